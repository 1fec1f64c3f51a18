"""batchgenerators data loaders over the Screener cache, run in nnU-Net's multi-process augmenter.

Crops are cut from memory-mapped float16 volumes; only the region under a crop is read and converted, so the cost
per example does not grow with the CT's size. Colour augmentation and masking run batched on the GPU instead.
"""
from typing import Sequence

import numpy as np
from batchgenerators.dataloading.data_loader import SlimDataLoaderBase
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnscreener.preprocessing.screener_cache import ScreenerCache
from nnscreener.ssl.crop_pairs import (CropBox, extract_crop, sample_crop_pair, sample_overlap_positions,
                                       to_view_coords)
from nnscreener.utilities.cache_channels import BODY, CLAHE


class _CacheLoader(SlimDataLoaderBase):
    """Infinite random batches. Batch i, counted from `first_batch` over all workers in the order the augmenter
    returns them (round robin), is drawn with a generator of its own seeded by (seed, i): a training step's data
    depend neither on the number of workers nor on where a run was resumed, so a killed stage continued with --c
    trains on the batches the uninterrupted run would have seen."""

    def __init__(self, cache: ScreenerCache, batch_size: int, patch_size: Sequence[int], seed: int,
                 first_batch: int = 0):
        super().__init__(cache.pretraining_keys, batch_size, 1)
        self.cache, self.patch_size, self.seed = cache, tuple(int(p) for p in patch_size), seed
        self.first_batch, self._batches_drawn = first_batch, 0

    def _batch_rng(self) -> np.random.Generator:
        """The generator of this worker's next batch (a worker is a forked copy, counting its own batches)."""
        index = self.first_batch + self.thread_id + self._batches_drawn * self.number_of_threads_in_multithreaded
        self._batches_drawn += 1
        return np.random.default_rng([self.seed, index])

    def _random_volume(self, rng: np.random.Generator):
        return self.cache.load(self._data[rng.integers(len(self._data))])


def read_region(volume: np.ndarray, boxes: Sequence[CropBox], patch_size) -> tuple:
    """float32 copy of the part of `volume` (C, z, y, x) under `boxes`, and the boxes moved into that copy."""
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    for box in boxes:
        first, last = box.centre_range(patch_size)
        lo, hi = np.minimum(lo, first), np.maximum(hi, last)
    lo = np.clip(np.floor(lo).astype(int) - 1, 0, volume.shape[1:])
    hi = np.clip(np.ceil(hi).astype(int) + 2, lo + 1, volume.shape[1:])
    region = np.asarray(volume[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
    return region, [CropBox(start=np.asarray(b.start) - lo, size=b.size) for b in boxes]


class CropPairLoader(_CacheLoader):
    """Dense SSL examples: two overlapping crops of one CLAHE volume and n positive-pair coordinates in each."""

    def __init__(self, cache, batch_size, patch_size, pairs_per_image: int, seed: int, first_batch: int = 0):
        super().__init__(cache, batch_size, patch_size, seed, first_batch)
        self.pairs_per_image = pairs_per_image

    def generate_train_batch(self) -> dict:
        rng = self._batch_rng()
        views, coords = [[], []], [[], []]
        for _ in range(self.batch_size):
            volume = self._random_volume(rng)
            boxes = sample_crop_pair(volume.shape[1:], self.patch_size, rng)
            region, boxes = read_region(volume, boxes, self.patch_size)
            positions = sample_overlap_positions(*boxes, self.patch_size, region.shape[1:], self.pairs_per_image,
                                                 rng, body=region[BODY] > 0.5)
            for k, box in enumerate(boxes):
                views[k].append(extract_crop(region[CLAHE:CLAHE + 1], box, self.patch_size))
                coords[k].append(to_view_coords(positions, box, self.patch_size).astype(np.float32))
        return {'view1': np.stack(views[0]), 'view2': np.stack(views[1]),
                'coords1': np.stack(coords[0]), 'coords2': np.stack(coords[1])}


class RandomCropLoader(_CacheLoader):
    """Patch-size crops (stock input, CLAHE, body mask) at random positions, centres inside the body where possible."""

    def generate_train_batch(self) -> dict:
        rng = self._batch_rng()
        crops, starts = [], []
        for _ in range(self.batch_size):
            volume = self._random_volume(rng)
            start = self._random_start(volume, rng)
            box = CropBox(start=start.astype(float), size=np.array(self.patch_size, dtype=float))
            region, (box,) = read_region(volume, [box], self.patch_size)
            crops.append(extract_crop(region, box, self.patch_size))
            starts.append(start)
        return {'data': np.stack(crops), 'crop_start': np.stack(starts)}

    def _random_start(self, volume, rng) -> np.ndarray:
        shape, patch = np.array(volume.shape[1:]), np.array(self.patch_size)
        high = np.maximum(shape - patch, 0)
        for _ in range(10):  # prefer crops centred on the body: air-only crops teach the density model little
            start = np.array([rng.integers(h + 1) for h in high])
            centre = tuple(np.minimum(start + patch // 2, shape - 1))
            if volume[(BODY, *centre)] > 0.5:
                break
        return start


def multiprocess_loader(loader: _CacheLoader, pin_memory: bool):
    """Workers per nnUNet_n_proc_DA as in nnU-Net, single-threaded when it is 0. Unlike nnU-Net's training loaders
    this is the ordered augmenter (batches in round-robin worker order), which the per-batch seeds need."""
    n_proc = get_allowed_n_proc_DA()
    if n_proc == 0:
        return SingleThreadedAugmenter(loader, None)
    loader.number_of_threads_in_multithreaded = n_proc
    return MultiThreadedAugmenter(loader, None, n_proc, num_cached_per_queue=2, seeds=None, pin_memory=pin_memory,
                                  wait_time=0.002)
