"""Sliding-window anomaly map of a whole preprocessed CT (the paper's inference; documentation/method.md).

The CT is split into overlapping patches (nnU-Net's step computation), each patch map is upsampled to the patch
(trilinear) and overlaps are averaged with a *plain mean*, as in the paper. nnU-Net weights overlaps with a Gaussian
because segmentation logits are worse near patch borders; Screener's map is a density of local descriptors that is
meant to be equally valid everywhere in the patch, and the paper averages, so we do too.

Memory: only a batch of patches is ever on the accelerator, plus the volumes and the sum accumulator when they are
small enough (`MAX_DEVICE_VOXELS`); larger volumes stay on the CPU and patches travel in batches. The overlap count
is not a volume at all: patch positions form a grid, so the count is the outer product of per-axis counts.
"""
from itertools import product
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

# Volumes (after padding) up to this many voxels live on the model device: 3 float32 volumes (stock, CLAHE, sum) of
# 48M voxels are 0.6 GB. A 512 x 512 x 1000 CT at 0.7 x 0.7 x 1 mm is 25M voxels at the Screener spacing.
MAX_DEVICE_VOXELS = 48 * 2 ** 20


def sliding_window_anomaly_map(stock: Union[np.ndarray, torch.Tensor], clahe: Union[np.ndarray, torch.Tensor], model,
                               step_size: float = 0.5, batch_size: int = 4, use_bf16: Optional[bool] = None,
                               volume_on_device: Optional[bool] = None) -> np.ndarray:
    """Anomaly map (z, y, x) float32 of a preprocessed volume, same shape as `stock`.

    stock, clahe: (z, y, x) in [0, 1] (stock nnU-Net input and its CLAHE). model: a `PatchAnomalyModel`, called as
    is (put it in eval mode first). use_bf16: autocast to bfloat16; None = on CUDA only. volume_on_device: keep the
    volumes and the accumulator on the model device; None = when they have at most MAX_DEVICE_VOXELS voxels.
    """
    maps = sliding_window_anomaly_maps(stock, clahe, model, step_size, batch_size, use_bf16, volume_on_device)
    if len(maps) != 1:
        raise ValueError(f'the anomaly model returned {len(maps)} maps per patch, (B, 1, z, y, x) expected: use '
                         f'sliding_window_anomaly_maps')
    return maps[0]


def sliding_window_anomaly_maps(stock: Union[np.ndarray, torch.Tensor], clahe: Union[np.ndarray, torch.Tensor],
                                model, step_size: float = 0.5, batch_size: int = 4, use_bf16: Optional[bool] = None,
                                volume_on_device: Optional[bool] = None) -> np.ndarray:
    """`sliding_window_anomaly_map` of a model returning C maps per patch (B, C, z', y', x'), e.g. one per density
    variant on shared descriptors: (C, z, y, x) float32."""
    patch_size = tuple(int(p) for p in model.patch_size)
    stock, clahe = (torch.as_tensor(np.asarray(v, dtype=np.float32) if isinstance(v, np.ndarray) else v).float()
                    for v in (stock, clahe))
    if stock.ndim != 3 or stock.shape != clahe.shape:
        raise ValueError(f'stock and clahe must be (z, y, x) volumes of one shape, got {tuple(stock.shape)} and '
                         f'{tuple(clahe.shape)}')
    # zero = -1000 HU (air) after CTNormalization: small volumes are padded with air, as nnU-Net does
    stock, slicer = pad_nd_image(stock, patch_size, 'constant', {'value': 0}, True)
    padding_before = torch.tensor([s.start for s in slicer])
    clahe = pad_nd_image(clahe, patch_size, 'constant', {'value': 0})
    shape = tuple(stock.shape)

    device = torch.device(model.device)
    if volume_on_device is None:
        volume_on_device = np.prod(shape) <= MAX_DEVICE_VOXELS
    accumulation_device = device if volume_on_device else torch.device('cpu')
    stock, clahe = stock.to(accumulation_device), clahe.to(accumulation_device)
    total = None  # (C, *shape), once the first batch says C

    steps = compute_steps_for_sliding_window(shape, patch_size, step_size)
    slicers = [tuple(slice(s, s + p) for s, p in zip(start, patch_size)) for start in product(*steps)]
    if use_bf16 is None:
        use_bf16 = device.type == 'cuda'
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        for first in range(0, len(slicers), batch_size):
            batch = slicers[first:first + batch_size]
            # patch positions in the unpadded volume, as the loaders' crop_start (sin-cos conditions read them)
            crop_start = torch.tensor([[s.start for s in patch] for patch in batch]) - padding_before
            maps = _patch_maps(model, torch.stack([stock[s] for s in batch])[:, None].to(device, non_blocking=True),
                               torch.stack([clahe[s] for s in batch])[:, None].to(device, non_blocking=True),
                               crop_start)
            maps = maps.to(accumulation_device)
            if total is None:
                total = torch.zeros((maps.shape[1], *shape), dtype=torch.float32, device=accumulation_device)
            for s, m in zip(batch, maps):
                total[(slice(None), *s)] += m
        for axis, count in enumerate(_overlap_counts(shape, patch_size, steps)):  # total is an inference tensor
            total /= count.to(accumulation_device).view([1] + [-1 if a == axis else 1 for a in range(3)])
    return total[(slice(None), *slicer)].cpu().numpy()


def _patch_maps(model, stock: torch.Tensor, clahe: torch.Tensor, crop_start: torch.Tensor) -> torch.Tensor:
    """(B, C, z, y, x) float32 maps at the patch size; the model may return them at a lower resolution."""
    maps = model(stock, clahe, crop_start)
    patch_size = tuple(stock.shape[2:])
    if maps.ndim != 5 or maps.shape[0] != stock.shape[0] or any(m > p for m, p in zip(maps.shape[2:], patch_size)):
        raise ValueError(f'the anomaly model must return (B, 1, z, y, x) maps (or (B, C, z, y, x): C maps per patch) '
                         f'no larger than the patch {patch_size}, got {tuple(maps.shape)} for a batch of '
                         f'{stock.shape[0]}')
    maps = maps.float()
    if tuple(maps.shape[2:]) != patch_size:
        maps = F.interpolate(maps, size=patch_size, mode='trilinear', align_corners=False)
    return maps


def _overlap_counts(shape: Sequence[int], patch_size: Sequence[int], steps: List[List[int]]) -> List[torch.Tensor]:
    """Per-axis patch counts; patches form a grid, so the number covering a voxel is their outer product."""
    counts = []
    for size, p, axis_steps in zip(shape, patch_size, steps):
        count = torch.zeros(size, dtype=torch.float32)
        for s in axis_steps:
            count[s:s + p] += 1
        counts.append(count)
    return counts

