"""The Screener cache: preprocessed CT volumes for the Screener models, one float16 `.npy` per case.

Each file holds (2, z, y, x): channel 0 is the stock nnU-Net input (resampled, CTNormalization -> [0, 1]), channel 1
its CLAHE (see clahe.py for why CLAHE lives here). Volumes are cropped to the body (> -500 HU, the paper's "dense
foreground"), but never below one patch. Cases of every pretraining dataset are preprocessed with the *target*
dataset's plans, so all Screener models and the distilled UNet share one spacing, intensity scale and architecture.

Layout: $nnUNet_preprocessed/<target>/<data_identifier>_screener/{index.json, <source dataset>/<case>.npy}
"""
import multiprocessing
import os
from dataclasses import dataclass
from os.path import isfile, join
from typing import Dict, List, Sequence, Tuple

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json, maybe_mkdir_p
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from tqdm import tqdm

from nnscreener.planners.presets import BODY_THRESHOLD_HU, CT_CLIP_RANGE
from nnscreener.preprocessing.clahe import apply_clahe
from nnscreener.utilities.errors import ScreenerInputError
from nnscreener.utilities.io import atomic_save_json, atomic_save_npy

INDEX_FILE = 'index.json'
BODY_THRESHOLD = (BODY_THRESHOLD_HU - CT_CLIP_RANGE[0]) / (CT_CLIP_RANGE[1] - CT_CLIP_RANGE[0])  # in [0, 1] units


def screener_cache_folder(preprocessed_dataset_folder: str, configuration_manager: ConfigurationManager) -> str:
    return join(preprocessed_dataset_folder, configuration_manager.data_identifier + '_screener')


def body_bbox(volume01: np.ndarray, min_size: Sequence[int]) -> List[Tuple[int, int]]:
    """Bounding box of the body (> -500 HU), grown symmetrically to at least `min_size` where the volume allows."""
    body = np.argwhere(volume01 > BODY_THRESHOLD)
    if len(body) == 0:
        lo, hi = np.zeros(3, int), np.array(volume01.shape)
    else:
        lo, hi = body.min(0), body.max(0) + 1
    bbox = []
    for axis, (l, h) in enumerate(zip(lo, hi)):
        grow = max(0, min_size[axis] - (h - l))
        l, h = l - grow // 2, h + grow - grow // 2
        shift = max(0, -l) - max(0, h - volume01.shape[axis])
        bbox.append((int(max(0, l + shift)), int(min(volume01.shape[axis], h + shift))))
    return bbox


def preprocess_screener_case(image_files: List[str], plans_manager: PlansManager,
                             configuration_manager: ConfigurationManager, dataset_json: dict) -> Tuple[np.ndarray, list]:
    """Stock nnU-Net preprocessing of one CT, body crop, CLAHE -> ((2, z, y, x) float16, body bbox)."""
    data, _, _ = DefaultPreprocessor(verbose=False).run_case(image_files, None, plans_manager, configuration_manager,
                                                             dataset_json)
    volume = data[0]
    bbox = body_bbox(volume, configuration_manager.patch_size)
    volume = volume[tuple(slice(l, h) for l, h in bbox)]
    return np.stack([volume, apply_clahe(volume)]).astype(np.float16), bbox


def _cache_one(args) -> dict:
    key, image_files, out_file, plans_manager, configuration_manager, dataset_json, skip_existing = args
    if skip_existing and isfile(out_file):
        shape, bbox = np.load(out_file, mmap_mode='r').shape[1:], None
    else:
        volume, bbox = preprocess_screener_case(image_files, plans_manager, configuration_manager, dataset_json)
        atomic_save_npy(out_file, volume)
        shape = volume.shape[1:]
    return {'key': key, 'file': os.path.relpath(out_file, os.path.dirname(os.path.dirname(out_file))),
            'shape': [int(s) for s in shape], 'bbox': bbox}


def build_screener_cache(cache_folder: str, sources: Dict[str, Dict[str, dict]], plans_manager: PlansManager,
                         configuration_manager: ConfigurationManager, dataset_json: dict, num_processes: int = 2,
                         skip_existing: bool = False) -> List[dict]:
    """sources: {source dataset name: nnU-Net's {case: {'images': [...]}}}. Writes the cache and its index."""
    jobs = []
    for source, cases in sources.items():
        maybe_mkdir_p(join(cache_folder, source))
        for case, files in cases.items():
            jobs.append((f'{source}/{case}', files['images'], join(cache_folder, source, case + '.npy'),
                         plans_manager, configuration_manager, dataset_json, skip_existing))
    old = {e['key']: e for e in load_screener_index(cache_folder, missing_ok=True)}
    with multiprocessing.get_context('spawn').Pool(num_processes) as pool:
        entries = list(tqdm(pool.imap(_cache_one, jobs), total=len(jobs), desc='Screener cache (CLAHE)'))
    for e in entries:  # resumed cases keep the bbox recorded when they were written
        if e['bbox'] is None:
            e['bbox'] = old.get(e['key'], {}).get('bbox')
    atomic_save_json({'cases': entries}, join(cache_folder, INDEX_FILE))
    return entries


def load_screener_index(cache_folder: str, missing_ok: bool = False) -> List[dict]:
    fname = join(cache_folder, INDEX_FILE)
    if not isfile(fname):
        if missing_ok:
            return []
        raise ScreenerInputError(f'{fname} missing: run nnScreener_plan_and_preprocess for this dataset first')
    return load_json(fname)['cases']


@dataclass
class ScreenerCache:
    """Read access to the cache; volumes are memory-mapped so data-loader workers share the page cache."""
    folder: str

    def __post_init__(self):
        self.entries = {e['key']: e for e in load_screener_index(self.folder)}

    @property
    def keys(self) -> List[str]:
        return sorted(self.entries)

    def load(self, key: str) -> np.ndarray:
        """(2, z, y, x) float16 memmap: [stock input, CLAHE]."""
        return np.load(join(self.folder, self.entries[key]['file']), mmap_mode='r')
