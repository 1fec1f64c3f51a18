"""The modular Screener: descriptor -> condition -> density -> voxel-wise anomaly map (pure torch).

Used as the density stage's feature extractor (frozen nets), as the distillation teacher and for modular inference.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnscreener.density.conditions import median_aggregated_conditions, sincos_condition_map
from nnscreener.density.pooling import add_noise, pool_and_noise

CONDITION_KINDS = ('learned', 'none', 'sincos')
DESCRIPTOR_INPUTS = ('clahe', 'stock')  # Screener's descriptors read CLAHE; the intensity baseline reads the HU input


class ModularScreener(nn.Module):
    def __init__(self, descriptor: nn.Module, density: nn.Module, condition_kind: str = 'learned',
                 condition: Optional[nn.Module] = None, condition_dim: int = 0,
                 pool_stride: Sequence[int] = (2, 3, 3), descriptor_input: str = 'clahe', condition_median: int = 1):
        super().__init__()
        if condition_kind not in CONDITION_KINDS or descriptor_input not in DESCRIPTOR_INPUTS:
            raise ValueError(f'condition kind {condition_kind!r} not in {CONDITION_KINDS} or descriptor input '
                             f'{descriptor_input!r} not in {DESCRIPTOR_INPUTS}')
        self.descriptor, self.condition, self.density = descriptor, condition, density
        self.condition_kind, self.condition_dim = condition_kind, condition_dim
        self.pool_stride, self.descriptor_input = tuple(pool_stride), descriptor_input
        self.condition_median = condition_median  # window of median_aggregated_conditions; 1 = the paper's c

    def select_input(self, stock: torch.Tensor, clahe: torch.Tensor) -> torch.Tensor:
        """The input channel the descriptor reads; everything downstream calls the model on it."""
        return clahe if self.descriptor_input == 'clahe' else stock

    def features(self, clahe: torch.Tensor, crop_start: Optional[torch.Tensor] = None, noise_sd: float = 0.0):
        """Pooled descriptors y and conditions c (or None) of CLAHE crops (B, 1, *patch) (of `select_input`).

        crop_start (B, 3): voxel position of each crop in the whole volume, needed by sin-cos conditions only.
        Learned conditions are median-aggregated (`condition_median`) before the noise is added.
        """
        y = pool_and_noise(self.descriptor(clahe), self.pool_stride, noise_sd)
        if self.condition_kind == 'learned':
            c = median_aggregated_conditions(pool_and_noise(self.condition(clahe), self.pool_stride, 0),
                                             self.condition_median)
            return y, add_noise(c, noise_sd)
        if self.condition_kind == 'sincos':
            if crop_start is None:
                raise ValueError('sin-cos conditions need the crop positions (crop_start)')
            c = torch.stack([sincos_condition_map(tuple(s.tolist()), clahe.shape[2:], self.condition_dim,
                                                  self.pool_stride, device=clahe.device) for s in crop_start])
            return y, c.to(y.dtype)
        return y, None

    def forward(self, clahe: torch.Tensor, crop_start: Optional[torch.Tensor] = None,
                upsample: bool = False) -> torch.Tensor:
        """Anomaly map -log q(y | c) (B, 1, z', y', x') at the pooled resolution, or at the patch's if `upsample`."""
        y, c = self.features(clahe, crop_start)
        score = self.density.nll(y, c).unsqueeze(1)
        if upsample:
            score = F.interpolate(score, size=clahe.shape[2:], mode='trilinear', align_corners=False)
        return score
