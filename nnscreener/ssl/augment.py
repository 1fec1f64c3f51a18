"""Colour jitter of Screener's dense SSL, batched on the GPU: every sample of a (B, 1, z, y, x) batch in [0, 1]
gets its own random parameters, with no per-voxel python loops.

Order, probabilities and ranges are those of Screener's code (vox2vec `ColorAugmentations` defaults):
blur or sharpen (p 0.8, either with prob. 1/2) -> Gaussian noise (p 0.8) -> brightness (p 0.8) -> contrast (p 0.8)
-> gamma (p 0.8). Brightness, contrast and gamma clip to [0, 1] as there. CLAHE in preprocessing is what keeps
pathology contrast alive under this jitter (paper, appendix).
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ColourJitterConfig:
    """Probabilities (per sample) and uniform ranges of the colour jitter.

    Sigmas are in view voxels and act in the axial plane (y, x) only, like Screener's in-plane blur; its
    sigma range 0 .. 1.5 mm is 0 .. 1 voxel at the 1.5 mm in-plane spacing.
    Brightness is multiplicative (as in Screener's code and torchvision); contrast scales around the sample mean.
    """
    blur_or_sharpen_p: float = 0.8
    blur_sigma_range: tuple = (0.0, 1.0)
    sharpen_sigma_range: tuple = (0.0, 1.0)
    sharpen_alpha_range: tuple = (0.0, 2.0)
    noise_p: float = 0.8
    noise_sigma_range: tuple = (0.0, 0.1)
    brightness_p: float = 0.8
    brightness_range: tuple = (0.8, 1.2)
    contrast_p: float = 0.8
    contrast_range: tuple = (0.8, 1.2)
    gamma_p: float = 0.8
    gamma_range: tuple = (0.8, 1.25)

    def scaled(self, scale: float) -> 'ColourJitterConfig':
        """The same jitter with every range shrunk towards the identity by `scale` (1: these ranges, 0: none);
        gamma geometrically, so 0.8 .. 1.25 stays symmetric about 1. The probabilities stay."""
        def towards(value_range, identity):
            return tuple(identity + scale * (v - identity) for v in value_range)
        return replace(
            self, blur_sigma_range=towards(self.blur_sigma_range, 0.0),
            sharpen_sigma_range=towards(self.sharpen_sigma_range, 0.0),
            sharpen_alpha_range=towards(self.sharpen_alpha_range, 0.0),
            noise_sigma_range=towards(self.noise_sigma_range, 0.0),
            brightness_range=towards(self.brightness_range, 1.0), contrast_range=towards(self.contrast_range, 1.0),
            gamma_range=tuple(g ** scale for g in self.gamma_range))


def _uniform(batch: int, value_range, like: torch.Tensor, generator) -> torch.Tensor:
    """(B, 1, 1, 1, 1) uniform draws in value_range, with like's device and dtype."""
    lo, hi = value_range
    u = torch.rand(batch, generator=generator, device=like.device)
    return (lo + (hi - lo) * u).view(batch, 1, 1, 1, 1).to(like.dtype)


def _coin(batch: int, p: float, like: torch.Tensor, generator) -> torch.Tensor:
    """(B, 1, 1, 1, 1) bool: True with probability p, per sample."""
    return (torch.rand(batch, generator=generator, device=like.device) < p).view(batch, 1, 1, 1, 1)


def gaussian_blur_yx(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, z, y, x) along y and x with a per-sample sigma (B,) in voxels.

    One grouped conv per axis (groups = B) applies B different kernels at once; the kernel support is fixed by
    max_sigma (radius ceil(3 max_sigma)). sigma 0 is the identity. Replicate padding keeps borders unbiased.
    """
    radius = max(1, math.ceil(3 * max_sigma))
    b = x.shape[0]
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    s = sigma.float().clamp_min(1e-3).view(b, 1)  # sigma -> 0 gives a delta kernel
    kernels = torch.exp(-0.5 * (offsets / s) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).to(x.dtype)  # (B, K)
    out = x.transpose(0, 1)  # (1, B, z, y, x): samples become channels of one grouped conv
    out = F.conv3d(F.pad(out, (0, 0, radius, radius, 0, 0), mode='replicate'), kernels.view(b, 1, 1, -1, 1), groups=b)
    out = F.conv3d(F.pad(out, (radius, radius, 0, 0, 0, 0), mode='replicate'), kernels.view(b, 1, 1, 1, -1), groups=b)
    return out.transpose(0, 1)


class ColourJitter(nn.Module):
    """Random colour augmentation of a batch of views (B, 1, z, y, x) in [0, 1], independently per sample.

    No parameters; `generator` (a torch.Generator on the batch's device) makes it reproducible. Call it once per
    view batch, so the two views of a pair get independent jitter.
    """

    def __init__(self, config: ColourJitterConfig = ColourJitterConfig()):
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor, generator: torch.Generator = None) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f'ColourJitter expects (B, 1, z, y, x), got {tuple(x.shape)}')
        cfg, b = self.config, x.shape[0]
        x = self._blur_or_sharpen(x, generator)

        noisy = x + _uniform(b, cfg.noise_sigma_range, x, generator) * torch.randn(
            x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = torch.where(_coin(b, cfg.noise_p, x, generator), noisy, x)

        brighter = (x * _uniform(b, cfg.brightness_range, x, generator)).clamp(0, 1)
        x = torch.where(_coin(b, cfg.brightness_p, x, generator), brighter, x)

        mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
        contrasted = ((x - mean) * _uniform(b, cfg.contrast_range, x, generator) + mean).clamp(0, 1)
        x = torch.where(_coin(b, cfg.contrast_p, x, generator), contrasted, x)

        gamma = x.clamp(0, 1) ** _uniform(b, cfg.gamma_range, x, generator)
        return torch.where(_coin(b, cfg.gamma_p, x, generator), gamma, x)

    def _blur_or_sharpen(self, x: torch.Tensor, generator) -> torch.Tensor:
        """x + w (blur(x) - x): w = 1 blurs, w = -alpha is the unsharp mask x + alpha (x - blur(x)), w = 0 skips.
        One blur pass serves both, with each sample's own sigma."""
        cfg, b = self.config, x.shape[0]
        apply = _coin(b, cfg.blur_or_sharpen_p, x, generator)
        sharpen = _coin(b, 0.5, x, generator)
        blur_sigma = _uniform(b, cfg.blur_sigma_range, x, generator)
        sharpen_sigma = _uniform(b, cfg.sharpen_sigma_range, x, generator)
        alpha = _uniform(b, cfg.sharpen_alpha_range, x, generator)
        sigma = torch.where(sharpen, sharpen_sigma, blur_sigma).view(b)
        weight = torch.where(sharpen, -alpha, torch.ones_like(alpha)) * apply
        max_sigma = max(cfg.blur_sigma_range[1], cfg.sharpen_sigma_range[1])
        return x + weight * (gaussian_blur_yx(x, sigma, max_sigma) - x)
