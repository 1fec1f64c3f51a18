"""nnU-Net's residual-encoder UNet as the Screener UNet (`--unet`) through distillation and stock fine-tuning, and
batch sizes fitted to a GPU memory target (`-gpu_memory_target`) with the estimate checked on the CPU."""
import json
import os
import subprocess
from os.path import join

import numpy as np
import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from conftest import environment, nnunet_env, stock_finetune_until_first_loss
from test_safety import one_line_error, run_cli
from nnscreener.planners.gpu_memory import GIB, saved_tensor_bytes, ssl_head_bytes, unet_crop_bytes
from nnscreener.planners.settings import SSLSettings
from nnscreener.planners.presets import SCREENER_SPACING, get_preset
from nnscreener.planners.screener_planner import screener_settings
from nnscreener.planners.unets import REFERENCE_BATCH_SIZE, UNETS, plans_architecture
from nnscreener.utilities.errors import ScreenerInputError

DATASET_ID, NAME = 503, 'Dataset503_ScreenerPhantomLesions'
PRESET, UNET = 'tiny:steps=20', 'ResEncM'
# holds one SSL step of one CT (two crops) but not of two, and 4 fine-tuning crops (nnU-Net's estimate, tiny preset)
TARGET_GB = 0.008


def _architecture(unet, preset='tiny'):
    settings = get_preset(preset)
    return plans_architecture(unet, SCREENER_SPACING, settings['patch_size'], settings['base_num_features'],
                              settings['max_num_features']), settings['patch_size']


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """Tiny phantoms planned by the CLI with the residual-encoder UNet and a memory target, then pretrained (all four
    stages, 20 steps each)."""
    from nnscreener.phantoms.make_phantoms import make_phantom_datasets
    from nnscreener.run.pretrain import pretrain
    env = nnunet_env(tmp_path_factory.mktemp('resenc_world'))
    with environment(env):
        make_phantom_datasets(DATASET_ID, None, num_labeled=5, preset='tiny', seed=2)
        subprocess.run(['nnScreener_plan_and_preprocess', '-d', str(DATASET_ID), '--preset', PRESET, '--unet', UNET,
                        '-gpu_memory_target', str(TARGET_GB), '-np', '2'], env={**os.environ, **env}, check=True,
                       capture_output=True)
        checkpoints = pretrain(DATASET_ID, device='cpu')
    return env, checkpoints


@pytest.fixture
def in_world(world, monkeypatch):
    for k, v in world[0].items():
        monkeypatch.setenv(k, v)
    return world


def _plans(env) -> dict:
    return json.load(open(join(env['nnUNet_preprocessed'], NAME, 'nnScreenerPlans.json')))


def test_plans_hold_nnunets_residual_encoder_unet_and_the_fitted_batches(in_world, monkeypatch):
    """The architecture block is the one nnU-Net's own nnUNetPlannerResEncM writes for this patch and width, and the
    block counts and memory calibration of every UNet in UNETS are those of nnU-Net's planners."""
    import nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners as resenc
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    env, _ = in_world
    plans = _plans(env)
    config = plans['configurations']['3d_fullres']
    monkeypatch.setenv('nnUNet_n_proc_DA', '1')  # nnU-Net's estimate sets torch's threads to this number
    for name, spec in UNETS.items():
        planner = getattr(resenc, spec.planner, ExperimentPlanner)(DATASET_ID)
        assert (planner.UNet_class, tuple(planner.UNet_blocks_per_stage_encoder),
                tuple(planner.UNet_blocks_per_stage_decoder), planner.UNet_reference_val_3d,
                planner.UNet_reference_val_corresp_GB, planner.UNet_reference_val_corresp_bs_3d) == \
            (spec.network_class, spec.blocks_per_stage_encoder, spec.blocks_per_stage_decoder, spec.reference_val_3d,
             spec.reference_gb, REFERENCE_BATCH_SIZE), name
        if name == UNET:  # nnU-Net's planner for the Screener patch (a median shape that clips it to the patch)
            planner.UNet_base_num_features, planner.UNet_max_features_3d = 4, 32
            stock = planner.get_plans_for_configuration(SCREENER_SPACING, np.array(config['patch_size']),
                                                        'x', 1e9, {})
            assert json.loads(json.dumps(stock['architecture'])) == config['architecture']
    assert config['architecture']['network_class_name'].endswith('.ResidualEncoderUNet')
    screener = plans['screener']
    assert screener['unet'] == UNET and screener['gpu_memory']['target_gb'] == TARGET_GB
    assert screener == json.loads(json.dumps({'preset': PRESET, **screener_settings(PRESET, UNET, TARGET_GB, 2)}))
    tiny = get_preset(PRESET)
    assert screener['ssl']['batch_size'] == 1 < tiny['ssl']['batch_size']  # the target holds one CT's two crops
    assert screener['ssl']['positive_pairs'] == tiny['ssl']['positive_pairs'] // tiny['ssl']['batch_size']
    assert config['batch_size'] == screener['finetune_batch_size'] == 4  # nnU-Net's rule: round(target / crop)


