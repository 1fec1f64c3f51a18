"""`nnScreener_predict`: unsupervised anomaly maps of raw CTs with the modular or the distilled Screener (or the
autoencoder and local-contrast baselines of the quality benchmark)."""
import os
from os.path import isfile, join
from typing import Tuple

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnscreener.baselines.autoencoder import build_autoencoder, reconstruction_error_map
from nnscreener.inference.anomaly_maps import OVERLAY_FOLDER, predict_anomaly_maps
from nnscreener.inference.findings import (FindingsSettings, add_findings_arguments, findings_settings,
                                           resolve_reference, write_findings_report)
from nnscreener.baselines.local_contrast import LocalContrastPatchModel
from nnscreener.planners.screener_planner import CONFIGURATION, SCREENER_PLANS_NAME
from nnscreener.training.networks import build_plans_unet
from nnscreener.training.stage_trainer import load_stage_network
from nnscreener.training.stages import modular_screener, screener_dataset, stage_checkpoint, stage_folder
from nnscreener.utilities.cli import add_device_argument, argument_parser
from nnscreener.utilities.errors import ScreenerInputError, exit_on_input_error
from nnscreener.utilities.io import file_sha256
from nnscreener.utilities.output_folder import check_output_folder
from nnscreener.utilities.paths import dataset_name, preprocessed_dataset_folder, require_env

AUTOENCODER_TRAINER = 'nnScreenerAutoencoderTrainer'
# model kind -> (stage, trainer) whose result folder holds the plans.json / dataset.json it was trained with
MODEL_FOLDERS = {'modular': ('density', None), 'distilled': ('distillation', None),
                 'autoencoder': ('density', AUTOENCODER_TRAINER)}
LOCAL_CONTRAST = 'local_contrast'  # training-free baseline: the dataset's preprocessed plans are all it needs
MODEL_KINDS = tuple(MODEL_FOLDERS) + (LOCAL_CONTRAST,)


class ModularPatchModel:
    """descriptor -> condition -> density on the CLAHE patch; the map stays at the pooled resolution."""

    def __init__(self, screener: nn.Module, patch_size, device: torch.device):
        self.screener, self.patch_size, self.device = screener.eval(), tuple(patch_size), device

    def __call__(self, stock: torch.Tensor, clahe: torch.Tensor, crop_start: torch.Tensor) -> torch.Tensor:
        return self.screener(self.screener.select_input(stock, clahe), crop_start)


class DistilledPatchModel:
    """The distilled UNet on the stock nnU-Net input, mapped back to the teacher's NLL scale."""
    uses_clahe = False

    def __init__(self, network: nn.Module, target_mean: float, target_sd: float, patch_size, device: torch.device):
        self.network, self.patch_size, self.device = network.eval(), tuple(patch_size), device
        self.target_mean, self.target_sd = target_mean, target_sd

    def __call__(self, stock: torch.Tensor, clahe: torch.Tensor, crop_start: torch.Tensor) -> torch.Tensor:
        return self.network(stock) * self.target_sd + self.target_mean


class AutoencoderPatchModel:
    """Baseline: squared reconstruction error of the stock input, averaged over the density's pooling cells."""
    uses_clahe = False

    def __init__(self, autoencoder: nn.Module, pool_stride, patch_size, device: torch.device):
        self.autoencoder, self.pool_stride = autoencoder.eval(), tuple(pool_stride)
        self.patch_size, self.device = tuple(patch_size), device

    def __call__(self, stock: torch.Tensor, clahe: torch.Tensor, crop_start: torch.Tensor) -> torch.Tensor:
        return reconstruction_error_map(self.autoencoder, stock, self.pool_stride)


