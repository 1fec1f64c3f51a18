"""`nnScreener_pretrain`: descriptor -> condition -> density -> distillation, each an nnU-Net trainer run.

Multi-GPU follows nnU-Net: `-num_gpus N` spawns N DDP processes (NCCL on CUDA, gloo on CPU), and a launch under
`torchrun` joins the process group torchrun set up.
"""
import os
from os.path import isfile, join
from typing import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnscreener.planners.presets import PRESETS
from nnscreener.planners.screener_planner import (CONFIGURATION, SCREENER_PLANS_NAME, check_same_screener_input,
                                                  screener_plans_file)
from nnscreener.planners.settings import ScreenerSettings
from nnscreener.training.progress import StageProgress
from nnscreener.training.stage_trainer import SEED_ENV
from nnscreener.training.stage_runs import StageRun, plan_stage_run
from nnscreener.training.stages import (PRETRAIN_FOLD, STAGE_TRAINERS, screener_dataset, stage_checkpoint,
                                       stage_folder)
from nnscreener.utilities.cli import add_device_argument, argument_parser
from nnscreener.utilities.console import output_to_log
from nnscreener.utilities.errors import ScreenerInputError, exit_on_input_error
from nnscreener.utilities.paths import dataset_name, require_env


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
    checkpoints = {s: stage_checkpoint(name, s, trainers[s]) for s in stages}
    if screener_dataset(name) != name:
        return _uses_screener_of(name, screener_dataset(name), checkpoints)
    if seed is not None:
        os.environ[SEED_ENV] = str(seed)
    ordered = [s for s in STAGE_TRAINERS if s in stages]  # paper order, whatever order was typed
    classes = [_stage_trainer_class(trainers[s]) for s in ordered]
    planned = ScreenerSettings.from_plans(load_json(screener_plans_file(name)))
    settings = [c.training_settings(planned) for c in classes]
    steps = [s.stage(c.settings_block).num_steps for c, s in zip(classes, settings)]  # for the ETA
    told_where = False
    for k, stage in enumerate(ordered):
        run = plan_stage_run(stage_folder(name, stage, trainers[stage]), classes[k].settings_block,
                             settings[k].to_dict(), continue_, classes[k].settings_not_learned)
        if run.finished:
            print(f'{stage}: finished earlier with these plans ({stage_checkpoint(name, stage, trainers[stage])}), '
                  f'skipping')
            continue
        if not told_where:
            print(f'Each stage logs to its fold_{PRETRAIN_FOLD}/training_log_*.txt; nnU-Net\'s console output goes '
                  f'to {pretrain_log_file(name)}', flush=True)
            told_where = True
        if run.resume_from:
            print(f'{stage}: continuing {run.resume_from}', flush=True)
        progress = StageProgress(f'pretrain stage {k + 1}/{len(ordered)} {stage} ({trainers[stage]})', sum(steps[:k]),
                                 sum(steps), k == len(ordered) - 1)
        run_stage(name, trainers[stage], run, torch.device(device), num_gpus, progress)
    return checkpoints


def pretrain_log_file(name: str) -> str:
    """Where the console output of the stage trainings goes (nnU-Net's trainer search and citation banner, library
    warnings); each stage's own log is nnU-Net's training_log_*.txt in its fold folder."""
    return join(os.environ['nnUNet_results'], name, 'nnscreener_pretrain.log')


def _uses_screener_of(name: str, source: str, checkpoints: dict) -> dict:
    """A dataset planned with --screener_from trains nothing: its checkpoints are the source's, whose distilled UNet
    must fit its plans (the source may have been re-planned and retrained since)."""
    distilled = stage_checkpoint(name, 'distillation')
    source_plans = join(os.path.dirname(os.path.dirname(distilled)), 'plans.json')
    if not isfile(distilled) or not isfile(source_plans):
        raise ScreenerInputError(f'{name} uses the Screener of {source}, which is not pretrained yet: run '
                                 f'nnScreener_pretrain -d {source}')
    check_same_screener_input(load_json(screener_plans_file(name)), load_json(source_plans), source_plans)
    print(f'{name}: this dataset uses the Screener of {source}: nothing to train. Fine-tune from its distilled UNet: '
          f'nnUNetv2_train {name} {CONFIGURATION} FOLD -p {SCREENER_PLANS_NAME} -tr nnScreenerFinetuneTrainer '
          f'-pretrained_weights {distilled}')
    return checkpoints


def _stage_trainer_class(trainer_name: str):
    """The stage trainer class of that name in nnscreener's trainer folder (found the way nnU-Net finds it there)."""
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnscreener.ext_trainer_path import TRAINER_FOLDER
    from nnscreener.training.stage_trainer import nnScreenerStageTrainer
    trainer_class = recursive_find_python_class(TRAINER_FOLDER, trainer_name, None, base_folder=TRAINER_FOLDER)
    if trainer_class is None or not issubclass(trainer_class, nnScreenerStageTrainer):
        raise ScreenerInputError(f'{trainer_name} is not a Screener stage trainer of nnscreener/trainers (e.g. '
                                 f'nnScreenerDensityTrainer_flow): check the --density_trainer name')
    return trainer_class


