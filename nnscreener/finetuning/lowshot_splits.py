"""Low-shot cross-validation splits of the paper's fine-tuning protocol (Sec. 4.2): `nnScreener_lowshot_splits`.

k-fold cross-validation where every fold trains on only n_train labeled cases: the validation folds partition the
dataset (each case is validated exactly once, so per-case Dice of all folds can be paired across trainers), and each
fold's training set is n_train cases drawn from the cases outside its validation fold. Written as nnU-Net's
`splits_final.json`, which `nnUNetv2_train` then uses for folds 0..k-1.
"""
import math
import os
from typing import Dict, List, Sequence, Union

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnscreener.utilities.cli import argument_parser
from nnscreener.utilities.errors import ScreenerInputError, exit_on_input_error
from nnscreener.utilities.io import atomic_save_json
from nnscreener.utilities.paths import dataset_name, preprocessed_dataset_folder, require_env

SPLITS_FILE = 'splits_final.json'


def min_cases_for_lowshot(n_train: int, k: int) -> int:
    """Smallest N with N - ceil(N / k) >= n_train: the largest validation fold leaves n_train cases to draw from."""
    n = n_train + 1
    while n - math.ceil(n / k) < n_train:
        n += 1
    return n


def make_lowshot_splits(case_ids: Sequence[str], n_train: int = 25, k: int = 3, seed: int = 0) -> List[Dict]:
    """-> [{'train': [...], 'val': [...]}] * k (nnU-Net's splits format), deterministic for a seed.

    Validation folds: a seeded shuffle of the sorted case ids cut into k near-equal parts. Training set of fold f:
    n_train cases drawn (seeded, without replacement) from the cases not in validation fold f.
    """
    case_ids = sorted(set(case_ids))
    if k < 2 or n_train < 1:
        raise ScreenerInputError(f'need k >= 2 folds and n_train >= 1, got k={k}, n_train={n_train}')
    needed = min_cases_for_lowshot(n_train, k)
    if len(case_ids) < needed:
        raise ScreenerInputError(f'{k}-fold low-shot splits with {n_train} training cases per fold need at least '
                                 f'{needed} cases (the largest validation fold has ceil(N/{k}) of them), the dataset '
                                 f'has {len(case_ids)}: lower -n or -k')
    rng = np.random.default_rng(seed)
    shuffled = [case_ids[i] for i in rng.permutation(len(case_ids))]
    val_folds = [sorted(fold.tolist()) for fold in np.array_split(np.array(shuffled, dtype=object), k)]
    splits = []
    for val in val_folds:
        in_val = set(val)
        pool = [c for c in case_ids if c not in in_val]
        splits.append({'train': sorted(rng.choice(pool, n_train, replace=False).tolist()), 'val': val})
    return splits


def dataset_case_ids(dataset: Union[int, str]) -> List[str]:
    """Training case identifiers: from $nnUNet_raw/DatasetXXX (dataset.json + imagesTr, as nnU-Net reads them) when
    present, else from the reference segmentations nnU-Net copies to
    $nnUNet_preprocessed/DatasetXXX/gt_segmentations."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder
    require_env('nnUNet_preprocessed')
    name = dataset_name(dataset)
    preprocessed = preprocessed_dataset_folder(name)
    raw = os.path.join(os.environ.get('nnUNet_raw', '<unset nnUNet_raw>'), name)
    if os.path.isfile(os.path.join(raw, 'dataset.json')):
        dataset_json = load_json(os.path.join(raw, 'dataset.json'))
        if 'dataset' in dataset_json:  # nnU-Net's alternative dataset.json that lists the cases explicitly
            return sorted(dataset_json['dataset'])
        if not os.path.isdir(os.path.join(raw, 'labelsTr')):
            raise ScreenerInputError(f'{name} is image-only (no labelsTr): nothing to fine-tune, so no low-shot '
                                     f'splits; its images serve the Screener stages and nnScreener_predict')
        identifiers = get_identifiers_from_splitted_dataset_folder(os.path.join(raw, 'imagesTr'),
                                                                   dataset_json['file_ending'])
        return sorted(str(i) for i in identifiers)
    gt_folder = os.path.join(preprocessed, 'gt_segmentations')
    if os.path.isfile(os.path.join(preprocessed, 'dataset.json')) and os.path.isdir(gt_folder):
        ending = load_json(os.path.join(preprocessed, 'dataset.json'))['file_ending']
        return sorted(f[:-len(ending)] for f in os.listdir(gt_folder) if f.endswith(ending))
    raise ScreenerInputError(f'cannot list the cases of {name}: neither {raw}/dataset.json '
                             f'nor {gt_folder} exists (set nnUNet_raw, or plan and preprocess the dataset first)')


def write_lowshot_splits(dataset: Union[int, str], n_train: int = 25, k: int = 3, seed: int = 0,
                         overwrite: bool = False) -> str:
    """Writes $nnUNet_preprocessed/DatasetXXX_Name/splits_final.json; returns its path.

    An existing, different splits file (e.g. nnU-Net's default 5-fold one, or one other runs were trained with) is
    kept unless overwrite=True, because silently changing the folds would mix results of different splits.
    """
    splits = make_lowshot_splits(dataset_case_ids(dataset), n_train, k, seed)
    path = os.path.join(preprocessed_dataset_folder(dataset_name(dataset)), SPLITS_FILE)
    if os.path.isfile(path) and not overwrite and load_json(path) != splits:
        raise ScreenerInputError(f'{path} exists and differs from the requested low-shot splits; pass --overwrite to '
                                 f'replace it (models trained on the old folds are then no longer comparable)')
    atomic_save_json(splits, path)
    return path


@exit_on_input_error
def lowshot_splits_entry():
    parser = argument_parser("Write nnU-Net splits_final.json for the paper's low-shot protocol: "
                             "k-fold CV, n_train labeled training cases per fold.")
    parser.add_argument('-d', required=True, help='dataset id or name (e.g. 501 or Dataset501_LIDC)')
    parser.add_argument('-n', type=int, default=25, help='training cases per fold (paper: 25)')
    parser.add_argument('-k', type=int, default=3, help='number of folds (paper: 3)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the fold partition and training-case draw')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing, different splits_final.json')
    args = parser.parse_args()
    path = write_lowshot_splits(args.d, args.n, args.k, args.seed, args.overwrite)
    print(f'{args.k} low-shot folds ({args.n} training cases each) written to {path}; train folds 0..{args.k - 1}')
