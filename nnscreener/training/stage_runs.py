"""Which run of a pretraining stage is current, and what `nnScreener_pretrain --c` does with a stage folder.

A fresh run (no `--c`) writes a new run id to `nnscreener_run.json` in the stage folder (atomically), then removes
the checkpoints of earlier runs; every checkpoint it writes carries that id. So after a kill at any point `--c`
finds only checkpoints of the current run (or none) and never mistakes an earlier run's `checkpoint_final.pth` for
this run's result. A folder without the file (trained by an older nnscreener, or by `nnUNetv2_train`) counts as one
run: its checkpoints are taken as they are.

`--c` also compares the settings a checkpoint was trained with (its `plans_screener`) with the plans: more steps
than trained continue the run to the new count (as nnU-Net continues to a larger `num_epochs`); fewer steps than
done, or any other setting of the stage changed, is a one-line error asking for a fresh run.
"""
import json
import os
import uuid
from os.path import isfile, join
from typing import NamedTuple, Optional

from nnscreener.training.stage_trainer import load_plain_checkpoint
from nnscreener.utilities.errors import ScreenerInputError
from nnscreener.utilities.io import atomic_save_json

RUN_FILE = 'nnscreener_run.json'
FINAL, LATEST = 'checkpoint_final.pth', 'checkpoint_latest.pth'
STAGE_BLOCKS = ('ssl', 'density', 'distillation')  # per-stage blocks of the plans' `screener` block
# settings that do not change what a stage learns: a label, how often it checkpoints, nnU-Net's fine-tuning, the
# record of the memory estimate (what it changes, the batch sizes, is compared), the smoothing of exported maps
NOT_TRAINING_SETTINGS = ('preset', 'checkpoint_every', 'finetune_batch_size', 'gpu_memory', 'map_smoothing_mm')


class StageRun(NamedTuple):
    run_id: str
    resume_from: Optional[str]  # checkpoint to load before training; None: from step 0
    finished: bool  # nothing to train: the final checkpoint is this run's, with these settings


def plan_stage_run(folder: str, block: str, screener: dict, continue_: bool, not_learned=()) -> StageRun:
    """The run to do in stage folder `folder` whose trainer trains with `screener` (its `screener` block, `block`
    its per-stage key); starts a fresh run unless `continue_` finds a checkpoint of the current run.
    not_learned: dotted keys of the block this stage does not read (the descriptor shares the `ssl` block with the
    condition model but never masks), which may change without staling it."""
    if not continue_:
        return StageRun(begin_fresh_run(folder), None, False)
    run_id = current_run_id(folder)
    for name in (FINAL, LATEST):
        fname = join(folder, name)
        if not isfile(fname):
            continue
        state = load_plain_checkpoint(fname, 'cpu')['screener']
        if run_id is not None and state.get('run_id') != run_id:
            continue  # an earlier run's file, left by a kill before the fresh run removed it
        num_steps = _check_settings(state, block, screener, fname, not_learned)
        if run_id is None:
            run_id = _save_run_id(folder, uuid.uuid4().hex)
        finished = name == FINAL and state['step'] == num_steps
        return StageRun(run_id, None if finished else fname, finished)
    return StageRun(begin_fresh_run(folder), None, False)


def begin_fresh_run(folder: str) -> str:
    """A new run id first, then the earlier runs' checkpoints go: a kill in between leaves files `--c` ignores."""
    run_id = _save_run_id(folder, uuid.uuid4().hex)
    for name in (FINAL, LATEST):
        if isfile(join(folder, name)):
            os.remove(join(folder, name))
    return run_id


def current_run_id(folder: str) -> Optional[str]:
    fname = join(folder, RUN_FILE)
    if not isfile(fname):
        return None
    try:
        with open(fname) as f:
            return json.load(f)['run_id']
    except (ValueError, KeyError, TypeError) as e:
        raise ScreenerInputError(f'{fname} is damaged ({e}): retrain the stage without --c')


def stage_settings(screener: dict, block: str) -> dict:
    """What decides what a stage learns: its `screener` block without the settings in NOT_TRAINING_SETTINGS, the
    blocks of later stages and its own `num_steps` (compared on its own), as the plans' JSON holds it. The blocks of
    earlier stages stay in, steps included: the density model is fitted to the SSL stages' features, and the
    distilled UNet to the density stage's maps."""
    upstream = STAGE_BLOCKS[:STAGE_BLOCKS.index(block) + 1]
    settings = {k: v for k, v in screener.items() if k not in NOT_TRAINING_SETTINGS
                and (k not in STAGE_BLOCKS or k in upstream)}
    settings[block] = {k: v for k, v in settings[block].items() if k != 'num_steps'}
    return json.loads(json.dumps(settings))


def _check_settings(state: dict, block: str, screener: dict, fname: str, not_learned=()) -> int:
    """The planned step count, after refusing a checkpoint trained with other settings or beyond that count."""
    trained, planned = stage_settings(state['plans_screener'], block), stage_settings(screener, block)
    changed = sorted(set(_differing_keys(trained, planned)) - set(not_learned))
    num_steps = int(screener[block]['num_steps'])
    if changed:
        raise ScreenerInputError(f'{fname} was trained with other settings than the plans now give '
                                 f'({", ".join(changed)}): run nnScreener_pretrain without --c for this stage')
    if state['step'] > num_steps:
        raise ScreenerInputError(f'{fname} was trained {state["step"]} steps, the plans now ask for {num_steps}: '
                                 f'run nnScreener_pretrain without --c for this stage, or restore the plans')
    return num_steps


def _differing_keys(a, b, prefix: str = ''):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in set(a) | set(b):
            yield from _differing_keys(a.get(key), b.get(key), f'{prefix}{key}.')
    elif a != b:
        yield prefix[:-1]


def _save_run_id(folder: str, run_id: str) -> str:
    atomic_save_json({'run_id': run_id}, join(folder, RUN_FILE))
    return run_id
