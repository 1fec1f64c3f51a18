"""How much do Screener's conditions see of the lesions? The default model's body AUROC on the phantom test set with
conditions from the CT itself, and with conditions from a copy of the CT whose lesions are in-painted by their
surroundings (an oracle: it uses the masks). Descriptors always come from the CT itself.

    python benchmarks/quality/condition_oracle.py --work /tmp/qmed --tags seed0 \
        --results_json benchmarks/results/condition_oracle.json

The paper's conditions are meant to be ignorant of local pathology (masking invariance). If they are, the two
columns agree; the gap is what the conditions' knowledge of the lesion costs. In-painting: each lesion (dilated by
one voxel) takes the median CLAHE value of a 3-voxel shell of lesion-free body around it. Scoring is
`nnScreener_evaluate`'s pooled AUROC estimate (1000 lesion and 1000 normal body voxels per case and type), in the
preprocessed body box, the space the models work in.
"""
import argparse
import os
from os.path import join

import numpy as np
import SimpleITK as sitk
import torch
from scipy.ndimage import binary_dilation, label
from sklearn.metrics import roc_auc_score

from nnscreener.inference.trained_model import load_trained_model
from nnscreener.inference.sliding_window import sliding_window_anomaly_maps
from nnscreener.phantoms.lesions import LESION_TYPES
from nnscreener.phantoms.make_phantoms import LESION_TYPES_FOLDER
from nnscreener.planners.screener_planner import CONFIGURATION
from nnscreener.planners.settings import ScreenerSettings
from nnscreener.preprocessing.screener_cache import screener_view
from nnscreener.utilities.io import atomic_save_json, read_image
from world import TARGET_NAME, machine, mean_sd, use_results, use_work_folder

VOXELS = 1000  # per case: lesion voxels of each type, and normal body voxels (the evaluation's estimate)
COLUMNS = ('conditions from the CT', 'conditions from the in-painted CT')


class OracleConditionModel:
    """Two maps per patch: -log q(y | c(CT)) and -log q(y | c(in-painted CT)); the sliding window's `stock` slot
    carries the in-painted CLAHE volume."""

    def __init__(self, patch_model):
        self.screener, self.patch_size, self.device = patch_model.screener, patch_model.patch_size, 'cpu'

    def __call__(self, inpainted: torch.Tensor, clahe: torch.Tensor, crop_start: torch.Tensor) -> torch.Tensor:
        y, c = self.screener.features(clahe, crop_start)
        _, c_inpainted = self.screener.features(inpainted, crop_start)
        return torch.stack([self.screener.density.nll(y, c), self.screener.density.nll(y, c_inpainted)], 1)


def preprocessed_case(raw: str, case: str, plans_manager, dataset_json: dict):
    """(CLAHE, body, lesion types) of the body box, as the models see the case."""
    configuration = plans_manager.get_configuration(CONFIGURATION)
    image = read_image(join(raw, 'imagesTr', case + '_0000.nii.gz'))
    types = sitk.GetArrayFromImage(sitk.ReadImage(join(raw, LESION_TYPES_FOLDER, case + '.nii.gz')))
    spacing = image.GetSpacing()
    properties = {'sitk_stuff': {'spacing': spacing, 'origin': image.GetOrigin(), 'direction': image.GetDirection()},
                  'spacing': [abs(s) for s in spacing[::-1]]}
    data, seg, _ = configuration.preprocessor_class(verbose=False).run_case_npy(
        sitk.GetArrayFromImage(image)[None].astype(np.float32), types[None].astype(np.int16), properties,
        plans_manager, configuration, dataset_json)
    view = screener_view(data[0].astype(np.float32), configuration, ScreenerSettings.from_plans(plans_manager.plans).clahe_clip_limit)
    return view.clahe, view.body, seg[0][view.slicer]


def inpaint_lesions(clahe: np.ndarray, body: np.ndarray, types: np.ndarray) -> np.ndarray:
    inpainted = clahe.copy()
    components, n = label(types > 0)
    for k in range(1, n + 1):
        lesion = binary_dilation(components == k, iterations=1)
        shell = binary_dilation(lesion, iterations=3) & ~lesion & body & (types == 0)
        if shell.any():
            inpainted[lesion] = np.median(clahe[shell])
    return inpainted


def score_tag(work: str, tag: str, cases: int) -> dict:
    use_results(work, tag)
    trained = load_trained_model(TARGET_NAME, 'modular', torch.device('cpu'))
    model, plans_manager, dataset_json = trained.patch_model, trained.plans_manager, trained.dataset_json
    raw = join(os.environ['nnUNet_raw'], TARGET_NAME)
    rng = np.random.default_rng(0)
    samples = {(column, code): ([], []) for column in COLUMNS for code in LESION_TYPES}
    for case in sorted(f[:-len('.nii.gz')] for f in os.listdir(join(raw, 'labelsTr')))[:cases]:
        clahe, body, types = preprocessed_case(raw, case, plans_manager, dataset_json)
        maps = sliding_window_anomaly_maps(inpaint_lesions(clahe, body, types), clahe, OracleConditionModel(model),
                                           batch_size=32)
        normal = rng.choice(np.flatnonzero(body & (types == 0)), VOXELS, replace=False)
        for code in np.unique(types[types > 0]):
            lesion = np.flatnonzero(types == code)
            lesion = rng.choice(lesion, min(VOXELS, lesion.size), replace=False)
            for column, anomaly_map in zip(COLUMNS, maps):
                samples[(column, int(code))][0].append(anomaly_map.ravel()[lesion])
                samples[(column, int(code))][1].append(anomaly_map.ravel()[normal])
    result = {}
    for column in COLUMNS:
        row, pooled = {}, ([], [])
        for code, name in LESION_TYPES.items():
            lesion, normal = (np.concatenate(v) for v in samples[(column, code)])
            pooled[0].append(lesion), pooled[1].append(normal)
            row[name] = auroc(lesion, normal)
        result[column] = {'all': auroc(*(np.concatenate(v) for v in pooled)), **row}
    return result


def auroc(lesion: np.ndarray, normal: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.ones(lesion.size), np.zeros(normal.size)], np.r_[lesion, normal]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work', required=True, help='a phantom_benchmark.py work folder')
    parser.add_argument('--tags', nargs='+', default=['seed0'], help='its training runs (nnUNet_results_<tag>)')
    parser.add_argument('--cases', type=int, default=42, help='test phantoms scored')
    parser.add_argument('--results_json', default=None)
    args = parser.parse_args()
    use_work_folder(args.work)
    torch.set_num_threads(min(2, os.cpu_count()))
    per_tag = {tag: score_tag(args.work, tag, args.cases) for tag in args.tags}
    groups = ['all', *LESION_TYPES.values()]
    table = {column: {g: mean_sd([per_tag[t][column][g] for t in args.tags]) for g in groups} for column in COLUMNS}
    for column in COLUMNS:
        print(f'{column:36s}', '  '.join(f"{g} {table[column][g]['mean']:.3f}" for g in groups))
    if args.results_json:
        atomic_save_json({'machine': machine(), 'work': os.path.abspath(args.work), 'tags': args.tags,
                          'cases': args.cases, 'evaluation': 'body-only, preprocessed body box', 'per_tag': per_tag,
                          'table': table}, args.results_json)


if __name__ == '__main__':
    main()
