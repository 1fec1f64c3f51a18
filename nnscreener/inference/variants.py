"""Anomaly maps of several density variants of one Screener at once (`predict_density_variants`).

The density variants of the paper's ablation (`nnScreener_pretrain --density_trainer ...`) run on the same
descriptor and, with learned conditions, the same condition model: both come from the same stage checkpoints.
`nnScreener_predict` of each variant reads and preprocesses every CT and runs those two UNets again; here each CT is
read, preprocessed and CLAHE'd once and each patch's descriptor and condition maps are computed once, then scored by
every variant's density model. Each variant still gets the output folder `nnScreener_predict --model modular
--density_trainer T` writes (maps, scores, overlays, manifest), with the same maps.
"""
from contextlib import ExitStack
from os.path import abspath, join
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from tqdm import tqdm

from nnscreener.inference.anomaly_maps import (MAP_ENDING, OVERLAY_FOLDER, body_anomaly_maps, find_ct_files,
                                               map_identity, map_smoothing_mm, map_smoothing_sigma,
                                               map_to_input_geometry, preprocess_ct_image, write_anomaly_map)
from nnscreener.inference.manifest import PredictionRun
from nnscreener.density.modular_screener import DensityPatchModel
from nnscreener.inference.predict import predict
from nnscreener.inference.trained_model import load_trained_model
from nnscreener.planners.screener_planner import CONFIGURATION
from nnscreener.preprocessing.validation import check_ct_image
from nnscreener.utilities.errors import ScreenerInputError
from nnscreener.utilities.io import read_image
from nnscreener.utilities.output_folder import check_output_folder, output_folder_lock
from nnscreener.utilities.paths import dataset_name, require_env


class ReuseLastOutput(nn.Module):
    """A frozen network the variants call one after another on the same patch batch: a call on the very tensor of
    the previous call returns the previous output instead of running the network again."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self._last = None  # (input, output); holding the input keeps its identity from being reused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not x:
            self._last = (x, self.network(x))
        return self._last[1]


class DensityVariantsPatchModel:
    """A `PatchAnomalyModel` with one map per variant (B, V, z', y', x'), the variants sharing one descriptor and
    one condition network (every variant loads them from the same stage checkpoints, so one copy serves all)."""

    def __init__(self, variants: Sequence[DensityPatchModel]):
        shared = {}
        for screener in (v.screener for v in variants):
            screener.descriptor = shared.setdefault('descriptor', ReuseLastOutput(screener.descriptor))
            if screener.condition is not None:  # learned conditions; sin-cos ones are computed, not a network
                # variants with and without leave-out conditions share the network, not its output
                key = ('condition', getattr(screener.condition, 'cell', None))
                screener.condition = shared.setdefault(key, ReuseLastOutput(screener.condition))
        if len({v.patch_size for v in variants}) != 1:
            raise ScreenerInputError('the density variants were trained with different plans (patch sizes '
                                     f'{sorted({v.patch_size for v in variants})}): predict them one at a time')
        self.variants = list(variants)
        self.patch_size, self.device = self.variants[0].patch_size, self.variants[0].device

    def __call__(self, stock: torch.Tensor, clahe: torch.Tensor, crop_start: torch.Tensor) -> torch.Tensor:
        return torch.cat([v(stock, clahe, crop_start) for v in self.variants], dim=1)


def predict_density_variants(input_path: Union[str, Sequence[str]], output_folders: Dict[Optional[str], str],
                             dataset, device: str = 'cuda', step_size: float = 0.5, batch_size: int = 4,
                             overlays: int = 0, continue_: bool = False, reference_folder: str = None,
                             allow_non_hu: bool = False,
                             smoothing_mm: float = None) -> Dict[Optional[str], List[dict]]:
    """`predict(input_path, folder, dataset, 'modular', ..., density_trainer=T)` for every `{T: folder}` of
    `output_folders` (T None: the default density stage); returns {T: its score records}.

    First every CT is preprocessed once and the maps of all variants still missing (all of them without
    `continue_`) are computed in one sliding window and written, each into its folder with its manifest entry, as
    predict writes them. Then predict runs per variant with --c: it keeps exactly those maps and writes the scores
    and overlays.
    """
    folders = {t: abspath(f) for t, f in output_folders.items()}
    if not folders or len(set(folders.values())) != len(folders):
        raise ScreenerInputError(f'each density variant needs an output folder of its own, got {output_folders}')
    require_env('nnUNet_results')
    for folder in folders.values():  # before loading anything, as predict does
        check_output_folder(folder, (), only_ours=True, subfolders=(OVERLAY_FOLDER,))
    name = dataset_name(dataset)
    cases = find_ct_files(input_path)
    models = {t: load_trained_model(name, 'modular', torch.device(device), t) for t in folders}
    first = next(iter(models.values()))  # the variants share the plans
    smoothing_mm = map_smoothing_mm(first.plans_manager, smoothing_mm)
    with ExitStack() as stack:
        runs = {}
        for t, folder in folders.items():
            stack.enter_context(output_folder_lock(folder, (OVERLAY_FOLDER,)))
            manifest = check_output_folder(folder, (), only_ours=True, subfolders=(OVERLAY_FOLDER,))
            runs[t] = PredictionRun(folder, manifest, cases, {case: case + MAP_ENDING for case in cases},
                                    map_identity(models[t].identity, step_size, smoothing_mm), continue_)
        _write_missing_maps(cases, runs, DensityVariantsPatchModel([m.patch_model for m in models.values()]),
                            first.plans_manager, first.dataset_json, step_size, batch_size, allow_non_hu,
                            smoothing_mm)
    return {t: predict(input_path, folder, dataset, 'modular', device, step_size, batch_size, overlays, True, t,
                       reference_folder, allow_non_hu, smoothing_mm=smoothing_mm) for t, folder in folders.items()}


def _write_missing_maps(cases: Dict[str, str], runs: Dict[Optional[str], PredictionRun],
                        model: DensityVariantsPatchModel, plans_manager, dataset_json: dict, step_size: float,
                        batch_size: int, allow_non_hu: bool, smoothing_mm: float) -> None:
    """Each case's maps of the variants whose run does not keep one: one preprocessing, one sliding window."""
    configuration_manager = plans_manager.get_configuration(CONFIGURATION)
    smoothing = map_smoothing_sigma(smoothing_mm, configuration_manager)
    for case, image_file in tqdm(cases.items(), desc=f'anomaly maps ({len(runs)} density variants)'):
        missing = [t for t, run in runs.items() if case not in run.maps_to_keep]
        if not missing:
            continue
        image = read_image(image_file)
        check_ct_image(image, image_file, allow_non_hu=allow_non_hu)
        stock, view, properties = preprocess_ct_image(image, plans_manager, configuration_manager, dataset_json)
        for t, anomaly_map in zip(runs, body_anomaly_maps(stock, view, model, step_size, batch_size, smoothing)):
            if t in missing:
                map_raw = map_to_input_geometry(anomaly_map, properties, plans_manager, configuration_manager)
                write_anomaly_map(map_raw, image, join(runs[t].folder, runs[t].outputs[case]))
                runs[t].record_map(case, runs[t].outputs[case])
