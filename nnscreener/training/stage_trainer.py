"""Base class of the Screener stage trainers (descriptor, condition, density, distillation).

A Screener stage is an nnU-Net trainer: same folder layout in nnUNet_results, checkpoint format, log file, DDP and
`--c` semantics, found by stock tooling. What differs from segmentation training is the loop: the paper counts
optimiser *steps* (300k SSL steps), so the loop is step-based, checkpoints every `checkpoint_every` steps
atomically, and a resumed run continues step counter, optimiser, lr schedule and RNG states.

A subclass provides `build_objective()` (an nn.Module whose forward(batch) returns (loss, logs) and whose
`.network` is the UNet stored as `network_weights`) and, unless random crops do, `build_loader()`.
"""
import os
import pickle
import random
from abc import ABCMeta, abstractmethod
import time
from os.path import isfile, join
from typing import Tuple

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import maybe_mkdir_p, save_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context, empty_cache
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnscreener.planners.settings import ScreenerSettings
from nnscreener.preprocessing.screener_cache import ScreenerCache, screener_cache_folder
from nnscreener.training.data_loaders import RandomCropLoader, multiprocess_loader
from nnscreener.training.lr_schedule import WarmupDecayLRScheduler
from nnscreener.training.progress import LossHistory
from nnscreener.utilities.io import atomic_path

LOG_EVERY = 10
# Training seed of every stage (weights init, crops); an environment variable like nnU-Net's own knobs, so DDP
# workers and torchrun launches see it. `nnScreener_pretrain --seed` sets it.
SEED_ENV = 'nnScreener_seed'


def training_seed() -> int:
    return int(os.environ.get(SEED_ENV, 0))


