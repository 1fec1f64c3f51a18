"""The Screener cache: preprocessed CT volumes for the Screener models, one float16 `.npy` per case.

Each file holds (2, z, y, x): channel 0 is the stock nnU-Net input (resampled, CTNormalization -> [0, 1]), channel 1
its CLAHE (see clahe.py for why CLAHE lives here). Volumes are cropped to the body (> -500 HU, the paper's "dense
foreground"), but never below one patch. Cases of every pretraining dataset are preprocessed with the *target*
dataset's plans, so all Screener models and the distilled UNet share one spacing, intensity scale and architecture.
The Screener models train on the pretraining datasets only (role 'pretrain'), as in the paper, where the datasets
with pathology masks are test sets: pathologies must stay rare in the training data. Only without pretraining
datasets does the target itself serve (its labels unused).

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


def body_clahe(volume01: np.ndarray, min_size: Sequence[int]) -> Tuple[np.ndarray, list]:
    """CLAHE of the body region (the paper crops to the body before CLAHE; CLAHE tiles are 1/8 of the region, so
    including air and table would change the result) -> (CLAHE inside the body bbox, bbox)."""
    bbox = body_bbox(volume01, min_size)
    return apply_clahe(volume01[tuple(slice(l, h) for l, h in bbox)]), bbox


def screener_clahe(volume01: np.ndarray, min_size: Sequence[int]) -> np.ndarray:
    """Whole-volume input of the Screener models at inference: body CLAHE inside the body bbox, the stock volume
    (air, ~0) outside, so patches see exactly what the cache showed in training."""
    clahe, bbox = body_clahe(volume01, min_size)
    out = np.array(volume01, dtype=np.float32, copy=True)
    out[tuple(slice(l, h) for l, h in bbox)] = clahe
    return out


def preprocess_screener_case(image_files: List[str], plans_manager: PlansManager,
                             configuration_manager: ConfigurationManager, dataset_json: dict) -> Tuple[np.ndarray, list]:
    """Stock nnU-Net preprocessing of one CT, body crop, CLAHE -> ((2, z, y, x) float16, body bbox)."""
    data, _, _ = DefaultPreprocessor(verbose=False).run_case(image_files, None, plans_manager, configuration_manager,
                                                             dataset_json)
    clahe, bbox = body_clahe(data[0], configuration_manager.patch_size)
    volume = data[0][tuple(slice(l, h) for l, h in bbox)]
    return np.stack([volume, clahe]).astype(np.float16), bbox


def _cache_one(args) -> dict:
    key, role, image_files, out_file, plans_manager, configuration_manager, dataset_json, skip_existing = args
    if skip_existing and isfile(out_file):
        shape, bbox = np.load(out_file, mmap_mode='r').shape[1:], None
    else:
        volume, bbox = preprocess_screener_case(image_files, plans_manager, configuration_manager, dataset_json)
        atomic_save_npy(out_file, volume)
        shape = volume.shape[1:]
    return {'key': key, 'role': role, 'file': os.path.relpath(out_file, os.path.dirname(os.path.dirname(out_file))),
            'shape': [int(s) for s in shape], 'bbox': bbox}


def build_screener_cache(cache_folder: str, sources: Dict[str, Dict[str, dict]], plans_manager: PlansManager,
                         configuration_manager: ConfigurationManager, dataset_json: dict, num_processes: int = 2,
                         skip_existing: bool = False, target: str = None) -> List[dict]:
    """sources: {source dataset name: nnU-Net's {case: {'images': [...]}}}; `target` is the fine-tuning dataset
    (role 'target'), every other source has role 'pretrain'. Writes the cache and its index."""
    jobs = []
    for source, cases in sources.items():
        maybe_mkdir_p(join(cache_folder, source))
        role = 'target' if source == target else 'pretrain'
        for case, files in cases.items():
            jobs.append((f'{source}/{case}', role, files['images'], join(cache_folder, source, case + '.npy'),
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

    @property
    def pretraining_keys(self) -> List[str]:
        """The cases the Screener models train on: the pretraining datasets, or the target if there are none."""
        pretrain = [k for k, e in self.entries.items() if e.get('role') == 'pretrain']
        return sorted(pretrain) or self.keys

    def load(self, key: str) -> np.ndarray:
        """(2, z, y, x) float16 memmap: [stock input, CLAHE]."""
        return np.load(join(self.folder, self.entries[key]['file']), mmap_mode='r')
