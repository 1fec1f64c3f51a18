"""Where each Screener stage lives in nnUNet_results, and loading finished stages as frozen modules."""
import os
from os.path import isfile, join

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnscreener.density.factory import build_density_model
from nnscreener.density.conditions import LeaveOutConditions
from nnscreener.density.modular_screener import ModularScreener
from nnscreener.planners.screener_planner import CONFIGURATION, SCREENER_PLANS_NAME, screener_plans_file
from nnscreener.planners.settings import ScreenerSettings
from nnscreener.training.networks import build_plans_unet
from nnscreener.training.stage_trainer import load_stage_network

STAGE_TRAINERS = {
    'descriptor': 'nnScreenerDescriptorTrainer',
    'condition': 'nnScreenerConditionTrainer',
    'density': 'nnScreenerDensityTrainer',
    'distillation': 'nnScreenerDistillationTrainer',
}
PRETRAIN_FOLD = 'all'  # pretraining uses every case: there is no label to validate against


def screener_dataset(dataset_name: str) -> str:
    """The dataset whose pretrained Screener `dataset_name` uses: the one its plans name in `screener_from`
    (nnScreener_plan_and_preprocess --screener_from), else itself (also when its plans are not at hand)."""
    if not os.environ.get('nnUNet_preprocessed') or not isfile(plans_file := screener_plans_file(dataset_name)):
        return dataset_name
    plans = load_json(plans_file)
    return (ScreenerSettings.from_plans(plans).screener_from if 'screener' in plans else None) or dataset_name


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
    return _frozen_unet_and_state(dataset_name, stage, configuration_manager, output_channels, device)[0]


def _frozen_unet_and_state(dataset_name: str, stage: str, configuration_manager: ConfigurationManager,
                           output_channels: int, device: torch.device):
    """The frozen UNet of a finished stage and the screener state of its checkpoint, from one read of the file."""
    checkpoint, state = load_stage_network(stage_checkpoint(dataset_name, stage), device)
    network = build_plans_unet(configuration_manager, output_channels)
    network.load_state_dict(checkpoint['network_weights'])
    return freeze(network.to(device)), state


def density_from_block(settings: ScreenerSettings) -> nn.Module:
    """The (untrained) density model of the settings' density block, for its conditions."""
    kind, name = settings.density.condition, settings.density.model
    d_c = settings.condition_dim if kind != 'none' else 0
    if kind == 'none':
        name = name.replace('conditional_', '')
    return build_density_model(name, settings.descriptor_dim, d_c)


def load_modular_screener(dataset_name: str, configuration_manager: ConfigurationManager, device: torch.device,
                          density_trainer: str = None) -> ModularScreener:
    """The trained modular Screener: the density model of `density_trainer` (default nnScreenerDensityTrainer) with
    the descriptor, conditions and settings it was trained with (the screener block its checkpoint holds)."""
    checkpoint, state = load_stage_network(stage_checkpoint(dataset_name, 'density', density_trainer), device)
    settings = ScreenerSettings.from_dict(state['plans_screener'])
    density = density_from_block(settings)
    density.load_state_dict(checkpoint['network_weights'])
    return assemble_modular_screener(dataset_name, configuration_manager, settings, freeze(density), device)


def assemble_modular_screener(dataset_name: str, configuration_manager: ConfigurationManager,
                              settings: ScreenerSettings, density: nn.Module, device: torch.device) -> ModularScreener:
    """`density` on the frozen descriptor (+ condition) of the finished SSL stages, with the conditions of
    `settings` (the density trainer's, whose density model is still to be trained)."""
    block = settings.density
    descriptor = load_frozen_unet(dataset_name, 'descriptor', configuration_manager, settings.descriptor_dim, device)
    condition = None
    if block.condition == 'learned':
        condition, state = _frozen_unet_and_state(dataset_name, 'condition', configuration_manager,
                                                  settings.condition_dim, device)
        if block.condition_leave_out is not None:  # with the mask token the condition model was trained with
            condition = LeaveOutConditions(condition, float(state['objective_weights']['masking.mask_token']),
                                           block.condition_leave_out, block.condition_leave_out_centred)
    return ModularScreener(descriptor, density.to(device), block.condition, condition, settings.condition_dim,
                           block.pool_stride, block.condition_median).to(device)

