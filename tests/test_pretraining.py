"""Screener pretraining on tiny phantoms: all four stages as nnU-Net trainers, resume, DDP on CPU, masking
invariance of the condition model, distillation into a stock-loadable nnU-Net UNet."""
import glob
import os
import subprocess
from os.path import isfile, join

import numpy as np
import pytest
import torch

from conftest import TARGET_ID
from nnscreener.training.stages import STAGE_TRAINERS, stage_checkpoint, stage_folder

NAME = 'Dataset501_ScreenerPhantomLesions'
NNUNET_CHECKPOINT_KEYS = {'network_weights', 'optimizer_state', 'current_epoch', 'init_args', 'trainer_name'}


def _history(stage):
    checkpoint = torch.load(stage_checkpoint(NAME, stage), map_location='cpu', weights_only=True)
    return checkpoint, checkpoint['screener']['history']


def test_all_stages_write_nnunet_checkpoints_logs_and_curves(pretrained_world, monkeypatch):
    env, checkpoints = pretrained_world
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for stage in STAGE_TRAINERS:
        checkpoint, history = _history(stage)
        assert NNUNET_CHECKPOINT_KEYS <= set(checkpoint), stage
        assert checkpoint['screener']['step'] == len(history['steps']) == history['steps'][-1]
        folder = stage_folder(NAME, stage)
        assert isfile(join(folder, 'progress.png')) and glob.glob(join(folder, 'training_log_*.txt'))
        assert not isfile(join(folder, 'checkpoint_latest.pth')), 'latest is removed once final is written'


@pytest.mark.parametrize('stage', ['descriptor', 'condition', 'density'])
def test_training_reduces_the_loss(pretrained_world, monkeypatch, stage):
    for k, v in pretrained_world[0].items():
        monkeypatch.setenv(k, v)
    """The loss falls with the steps beyond its noise: a negative rank correlation with the step (p < 1e-3), and the
    last quarter's median below the first quarter's. A stage that does not learn (lr 0, a detached loss) gives a
    flat, noisy curve and fails."""
    from scipy.stats import spearmanr
    loss = np.array(_history(stage)[1]['values']['loss'])
    rho, p = spearmanr(np.arange(len(loss)), loss)
    quarter = len(loss) // 4
    assert rho < 0 and p < 1e-3, (stage, rho, p)
    assert np.median(loss[-quarter:]) < np.median(loss[:quarter]), (stage, loss[:quarter], loss[-quarter:])


def test_distillation_reduces_the_student_teacher_error(pretrained_world, monkeypatch):
    """On a fixed batch, the distilled student is closer to the teacher's map than a freshly initialised one."""
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnscreener.training.data_loaders import RandomCropLoader
    for k, v in pretrained_world[0].items():
        monkeypatch.setenv(k, v)
    trainer = get_trainer_from_args(NAME, '3d_fullres', 'all', 'nnScreenerDistillationTrainer', 'nnScreenerPlans',
                                    False, device=torch.device('cpu'))
    trainer.initialize()  # trained teacher, random student
    batch = RandomCropLoader(trainer.screener_cache(), 4, trainer.configuration_manager.patch_size,
                             seed=99).generate_train_batch()
    batch = {k: torch.as_tensor(v) for k, v in batch.items()}
    checkpoint = torch.load(stage_checkpoint(NAME, 'distillation'), weights_only=True)
    trained = checkpoint['screener']['objective_weights']
    objective = trainer.objective.eval()
    objective.target_mean.fill_(trained['target_mean'])  # both students scored against the same target
    objective.target_sd.fill_(trained['target_sd'])
    with torch.no_grad():
        before = objective(batch)[0].item()
        objective.network.load_state_dict(checkpoint['network_weights'])
        after = objective(batch)[0].item()
    assert after < before, (before, after)


def _features(network, x):
    with torch.no_grad():
        return network(x)


