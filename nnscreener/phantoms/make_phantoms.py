"""Writes the phantom datasets as nnU-Net v2 raw datasets: a labeled target dataset (every case has lesions) and an
image-only pretraining dataset (lesions in a small fraction of cases), each with hidden lesion-type maps.

    nnScreener_make_phantoms -d 501 -pretrain_d 500 -n_labeled 40 -n_unlabeled 100 --preset tiny
"""
import json
import multiprocessing
import os
import shutil
import tempfile

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnscreener.phantoms.generator import PRESETS, PhantomPreset, generate_phantom_case, get_preset
from nnscreener.phantoms.lesions import LESION_TYPES
from nnscreener.phantoms.montage import save_montage
from nnscreener.utilities.cli import argument_parser
from nnscreener.utilities.errors import ScreenerInputError, exit_on_input_error

DATASET_NAMES = {'target': 'ScreenerPhantomLesions', 'pretrain': 'ScreenerPhantomPretrain'}
ROLE_SEED = {'target': 0, 'pretrain': 1, 'pretrain_lesion_cases': 2}
FILE_ENDING = '.nii.gz'
LESION_TYPES_FOLDER = 'lesion_typesTr'


def dataset_folder_name(dataset_id: int, role: str) -> str:
    return f'Dataset{dataset_id:03d}_{DATASET_NAMES[role]}'


def case_name(index: int) -> str:
    return f'phantom_{index:04d}'


def make_phantom_datasets(target_dataset_id: int = 501, pretrain_dataset_id: int | None = 500,
                          num_labeled: int = 40, num_unlabeled: int = 100, preset: str | PhantomPreset = 'tiny',
                          seed: int = 0, unlabeled_lesion_fraction: float = 0.15, raw_folder: str | None = None,
                          num_processes: int = 1) -> dict:
    """Write `Dataset<target>_ScreenerPhantomLesions` (labelsTr binary, >= 1 lesion per case) and, unless
    `pretrain_dataset_id` is None, `Dataset<pretrain>_ScreenerPhantomPretrain` (no labelsTr; lesions in
    `unlabeled_lesion_fraction` of the cases) into `raw_folder` (default $nnUNet_raw).

    Case i of a role is generated from seed (seed, role, i), so results do not depend on `num_processes` or on the
    number of cases. Returns {'target': folder, 'pretrain': folder}; an existing dataset of the same name is
    replaced, one of another name with the same id is refused.
    """
    preset = get_preset(preset)
    raw_folder = raw_folder or os.environ.get('nnUNet_raw')
    if not raw_folder:
        raise ScreenerInputError('nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (the folder the '
                                 'phantom datasets are written to)')
    jobs = [('target', target_dataset_id, num_labeled)]
    if pretrain_dataset_id is not None:
        jobs.append(('pretrain', pretrain_dataset_id, num_unlabeled))
        if pretrain_dataset_id == target_dataset_id:
            raise ScreenerInputError(f'target and pretraining dataset ids are both {target_dataset_id}; pass two '
                                     f'different ids (-d and -pretrain_d)')
    if not 0 <= unlabeled_lesion_fraction <= 1:
        raise ScreenerInputError(f'lesion fraction must lie in [0, 1], got {unlabeled_lesion_fraction}')
    os.makedirs(raw_folder, exist_ok=True)
    for role, dataset_id, num_cases in jobs:
        if not 1 <= dataset_id <= 999:
            raise ScreenerInputError(f'dataset id {dataset_id} is outside 1..999 (nnU-Net dataset ids)')
        if num_cases < 1:
            raise ScreenerInputError(f'the {role} dataset needs at least one case, got {num_cases}')
        _check_id_free(raw_folder, dataset_id, dataset_folder_name(dataset_id, role))

    folders = {}
    for role, dataset_id, num_cases in jobs:
        with_lesions = np.ones(num_cases, bool)
        if role == 'pretrain':
            with_lesions = _lesion_cases(num_cases, unlabeled_lesion_fraction, seed)
        folders[role] = _write_dataset(raw_folder, dataset_folder_name(dataset_id, role), role, with_lesions,
                                       preset, seed, unlabeled_lesion_fraction, num_processes)
    return folders


def _lesion_cases(num_cases: int, fraction: float, seed: int) -> np.ndarray:
    """Which pretraining cases carry lesions: round(fraction * n) of them, at least one when fraction > 0 (rare,
    not absent), drawn at random."""
    count = 0 if fraction == 0 else min(num_cases, max(1, int(round(fraction * num_cases))))
    flags = np.zeros(num_cases, bool)
    flags[np.random.default_rng([seed, ROLE_SEED['pretrain_lesion_cases']]).choice(num_cases, count, False)] = True
    return flags


def _check_id_free(raw_folder: str, dataset_id: int, name: str):
    prefix = f'Dataset{dataset_id:03d}_'
    for entry in os.listdir(raw_folder):
        if entry.startswith(prefix) and entry != name and os.path.isdir(os.path.join(raw_folder, entry)):
            raise ScreenerInputError(f'dataset id {dataset_id} is taken by {entry} in {raw_folder}; choose another '
                                     f'id or remove that folder')


