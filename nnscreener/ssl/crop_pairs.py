"""Positive pairs of Screener's dense SSL: two overlapping, randomly sized crops of one CT and matching voxel positions.

Coordinate convention (used by every function here)
---------------------------------------------------
*Source coordinates* are continuous voxel-index coordinates of the preprocessed volume (C, z, y, x): the centre of
voxel (i, j, k) is the point (i, j, k); the volume occupies [-0.5, shape - 0.5] on each axis.

A `CropBox` (start, size) resized to `patch_size` voxels is the view whose voxel j (per axis) has its centre at the
source coordinate

    source = start + j * step,    step = size / patch_size    (source voxels per view voxel),

so `start` is the source coordinate of the centre of the view's FIRST voxel and `size` is the crop's extent in
source voxels (the view's voxels tile [start - step / 2, start - step / 2 + size]). A step > 1 zooms out (a
coarser view), < 1 zooms in: drawing the size at random realises the paper's "random crop size" and "random
spacing" at once. *View coordinates* are continuous voxel-index coordinates of the resized view, j above, which
are also the coordinates of a full-resolution feature map computed from the view (nnU-Net's UNet output).

Everything here is numpy in / numpy out (data-loader workers) except `sample_features` (torch, in the trainer).
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import affine_transform

from nnscreener.utilities.tensors import at_least_float32

# Per-axis crop scale (crop extent / patch size), drawn independently per axis and per crop. Screener's code
# (vox2vec, pretrain_screener) draws the crop spacing uniformly in [1.0, 1.0, 1.5] .. [2.0, 2.0, 3.0] mm (x, y, z)
# from data at 1.5 x 1.5 x 2.25 mm, i.e. a scale of 2/3 .. 4/3 on every axis.
DEFAULT_SCALE_RANGE = (2 / 3, 4 / 3)
# Minimum overlap of the two crops on each axis, as a fraction of the smaller crop's extent.
DEFAULT_MIN_OVERLAP = 0.25
# Candidates drawn per wanted position when rejection-sampling positions inside the body mask.
BODY_OVERSAMPLING = 4


@dataclass(frozen=True)
class CropBox:
    """An axis-aligned crop of a volume, in source voxel coordinates (see the module docstring).

    start: (3,) source coordinate (z, y, x) of the centre of the view's first voxel.
    size: (3,) extent of the crop in source voxels (z, y, x).
    """
    start: np.ndarray
    size: np.ndarray

    def step(self, patch_size) -> np.ndarray:
        """Source voxels per view voxel, (3,)."""
        return np.asarray(self.size, dtype=np.float64) / np.asarray(patch_size, dtype=np.float64)

    def centre_range(self, patch_size) -> tuple[np.ndarray, np.ndarray]:
        """Source coordinates of the first and last view voxel centres: the region a view can be sampled in
        without extrapolating beyond its outermost voxels."""
        start = np.asarray(self.start, dtype=np.float64)
        return start, start + (np.asarray(patch_size) - 1) * self.step(patch_size)


def _place_interval(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Uniform draw in [lo, hi] (lo == hi allowed)."""
    return lo if hi <= lo else rng.uniform(lo, hi)


