"""Image-only datasets end to end (plan, all four stages, predict without any label), and one pretrained Screener
serving another dataset (`--screener_from`): no stage retrained, the source's maps, stock fine-tuning from its
distilled UNet, a mismatching preset refused with one line."""
import glob
import json
import os
from os.path import isdir, isfile, join

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import environment, nnunet_env, stock_finetune_until_first_loss
from test_safety import one_line_error, run_cli

SOURCE_ID, TARGET_ID = 900, 501
SOURCE = 'Dataset900_ScreenerPhantomPretrain'  # image-only: no labelsTr
TARGET = 'Dataset501_ScreenerPhantomLesions'
PRESET = 'tiny:steps=30'
STAGE_FOLDER = '{}__nnScreenerPlans__3d_fullres'


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """Image-only 900 planned and pretrained on itself; labeled 501 planned with --screener_from 900."""
    from nnscreener.phantoms.make_phantoms import make_phantom_datasets
    from nnscreener.preprocessing.plan_and_preprocess import plan_and_preprocess
    from nnscreener.run.pretrain import pretrain
    env = nnunet_env(tmp_path_factory.mktemp('image_only_world'))
    with environment(env):
        make_phantom_datasets(TARGET_ID, SOURCE_ID, num_labeled=5, num_unlabeled=4, preset='tiny', seed=1)
        assert not isdir(join(env['nnUNet_raw'], SOURCE, 'labelsTr'))
        plan_and_preprocess(SOURCE_ID, preset=PRESET, num_processes=2)
        checkpoints = pretrain(SOURCE_ID, device='cpu')
        plan_and_preprocess(TARGET_ID, screener_from=SOURCE_ID, num_processes=2)  # preset: the source's
    return env, checkpoints


@pytest.fixture
def in_world(world, monkeypatch):
    env, checkpoints = world
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env, checkpoints


def _plans(env, name) -> dict:
    return json.load(open(join(env['nnUNet_preprocessed'], name, 'nnScreenerPlans.json')))


def _source_images(env):
    return sorted(glob.glob(join(env['nnUNet_raw'], SOURCE, 'imagesTr', '*_0000.nii.gz')))


def _map_file(folder, image):
    return join(str(folder), os.path.basename(image).replace('_0000.nii.gz', '.nii.gz'))


def test_image_only_dataset_is_planned_cached_and_pretrained_on_itself(in_world):
    from nnscreener.preprocessing.screener_cache import ScreenerCache
    env, checkpoints = in_world
    folder = join(env['nnUNet_preprocessed'], SOURCE)
    plans = _plans(env, SOURCE)
    assert plans['screener']['preset'] == PRESET and 'screener_from' not in plans['screener']
    assert plans['configurations']['3d_fullres']['patch_size'] == [16, 24, 24]
    assert isfile(join(folder, 'dataset_fingerprint.json'))
    assert not isdir(join(folder, 'nnScreenerPlans_3d_fullres'))  # no nnU-Net training data without labels
    cache = ScreenerCache(join(folder, 'nnScreenerPlans_3d_fullres_screener'))
    assert len(cache.keys) == 4 and {e['role'] for e in cache.entries.values()} == {'target'}
    assert cache.pretraining_keys == cache.keys  # no pretraining datasets: the target itself is the training data
    assert set(checkpoints) == {'descriptor', 'condition', 'density', 'distillation'}
    for stage, checkpoint in checkpoints.items():
        assert isfile(checkpoint) and f'/{SOURCE}/' in checkpoint, (stage, checkpoint)


def test_image_only_dataset_predicts_maps_in_the_input_geometry(in_world, tmp_path):
    from nnscreener.inference.predict import predict
    env, _ = in_world
    image = _source_images(env)[0]
    for model in ('modular', 'distilled'):
        predict([image], str(tmp_path / model), SOURCE_ID, model, 'cpu')
        ct, anomaly = sitk.ReadImage(image), sitk.ReadImage(_map_file(tmp_path / model, image))
        assert anomaly.GetSize() == ct.GetSize() and np.allclose(anomaly.GetSpacing(), ct.GetSpacing())
        assert np.allclose(anomaly.GetOrigin(), ct.GetOrigin()) and anomaly.GetDirection() == ct.GetDirection()
        assert np.isfinite(sitk.GetArrayFromImage(anomaly)).all()