def _check_plans(name: str, preset: str) -> None:
    plans_file = screener_plans_file(name)
    if not isfile(plans_file):
        raise ScreenerInputError(f'{plans_file} missing: run nnScreener_plan_and_preprocess -d {name} first')
    plans = load_json(plans_file)
    planned = ScreenerSettings.from_plans(plans).preset if 'screener' in plans else None
    if preset is not None and preset != planned:
        raise ScreenerInputError(f'{name} was planned with preset {planned!r}, not {preset!r}: re-run '
                                 f'nnScreener_plan_and_preprocess -d {name} --preset {preset}')


def run_stage(name: str, trainer_name: str, run: StageRun, device: torch.device, num_gpus: int,
              progress: StageProgress = None) -> None:
    if num_gpus > 1:
        os.environ.setdefault('MASTER_ADDR', 'localhost')
        if 'MASTER_PORT' not in os.environ:
            from nnunetv2.run.run_training import find_free_network_port
            os.environ['MASTER_PORT'] = str(find_free_network_port())
        mp.spawn(_ddp_worker, args=(num_gpus, name, trainer_name, run, device.type, progress), nprocs=num_gpus,
                 join=True)
    elif int(os.environ.get('WORLD_SIZE', 1)) > 1:  # started by torchrun
        _init_process_group(int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), device.type)
        try:
            _train(name, trainer_name, run, _rank_device(device.type), progress)
        finally:
            dist.destroy_process_group()
    else:
        _train(name, trainer_name, run, device, progress)


def _init_process_group(rank: int, world_size: int, device_type: str) -> None:
    dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo', rank=rank, world_size=world_size)
    if device_type == 'cuda':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', rank)))


def _rank_device(device_type: str) -> torch.device:
    if device_type == 'cuda':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device(device_type)


def _ddp_worker(rank: int, world_size: int, name: str, trainer_name: str, run: StageRun, device_type: str,
                progress: StageProgress):
    _init_process_group(rank, world_size, device_type)
    try:
        _train(name, trainer_name, run, _rank_device(device_type), progress)
    finally:
        dist.destroy_process_group()


def _train(name: str, trainer_name: str, run: StageRun, device: torch.device, progress: StageProgress = None) -> None:
    """One process's part of a stage run, its console output in the pretrain log: not nnU-Net's
    maybe_load_checkpoint, which would take any checkpoint_final.pth, however old, for the result of this run."""
    from nnunetv2.run.run_training import get_trainer_from_args
    with output_to_log(pretrain_log_file(name), f'{trainer_name} on {device}'):
        trainer = get_trainer_from_args(name, CONFIGURATION, PRETRAIN_FOLD, trainer_name, SCREENER_PLANS_NAME,
                                        run.resume_from is not None, device=device)
        trainer.run_id = run.run_id
        trainer.progress = progress
        if run.resume_from is not None:
            trainer.load_checkpoint(run.resume_from)
        trainer.run_training()


@exit_on_input_error
def pretrain_entry():
    parser = argument_parser('Screener pretraining: descriptor -> condition -> density -> distillation, written to '
                             'nnUNet_results like nnU-Net trainings.')
    parser.add_argument('-d', required=True, help='dataset id or name (planned with nnScreener_plan_and_preprocess)')
    parser.add_argument('--stages', nargs='+', default=list(STAGE_TRAINERS), choices=list(STAGE_TRAINERS),
                        help=f'stages to train, run in the paper\'s order (default: all four, {" ".join(STAGE_TRAINERS)})')
    parser.add_argument('--preset', default=None,
                        help=f'assert the preset the plans were made with ({", ".join(sorted(PRESETS))}, with overrides '
                             f'as planned) (default: no check)')
    parser.add_argument('--c', action='store_true',
                        help='continue: skip stages finished with these plans, resume the current run of the others '
                             '(and continue a finished stage whose plans now ask for more steps)')
    add_device_argument(parser)
    parser.add_argument('-num_gpus', type=int, default=1, help='DDP processes (gloo on CPU, NCCL on CUDA)')
    parser.add_argument('--density_trainer', default=None,
                        help='density-stage variant, e.g. nnScreenerDensityTrainer_flow, _gaussian, _marginalGaussian, '
                             '_marginalFlow, _sincosGaussian (default: as planned)')
    parser.add_argument('--seed', '-seed', type=int, default=None,  # -seed: the spelling of earlier versions
                        help='training seed of every stage (default: $nnScreener_seed, else 0)')
    args = parser.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise ScreenerInputError('no CUDA device available: pass -device cpu (slow) or run on a GPU machine')
    for stage, checkpoint in pretrain(args.d, args.stages, args.preset, args.c, args.device, args.num_gpus,
                                      args.density_trainer, args.seed).items():
        print(f'{stage}: {checkpoint}')