def sample_crop_pair(volume_shape, patch_size, rng: np.random.Generator, scale_range=DEFAULT_SCALE_RANGE,
                     min_overlap: float = DEFAULT_MIN_OVERLAP) -> tuple[CropBox, CropBox]:
    """Draws two overlapping crops of random size of a volume of spatial shape `volume_shape` (z, y, x).

    Each crop's extent is patch_size * scale with scale ~ U(scale_range) per axis, capped at the volume's extent
    (as in Screener's code) unless that is below the range's lower end. Crop 1 lies inside the volume where it fits
    (else it covers the whole axis, centred at random). Crop 2 overlaps the in-volume part of crop 1 by at least
    `min_overlap` x the smaller extent on every axis and also lies inside the volume where it fits. Crops that
    extend beyond the volume are padded by `extract_crop`; the overlap always intersects the volume.
    """
    shape = np.asarray(volume_shape, dtype=np.float64)
    patch = np.asarray(patch_size, dtype=np.float64)
    scale_lo, scale_hi = scale_range
    if not 0 < scale_lo <= scale_hi:
        raise ValueError(f'scale_range must satisfy 0 < low <= high, got {scale_range}')
    if not 0 < min_overlap <= 1:
        raise ValueError(f'min_overlap must be in (0, 1], got {min_overlap}')
    scale_cap = np.clip(shape / patch, scale_lo, scale_hi)
    size1 = patch * rng.uniform(scale_lo, scale_cap)
    size2 = patch * rng.uniform(scale_lo, scale_cap)

    # work with the crops' lower edges; the volume spans [-0.5, shape - 0.5]
    edge1, edge2 = np.empty(3), np.empty(3)
    for ax in range(3):
        v_lo, v_hi = -0.5, shape[ax] - 0.5
        edge1[ax] = _place_interval(rng, min(v_lo, v_hi - size1[ax]), max(v_lo, v_hi - size1[ax]))
        # the part of crop 1 inside the volume, which crop 2 must overlap by `need`
        a_lo, a_hi = max(edge1[ax], v_lo), min(edge1[ax] + size1[ax], v_hi)
        need = min(min_overlap * min(size1[ax], size2[ax]), a_hi - a_lo, size2[ax])
        lo, hi = a_lo - size2[ax] + need, a_hi - need
        if size2[ax] <= shape[ax]:
            # keep crop 2 inside the volume too; this interval always intersects [lo, hi] (crop 1's part is in it)
            lo, hi = max(lo, v_lo), min(hi, v_hi - size2[ax])
        edge2[ax] = _place_interval(rng, lo, hi)
    box1 = CropBox(start=edge1 + size1 / patch / 2, size=size1)
    box2 = CropBox(start=edge2 + size2 / patch / 2, size=size2)
    return box1, box2


def extract_crop(volume: np.ndarray, box: CropBox, patch_size, pad_value: float = 0.0) -> np.ndarray:
    """Resamples `box` of `volume` (C, z, y, x) to a view (C, *patch_size) by trilinear interpolation.

    Outside the volume the image continues with `pad_value` (0 = -1000 HU after Screener's normalisation) and is
    interpolated into it across the border half-voxel (scipy's 'grid-constant' mode). The axis-aligned
    scale + shift is separable, so scipy's diagonal `affine_transform` path is one cheap call per channel.
    """
    if volume.ndim != 4:
        raise ValueError(f'volume must be (C, z, y, x), got shape {volume.shape}')
    out_dtype = np.result_type(volume.dtype, np.float32)
    step, start = box.step(patch_size), np.asarray(box.start, dtype=np.float64)
    view = np.empty((volume.shape[0], *patch_size), dtype=out_dtype)
    for c in range(volume.shape[0]):
        affine_transform(volume[c], step, offset=start, output_shape=tuple(patch_size), output=view[c],
                         order=1, mode='grid-constant', cval=pad_value, prefilter=False)
    return view


def overlap_range(box1: CropBox, box2: CropBox, patch_size, volume_shape) -> tuple[np.ndarray, np.ndarray]:
    """Source region (lo, hi), each (3,), covered by the voxel centres of both views and of the volume: positions
    in it can be sampled in both views and in the volume without extrapolation. Raises if it is empty."""
    (s1, e1), (s2, e2) = box1.centre_range(patch_size), box2.centre_range(patch_size)
    lo = np.maximum.reduce([s1, s2, np.zeros(3)])
    hi = np.minimum.reduce([e1, e2, np.asarray(volume_shape, dtype=np.float64) - 1])
    if np.any(hi < lo):
        raise ValueError(f'the crops do not overlap inside the volume: overlap {lo} .. {hi}')
    return lo, hi