def test_condition_model_is_more_masking_invariant_than_descriptor(pretrained_world, monkeypatch):
    """On held-out crops (the labeled target set), masking changes conditions less than descriptors."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnscreener.preprocessing.screener_cache import ScreenerCache, screener_cache_folder
    from nnscreener.ssl.masking import BlockMasking
    from nnscreener.training.data_loaders import CLAHE, RandomCropLoader
    from nnscreener.training.stages import load_frozen_unet
    for k, v in pretrained_world[0].items():
        monkeypatch.setenv(k, v)
    condition_state = torch.load(stage_checkpoint(NAME, 'condition'), weights_only=True)['screener']
    trainer_plans = condition_state['plans_screener']
    config = PlansManager(join(os.path.dirname(stage_folder(NAME, 'condition')), 'plans.json')).get_configuration(
        '3d_fullres')
    cache = ScreenerCache(screener_cache_folder(join(os.environ['nnUNet_preprocessed'], NAME), config))
    cache.entries = {k: e for k, e in cache.entries.items() if k.startswith(NAME)}  # the held-out labeled set
    batch = RandomCropLoader(cache, 8, config.patch_size, seed=7).generate_train_batch()
    x = torch.as_tensor(batch['data'][:, CLAHE:CLAHE + 1])
    masking = BlockMasking(trainer_plans['ssl']['mask_block_size'], trainer_plans['ssl']['mask_ratio'], p=1.0)
    torch.manual_seed(0)
    changes = {}
    for stage, dim in (('descriptor', trainer_plans['descriptor_dim']), ('condition', trainer_plans['condition_dim'])):
        network = load_frozen_unet(NAME, stage, config, dim, torch.device('cpu'))
        if stage == 'condition':  # the learned mask token is part of the condition model's training state
            masking.mask_token.data.copy_(condition_state['objective_weights']['masking.mask_token'])
        masked, mask = masking(x, torch.Generator().manual_seed(1))
        clean, corrupted = _features(network, x), _features(network, masked)
        # relative change of the feature maps, normalised by the features' own spread
        changes[stage] = float(((clean - corrupted) ** 2).mean() / clean.var(dim=(0, 2, 3, 4)).sum())
    assert changes['condition'] < changes['descriptor'], changes


def test_leave_out_conditions_use_the_trained_mask_token_and_only_change_the_conditions(pretrained_world, monkeypatch):
    """A density block with `condition_leave_out` assembles the trained condition model behind LeaveOutConditions with
    the mask token it was trained with; the descriptors are those of the paper's conditions' Screener."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnscreener.density.conditions import LeaveOutConditions
    from nnscreener.density.gaussian import ConditionalGaussianDensity
    from nnscreener.planners.settings import ScreenerSettings
    from nnscreener.training.stages import assemble_modular_screener
    for k, v in pretrained_world[0].items():
        monkeypatch.setenv(k, v)
    plans = PlansManager(join(os.path.dirname(stage_folder(NAME, 'density')), 'plans.json'))
    config, settings = plans.get_configuration('3d_fullres'), ScreenerSettings.from_plans(plans.plans)
    token = torch.load(stage_checkpoint(NAME, 'condition'), weights_only=True)['screener']['objective_weights'][
        'masking.mask_token']
    leave_out = settings.with_stage('density', condition_leave_out=tuple(settings.ssl.mask_block_size))
    screeners = [assemble_modular_screener(NAME, config, s, ConditionalGaussianDensity(s.descriptor_dim,
                                                                                      s.condition_dim), 'cpu')
                 for s in (settings, leave_out)]
    assert isinstance(screeners[1].condition, LeaveOutConditions) and not isinstance(screeners[0].condition,
                                                                                     LeaveOutConditions)
    assert float(screeners[1].condition.mask_token) == float(token) != 0.0
    x = torch.rand(1, 1, *config.patch_size)
    with torch.no_grad():
        (y, c), (y_leave_out, c_leave_out) = (s.features(x) for s in screeners)
    torch.testing.assert_close(y, y_leave_out)
    assert not torch.allclose(c, c_leave_out)


def test_resume_continues_step_counter_schedule_and_history(phantom_world, monkeypatch, tmp_path):
    """Interrupt the descriptor stage after its first checkpoint, then `--c`: nothing is lost but the steps after
    the last checkpoint, and the run ends at the planned number of steps with the planned lr schedule."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    for k, v in phantom_world.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv('nnUNet_results', str(tmp_path))

    def make_trainer(continue_):
        trainer = get_trainer_from_args(NAME, '3d_fullres', 'all', 'nnScreenerDescriptorTrainer', 'nnScreenerPlans',
                                        continue_, device=torch.device('cpu'))
        trainer.num_steps, trainer.checkpoint_every = 16, 5
        return trainer

    trainer = make_trainer(False)
    original_step = trainer.train_step

    def killed_after_12(batch):
        if trainer.current_step == 12:
            raise KeyboardInterrupt
        return original_step(batch)

    trainer.train_step = killed_after_12
    with pytest.raises(KeyboardInterrupt):
        trainer.run_training()
    latest = join(trainer.output_folder, 'checkpoint_latest.pth')
    assert torch.load(latest, weights_only=True)['screener']['step'] == 10
    resumed = make_trainer(True)
    maybe_load_checkpoint(resumed, True, False)
    assert resumed.current_step == 10
    resumed.lr_scheduler.step(resumed.current_step)
    lr_at_10 = resumed.optimizer.param_groups[0]['lr']
    resumed.run_training()
    final = torch.load(join(resumed.output_folder, 'checkpoint_final.pth'), weights_only=True)['screener']
    assert final['step'] == 16 and final['history']['steps'] == list(range(1, 17))
    from nnscreener.training.lr_schedule import warmup_decay_lr
    hp = resumed.stage_settings
    assert lr_at_10 == pytest.approx(warmup_decay_lr(10, hp.lr, hp.warmup_steps, 16))


def test_ddp_on_cpu_with_gloo_two_processes(phantom_world, tmp_path):
    import json
    import shutil
    preprocessed = tmp_path / 'nnUNet_preprocessed'  # a copy whose plans ask for 10 steps: DDP on CPU is slow
    shutil.copytree(join(phantom_world['nnUNet_preprocessed'], NAME), preprocessed / NAME)
    plans = json.load(open(preprocessed / NAME / 'nnScreenerPlans.json'))
    plans['screener']['ssl']['num_steps'] = 10
    json.dump(plans, open(preprocessed / NAME / 'nnScreenerPlans.json', 'w'))
    env = {**os.environ, **phantom_world, 'nnUNet_results': str(tmp_path), 'nnUNet_preprocessed': str(preprocessed)}
    result = subprocess.run(['nnScreener_pretrain', '-d', str(TARGET_ID), '--stages', 'descriptor', '-device', 'cpu',
                             '-num_gpus', '2'], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = glob.glob(join(str(tmp_path), NAME, 'nnScreenerDescriptorTrainer__*', 'fold_all',
                                'checkpoint_final.pth'))
    assert checkpoint and torch.load(checkpoint[0], weights_only=True)['screener']['step'] == 10
    log = open(join(str(tmp_path), NAME, 'nnscreener_pretrain.log')).read()  # nnU-Net's console output of both ranks
    assert 'I am local rank 1' in log, 'two DDP processes must have run'
    assert 'Please cite' not in result.stdout + result.stderr  # nnU-Net's banner: in the stage's training log only