class nnScreenerStageTrainer(nnUNetTrainer, metaclass=ABCMeta):
    settings_block = None  # the plans' stage block this trainer trains with: 'ssl', 'density' or 'distillation'
    settings_not_learned = ()  # dotted keys of the plans' `screener` block this stage does not read (stage_runs)

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type == 'cpu':  # nnU-Net assumes DDP means CUDA; we also run gloo on CPU
            self.device = device
        self.settings = self.training_settings(ScreenerSettings.from_plans(self.plans_manager.plans))
        # into the plans' own dict, so plans.json and the checkpoint's copy of the plans record what was trained
        self.plans_manager.plans['screener'] = self.settings.to_dict()
        self.stage_settings = self.settings.stage(self.settings_block)
        self.num_steps = self.stage_settings.num_steps
        self.checkpoint_every = self.settings.checkpoint_every
        self.current_step = 0
        # stages draw different crops and inits; seeds of one stage lie 7919 (a prime) apart
        self.seed = 12345 + 7919 * training_seed() + sum(map(ord, self.__class__.__name__))
        self.enable_deep_supervision = False
        self.history = LossHistory()
        self.objective = None
        self.run_id = None  # set by nnScreener_pretrain (nnscreener.training.stage_runs); stored in every checkpoint
        self.progress = None  # StageProgress of nnScreener_pretrain: a console bar over all its stages; None: no bar

    @classmethod
    def training_settings(cls, settings: ScreenerSettings) -> ScreenerSettings:
        """The settings this trainer trains with, made from the plans' (variants fix some of them)."""
        return settings

    # ---- set-up -------------------------------------------------------------------------------------------------
    def initialize(self):
        if self.was_initialized:
            raise RuntimeError('trainer already initialized')
        torch.manual_seed(self.seed + self.local_rank)
        self.objective = self.build_objective().to(self.device)
        self.network = self.objective.network
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        self.trained = self.objective
        if self.is_ddp:
            self.trained = DDP(self.objective, device_ids=[self.local_rank] if self.device.type == 'cuda' else None)
        if self._do_i_compile():
            self.print_to_log_file('Using torch.compile on the network')
            self.objective.network = torch.compile(self.objective.network)
        self.was_initialized = True

    def configure_optimizers(self):
        params = [p for p in self.objective.parameters() if p.requires_grad]
        hp = self.stage_settings
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        return optimizer, WarmupDecayLRScheduler(optimizer, hp.lr, hp.warmup_steps, self.num_steps, decay='cosine')

    def screener_cache(self) -> ScreenerCache:
        return ScreenerCache(screener_cache_folder(self.preprocessed_dataset_folder_base, self.configuration_manager))

    def build_loader(self, seed: int, first_batch: int = 0):
        """Infinite iterator of numpy batches (dicts, see nnscreener.training.data_loaders), from batch `first_batch`
        of the sequence `seed` draws; by default patch-size crops of the Screener cache at random body positions,
        the stage's batch size split over ranks."""
        loader = RandomCropLoader(self.screener_cache(), self.per_rank_batch_size(self.stage_settings.batch_size),
                                  self.configuration_manager.patch_size, seed, first_batch)
        return multiprocess_loader(loader, pin_memory=self.device.type == 'cuda')

    def per_rank_batch_size(self, batch_size: int) -> int:
        world = dist.get_world_size() if self.is_ddp else 1
        return max(1, batch_size // world)

    @abstractmethod
    def build_objective(self) -> nn.Module:
        """nn.Module with `.network`; forward(batch of tensors) -> (loss, dict of floats to log)."""


    # ---- training -----------------------------------------------------------------------------------------------
    def run_training(self):
        if not self.was_initialized:
            self.initialize()
        maybe_mkdir_p(self.output_folder)
        self.save_plans_and_dataset_json()
        # a resumed run draws the batches the uninterrupted run would have drawn from here on
        loader = self.build_loader(seed=self.seed + self.local_rank, first_batch=self.current_step)
        self.print_to_log_file(f'{self.__class__.__name__}: steps {self.current_step} -> {self.num_steps}, '
                               f'{SEED_ENV}={training_seed()}')
        self.objective.train()
        t0, step0 = time.time(), self.current_step
        bar = self.progress.bar(self.current_step) if self.progress and self.local_rank == 0 else None
        while self.current_step < self.num_steps:
            self.lr_scheduler.step(self.current_step)
            logs = self.train_step(next(loader))
            self.current_step += 1
            self.history.append(self.current_step, logs)
            if bar is not None:
                bar.update()
            if self.current_step % LOG_EVERY == 0 or self.current_step == self.num_steps:
                self._log_progress(t0, step0)
            if self.current_step % self.checkpoint_every == 0 and self.current_step < self.num_steps:
                self.save_checkpoint(join(self.output_folder, 'checkpoint_latest.pth'))
        if bar is not None:
            bar.close()
        self.save_checkpoint(join(self.output_folder, 'checkpoint_final.pth'))
        if self.local_rank == 0 and isfile(join(self.output_folder, 'checkpoint_latest.pth')):
            os.remove(join(self.output_folder, 'checkpoint_latest.pth'))
        shutdown_loader(loader)
        empty_cache(self.device)

    def save_plans_and_dataset_json(self) -> None:
        """What later stages and `nnScreener_predict` load this stage with (as nnU-Net does for inference)."""
        save_json(self.plans_manager.plans, join(self.output_folder_base, 'plans.json'), sort_keys=False)
        save_json(self.dataset_json, join(self.output_folder_base, 'dataset.json'), sort_keys=False)

    def train_step(self, batch: dict) -> dict:
        batch = {k: torch.as_tensor(v).to(self.device, non_blocking=True) for k, v in batch.items()}
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, logs = self.trained(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.stage_settings.grad_clip)
        self.optimizer.step()
        return {'loss': loss.item(), **{k: float(v) for k, v in logs.items()}}

    def autocast(self):
        # bf16 needs no grad scaler; on CPU autocast is slow, so it is CUDA-only like in nnU-Net
        if self.device.type == 'cuda':
            return torch.autocast('cuda', dtype=torch.bfloat16)
        return dummy_context()

    def print_to_log_file(self, *args, also_print_to_console=False, add_timestamp=True):
        """Into the stage's training log only (nnU-Net's default also prints every line, its citation banner
        included); the console shows the progress bar of nnScreener_pretrain."""
        super().print_to_log_file(*args, also_print_to_console=False, add_timestamp=add_timestamp)

    def _log_progress(self, t0: float, step0: int):
        rate = (self.current_step - step0) / max(time.time() - t0, 1e-9)
        eta = (self.num_steps - self.current_step) / max(rate, 1e-9)
        means = self.history.recent_means(LOG_EVERY)
        self.print_to_log_file(f'step {self.current_step}/{self.num_steps} ' +
                               ' '.join(f'{k} {v:.4f}' for k, v in means.items()) +
                               f" lr {self.optimizer.param_groups[0]['lr']:.2e} {rate:.2f} steps/s ETA {eta / 60:.1f} min")

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Screener stages have no segmentation validation; the stage's own checks live in the tests/benchmarks."""
        self.print_to_log_file(f'{self.__class__.__name__}: no segmentation validation for a Screener stage')

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            return
        network = self.objective.network
        network = getattr(network, '_orig_mod', network)
        checkpoint = {
            # nnU-Net's key, loaded by -pretrained_weights; on the CPU so a GPU-trained file loads on any machine
            'network_weights': {k: v.cpu() for k, v in network.state_dict().items()},
            'optimizer_state': self.optimizer.state_dict(),
            'grad_scaler_state': None,
            'logging': self.logger.get_checkpoint(),
            '_best_ema': None,
            'current_epoch': self.current_step,
            'init_args': self.my_init_kwargs,
            'trainer_name': self.__class__.__name__,
            'inference_allowed_mirroring_axes': None,
            'screener': {
                'stage': self.settings_block,
                'run_id': self.run_id,
                'step': self.current_step,
                'objective_weights': _uncompiled_state_dict(self.objective),
                'history': self.history.state_dict(),
                'rng': {'torch': torch.get_rng_state(), 'numpy': _numpy_rng_state(), 'python': random.getstate(),
                        'cuda': torch.cuda.get_rng_state_all() if self.device.type == 'cuda' else None},
                'plans_screener': self.settings.to_dict(),
            },
        }
        with atomic_path(filename) as tmp:
            torch.save(checkpoint, tmp)
        self.history.plot(join(self.output_folder, 'progress.png'), title=self.__class__.__name__)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = load_plain_checkpoint(checkpoint, self.device)
        state = checkpoint['screener']
        _load_uncompiled_state_dict(self.objective, state['objective_weights'])
        self.optimizer.load_state_dict(checkpoint['optimizer_state'])
        self.current_step = state['step']
        self.history.load_state_dict(state['history'])
        torch.set_rng_state(state['rng']['torch'].cpu())
        _set_numpy_rng_state(state['rng']['numpy'])
        random.setstate((state['rng']['python'][0], tuple(state['rng']['python'][1]), state['rng']['python'][2]))
        if self.device.type == 'cuda' and state['rng'].get('cuda') is not None:  # jitter and masking draw on the GPU
            torch.cuda.set_rng_state_all([s.cpu() for s in state['rng']['cuda']])
        self.print_to_log_file(f'resumed from step {self.current_step}')


def _uncompiled_state_dict(module: nn.Module) -> dict:
    return {k.replace('_orig_mod.', ''): v for k, v in module.state_dict().items()}


def _load_uncompiled_state_dict(module: nn.Module, state: dict) -> None:
    own = {k.replace('_orig_mod.', ''): k for k in module.state_dict()}
    module.load_state_dict({own[k]: v for k, v in state.items()})


def shutdown_loader(loader) -> None:
    """Stops the worker processes of nnU-Net's multi-process augmenter (no-op for in-process loaders)."""
    if hasattr(loader, '_finish'):
        loader._finish()


def load_stage_network(checkpoint_file: str, device: torch.device) -> Tuple[dict, dict]:
    """(checkpoint, screener block) of a finished stage; one line of advice when it is missing."""
    from nnscreener.utilities.errors import ScreenerInputError
    if not isfile(checkpoint_file):
        raise ScreenerInputError(f'{checkpoint_file} missing: run nnScreener_pretrain for the earlier stages first')
    checkpoint = load_plain_checkpoint(checkpoint_file, device)
    return checkpoint, checkpoint['screener']


def load_plain_checkpoint(checkpoint_file: str, device) -> dict:
    """A stage checkpoint, unpickled with `weights_only=True`: tensors and plain Python values only, so a crafted
    file cannot run code; anything else is refused with one line."""
    from nnscreener.utilities.errors import ScreenerInputError
    try:
        return torch.load(checkpoint_file, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if 'GLOBAL' not in str(e):  # not a refused class or function: bytes that are no pickle at all
            raise _corrupt_checkpoint(checkpoint_file, e)
        refused = next(line for line in str(e).splitlines() if 'GLOBAL' in line)
        raise ScreenerInputError(f'{checkpoint_file} holds objects other than tensors and plain values, which '
                                 f'nnscreener never writes; refusing to unpickle it ({refused.strip()[:120]}). '
                                 f'Re-run the stage that wrote it')
    except Exception as e:  # truncated or damaged zip archive, empty file, or garbage the unpickler trips over
        raise _corrupt_checkpoint(checkpoint_file, e)


def _corrupt_checkpoint(checkpoint_file: str, error: Exception):
    from nnscreener.utilities.errors import ScreenerInputError
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:100]
    return ScreenerInputError(f'{checkpoint_file} is truncated or corrupt ({detail}): re-run the stage that wrote it '
                              f'(nnScreener_pretrain without --c for that stage), or restore the file')


def _numpy_rng_state() -> dict:
    """numpy's global RNG state as a tensor and plain numbers (a weights_only checkpoint holds no ndarray)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
            'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)}


def _set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state['kind'], state['keys'].cpu().numpy().astype(np.uint32), state['pos'],
                         state['has_gauss'], state['cached_gaussian']))
