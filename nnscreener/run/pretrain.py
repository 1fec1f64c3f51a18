"""`nnScreener_pretrain`: descriptor -> condition -> density -> distillation, each an nnU-Net trainer run.

Multi-GPU follows nnU-Net: `-num_gpus N` spawns N DDP processes (NCCL on CUDA, gloo on CPU), and a launch under
`torchrun` joins the process group torchrun set up.
"""
import argparse
import os
from os.path import isfile, join
from typing import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnscreener.planners.presets import PRESETS
from nnscreener.planners.screener_planner import CONFIGURATION, SCREENER_PLANS_NAME
from nnscreener.training.stage_trainer import SEED_ENV
from nnscreener.training.stages import PRETRAIN_FOLD, STAGE_TRAINERS, stage_checkpoint
from nnscreener.utilities.errors import ScreenerInputError, exit_on_input_error
from nnscreener.utilities.paths import dataset_name, preprocessed_dataset_folder, require_env


def pretrain(dataset, stages: Sequence[str] = tuple(STAGE_TRAINERS), preset: str = None, continue_: bool = False,
             device: str = 'cuda', num_gpus: int = 1, density_trainer: str = None, seed: int = None) -> dict:
    """Runs the requested stages in order; returns {stage: checkpoint_final.pth}.

    seed: training seed of every stage (sets the nnScreener_seed environment variable; default: as set, else 0).

    density_trainer: a variant of nnScreenerDensityTrainer for the density stage (ablations); the distillation
    teacher always uses the default density stage.
    """
    require_env('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')
    name = dataset_name(dataset)
    _check_plans(name, preset)
    unknown = [s for s in stages if s not in STAGE_TRAINERS]
    if unknown:
        raise ScreenerInputError(f'unknown stage(s) {unknown}; choose from {list(STAGE_TRAINERS)}')
    trainers = {**STAGE_TRAINERS, 'density': density_trainer or STAGE_TRAINERS['density']}
    if seed is not None:
        os.environ[SEED_ENV] = str(seed)
    for stage in [s for s in STAGE_TRAINERS if s in stages]:  # paper order, whatever order was typed
        checkpoint = stage_checkpoint(name, stage, trainers[stage])
        if continue_ and isfile(checkpoint):
            print(f'{stage}: finished earlier ({checkpoint}), skipping')
            continue
        print(f'==== Screener stage: {stage} ({trainers[stage]}) ====')
        run_stage(name, trainers[stage], continue_, torch.device(device), num_gpus)
    return {s: stage_checkpoint(name, s, trainers[s]) for s in stages}


def _check_plans(name: str, preset: str) -> None:
    plans_file = join(preprocessed_dataset_folder(name), SCREENER_PLANS_NAME + '.json')
    if not isfile(plans_file):
        raise ScreenerInputError(f'{plans_file} missing: run nnScreener_plan_and_preprocess -d {name} first')
    planned = load_json(plans_file).get('screener', {}).get('preset')
    if preset is not None and preset != planned:
        raise ScreenerInputError(f'{name} was planned with preset {planned!r}, not {preset!r}: re-run '
                                 f'nnScreener_plan_and_preprocess -d {name} --preset {preset}')


def run_stage(name: str, trainer_name: str, continue_: bool, device: torch.device, num_gpus: int) -> None:
    if num_gpus > 1:
        os.environ.setdefault('MASTER_ADDR', 'localhost')
        if 'MASTER_PORT' not in os.environ:
            from nnunetv2.run.run_training import find_free_network_port
            os.environ['MASTER_PORT'] = str(find_free_network_port())
        mp.spawn(_ddp_worker, args=(num_gpus, name, trainer_name, continue_, device.type), nprocs=num_gpus,
                 join=True)
    elif int(os.environ.get('WORLD_SIZE', 1)) > 1:  # started by torchrun
        _init_process_group(int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), device.type)
        try:
            _train(name, trainer_name, continue_, _rank_device(device.type))
        finally:
            dist.destroy_process_group()
    else:
        _train(name, trainer_name, continue_, device)


def _init_process_group(rank: int, world_size: int, device_type: str) -> None:
    dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo', rank=rank, world_size=world_size)
    if device_type == 'cuda':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', rank)))


def _rank_device(device_type: str) -> torch.device:
    if device_type == 'cuda':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device(device_type)


def _ddp_worker(rank: int, world_size: int, name: str, trainer_name: str, continue_: bool, device_type: str):
    _init_process_group(rank, world_size, device_type)
    try:
        _train(name, trainer_name, continue_, _rank_device(device_type))
    finally:
        dist.destroy_process_group()


def _train(name: str, trainer_name: str, continue_: bool, device: torch.device) -> None:
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    trainer = get_trainer_from_args(name, CONFIGURATION, PRETRAIN_FOLD, trainer_name, SCREENER_PLANS_NAME,
                                    continue_, device=device)
    maybe_load_checkpoint(trainer, continue_, False)
    trainer.run_training()


@exit_on_input_error
def pretrain_entry():
    parser = argparse.ArgumentParser(description='Screener pretraining: descriptor -> condition -> density -> '
                                                 'distillation, written to nnUNet_results like nnU-Net trainings.')
    parser.add_argument('-d', required=True, help='dataset id or name (planned with nnScreener_plan_and_preprocess)')
    parser.add_argument('--stages', nargs='+', default=list(STAGE_TRAINERS), choices=list(STAGE_TRAINERS))
    parser.add_argument('--preset', default=None,
                        help=f'assert the preset the plans were made with ({", ".join(sorted(PRESETS))}, with overrides '
                             f'as planned)')
    parser.add_argument('--c', action='store_true', help='continue: skip finished stages, resume the current one')
    parser.add_argument('-device', default='cuda', choices=['cuda', 'cpu', 'mps'])
    parser.add_argument('-num_gpus', type=int, default=1, help='DDP processes (gloo on CPU, NCCL on CUDA)')
    parser.add_argument('--density_trainer', default=None,
                        help='density-stage variant, e.g. nnScreenerDensityTrainer_flow, _marginalGaussian, '
                             '_marginalFlow, _sincosGaussian (default: as planned)')
    parser.add_argument('-seed', type=int, default=None,
                        help='training seed of every stage (default: $nnScreener_seed, else 0)')
    args = parser.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise ScreenerInputError('no CUDA device available: pass -device cpu (slow) or run on a GPU machine')
    for stage, checkpoint in pretrain(args.d, args.stages, args.preset, args.c, args.device, args.num_gpus,
                                      args.density_trainer, args.seed).items():
        print(f'{stage}: {checkpoint}')