def test_distilled_residual_unet_loads_into_stock_nnunet_train(in_world):
    """`nnUNetv2_train ... -pretrained_weights <distilled>`: nnU-Net's own loading code (maybe_load_checkpoint, what
    the command runs) leaves every weight but the re-initialised seg_layers equal to the distilled checkpoint's; the
    real command loads every one of them (its verbose list of the transferred keys) and trains."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    env, checkpoints = in_world
    distilled = torch.load(checkpoints['distillation'], weights_only=True)['network_weights']
    assert any(k.startswith('encoder.stem.') for k in distilled)  # the residual encoder's stem, not a plain stage
    trainer = get_trainer_from_args(str(DATASET_ID), '3d_fullres', 0, 'nnScreenerFinetuneTrainer_tiny',
                                    'nnScreenerPlans', device=torch.device('cpu'))
    maybe_load_checkpoint(trainer, False, False, checkpoints['distillation'])
    assert type(trainer.network).__name__ == 'ResidualEncoderUNet'
    loaded = {k: v for k, v in trainer.network.state_dict().items() if '.seg_layers.' not in k}
    assert set(loaded) == {k for k in distilled if '.seg_layers.' not in k}
    assert all(torch.equal(v, distilled[k]) for k, v in loaded.items())
    assert not torch.equal(trainer.network.state_dict()['decoder.seg_layers.0.weight'][:1],
                           distilled['decoder.seg_layers.0.weight'])  # nnU-Net's loader skips the heads

    text = stock_finetune_until_first_loss(DATASET_ID, 1, checkpoints['distillation'], env)
    assert 'Loading pretrained weights' in text and 'train_loss' in text and 'Traceback' not in text, text[-3000:]
    transferred = {line.split(' shape ')[0] for line in text.splitlines() if ' shape torch.Size' in line}
    assert transferred == set(loaded)


def test_memory_estimate_is_the_order_of_a_cpu_forward_and_backward():
    """nnU-Net's per-crop estimate (GPU-calibrated: activations in half precision plus weights, optimiser and CUDA's
    own memory) against what a CPU forward in fp32 saves for its backward, per crop, for both UNets and two patches:
    measured 0.83-0.94 (plain) and 1.08-1.22 (residual) times the estimate. A wrong network, patch or batch in the
    estimate moves the ratio by the factor that is wrong (2x the batch, 8x a patch of twice the edge)."""
    for unet in ('plain', UNET):
        for preset in ('tiny', 'cpu_wide'):
            architecture, patch = _architecture(unet, preset)
            network = get_network_from_plans(architecture['network_class_name'], architecture['arch_kwargs'],
                                             architecture['_kw_requires_import'], 1, 8, allow_init=True,
                                             deep_supervision=False)
            batch = 2
            saved, output = saved_tensor_bytes(lambda: network(torch.randn(batch, 1, *patch)))
            output.square().mean().backward()
            assert all(p.grad is not None for p in network.decoder.seg_layers[-1].parameters())
            ratio = saved / (batch * unet_crop_bytes(architecture, patch, 8, unet))
            assert 0.7 < ratio < 1.6, (unet, preset, ratio)


def test_ssl_head_is_counted_as_on_the_cpu():
    """The SSL head's memory is counted on the meta device: the same saved-for-backward bytes as a real CPU forward
    (whose backward runs), plus the AdamW state of its parameters."""
    from nnscreener.ssl.losses import ssl_loss_of_block
    ssl = SSLSettings.from_dict(get_preset('tiny')['ssl'])
    head = ssl_loss_of_block(ssl, 8)
    y1, y2 = (torch.randn(300, 8, requires_grad=True) for _ in range(2))
    saved, (loss, _) = saved_tensor_bytes(lambda: head(y1, y2))
    loss.backward()
    assert y1.grad is not None and saved > 300 * sum(ssl.expander_dims) * 4  # every expander activation, fp32
    assert ssl_head_bytes(ssl, 8, 300) == saved + 16 * sum(p.numel() for p in head.parameters())


def test_a_larger_memory_target_never_gives_smaller_batches_and_each_fits():
    tiny = get_preset('tiny')
    architecture, patch = _architecture(UNET)
    crop = {'ssl': unet_crop_bytes(architecture, patch, 8, UNET),
            'distillation': unet_crop_bytes(architecture, patch, 1, UNET)}
    previous = None
    for target in (0.0055, 0.008, 0.011, 0.02, 0.05, 1.0):
        s = screener_settings('tiny', UNET, target, num_labels=2)
        batches = (s['ssl']['batch_size'], s['density']['batch_size'], s['distillation']['batch_size'],
                   s['finetune_batch_size'])
        assert previous is None or all(b >= p for b, p in zip(batches, previous)), (target, batches, previous)
        previous = batches
        budget = target * GIB
        assert s['gpu_memory']['ssl_step_gb'] <= target
        assert s['density']['batch_size'] * crop['ssl'] <= budget
        assert s['distillation']['batch_size'] * crop['distillation'] <= budget
        for stage in ('ssl', 'density', 'distillation'):  # the preset's (the paper's) batches are the ceiling
            assert s[stage]['batch_size'] <= tiny[stage]['batch_size']
        m = s['ssl']['batch_size']
        if m < tiny['ssl']['batch_size']:  # the largest that fits: one more CT would not
            pairs = (m + 1) * tiny['ssl']['positive_pairs'] // tiny['ssl']['batch_size']
            assert 2 * (m + 1) * crop['ssl'] + ssl_head_bytes(SSLSettings.from_dict(tiny['ssl']), 8, pairs) > budget
    assert previous[:3] == (2, 2, 4) and previous[3] > 100  # 1 GB holds the preset; fine-tuning grows as nnU-Net's
    with pytest.raises(ScreenerInputError, match='too small') as info:
        screener_settings('tiny', UNET, 0.002)
    assert '\n' not in str(info.value)
    with pytest.raises(ScreenerInputError, match='unknown UNet'):
        screener_settings('tiny', 'ResEncS')


def test_too_small_memory_target_is_one_line_before_anything_changes(in_world, monkeypatch, capsys):
    from nnscreener.preprocessing.plan_and_preprocess import plan_and_preprocess_entry
    env, _ = in_world
    plans_file = join(env['nnUNet_preprocessed'], NAME, 'nnScreenerPlans.json')
    before = open(plans_file).read()
    capsys.readouterr()
    code = run_cli(monkeypatch, plan_and_preprocess_entry, '-d', DATASET_ID, '--preset', PRESET, '--unet', UNET,
                   '-gpu_memory_target', 0.001, '--c', '-np', 1)
    assert code == 2 and 'too small' in one_line_error(capsys)
    assert open(plans_file).read() == before


def test_autoencoder_baseline_uses_the_residual_encoder(in_world):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnscreener.baselines.autoencoder import build_autoencoder
    env, _ = in_world
    config = PlansManager(join(env['nnUNet_preprocessed'], NAME, 'nnScreenerPlans.json')).get_configuration('3d_fullres')
    autoencoder = build_autoencoder(config, 8)
    assert type(autoencoder.encoder).__name__ == 'ResidualEncoder'
    x = torch.randn(1, 1, *config.patch_size)
    assert autoencoder(x).shape == x.shape
