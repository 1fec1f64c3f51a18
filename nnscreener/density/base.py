"""Common interface of Screener's voxel-wise density models and the small conv nets they share.

Every density model here is a per-voxel bijection y[p] <-> z[p] onto a standard normal base distribution
(a diagonal Gaussian is the one-layer affine case), so the anomaly score follows from the change of variables:
    -log q(y[p] | c[p]) = 0.5 ||z[p]||^2 + d_y/2 log(2 pi) - log|det dz[p]/dy[p]|.
"""
import math
from abc import ABCMeta, abstractmethod

import torch
from torch import nn

from nnscreener.utilities.tensors import at_least_float32

LOG_2PI = math.log(2 * math.pi)


def conv_mlp(in_channels: int, out_channels: int, hidden_channels: int, hidden_layers: int,
             kernel_size: int = 1) -> nn.Sequential:
    """A dense MLP over the channel dim: `hidden_layers` conv + LeakyReLU blocks, then an output conv.

    kernel_size 1 is the voxel-wise MLP; kernel_size k > 1 makes every conv k x k x k (the paper's "locally
    aggregated conditions"), receptive field 1 + (hidden_layers + 1)(k - 1). Replicate padding keeps the map size
    and avoids the fake all-zero neighbours zero padding would show at crop borders.
    The output conv starts at zero, so a model that adds this net's output starts as its c-independent part.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f'kernel_size must be odd and >= 1 to keep the map size, got {kernel_size}')
    pad = dict(padding=kernel_size // 2, padding_mode='replicate')
    layers, width = [], in_channels
    for _ in range(hidden_layers):
        layers += [nn.Conv3d(width, hidden_channels, kernel_size, **pad), nn.LeakyReLU(0.01, inplace=True)]
        width = hidden_channels
    layers.append(nn.Conv3d(width, out_channels, kernel_size, **pad))
    zero_output_layer_(layers[-1])
    return nn.Sequential(*layers)


def zero_output_layer_(conv: nn.Conv3d) -> None:
    """Zeros a conv's weight and bias in place (its output becomes 0 for every input)."""
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)


class DensityModel(nn.Module, metaclass=ABCMeta):
    """Voxel-wise density q(y[p] | c[p]) of descriptor maps y (B, d_y, z, y, x) given condition maps c.

    Subclasses implement the per-voxel bijection (`forward`, `inverse`) and `initialize_from_data`;
    `nll` is shared. `conditional` says whether c (B, d_c, z, y, x) is required (True) or must be None (False).
    """

    def __init__(self, d_y: int, d_c: int = 0):
        super().__init__()
        self.d_y = d_y
        self.d_c = d_c
        self.conditional = d_c > 0

    @abstractmethod
    def forward(self, y: torch.Tensor, c: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps y to base space: returns z (B, d_y, z, y, x) and log|det dz/dy| per voxel (B, z, y, x)."""

    @abstractmethod
    def inverse(self, z: torch.Tensor, c: torch.Tensor = None) -> torch.Tensor:
        """Maps base-space z back to descriptors y (B, d_y, z, y, x)."""

    @abstractmethod
    def initialize_from_data(self, y: torch.Tensor, c: torch.Tensor = None) -> None:
        """Data-dependent initialisation from one batch (call once, before training)."""

    def nll(self, y: torch.Tensor, c: torch.Tensor = None) -> torch.Tensor:
        """Voxel-wise -log q(y[p] | c[p]) in nats, (B, z, y, x), at least float32 (also under autocast).

        This is the anomaly score; the training loss is its mean.
        """
        z, logdet = self(y, c)
        z, logdet = at_least_float32(z), at_least_float32(logdet)
        return 0.5 * z.square().sum(1) + 0.5 * self.d_y * LOG_2PI - logdet

    def check_inputs(self, y: torch.Tensor, c: torch.Tensor = None) -> None:
        """Raises ValueError if y is not (B, d_y, z, y, x) or c does not fit the model / y."""
        if y.ndim != 5 or y.shape[1] != self.d_y:
            raise ValueError(f'expected descriptor maps (B, {self.d_y}, z, y, x), got {tuple(y.shape)}')
        if not self.conditional:
            if c is not None:
                raise ValueError('this density model is marginal: pass c=None (build a conditional one to use c)')
            return
        if c is None:
            raise ValueError('this density model is conditional: pass condition maps c (B, d_c, z, y, x)')
        if c.ndim != 5 or c.shape[1] != self.d_c or c.shape[0] != y.shape[0] or c.shape[2:] != y.shape[2:]:
            raise ValueError(f'condition maps must be (B, {self.d_c}) + spatial shape of y {tuple(y.shape[2:])}, '
                             f'got {tuple(c.shape)}')
