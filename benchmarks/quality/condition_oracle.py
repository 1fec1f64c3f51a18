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

--probes adds two columns: conditions from a copy whose lesions are replaced by the condition model's mask token
(the oracle in the input the condition model was trained on), and each voxel's highest NLL over leave-out
conditions of 8 checkerboards of one mask block per cell, shifted by half a cell along any of the axes (no masks
used: does some board hide the lesion from the conditions?).

--decoy is the control of both oracles: the lesions AND a decoy of normal body (the lesion masks rolled by half the
box along x, clear of the lesions) are in-painted (or replaced by the mask token), and three AUROCs are reported:
lesion vs untouched normal body (the oracle), decoy vs untouched normal body (how much altering the input alone
raises the NLL), and lesion vs decoy (the fair ceiling: lesions against normal tissue whose conditions were
altered alike).
"""
import argparse
import json
import os
from os.path import join

import numpy as np
import SimpleITK as sitk
import torch
from scipy.ndimage import binary_dilation, label
from sklearn.metrics import roc_auc_score

from nnscreener.inference.trained_model import load_trained_model
from nnscreener.inference.sliding_window import sliding_window_anomaly_maps
from nnscreener.density.conditions import LeaveOutConditions
from nnscreener.density.pooling import pool_and_noise
from nnscreener.phantoms.lesions import LESION_TYPES
from nnscreener.phantoms.make_phantoms import LESION_TYPES_FOLDER
from nnscreener.planners.screener_planner import CONFIGURATION
from nnscreener.planners.settings import ScreenerSettings
from nnscreener.preprocessing.screener_cache import screener_view
from nnscreener.training.stages import load_stage_network, stage_checkpoint
from nnscreener.utilities.io import atomic_save_json, read_image
from world import TARGET_NAME, machine, mean_sd, use_results, use_work_folder

VOXELS = 1000  # per case: lesion voxels of each type, and normal body voxels (the evaluation's estimate)
COLUMNS = ('conditions from the CT', 'conditions from the in-painted CT')
PROBES = ('conditions from the CT, lesions replaced by the mask token',
          'leave-out cells of 1 mask block, highest NLL of 8 shifted checkerboards')
DECOY_MODES = ('in-painted', 'mask token')


class OracleConditionModel:
    """Two maps per patch: -log q(y | c(CT)) and -log q(y | c(in-painted CT)); the sliding window's `stock` slot
    carries the in-painted (or otherwise altered) CLAHE volume. With `leave_out`, a third: the highest NLL over its
    shifted checkerboards."""

    def __init__(self, patch_model, leave_out: LeaveOutConditions = None):
        self.screener, self.patch_size, self.device = patch_model.screener, patch_model.patch_size, 'cpu'
        self.leave_out = leave_out  # adds the highest NLL over its shifted checkerboards as a third map

    def __call__(self, inpainted: torch.Tensor, clahe: torch.Tensor, crop_start: torch.Tensor) -> torch.Tensor:
        y, c = self.screener.features(clahe, crop_start)
        _, c_inpainted = self.screener.features(inpainted, crop_start)
        maps = [self.screener.density.nll(y, c), self.screener.density.nll(y, c_inpainted)]
        if self.leave_out is not None:
            stride = self.screener.pool_stride
            maps.append(torch.stack([self.screener.density.nll(y, pool_and_noise(c_board, stride, 0))
                                     for c_board in self.leave_out.shifted_boards(clahe)]).amax(0))
        return torch.stack(maps, 1)


def mask_token() -> float:
    """The mask token the trained condition model (of the run `use_results` points at) was trained with."""
    _, state = load_stage_network(stage_checkpoint(TARGET_NAME, 'condition'), torch.device('cpu'))
    return float(state['objective_weights']['masking.mask_token'])


def one_block_leave_out(screener, plans: dict) -> LeaveOutConditions:
    """Leave-out conditions of the trained condition model (unwrapped if the run used them), cells of one mask block
    of its training, with its mask token."""
    condition = screener.condition
    condition = condition.condition if isinstance(condition, LeaveOutConditions) else condition
    return LeaveOutConditions(condition, mask_token(), plans['screener']['ssl']['mask_block_size'])


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


def trained_run(work: str, tag: str, cases: int):
    """The modular Screener of a run (patch model, plans manager, dataset.json) and its first `cases` test cases."""
    use_results(work, tag)
    trained = load_trained_model(TARGET_NAME, 'modular', torch.device('cpu'))
    raw = join(os.environ['nnUNet_raw'], TARGET_NAME)
    names = sorted(f[:-len('.nii.gz')] for f in os.listdir(join(raw, 'labelsTr')))[:cases]
    return trained.patch_model, trained.plans_manager, trained.dataset_json, raw, names


def score_tag(work: str, tag: str, cases: int, probes: bool) -> dict:
    model, plans_manager, dataset_json, raw, names = trained_run(work, tag, cases)
    rng = np.random.default_rng(0)
    leave_out = one_block_leave_out(model.screener, plans_manager.plans) if probes else None
    columns = COLUMNS + (PROBES if probes else ())
    samples = {(column, code): ([], []) for column in columns for code in LESION_TYPES}
    for case in names:
        clahe, body, types = preprocessed_case(raw, case, plans_manager, dataset_json)
        maps = list(sliding_window_anomaly_maps(inpaint_lesions(clahe, body, types), clahe,
                                                OracleConditionModel(model, leave_out), batch_size=32))
        if probes:  # the in-painted slot carries the token-masked copy; the leave-out map goes last
            tokens = np.where(binary_dilation(types > 0, iterations=1), leave_out.mask_token.item(), clahe)
            maps.insert(2, sliding_window_anomaly_maps(tokens.astype(np.float32), clahe, OracleConditionModel(model),
                                                       batch_size=32)[1])
        normal = rng.choice(np.flatnonzero(body & (types == 0)), VOXELS, replace=False)
        for code in np.unique(types[types > 0]):
            lesion = np.flatnonzero(types == code)
            lesion = rng.choice(lesion, min(VOXELS, lesion.size), replace=False)
            for column, anomaly_map in zip(columns, maps):
                samples[(column, int(code))][0].append(anomaly_map.ravel()[lesion])
                samples[(column, int(code))][1].append(anomaly_map.ravel()[normal])
    result = {}
    for column in columns:
        row, pooled = {}, ([], [])
        for code, name in LESION_TYPES.items():
            lesion, normal = (np.concatenate(v) for v in samples[(column, code)])
            pooled[0].append(lesion), pooled[1].append(normal)
            row[name] = auroc(lesion, normal)
        result[column] = {'all': auroc(*(np.concatenate(v) for v in pooled)), **row}
    return result


def decoy_control(work: str, tag: str, cases: int) -> dict:
    """The three AUROCs of --decoy for in-painting and for the mask token."""
    model, plans_manager, dataset_json, raw, names = trained_run(work, tag, cases)
    token = mask_token()
    rng = np.random.default_rng(0)
    samples = {mode: ([], [], []) for mode in DECOY_MODES}  # lesion, untouched normal, decoy
    for case in names:
        clahe, body, types = preprocessed_case(raw, case, plans_manager, dataset_json)
        lesion = binary_dilation(types > 0, iterations=1)
        decoy = np.roll(lesion, clahe.shape[2] // 2, axis=2) & body & ~binary_dilation(lesion, iterations=3)
        altered = {'in-painted': inpaint_lesions(clahe, body, np.where(decoy, len(LESION_TYPES) + 1, types)),
                   'mask token': np.where(lesion | decoy, token, clahe).astype(np.float32)}
        picks = [np.flatnonzero(types > 0), np.flatnonzero(body & (types == 0) & ~decoy), np.flatnonzero(decoy)]
        picks = [rng.choice(v, min(VOXELS, v.size), replace=False) for v in picks]
        for mode in DECOY_MODES:
            anomaly_map = sliding_window_anomaly_maps(altered[mode], clahe, OracleConditionModel(model),
                                                      batch_size=32)[1].ravel()
            for store, pick in zip(samples[mode], picks):
                store.append(anomaly_map[pick])
    result = {}
    for mode in DECOY_MODES:
        lesion, normal, decoy = (np.concatenate(v) for v in samples[mode])
        result[mode] = {'lesion vs normal': auroc(lesion, normal), 'decoy vs normal': auroc(decoy, normal),
                        'lesion vs decoy': auroc(lesion, decoy), 'decoy voxels': int(decoy.size)}
    return result


def auroc(lesion: np.ndarray, normal: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.ones(lesion.size), np.zeros(normal.size)], np.r_[lesion, normal]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work', required=True, help='a phantom_benchmark.py work folder')
    parser.add_argument('--tags', nargs='+', default=['seed0'], help='its training runs (nnUNet_results_<tag>)')
    parser.add_argument('--cases', type=int, default=42, help='test phantoms scored')
    parser.add_argument('--probes', action='store_true', help='add the mask-token oracle and the shifted '
                        'leave-out checkerboards (PROBES)')
    parser.add_argument('--decoy', action='store_true', help='only the control of the oracles (lesions and a decoy '
                        'of normal body altered alike)')
    parser.add_argument('--label', default='', help='what the run is, for the generated table title')
    parser.add_argument('--results_json', default=None)
    args = parser.parse_args()
    use_work_folder(args.work)
    torch.set_num_threads(min(2, os.cpu_count()))
    if args.decoy:
        decoy = {tag: decoy_control(args.work, tag, args.cases) for tag in args.tags}
        print(json.dumps(decoy, indent=1))
        if args.results_json:
            atomic_save_json({'label': args.label, 'machine': machine(), 'work': os.path.abspath(args.work),
                              'tags': args.tags, 'cases': args.cases, 'decoy': decoy}, args.results_json)
        return
    per_tag = {tag: score_tag(args.work, tag, args.cases, args.probes) for tag in args.tags}
    groups = ['all', *LESION_TYPES.values()]
    columns = COLUMNS + (PROBES if args.probes else ())
    table = {column: {g: mean_sd([per_tag[t][column][g] for t in args.tags]) for g in groups} for column in columns}
    for column in columns:
        print(f'{column:36s}', '  '.join(f"{g} {table[column][g]['mean']:.3f}" for g in groups))
    if args.results_json:
        atomic_save_json({'label': args.label, 'machine': machine(), 'work': os.path.abspath(args.work),
                          'tags': args.tags, 'cases': args.cases, 'evaluation': 'body-only, preprocessed body box',
                          'per_tag': per_tag, 'table': table}, args.results_json)


if __name__ == '__main__':
    main()