def load_patch_model(name: str, kind: str, device: torch.device,
                     density_trainer: str = None) -> Tuple[object, PlansManager, dict]:
    """The trained model of dataset `name` with the plans and dataset.json it was trained with; `density_trainer`
    picks a density-stage variant for the modular model."""
    if kind not in MODEL_KINDS:
        raise ScreenerInputError(f'unknown model {kind!r}; choose {MODEL_KINDS}')
    if kind == LOCAL_CONTRAST:
        return _local_contrast_model(name)
    folder = _model_folder(name, kind, density_trainer)
    if not isfile(join(folder, 'plans.json')):
        trainer = MODEL_FOLDERS[kind][1]
        raise ScreenerInputError(f'no trained {kind} model for {name} in {folder}: run nnScreener_pretrain -d '
                                 f'{screener_dataset(name)}'
                                 + (' --stages density --density_trainer ' + trainer if trainer else ''))
    plans_manager = PlansManager(load_json(join(folder, 'plans.json')))
    configuration_manager = plans_manager.get_configuration(CONFIGURATION)
    try:
        model = _build_patch_model(name, kind, plans_manager.plans['screener'], configuration_manager, device,
                                   density_trainer)
    except RuntimeError as e:  # load_state_dict: missing keys or shape mismatches
        raise ScreenerInputError(f'a {kind} checkpoint of {name} does not fit its plans ({str(e).splitlines()[0]}); '
                                 f're-run nnScreener_pretrain with these plans')
    return model, plans_manager, load_json(join(folder, 'dataset.json'))


def _model_folder(name: str, kind: str, density_trainer: str = None) -> str:
    """The trainer folder whose plans.json / dataset.json the model was trained with."""
    stage, trainer = MODEL_FOLDERS[kind]
    return os.path.dirname(stage_folder(name, stage, density_trainer if kind == 'modular' else trainer))


def model_identity(name: str, kind: str, density_trainer: str = None) -> dict:
    """What makes a map this model's (recorded in the predict output folder's manifest): dataset, kind, density
    trainer, the plans (identifier, preset, sha256 of the plans file used) and the sha256 of every checkpoint the
    model is built from (for the modular model those of the descriptor, condition and density stages present)."""
    if kind == LOCAL_CONTRAST:
        plans_file, checkpoints = _preprocessed_plans_file(name), []
    elif kind == 'modular':
        plans_file = join(_model_folder(name, kind, density_trainer), 'plans.json')
        stages = (('descriptor', None), ('condition', None), ('density', density_trainer))
        checkpoints = [f for f in (stage_checkpoint(name, s, t) for s, t in stages) if isfile(f)]
    else:
        plans_file = join(_model_folder(name, kind), 'plans.json')
        checkpoints = [stage_checkpoint(name, *MODEL_FOLDERS[kind])]
    return {'dataset': name, 'model': kind, 'density_trainer': density_trainer, 'plans': SCREENER_PLANS_NAME,
            'preset': load_json(plans_file)['screener'].get('preset'), 'plans_sha256': file_sha256(plans_file),
            'checkpoints': {os.path.relpath(f, os.environ['nnUNet_results']): file_sha256(f) for f in checkpoints}}


def _preprocessed_plans_file(name: str) -> str:
    return join(preprocessed_dataset_folder(name), SCREENER_PLANS_NAME + '.json')


def _local_contrast_model(name: str) -> Tuple[object, PlansManager, dict]:
    require_env('nnUNet_preprocessed')
    plans_file = _preprocessed_plans_file(name)
    if not isfile(plans_file):
        raise ScreenerInputError(f'{plans_file} missing: run nnScreener_plan_and_preprocess -d {name} first')
    plans_manager = PlansManager(load_json(plans_file))
    model = LocalContrastPatchModel(plans_manager.get_configuration(CONFIGURATION).patch_size)
    return model, plans_manager, load_json(join(preprocessed_dataset_folder(name), 'dataset.json'))


def _build_patch_model(name: str, kind: str, screener: dict, configuration_manager: ConfigurationManager,
                       device: torch.device, density_trainer: str = None):
    patch = configuration_manager.patch_size
    if kind == 'modular':
        return ModularPatchModel(modular_screener(name, configuration_manager, screener, device,
                                                  density_trainer=density_trainer), patch, device)
    stage, trainer = MODEL_FOLDERS[kind]
    checkpoint, state = load_stage_network(stage_checkpoint(name, stage, trainer), device)
    if kind == 'distilled':
        network = build_plans_unet(configuration_manager, 1).to(device)
        network.load_state_dict(checkpoint['network_weights'])
        weights = state['objective_weights']
        return DistilledPatchModel(network, float(weights['target_mean']), float(weights['target_sd']), patch, device)
    autoencoder = build_autoencoder(configuration_manager, screener['descriptor_dim']).to(device)
    autoencoder.load_state_dict(checkpoint['network_weights'])
    return AutoencoderPatchModel(autoencoder, screener['density']['pool_stride'], patch, device)


