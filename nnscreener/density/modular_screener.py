"""The modular Screener: descriptor -> condition -> density -> voxel-wise anomaly map (pure torch).

Used as the density stage's feature extractor (frozen nets), as the distillation teacher and for modular inference.
`DensityAnomalyModel` is what it shares with the intensity baseline (nnscreener/baselines/intensity.py): a map
-log q(y | c) of pooled features, trained by the density objective and served by `DensityPatchModel`.
"""
from abc import ABCMeta, abstractmethod
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnscreener.density.conditions import median_aggregated_conditions, sincos_conditions_of_crops
from nnscreener.density.pooling import add_noise, pool_and_noise

CONDITION_KINDS = ('learned', 'none', 'sincos')


class DensityAnomalyModel(nn.Module, metaclass=ABCMeta):
    """A voxel-wise density model on pooled features of one input channel; a subclass gives `features`, `density`
    and `pool_stride`."""
    reads_clahe = True  # the input channel the model reads: CLAHE, or the stock nnU-Net input

    def select_input(self, stock: torch.Tensor, clahe: torch.Tensor) -> torch.Tensor:
        """The input channel the model reads; the objectives and inference call the model on it."""
        return clahe if self.reads_clahe else stock

    @abstractmethod
    def features(self, x: torch.Tensor, crop_start: Optional[torch.Tensor] = None, noise_sd: float = 0.0):
        """Pooled features y and conditions c (or None) of input crops x (B, 1, *patch)."""

    def forward(self, x: torch.Tensor, crop_start: Optional[torch.Tensor] = None,
                upsample: bool = False) -> torch.Tensor:
        """Anomaly map -log q(y | c) (B, 1, z', y', x') at the pooled resolution, or at the patch's if `upsample`."""
        y, c = self.features(x, crop_start)
        score = self.density.nll(y, c).unsqueeze(1)
        if upsample:
            score = F.interpolate(score, size=x.shape[2:], mode='trilinear', align_corners=False)
        return score


class ModularScreener(DensityAnomalyModel):
    def __init__(self, descriptor: nn.Module, density: nn.Module, condition_kind: str = 'learned',
                 condition: Optional[nn.Module] = None, condition_dim: int = 0,
                 pool_stride: Sequence[int] = (2, 3, 3), condition_median: int = 1):
        super().__init__()
        if condition_kind not in CONDITION_KINDS:
            raise ValueError(f'condition kind {condition_kind!r} not in {CONDITION_KINDS}')
        self.descriptor, self.condition, self.density = descriptor, condition, density
        self.condition_kind, self.condition_dim = condition_kind, condition_dim
        self.pool_stride = tuple(pool_stride)
        self.condition_median = condition_median  # window of median_aggregated_conditions; 1 = the paper's c

    def features(self, clahe: torch.Tensor, crop_start: Optional[torch.Tensor] = None, noise_sd: float = 0.0):
        """Pooled descriptors y and conditions c (or None) of CLAHE crops (B, 1, *patch).

        crop_start (B, 3): voxel position of each crop in the whole volume, needed by sin-cos conditions only.
        Learned conditions are median-aggregated (`condition_median`) before the noise is added.
        """
        y = pool_and_noise(self.descriptor(clahe), self.pool_stride, noise_sd)
        if self.condition_kind == 'learned':
            c = median_aggregated_conditions(pool_and_noise(self.condition(clahe), self.pool_stride, 0),
                                             self.condition_median)
            return y, add_noise(c, noise_sd)
        if self.condition_kind == 'sincos':
            c = sincos_conditions_of_crops(crop_start, clahe.shape[2:], self.condition_dim, self.pool_stride,
                                           clahe.device)
            return y, c.to(y.dtype)
        return y, None


class DensityPatchModel:
    """A `DensityAnomalyModel` (the modular Screener, the intensity baseline) as inference's patch model
    (`PatchAnomalyModel`): its map of each patch from the input it reads, at the pooled resolution."""

    def __init__(self, screener: DensityAnomalyModel, patch_size, device: torch.device):
        self.screener, self.patch_size, self.device = screener.eval(), tuple(patch_size), device
        self.uses_clahe = screener.reads_clahe

    def __call__(self, stock: torch.Tensor, clahe: torch.Tensor, crop_start: torch.Tensor) -> torch.Tensor:
        return self.screener(self.screener.select_input(stock, clahe), crop_start)
