"""The phantom world of the quality benchmarks: fixed-seed phantoms, planned and preprocessed the Screener way, in a
work folder with its own nnUNet_raw / nnUNet_preprocessed and one nnUNet_results per training seed."""
import os
import platform
import sys
import time
from contextlib import contextmanager
from os.path import isdir, join

import numpy as np
import torch

from nnscreener.phantoms.make_phantoms import dataset_folder_name, make_phantom_datasets
from nnscreener.preprocessing.plan_and_preprocess import plan_and_preprocess

TARGET, PRETRAIN = 501, 500
TARGET_NAME = dataset_folder_name(TARGET, 'target')


def use_work_folder(work: str) -> None:
    for k in ('nnUNet_raw', 'nnUNet_preprocessed'):
        os.environ[k] = os.path.abspath(join(work, k))
        os.makedirs(os.environ[k], exist_ok=True)
    os.environ.setdefault('nnUNet_compile', 'false')


def use_results(work: str, tag: str) -> str:
    """Each training run (seed, budget) gets its own nnUNet_results, because stage folders are named by trainer only."""
    os.environ['nnUNet_results'] = os.path.abspath(join(work, f'nnUNet_results_{tag}'))
    os.makedirs(os.environ['nnUNet_results'], exist_ok=True)
    return os.environ['nnUNet_results']


def make_world(work: str, preset: str, n_pretrain: int, n_test: int, phantom_preset: str = 'tiny',
               num_processes: int = 2) -> str:
    """Phantoms (seed 0) and plans; returns the raw folder of the labeled test set. Resumes."""
    use_work_folder(work)
    raw = join(os.environ['nnUNet_raw'], TARGET_NAME)
    if not isdir(join(raw, 'labelsTr')):
        make_phantom_datasets(TARGET, PRETRAIN, n_test, n_pretrain, preset=phantom_preset, seed=0,
                              num_processes=num_processes)
    plan_and_preprocess(TARGET, [PRETRAIN], preset=preset, num_processes=num_processes, continue_=True)
    return raw


def machine() -> dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU, {os.cpu_count()} cores'
    return {'device': device, 'torch': torch.__version__, 'python': platform.python_version(),
            'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
            'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}


@contextmanager
def timed(timings: dict, key: str):
    t0 = time.time()
    yield
    timings[key] = timings.get(key, 0.0) + time.time() - t0


def mean_sd(values) -> dict:
    """Mean and sample sd over seeds (None values, e.g. a metric a seed could not compute, are left out)."""
    values = [v for v in values if v is not None]
    if not values:
        return {'mean': None, 'sd': None, 'n': 0}
    return {'mean': float(np.mean(values)), 'sd': float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            'n': len(values)}


def fmt(stat: dict, digits: int = 3) -> str:
    if stat['mean'] is None:
        return '-'
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['sd']:.{digits}f}" if stat['n'] > 1 else '')