def _write_dataset(raw_folder, name, role, with_lesions, preset, seed, lesion_fraction, num_processes) -> str:
    """Generate all cases into a hidden temporary folder next to the target and rename it at the end, so a crash
    never leaves a half-written dataset."""
    final = os.path.join(raw_folder, name)
    tmp = tempfile.mkdtemp(prefix=f'.{name}.', dir=raw_folder)
    try:
        labeled = role == 'target'
        for sub in ['imagesTr', LESION_TYPES_FOLDER] + (['labelsTr'] if labeled else []):
            os.makedirs(os.path.join(tmp, sub))
        tasks = [(tmp, role, i, bool(flag), preset, seed, labeled) for i, flag in enumerate(with_lesions)]
        if num_processes > 1:
            with multiprocessing.Pool(min(num_processes, len(tasks))) as pool:
                results = list(tqdm(pool.imap(_write_case, tasks), total=len(tasks), desc=name))
        else:
            results = [_write_case(t) for t in tqdm(tasks, desc=name)]
        lesions = {case: counts for case, counts in results if counts}
        dataset = {
            'channel_names': {'0': 'CT'},
            'labels': {'background': 0, 'lesion': 1} if labeled else {'background': 0},
            'numTraining': len(tasks), 'file_ending': FILE_ENDING, 'name': name,
            'description': 'nnscreener CT phantoms (synthetic torso CT in HU with lesions); ' +
                           ('labelsTr holds binary lesion masks' if labeled else 'image-only pretraining data') +
                           f'; {LESION_TYPES_FOLDER} holds per-voxel lesion types (codes below)',
            'nnscreener_lesion_types': {str(k): v for k, v in LESION_TYPES.items()},
            'nnscreener_cases_with_lesions': sorted(lesions),
            'nnscreener_lesion_voxels': lesions,  # case -> lesion type name -> voxels
            'nnscreener_phantom': {'preset': preset.name, 'seed': seed, 'role': role,
                                   'lesion_fraction': 1.0 if labeled else lesion_fraction},
        }
        with open(os.path.join(tmp, 'dataset.json'), 'w') as f:
            json.dump(dataset, f, indent=2)
        save_montage(tmp, title=name)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        _replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _replace_folder(new: str, final: str):
    if not os.path.exists(final):
        os.rename(new, final)
        return
    trash = tempfile.mkdtemp(prefix='.trash.', dir=os.path.dirname(final))
    old = os.path.join(trash, 'old')
    os.rename(final, old)
    try:
        os.rename(new, final)
    except OSError:
        os.rename(old, final)  # keep the previous dataset rather than none
        raise
    shutil.rmtree(trash)


def _write_case(task):
    folder, role, index, with_lesions, preset, seed, labeled = task
    case = generate_phantom_case(np.random.default_rng([seed, ROLE_SEED[role], index]), preset, with_lesions)
    name = case_name(index)

    def write(array, path):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(case.spacing[::-1])
        image.SetOrigin(case.origin)
        image.SetDirection(case.direction)
        sitk.WriteImage(image, os.path.join(folder, path), useCompression=True)

    write(case.hu, f'imagesTr/{name}_0000{FILE_ENDING}')
    write(case.lesion_type, f'{LESION_TYPES_FOLDER}/{name}{FILE_ENDING}')
    if labeled:
        write((case.lesion_type > 0).astype(np.uint8), f'labelsTr/{name}{FILE_ENDING}')
    counts = np.bincount(case.lesion_type.ravel(), minlength=len(LESION_TYPES) + 1)
    return name, {LESION_TYPES[c]: int(counts[c]) for c in LESION_TYPES if counts[c]}


def _dataset_id(text: str) -> int | None:
    if text.lower() == 'none':
        return None
    try:
        return int(text)
    except ValueError:
        raise ScreenerInputError(f"-pretrain_d must be a dataset id or 'none', got {text!r}") from None


@exit_on_input_error
def make_phantoms_entry():
    parser = argument_parser('Write CT phantom datasets (nnU-Net v2 raw format) into '
                             '$nnUNet_raw: a labeled lesion dataset and an unlabeled '
                             'pretraining dataset.')
    parser.add_argument('-d', type=int, default=501, help='id of the labeled target dataset (default 501)')
    parser.add_argument('-pretrain_d', type=str, default='500',
                        help="id of the unlabeled pretraining dataset, or 'none' to skip it (default 500)")
    parser.add_argument('-n_labeled', type=int, default=40, help='cases in the labeled dataset (default 40)')
    parser.add_argument('-n_unlabeled', type=int, default=100, help='cases in the pretraining dataset (default 100)')
    parser.add_argument('--preset', choices=sorted(PRESETS), default='tiny',
                        help='tiny: ~40x96x96 CPU-test cases; default: 512x512 clinical-like scans (default tiny)')
    parser.add_argument('--seed', type=int, default=0, help='random seed; same seed, same datasets (default 0)')
    parser.add_argument('--lesion_fraction', type=float, default=0.15,
                        help='fraction of pretraining cases that carry lesions (default 0.15)')
    parser.add_argument('-np', type=int, default=1, help='worker processes (default 1)')
    args = parser.parse_args()
    folders = make_phantom_datasets(args.d, _dataset_id(args.pretrain_d), args.n_labeled, args.n_unlabeled,
                                    args.preset, args.seed, args.lesion_fraction, num_processes=args.np)
    for role, folder in folders.items():
        print(f'{role}: {folder}')
