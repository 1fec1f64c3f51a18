"""Where each Screener stage lives in nnUNet_results, and loading finished stages as frozen modules."""
import os
from os.path import isfile, join

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnscreener.baselines.intensity import ConditionalHistogramDensity, IntensityDescriptor
from nnscreener.density.factory import build_density_model
from nnscreener.density.conditions import LeaveOutConditions
from nnscreener.density.modular_screener import ModularScreener
from nnscreener.planners.screener_planner import CONFIGURATION, SCREENER_FROM, SCREENER_PLANS_NAME
from nnscreener.training.networks import build_plans_unet
from nnscreener.training.stage_trainer import load_stage_network

STAGE_TRAINERS = {
    'descriptor': 'nnScreenerDescriptorTrainer',
    'condition': 'nnScreenerConditionTrainer',
    'density': 'nnScreenerDensityTrainer',
    'distillation': 'nnScreenerDistillationTrainer',
}
HISTOGRAM_MODEL = 'conditional_histogram'  # the intensity baseline's density (nnscreener.baselines.intensity)
PRETRAIN_FOLD = 'all'  # pretraining uses every case: there is no label to validate against


def screener_dataset(dataset_name: str) -> str:
    """The dataset whose pretrained Screener `dataset_name` uses: the one its plans name in `screener_from`
    (nnScreener_plan_and_preprocess --screener_from), else itself (also when its plans are not at hand)."""
    plans_file = join(os.environ.get('nnUNet_preprocessed', ''), dataset_name, SCREENER_PLANS_NAME + '.json')
    if not os.environ.get('nnUNet_preprocessed') or not isfile(plans_file):
        return dataset_name
    return load_json(plans_file).get('screener', {}).get(SCREENER_FROM, dataset_name)


def stage_folder(dataset_name: str, stage: str, trainer: str = None) -> str:
    """Result folder of a stage of the Screener that `dataset_name` uses (its own, or that of its `screener_from`
    dataset: every reader and writer of stage results finds them here); `trainer` names a variant (e.g.
    nnScreenerDensityTrainer_flow)."""
    trainer = trainer or STAGE_TRAINERS[stage]
    return join(os.environ['nnUNet_results'], screener_dataset(dataset_name),
                f'{trainer}__{SCREENER_PLANS_NAME}__{CONFIGURATION}', f'fold_{PRETRAIN_FOLD}')


def stage_checkpoint(dataset_name: str, stage: str, trainer: str = None) -> str:
    return join(stage_folder(dataset_name, stage, trainer), 'checkpoint_final.pth')


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_frozen_unet(dataset_name: str, stage: str, configuration_manager: ConfigurationManager, output_channels: int,
                     device: torch.device) -> nn.Module:
    checkpoint, _ = load_stage_network(stage_checkpoint(dataset_name, stage), device)
    network = build_plans_unet(configuration_manager, output_channels)
    network.load_state_dict(checkpoint['network_weights'])
    return freeze(network.to(device))


def density_from_block(screener: dict, condition_kind: str) -> nn.Module:
    d_c = screener['condition_dim'] if condition_kind != 'none' else 0
    name = screener['density']['model']
    if name == HISTOGRAM_MODEL:
        return ConditionalHistogramDensity(d_c)
    if condition_kind == 'none':
        name = name.replace('conditional_', '')
    return build_density_model(name, screener['descriptor_dim'], d_c)


def modular_screener(dataset_name: str, configuration_manager: ConfigurationManager, screener: dict,
                     device: torch.device, density: nn.Module = None, density_trainer: str = None) -> ModularScreener:
    """Frozen descriptor (+ condition) of the finished SSL stages with `density`, or by default the trained density
    model of `density_trainer` (default nnScreenerDensityTrainer) with the model and conditions it was trained with.
    A screener block with `descriptor: intensity` (the intensity baseline) uses the HU input as its descriptor.
    """
    if density is None:
        checkpoint, state = load_stage_network(stage_checkpoint(dataset_name, 'density', density_trainer), device)
        screener = state['plans_screener']
    kind = screener['density']['condition']
    intensity = screener.get('descriptor') == 'intensity'
    descriptor = IntensityDescriptor() if intensity else \
        load_frozen_unet(dataset_name, 'descriptor', configuration_manager, screener['descriptor_dim'], device)
    condition = None
    if kind == 'learned':
        condition = load_frozen_unet(dataset_name, 'condition', configuration_manager, screener['condition_dim'], device)
        cell = condition_leave_out_cell(screener)
        if cell is not None:
            condition = LeaveOutConditions(condition, condition_mask_token(dataset_name, device), cell)
    if density is None:
        density = density_from_block(screener, kind)
        density.load_state_dict(checkpoint['network_weights'])
        density = freeze(density)
    return ModularScreener(descriptor, density.to(device), kind, condition, screener['condition_dim'],
                           screener['density']['pool_stride'], 'stock' if intensity else 'clahe',
                           condition_median_window(screener)).to(device)


def condition_median_window(screener: dict) -> int:
    """The median window of the learned conditions (density voxels); plans from before it existed: 1 (none)."""
    return int(screener['density'].get('condition_median', 1))


def condition_leave_out_cell(screener: dict):
    """The leave-out cell of the learned conditions (`LeaveOutConditions`), or None: the paper's conditions of the
    unmasked input (plans from before the option have no key)."""
    cell = screener['density'].get('condition_leave_out')
    return tuple(cell) if cell else None


def condition_mask_token(dataset_name: str, device: torch.device) -> float:
    """The mask token the condition model was trained with (saved with its SSL objective)."""
    _, state = load_stage_network(stage_checkpoint(dataset_name, 'condition'), device)
    return float(state['objective_weights']['masking.mask_token'])