def test_image_only_dataset_refuses_fine_tuning_with_one_line(in_world, monkeypatch, capsys):
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnscreener.finetuning.lowshot_splits import lowshot_splits_entry
    assert run_cli(monkeypatch, lowshot_splits_entry, '-d', SOURCE_ID, '-n', 1, '-k', 2) == 2
    assert 'image-only' in one_line_error(capsys)
    with pytest.raises(SystemExit) as exit_info:  # nnUNetv2_train 900 3d_fullres 0 -p nnScreenerPlans -tr ...
        get_trainer_from_args(str(SOURCE_ID), '3d_fullres', 0, 'nnScreenerFinetuneTrainer_tiny', 'nnScreenerPlans',
                              device=torch.device('cpu'))
    assert exit_info.value.code == 2 and 'image-only' in one_line_error(capsys)


def test_screener_from_target_trains_nothing_and_names_the_source_checkpoints(in_world, capsys):
    from nnscreener.run.pretrain import pretrain
    from nnscreener.training.stages import STAGE_TRAINERS
    env, checkpoints = in_world
    plans = _plans(env, TARGET)
    assert plans['screener']['screener_from'] == SOURCE and plans['screener']['preset'] == PRESET
    folder = join(env['nnUNet_preprocessed'], TARGET)
    assert isdir(join(folder, 'nnScreenerPlans_3d_fullres'))  # labeled: nnU-Net's data for fine-tuning
    assert not isdir(join(folder, 'nnScreenerPlans_3d_fullres_screener'))  # nothing pretrains on it
    capsys.readouterr()
    assert pretrain(TARGET_ID, device='cpu') == checkpoints
    out = capsys.readouterr().out
    assert f'uses the Screener of {SOURCE}: nothing to train' in out and checkpoints['distillation'] in out
    for trainer in STAGE_TRAINERS.values():  # no stage folder of its own
        assert not glob.glob(join(env['nnUNet_results'], TARGET, STAGE_FOLDER.format(trainer)))


def test_screener_from_target_predicts_with_the_source_models(in_world, tmp_path):
    from nnscreener.inference.predict import predict
    env, _ = in_world
    image = sorted(glob.glob(join(env['nnUNet_raw'], TARGET, 'imagesTr', '*_0000.nii.gz')))[0]
    for model in ('modular', 'distilled'):
        maps = {}
        for dataset in (SOURCE_ID, TARGET_ID):
            predict([image], str(tmp_path / f'{model}_{dataset}'), dataset, model, 'cpu')
            maps[dataset] = sitk.GetArrayFromImage(sitk.ReadImage(_map_file(tmp_path / f'{model}_{dataset}', image)))
        assert np.array_equal(maps[SOURCE_ID], maps[TARGET_ID]), model


def test_screener_from_with_another_patch_is_refused_with_one_line(in_world, monkeypatch, capsys):
    from nnscreener.preprocessing.plan_and_preprocess import plan_and_preprocess_entry
    env, _ = in_world
    plans_file = join(env['nnUNet_preprocessed'], TARGET, 'nnScreenerPlans.json')
    before = open(plans_file).read()
    capsys.readouterr()
    code = run_cli(monkeypatch, plan_and_preprocess_entry, '-d', TARGET_ID, '--screener_from', SOURCE_ID,
                   '--preset', 'cpu_wide', '-np', 1)
    assert code == 2 and 'patch_size' in one_line_error(capsys)
    assert open(plans_file).read() == before


def test_planner_refuses_plans_whose_network_differs_from_the_source(in_world):
    """The full check of the finished plans (what the early preset check cannot see, e.g. plans of the source
    edited or made by another nnscreener): here the source's network widths."""
    from nnscreener.planners.screener_planner import check_same_screener_input
    from nnscreener.utilities.errors import ScreenerInputError
    env, _ = in_world
    target, source = _plans(env, TARGET), _plans(env, SOURCE)
    check_same_screener_input(target, source, 'source plans')
    source['configurations']['3d_fullres']['architecture']['arch_kwargs']['features_per_stage'][0] += 1
    source['foreground_intensity_properties_per_channel']['0']['std'] = 1.0
    with pytest.raises(ScreenerInputError, match='foreground_intensity_properties_per_channel, architecture differ'):
        check_same_screener_input(target, source, 'source plans')


def test_stock_nnunet_train_fine_tunes_the_target_from_the_source_distilled_unet(in_world):
    env, checkpoints = in_world
    text = stock_finetune_until_first_loss(TARGET_ID, 0, checkpoints['distillation'], env)
    assert 'Loading pretrained weights' in text and 'train_loss' in text, text[-3000:]
    assert 'Traceback' not in text, text[-3000:]
