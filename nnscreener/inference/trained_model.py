"""The one place that loads a trained Screener (or baseline) for inference, from its stage result folder (compare
nnU-Net's `nnUNetPredictor.initialize_from_trained_model_folder`): the patch model, the plans and dataset.json it
was trained with, and its identity for the predict manifest."""
import os
from dataclasses import dataclass
from os.path import isfile, join

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnscreener.baselines import BASELINE_TRAINERS
from nnscreener.baselines.autoencoder import AutoencoderPatchModel, build_autoencoder
from nnscreener.baselines.intensity import IntensityBaseline
from nnscreener.baselines.local_contrast import LocalContrastPatchModel
from nnscreener.density.modular_screener import DensityPatchModel
from nnscreener.distillation.objective import DistilledPatchModel
from nnscreener.planners.screener_planner import CONFIGURATION, SCREENER_PLANS_NAME, screener_plans_file
from nnscreener.planners.settings import ScreenerSettings
from nnscreener.training.networks import build_plans_unet
from nnscreener.training.stage_trainer import load_stage_network
from nnscreener.training.stages import freeze, load_modular_screener, screener_dataset, stage_checkpoint, stage_folder
from nnscreener.utilities.errors import ScreenerInputError
from nnscreener.utilities.io import file_sha256
from nnscreener.utilities.paths import preprocessed_dataset_folder, require_env

# model kind -> (stage, trainer) of the result folder that holds the model and the plans it was trained with; the
# trained baselines take the density stage's place
MODEL_FOLDERS = {'modular': ('density', None), 'distilled': ('distillation', None),
                 **{name: ('density', trainer) for name, trainer in BASELINE_TRAINERS.items() if trainer}}
LOCAL_CONTRAST = 'local_contrast'  # training-free baseline: the dataset's preprocessed plans are all it needs
MODEL_KINDS = tuple(MODEL_FOLDERS) + (LOCAL_CONTRAST,)


@dataclass(frozen=True)
class TrainedModel:
    patch_model: object  # a `PatchAnomalyModel`
    plans_manager: PlansManager
    dataset_json: dict
    identity: dict  # what makes a map this model's (the predict manifest's `model`)

    @property
    def configuration_manager(self) -> ConfigurationManager:
        return self.plans_manager.get_configuration(CONFIGURATION)


def load_trained_model(name: str, kind: str, device: torch.device, density_trainer: str = None) -> TrainedModel:
    """The trained model `kind` of dataset `name` (for the modular model: the density stage of `density_trainer`,
    default nnScreenerDensityTrainer); one line of advice when it is missing or does not fit its plans."""
    if kind not in MODEL_KINDS:
        raise ScreenerInputError(f'unknown model {kind!r}; choose {MODEL_KINDS}')
    if kind == LOCAL_CONTRAST:
        return _local_contrast_model(name)
    stage, trainer = MODEL_FOLDERS[kind]
    trainer = density_trainer if kind == 'modular' else trainer
    folder = os.path.dirname(stage_folder(name, stage, trainer))  # the trainer folder: plans.json, dataset.json
    plans_file = join(folder, 'plans.json')
    if not isfile(plans_file):
        raise ScreenerInputError(f'no trained {kind} model for {name} in {folder}: run '
                                 f'nnScreener_pretrain -d {screener_dataset(name)}'
                                 + (' --stages density --density_trainer ' + trainer if trainer else ''))
    plans_manager = PlansManager(load_json(plans_file))
    try:
        patch_model = _patch_model(name, kind, trainer, plans_manager, device)
    except RuntimeError as e:  # load_state_dict: missing keys or shape mismatches
        raise ScreenerInputError(f'a {kind} checkpoint of {name} does not fit its plans ({str(e).splitlines()[0]}); '
                                 f're-run nnScreener_pretrain with these plans')
    stages = (('descriptor', None), ('condition', None), (stage, trainer)) if kind == 'modular' else ((stage, trainer),)
    checkpoints = [f for f in (stage_checkpoint(name, s, t) for s, t in stages) if isfile(f)]
    return TrainedModel(patch_model, plans_manager, load_json(join(folder, 'dataset.json')),
                        _identity(name, kind, density_trainer, plans_file, plans_manager, checkpoints))


def _patch_model(name: str, kind: str, trainer: str, plans_manager: PlansManager, device: torch.device):
    configuration_manager = plans_manager.get_configuration(CONFIGURATION)
    patch = configuration_manager.patch_size
    if kind == 'modular':
        return DensityPatchModel(load_modular_screener(name, configuration_manager, device, trainer), patch, device)
    checkpoint, state = load_stage_network(stage_checkpoint(name, MODEL_FOLDERS[kind][0], trainer), device)
    settings = ScreenerSettings.from_dict(state['plans_screener'])
    if kind == 'distilled':
        network = build_plans_unet(configuration_manager, 1).to(device)
        network.load_state_dict(checkpoint['network_weights'])
        weights = state['objective_weights']
        return DistilledPatchModel(network, float(weights['target_mean']), float(weights['target_sd']), patch, device)
    if kind == 'intensity':
        model = IntensityBaseline(settings.condition_dim, settings.density.pool_stride)
        model.density.load_state_dict(checkpoint['network_weights'])
        return DensityPatchModel(freeze(model.to(device)), patch, device)
    autoencoder = build_autoencoder(configuration_manager, settings.descriptor_dim).to(device)
    autoencoder.load_state_dict(checkpoint['network_weights'])
    return AutoencoderPatchModel(autoencoder, settings.density.pool_stride, patch, device)


def _identity(name: str, kind: str, density_trainer: str, plans_file: str, plans_manager: PlansManager,
              checkpoints) -> dict:
    """Dataset, kind, density trainer, the plans (identifier, preset, sha256 of the plans file used) and the sha256 of
    every checkpoint the model is built from (for the modular model those of the descriptor, condition and density
    stages present)."""
    return {'dataset': name, 'model': kind, 'density_trainer': density_trainer, 'plans': SCREENER_PLANS_NAME,
            'preset': ScreenerSettings.from_plans(plans_manager.plans).preset, 'plans_sha256': file_sha256(plans_file),
            'checkpoints': {os.path.relpath(f, os.environ['nnUNet_results']): file_sha256(f) for f in checkpoints}}


def _local_contrast_model(name: str) -> TrainedModel:
    require_env('nnUNet_preprocessed')
    plans_file = screener_plans_file(name)
    if not isfile(plans_file):
        raise ScreenerInputError(f'{plans_file} missing: run nnScreener_plan_and_preprocess -d {name} first')
    plans_manager = PlansManager(load_json(plans_file))
    model = LocalContrastPatchModel(plans_manager.get_configuration(CONFIGURATION).patch_size)
    return TrainedModel(model, plans_manager, load_json(join(preprocessed_dataset_folder(name), 'dataset.json')),
                        _identity(name, LOCAL_CONTRAST, None, plans_file, plans_manager, []))