def sample_overlap_positions(box1: CropBox, box2: CropBox, patch_size, volume_shape, n: int,
                             rng: np.random.Generator, body: np.ndarray = None) -> np.ndarray:
    """n source positions (n, 3) float64, uniform in the crops' overlap (see `overlap_range`).

    With a boolean `body` mask (z, y, x) the positions are uniform in the overlap's part inside the body (lungs and
    bowel gas included: the paper samples "n positions from the overlapping region", the authors' code inside the
    flood-filled body): candidates are rejection-sampled (voxel of a candidate = nearest voxel centre); if fewer than
    n land inside, the rest are filled with positions elsewhere in the overlap (a fixed n keeps batches rectangular).
    """
    lo, hi = overlap_range(box1, box2, patch_size, volume_shape)
    if body is None:
        return rng.uniform(lo, hi, size=(n, 3))
    if body.shape != tuple(volume_shape):
        raise ValueError(f'body mask shape {body.shape} != volume shape {tuple(volume_shape)}')
    candidates = rng.uniform(lo, hi, size=(BODY_OVERSAMPLING * n, 3))
    voxels = np.rint(candidates).astype(np.intp)  # inside the volume: the overlap is within [0, shape - 1]
    inside = body[voxels[:, 0], voxels[:, 1], voxels[:, 2]]
    # stable order: body candidates first (still uniform among themselves), then the others as filling
    order = np.argsort(~inside, kind='stable')[:n]
    return candidates[order]


def to_view_coords(source_positions: np.ndarray, box: CropBox, patch_size) -> np.ndarray:
    """Source positions (..., 3) -> continuous voxel coordinates (..., 3) in the view of `box` (and in its
    full-resolution feature map)."""
    return (np.asarray(source_positions, dtype=np.float64) - np.asarray(box.start)) / box.step(patch_size)


def sample_features(features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of feature maps (B, C, z, y, x) at view voxel coordinates (B, n, 3) (z, y, x) -> (B, n, C).

    grid_sample with align_corners=True maps -1 / +1 to the first / last voxel centre, which is exactly the voxel
    index convention of `extract_crop` / `to_view_coords`. Sampling runs in float32 (returned as float32):
    normalised fp16/bf16 grid coordinates would be off by up to ~0.2 voxels.
    """
    if features.ndim != 5 or coords.ndim != 3 or coords.shape[-1] != 3 or coords.shape[0] != features.shape[0]:
        raise ValueError(f'expected features (B, C, z, y, x) and coords (B, n, 3), got {tuple(features.shape)} '
                         f'and {tuple(coords.shape)}')
    features = at_least_float32(features)
    spatial = torch.tensor(features.shape[2:], dtype=features.dtype, device=features.device)
    normalised = 2 * coords.to(features.dtype) / (spatial - 1).clamp_min(1) - 1
    # grid_sample's last grid dim is (x, y, z), i.e. reversed (z, y, x)
    grid = normalised.flip(-1)[:, :, None, None, :]  # (B, n, 1, 1, 3)
    sampled = F.grid_sample(features, grid, mode='bilinear', padding_mode='border', align_corners=True)
    return sampled[:, :, :, 0, 0].transpose(1, 2)  # (B, C, n, 1, 1) -> (B, n, C)


def sample_positive_pairs(volume: np.ndarray, patch_size, n: int, rng: np.random.Generator,
                          body: np.ndarray = None, scale_range=DEFAULT_SCALE_RANGE,
                          min_overlap: float = DEFAULT_MIN_OVERLAP, pad_value: float = 0.0):
    """One training example of the dense SSL from a preprocessed volume (C, z, y, x).

    Returns (view1, view2, coords1, coords2): the two views (C, *patch_size) (not colour-augmented; that runs
    batched on the GPU) and float32 view coordinates (n, 3) of the same n source positions in each view, so that
    features of view k sampled at coords k (`sample_features`) form n positive pairs.
    """
    patch_size = tuple(int(p) for p in patch_size)
    box1, box2 = sample_crop_pair(volume.shape[1:], patch_size, rng, scale_range, min_overlap)
    positions = sample_overlap_positions(box1, box2, patch_size, volume.shape[1:], n, rng, body)
    view1 = extract_crop(volume, box1, patch_size, pad_value)
    view2 = extract_crop(volume, box2, patch_size, pad_value)
    coords1 = to_view_coords(positions, box1, patch_size).astype(np.float32)
    coords2 = to_view_coords(positions, box2, patch_size).astype(np.float32)
    return view1, view2, coords1, coords2
