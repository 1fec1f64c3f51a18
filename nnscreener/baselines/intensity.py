"""Intensity-only baseline: q(HU | position), a density of each voxel's own (pooled) HU value given where it is.

The "descriptor" is the stock nnU-Net input (HU clipped to [-1000, 300], rescaled to [0, 1]); the conditions are
sin-cos encodings of the position. The density is a histogram whose bin probabilities depend on the position: HU
values are multi-modal at most positions (lung, soft tissue, bone, air across patients), and a Gaussian there
would put its mode between the modes and call e.g. -500 HU in muscle the most normal value of all.

It takes the density stage's place and budget (nnScreenerIntensityTrainer: steps, batch, lr, crops of the pretraining
cache) and is served by `nnScreener_predict --model intensity`.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnscreener.density.base import conv_mlp
from nnscreener.density.conditions import sincos_conditions_of_crops
from nnscreener.density.modular_screener import DensityAnomalyModel
from nnscreener.density.pooling import pool_and_noise

INTENSITY_DIM = 1
HISTOGRAM_BINS = 64  # 20 HU per bin over the [-1000, 300] HU range
# Screener's noise sd 0.1 is relative to descriptors of unit scale; on [0, 1] intensities (1300 HU) it would blur
# 130 HU, more than most lesions differ by. 0.01 (13 HU, the phantoms' noise level) just dequantises the histogram.
INTENSITY_NOISE_SD = 0.01


class IntensityBaseline(DensityAnomalyModel):
    """q(pooled HU | sin-cos position of the pooled voxel in the whole volume) on the stock input."""
    reads_clahe = False

    def __init__(self, condition_dim: int, pool_stride: Sequence[int] = (2, 3, 3)):
        super().__init__()
        self.condition_dim, self.pool_stride = condition_dim, tuple(pool_stride)
        self.density = ConditionalHistogramDensity(condition_dim)

    def features(self, stock: torch.Tensor, crop_start: Optional[torch.Tensor] = None, noise_sd: float = 0.0):
        """Pooled intensities y (B, 1, z', y', x') and their sin-cos positions c; crop_start (B, 3) as in the
        modular Screener."""
        y = pool_and_noise(stock, self.pool_stride, noise_sd)
        c = sincos_conditions_of_crops(crop_start, stock.shape[2:], self.condition_dim, self.pool_stride,
                                       stock.device)
        return y, c.to(y.dtype)


class ConditionalHistogramDensity(nn.Module):
    """q(y | c) of one channel y in [0, 1]: piecewise constant on `n_bins` equal bins, the bin probabilities a
    softmax of a conv MLP of the conditions (3x3x3, like the conditional Gaussian's nets).

    -log q(y | c) = -log p_bin(y)(c) - log n_bins (a bin of probability p has density p * n_bins); values outside
    [0, 1] (noise) fall into the edge bins.
    """
    conditional = True
    d_y = INTENSITY_DIM

    def __init__(self, d_c: int, n_bins: int = HISTOGRAM_BINS, hidden_channels: int = 128, hidden_layers: int = 1,
                 kernel_size: int = 3):
        super().__init__()
        self.d_c, self.n_bins = d_c, n_bins
        self.logit_net = conv_mlp(d_c, n_bins, hidden_channels, hidden_layers, kernel_size)

    def _bins(self, y: torch.Tensor) -> torch.Tensor:
        if y.ndim != 5 or y.shape[1] != 1:
            raise ValueError(f'expected intensity maps (B, 1, z, y, x), got {tuple(y.shape)}')
        return (y.float() * self.n_bins).long().clamp(0, self.n_bins - 1)

    def nll(self, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Voxel-wise -log q(y | c) in nats, (B, z, y, x)."""
        log_p = F.log_softmax(self.logit_net(c).float(), 1)
        return -log_p.gather(1, self._bins(y))[:, 0] - math.log(self.n_bins)

    @torch.no_grad()
    def initialize_from_data(self, y: torch.Tensor, c: torch.Tensor = None) -> None:
        """Starts every position at the batch's marginal histogram (add-one smoothed)."""
        counts = torch.bincount(self._bins(y).flatten(), minlength=self.n_bins).float() + 1
        self.logit_net[-1].weight.zero_()
        self.logit_net[-1].bias[:] = (counts / counts.sum()).log()
