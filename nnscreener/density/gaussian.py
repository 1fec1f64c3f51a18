"""Gaussian density models of Screener (paper, appendix "Density models", eqs. 6-7).

-log q(y | c) = 0.5 (y - mu(c))^T Sigma(c)^-1 (y - mu(c)) + 0.5 log det Sigma(c) + const, Sigma(c) diagonal.
Written as the affine bijection z = (y - mu) / sigma onto N(0, I) with log|det dz/dy| = -0.5 sum log sigma^2,
so `DensityModel.nll` gives exactly the formula above with const = d_y/2 log(2 pi).
"""
from abc import abstractmethod

import torch
from torch import nn

from nnscreener.density.base import DensityModel, conv_mlp
from nnscreener.utilities.tensors import at_least_float32


def _moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and log-variance of y (B, d, z, y, x) over batch and voxels (the diagonal Gaussian MLE)."""
    y = at_least_float32(y).transpose(0, 1).flatten(1)
    return y.mean(1), y.var(1, unbiased=False).clamp_min(1e-12).log()


class _DiagonalGaussian(DensityModel):
    """The affine bijection shared by both Gaussians; subclasses say where mu and log sigma^2 come from."""

    @abstractmethod
    def mean_and_log_var(self, c: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mu and log sigma^2, broadcastable to (B, d_y, z, y, x)."""

    def forward(self, y: torch.Tensor, c: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z = (y - mu) / sigma and log|det dz/dy| = -0.5 sum_i log sigma_i^2 per voxel."""
        self.check_inputs(y, c)
        mu, log_var = self.mean_and_log_var(c)
        z = (at_least_float32(y) - mu) * torch.exp(-0.5 * log_var)
        return z, (-0.5 * log_var.sum(1)).expand(y.shape[0], *y.shape[2:])

    def inverse(self, z: torch.Tensor, c: torch.Tensor = None) -> torch.Tensor:
        """y = mu + sigma z."""
        self.check_inputs(z, c)
        mu, log_var = self.mean_and_log_var(c)
        return mu + at_least_float32(z) * torch.exp(0.5 * log_var)


class GaussianDensity(_DiagonalGaussian):
    """Marginal Gaussian: learned mean mu and diagonal log-variance log sigma^2 (d_y each), shared by all voxels.

    Starts as N(0, I).
    """

    def __init__(self, d_y: int):
        super().__init__(d_y)
        self.mu = nn.Parameter(torch.zeros(d_y))
        self.log_var = nn.Parameter(torch.zeros(d_y))

    def mean_and_log_var(self, c: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mu and log sigma^2 as (1, d_y, 1, 1, 1)."""
        return self.mu.view(1, -1, 1, 1, 1), self.log_var.view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def initialize_from_data(self, y: torch.Tensor, c: torch.Tensor = None) -> None:
        """Sets mu and log sigma^2 to the batch's per-channel mean and log-variance (the maximum-likelihood fit)."""
        self.check_inputs(y, c)
        self.mu[:], self.log_var[:] = _moments(y)


class ConditionalGaussianDensity(_DiagonalGaussian):
    """Conditional Gaussian: mu(c) and log sigma^2(c) predicted from the condition maps by two small conv MLPs.

    The paper's MLP nets, run densely as convs; kernel_size 3 (the paper's choice in practice) conditions every
    voxel on its locally aggregated conditions, kernel_size 1 on its own condition only. Each net is
    `hidden_layers` conv+LeakyReLU blocks of width `hidden_channels` and an output conv. The output convs start at
    zero, so the model starts as N(0, I) for every c.
    """

    def __init__(self, d_y: int, d_c: int, hidden_channels: int = 128, hidden_layers: int = 1,
                 kernel_size: int = 3):
        super().__init__(d_y, d_c)
        self.mean_net = conv_mlp(d_c, d_y, hidden_channels, hidden_layers, kernel_size)
        self.log_var_net = conv_mlp(d_c, d_y, hidden_channels, hidden_layers, kernel_size)

    def mean_and_log_var(self, c: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mu(c) and log sigma^2(c), each (B, d_y, z, y, x), at least float32."""
        return at_least_float32(self.mean_net(c)), at_least_float32(self.log_var_net(c))

    @torch.no_grad()
    def initialize_from_data(self, y: torch.Tensor, c: torch.Tensor = None) -> None:
        """Zeros the nets' output weights and sets their biases to the batch's per-channel mean / log-variance.

        The model then is the marginal maximum-likelihood fit for every c; training learns the c-dependence.
        """
        self.check_inputs(y, c)
        mean, log_var = _moments(y)
        for net, bias in ((self.mean_net, mean), (self.log_var_net, log_var)):
            net[-1].weight.zero_()
            net[-1].bias[:] = bias
