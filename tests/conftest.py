"""Session fixtures: one tiny phantom world (raw -> plans -> Screener cache -> all pretraining stages) shared by the
pipeline tests, so the expensive CPU work runs once per test session."""
import os
from contextlib import contextmanager

import pytest

REALCT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'realct')
TARGET_ID, PRETRAIN_ID = 501, 500


def stock_finetune_until_first_loss(dataset_id, fold, pretrained_weights: str, env: dict) -> str:
    """Output of stock `nnUNetv2_train <d> 3d_fullres <fold> -p nnScreenerPlans -tr nnScreenerFinetuneTrainer_tiny
    -pretrained_weights ...` on the CPU, stopped after the first epoch's training loss: the weights loaded and the
    steps ran (the validation export that would follow is what the pipeline test covers)."""
    import subprocess
    process = subprocess.Popen(['nnUNetv2_train', str(dataset_id), '3d_fullres', str(fold), '-p', 'nnScreenerPlans',
                                '-tr', 'nnScreenerFinetuneTrainer_tiny', '-device', 'cpu', '-pretrained_weights',
                                pretrained_weights],
                               env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        for line in process.stdout:
            output.append(line)
            if 'train_loss' in line:
                break
    finally:
        process.terminate()
        process.wait(timeout=60)
    return ''.join(output)


def nnunet_env(root) -> dict:
    env = {k: str(root / k) for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    for folder in env.values():
        os.makedirs(folder, exist_ok=True)
    # tests run the real multi-process code paths elsewhere; here nnU-Net's loaders stay in-process (2 CPU cores)
    env.update({'nnUNet_n_proc_DA': '0', 'nnUNet_compile': 'false', 'nnUNet_def_n_proc': '2'})
    return env


@contextmanager
def environment(env: dict):
    """os.environ with `env` set inside the block (for session and module fixtures, which get no monkeypatch)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope='session')
def phantom_world(tmp_path_factory):
    """nnU-Net folders with tiny phantoms planned and preprocessed the Screener way (target 501, pretrain 500)."""
    from nnscreener.phantoms.make_phantoms import make_phantom_datasets
    from nnscreener.preprocessing.plan_and_preprocess import plan_and_preprocess
    env = nnunet_env(tmp_path_factory.mktemp('phantom_world'))
    with environment(env):
        make_phantom_datasets(TARGET_ID, PRETRAIN_ID, num_labeled=6, num_unlabeled=6, preset='tiny', seed=0)
        plan_and_preprocess(TARGET_ID, [PRETRAIN_ID], preset='tiny', num_processes=2)
    return env


@pytest.fixture
def in_phantom_world(phantom_world, monkeypatch):
    for k, v in phantom_world.items():
        monkeypatch.setenv(k, v)
    return phantom_world


@pytest.fixture(scope='session')
def pretrained_world(phantom_world):
    """The phantom world after `nnScreener_pretrain` (all four stages, tiny preset, CPU)."""
    from nnscreener.run.pretrain import pretrain
    with environment(phantom_world):
        checkpoints = pretrain(TARGET_ID, device='cpu')
    return phantom_world, checkpoints
