"""Training-time pre-processing of frozen feature maps for the density model (paper, implementation details).

Descriptor and condition maps are average-pooled with stride 3 x 3 x 2 (x, y, z), i.e. (2, 3, 3) in (z, y, x), so a
(64, 96, 96) crop gives 32^3 density-model voxels, and Gaussian noise of sd 0.1 is injected into both "to
stabilize the training" (it also bounds the density the model can fit to near-duplicate descriptors).
"""
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def pool_and_noise(features: torch.Tensor, stride: Sequence[int] = (2, 3, 3), noise_sd: float = 0.1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Average-pools (B, C, z, y, x) maps with kernel = stride, then adds N(0, noise_sd^2) noise.

    Use noise_sd=0.1 while training the density model and noise_sd=0 at inference (pooling only). The output has
    shape (B, C, z // sz, y // sy, x // sx) and keeps the input dtype; `generator` (on the features' device) makes
    the noise reproducible.
    """
    return add_noise(F.avg_pool3d(features, kernel_size=tuple(stride), stride=tuple(stride)), noise_sd, generator)


def add_noise(features: torch.Tensor, noise_sd: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """features + N(0, noise_sd^2) noise (the same tensor when noise_sd is 0), in the features' dtype."""
    if noise_sd == 0:
        return features
    noise = torch.randn(features.shape, generator=generator, device=features.device, dtype=features.dtype)
    return features + noise_sd * noise


def pooled_body(body: torch.Tensor, stride: Sequence[int] = (2, 3, 3)) -> torch.Tensor:
    """Body mask (B, 1, z, y, x) -> (B, z', y', x') bool on the pooled grid: cells that are mostly body."""
    return F.avg_pool3d(body.float(), kernel_size=tuple(stride), stride=tuple(stride))[:, 0] > 0.5


def body_mean(values: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
    """Mean of (B, ...) values over the voxels where `body` (same shape) is True; the plain mean where none is (a crop
    of table and air only would otherwise give 0 / 0)."""
    weights = body.to(values.dtype)
    total = weights.sum()
    return (values * weights).sum() / total if total > 0 else values.mean()