def predict(input_path, output_folder: str, dataset, model: str = 'modular', device: str = 'cuda',
            step_size: float = 0.5, batch_size: int = 4, overlays: int = 0, continue_: bool = False,
            density_trainer: str = None, reference_folder: str = None, allow_non_hu: bool = False,
            findings: FindingsSettings = None):
    """reference_folder: `<case>.nii.gz` masks whose contours the overlays show (cases without one: no contour).
    allow_non_hu: accept CTs whose values do not look like HU (`check_hounsfield_units`).
    findings: also write the findings report (`nnscreener.inference.findings`); its threshold and normals are
    checked against this model before any map is computed."""
    if reference_folder is not None and not os.path.isdir(reference_folder):
        raise ScreenerInputError(f'reference mask folder {reference_folder} does not exist')
    require_env('nnUNet_results')
    check_output_folder(output_folder, (), only_ours=True, subfolders=(OVERLAY_FOLDER,))  # before loading anything
    name = dataset_name(dataset)
    patch_model, plans_manager, dataset_json = load_patch_model(name, model, torch.device(device), density_trainer)
    model_name = model if model != 'modular' or density_trainer is None else f'{model} ({density_trainer})'
    identity = model_identity(name, model, density_trainer)
    reference = resolve_reference(findings, {**identity, 'step_size': step_size}) if findings else None
    records = predict_anomaly_maps(input_path, output_folder, patch_model, plans_manager,
                                   plans_manager.get_configuration(CONFIGURATION), dataset_json, step_size,
                                   batch_size, overlays, continue_, model_name=model_name,
                                   reference_folder=reference_folder, model_identity=identity,
                                   allow_non_hu=allow_non_hu)
    if reference:
        write_findings_report(output_folder, reference, findings.min_volume_ml, findings.n_png)
    return records


@exit_on_input_error
def predict_entry():
    parser = argument_parser('Voxel-wise anomaly maps (NIfTI, input geometry) and scan scores '
                             'of raw CT scans with a pretrained Screener.')
    parser.add_argument('-i', required=True, nargs='+',
                        help='CT files (.nii.gz, .nii, .mha, .nrrd) and DICOM series folders (one series each), or '
                             'one folder of them')
    parser.add_argument('-o', required=True, help='output folder')
    parser.add_argument('-d', required=True, help='dataset id or name the Screener was pretrained on')
    parser.add_argument('--model', default='modular', choices=MODEL_KINDS,
                        help='modular: descriptor, condition and density models; distilled: the one UNet they were '
                             'distilled into (faster); other kinds: baselines')
    add_device_argument(parser)
    parser.add_argument('--step_size', type=float, default=0.5, help='sliding-window step, fraction of the patch')
    parser.add_argument('--batch_size', type=int, default=4, help='patches per forward pass')
    parser.add_argument('--overlays', type=int, default=0, help='PNG overlays for the N highest-scoring scans')
    parser.add_argument('--ref', default=None,
                        help='folder of <case>.nii.gz reference masks: the overlays show their contours')
    parser.add_argument('--c', action='store_true',
                        help='continue: keep the maps the output folder\'s manifest lists as this model\'s maps of the '
                             'same inputs, recompute the others')
    parser.add_argument('--density_trainer', default=None,
                        help='modular model: a density-stage variant trained with nnScreener_pretrain --density_trainer')
    parser.add_argument('--allow_non_hu', action='store_true',
                        help='accept CTs whose values do not look like HU (none below 0, or a range under 10), '
                             'which are refused by default')
    add_findings_arguments(parser)
    args = parser.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise ScreenerInputError('no CUDA device available: pass -device cpu')
    inputs = args.i[0] if len(args.i) == 1 else args.i
    records = predict(inputs, args.o, args.d, args.model, args.device, args.step_size, args.batch_size,
                      args.overlays, args.c, args.density_trainer, args.ref, args.allow_non_hu,
                      findings_settings(args))
    print(f'{len(records)} anomaly maps in {args.o} (scores.csv)')
