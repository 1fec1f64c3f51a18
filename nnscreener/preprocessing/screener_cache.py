"""The Screener cache: preprocessed CT volumes for the Screener models, one float16 `.npy` per case.

Each file holds (3, z, y, x): channel 0 is the stock nnU-Net input (resampled, CTNormalization -> [0, 1]), channel 1
the CLAHE of the body (air outside it; see clahe.py for why CLAHE lives here), channel 2 the body mask (body.py: the
patient with lungs and bowel gas, without table and room air). Volumes are cropped to the body's bounding box (the
paper's "dense foreground"), but never below one patch. Cases of every pretraining dataset are preprocessed with the *target*
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
from typing import Dict, List, Optional, Tuple

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json, maybe_mkdir_p
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from tqdm import tqdm

from nnscreener.planners.settings import ScreenerSettings
from nnscreener.preprocessing.body import body_mask, mask_bbox
from nnscreener.preprocessing.clahe import apply_clahe
from nnscreener.utilities.errors import ScreenerInputError
from nnscreener.utilities.io import atomic_save_json, atomic_save_npy

INDEX_FILE = 'index.json'
CACHE_CHANNELS = 3  # stock input, CLAHE, body mask


def screener_cache_folder(preprocessed_dataset_folder: str, configuration_manager: ConfigurationManager) -> str:
    return join(preprocessed_dataset_folder, configuration_manager.data_identifier + '_screener')


@dataclass
class ScreenerView:
    """What the Screener models see of a preprocessed CT: the body's bounding box (at least one patch), the body mask
    inside it and the CLAHE of the body (air outside the body: the table and the room are not part of the input)."""
    bbox: List[Tuple[int, int]]
    body: np.ndarray  # bool, the bbox region
    clahe: Optional[np.ndarray]  # float32, the bbox region; None when not computed

    @property
    def slicer(self) -> tuple:
        return tuple(slice(lo, hi) for lo, hi in self.bbox)


def screener_view(volume01: np.ndarray, configuration_manager: ConfigurationManager, clip_limit: float,
                  with_clahe: bool = True) -> ScreenerView:
    """Body mask, body box and body CLAHE of a preprocessed volume, identical for the cache and for inference (the
    paper crops to the body before CLAHE; CLAHE tiles are 1/8 of the region, so what the box holds matters)."""
    body = body_mask(volume01, configuration_manager.spacing)
    bbox = mask_bbox(body, configuration_manager.patch_size)
    slicer = tuple(slice(lo, hi) for lo, hi in bbox)
    body = body[slicer]
    clahe = None
    if with_clahe:  # outside the body: 0, the air that crops beyond the volume are padded with, too
        clahe = np.where(body, apply_clahe(np.where(body, volume01[slicer], 0), clip_limit), 0).astype(np.float32)
    return ScreenerView(bbox, body, clahe)


def preprocess_screener_case(image_files: List[str], plans_manager: PlansManager,
                             configuration_manager: ConfigurationManager, dataset_json: dict) -> Tuple[np.ndarray, list]:
    """Stock nnU-Net preprocessing of one CT, body crop, CLAHE -> ((3, z, y, x) float16 [stock, CLAHE, body], bbox)."""
    data, _, _ = DefaultPreprocessor(verbose=False).run_case(image_files, None, plans_manager, configuration_manager,
                                                             dataset_json)
    clip_limit = ScreenerSettings.from_plans(plans_manager.plans).clahe_clip_limit
    view = screener_view(data[0], configuration_manager, clip_limit)
    return np.stack([data[0][view.slicer], view.clahe, view.body]).astype(np.float16), view.bbox


def _cache_one(args) -> dict:
    key, role, image_files, out_file, plans_manager, configuration_manager, dataset_json, skip_existing = args
    existing = np.load(out_file, mmap_mode='r').shape if skip_existing and isfile(out_file) else None
    if existing is not None and existing[0] == CACHE_CHANNELS:
        shape, bbox = existing[1:], None
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
    made_with = {'clahe_clip_limit': ScreenerSettings.from_plans(plans_manager.plans).clahe_clip_limit,
                 'patch_size': [int(p) for p in configuration_manager.patch_size]}  # CLAHE, and the body box's size
    old_index = _load_index(cache_folder)
    if any(old_index.get(k) != v for k, v in made_with.items()):  # a cache made otherwise: redo every case
        jobs = [job[:-1] + (False,) for job in jobs]
    old = {e['key']: e for e in old_index.get('cases', [])}
    with multiprocessing.get_context('spawn').Pool(num_processes) as pool:
        entries = list(tqdm(pool.imap(_cache_one, jobs), total=len(jobs), desc='Screener cache (CLAHE)'))
    for e in entries:  # resumed cases keep the bbox recorded when they were written
        if e['bbox'] is None:
            e['bbox'] = old.get(e['key'], {}).get('bbox')
    atomic_save_json({**made_with, 'channels': ['stock', 'clahe', 'body'], 'cases': entries},
                     join(cache_folder, INDEX_FILE))
    return entries


def _load_index(cache_folder: str) -> dict:
    fname = join(cache_folder, INDEX_FILE)
    return load_json(fname) if isfile(fname) else {}


def load_screener_index(cache_folder: str) -> List[dict]:
    index = _load_index(cache_folder)
    if not index:
        raise ScreenerInputError(f'{join(cache_folder, INDEX_FILE)} missing: run nnScreener_plan_and_preprocess for '
                                 f'this dataset first')
    return index['cases']


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
        """(3, z, y, x) float16 memmap: [stock input, CLAHE, body mask]."""
        volume = np.load(join(self.folder, self.entries[key]['file']), mmap_mode='r')
        if volume.shape[0] != CACHE_CHANNELS:
            raise ScreenerInputError(f'{self.folder} is a Screener cache of an older nnscreener (no body mask): re-run '
                                     f'nnScreener_plan_and_preprocess --c for this dataset')
        return volume
