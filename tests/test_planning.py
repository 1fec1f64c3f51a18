"""Foundation: Screener planning and preprocessing on phantoms and real CT, bad input, trainer discovery."""
import glob
import json
import os
import subprocess
import sys
from os.path import join
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from conftest import REALCT, TARGET_ID, nnunet_env
from nnscreener.planners.presets import SCREENER_SPACING, get_preset
from nnscreener.planners.screener_planner import nnScreenerPlanner
from nnscreener.preprocessing.plan_and_preprocess import plan_and_preprocess
from nnscreener.preprocessing.screener_cache import ScreenerCache
from nnscreener.utilities.errors import ScreenerInputError


def _plans(env):
    folder = glob.glob(join(env['nnUNet_preprocessed'], f'Dataset{TARGET_ID}_*'))[0]
    return folder, json.load(open(join(folder, 'nnScreenerPlans.json')))


def test_plans_have_fixed_spacing_patch_and_stock_names(in_phantom_world):
    _, plans = _plans(in_phantom_world)
    config = plans['configurations']['3d_fullres']
    assert list(plans['configurations']) == ['3d_fullres']
    assert config['spacing'] == list(SCREENER_SPACING)
    assert config['patch_size'] == list(get_preset('tiny')['patch_size'])
    assert config['preprocessor_name'] == 'DefaultPreprocessor'
    assert config['normalization_schemes'] == ['CTNormalization']
    assert plans['transpose_forward'] == [0, 1, 2]
    assert plans['screener']['preset'] == 'tiny'
    props = plans['foreground_intensity_properties_per_channel']['0']
    # CTNormalization: (clip(x, p00_5, p99_5) - mean) / std == (clip(x, -1000, 300) + 1000) / 1300
    assert (props['percentile_00_5'], props['percentile_99_5'], props['mean'], props['std']) == (-1000, 300, -1000, 1300)
    # batch Dice as nnU-Net's 3d_fullres plans it when it also plans a 3d_lowres: the patch is under a quarter of the
    # median image (so the fine-tuning loss is not averaged over lesion-free patches); not for a whole-image patch
    assert np.prod(config['patch_size']) < 0.25 * np.prod(config['median_image_size_in_voxels'])
    assert ConfigurationManager(config).batch_dice is True
    planner = SimpleNamespace(lowres_creation_threshold=0.25)
    assert not nnScreenerPlanner.batch_dice(planner, config['median_image_size_in_voxels'],
                                            config['median_image_size_in_voxels'])


def test_preprocessed_data_is_clipped_and_rescaled(in_phantom_world):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    folder, _ = _plans(in_phantom_world)
    dataset = nnUNetDatasetBlosc2(join(folder, 'nnScreenerPlans_3d_fullres'))
    data, seg, _, properties = dataset.load_case(dataset.identifiers[0])
    data = np.asarray(data)
    assert data.min() >= -1e-4 and data.max() <= 1 + 1e-4
    assert (data < 0.05).mean() > 0.05, 'air (-1000 HU -> 0) should be present around the body'
    assert np.asarray(seg).max() == 1, 'every labeled phantom has a lesion'


def test_continue_keeps_finished_preprocessing_and_a_new_preset_redoes_it(empty_world):
    """--c after a finished run rewrites nothing; --c with another preset must re-plan, not keep stale plans; it keeps
    nnU-Net's preprocessed data when the new preset changes training settings only, redoes it when the patch changes."""
    from nnscreener.phantoms.make_phantoms import make_phantom_datasets
    make_phantom_datasets(TARGET_ID, None, num_labeled=2, preset='tiny', seed=3)
    plan_and_preprocess(TARGET_ID, preset='tiny', num_processes=1)
    folder, _ = _plans(os.environ)
    files = sorted(glob.glob(join(folder, 'nnScreenerPlans_3d_fullres', '*')))
    written = [os.path.getmtime(f) for f in files]
    plan_and_preprocess(TARGET_ID, preset='tiny', num_processes=1, continue_=True)
    assert [os.path.getmtime(f) for f in files] == written
    plan_and_preprocess(TARGET_ID, preset='tiny_long', num_processes=1, continue_=True)
    assert _plans(os.environ)[1]['screener']['preset'] == 'tiny_long'
    assert _plans(os.environ)[1]['screener']['ssl']['num_steps'] == 600
    assert [os.path.getmtime(f) for f in files] == written  # steps only: the preprocessed cases are kept
    plan_and_preprocess(TARGET_ID, preset='cpu_wide', num_processes=1, continue_=True)
    plans = _plans(os.environ)[1]
    assert plans['screener']['preset'] == 'cpu_wide'
    assert plans['configurations']['3d_fullres']['patch_size'] == [32, 48, 48]
    assert [os.path.getmtime(f) for f in files] != written  # another patch: nnU-Net's preprocessing ran again


def test_screener_cache_holds_all_datasets_with_clahe(in_phantom_world):
    folder, _ = _plans(in_phantom_world)
    cache = ScreenerCache(join(folder, 'nnScreenerPlans_3d_fullres_screener'))
    sources = {k.split('/')[0] for k in cache.keys}
    assert sources == {'Dataset501_ScreenerPhantomLesions', 'Dataset500_ScreenerPhantomPretrain'}
    assert len(cache.keys) == 12
    # the Screener models pretrain on the pretraining set only: lesions stay rare, the target stays held out
    assert {k.split('/')[0] for k in cache.pretraining_keys} == {'Dataset500_ScreenerPhantomPretrain'}
    volume = np.asarray(cache.load(cache.keys[0]), dtype=np.float32)
    assert volume.shape[0] == 3 and volume.dtype == np.float32
    assert all(s >= p for s, p in zip(volume.shape[1:], get_preset('tiny')['patch_size']))
    stock, clahe, body = volume
    assert 0 <= clahe.min() and clahe.max() <= 1 and set(np.unique(body)) == {0, 1}
    # CLAHE equalises: it spreads the soft-tissue range that the linear [-1000, 300] window squeezes
    soft = (stock > 0.6) & (stock < 1.0)
    assert clahe[soft].std() > stock[soft].std()
    # the Screener input is the body alone: table and room air are air (0) there, the body is not
    assert np.all(clahe[body == 0] == 0) and (stock[body == 0] > 0.4).any()  # the table is in the stock input
    assert load_json(join(cache.folder, 'index.json'))['clahe_clip_limit'] == get_preset('tiny')['clahe_clip_limit']


def test_inference_sees_what_the_models_were_trained_on(in_phantom_world):
    """The Screener models train on the cache and predict on `preprocess_ct_image` of a raw scan: for the same case
    both must give the same stock input, body box, body mask and CLAHE (to the cache's float16)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnscreener.inference.anomaly_maps import preprocess_ct_image
    folder, _ = _plans(in_phantom_world)
    cache = ScreenerCache(join(folder, 'nnScreenerPlans_3d_fullres_screener'))
    plans_manager = PlansManager(join(folder, 'nnScreenerPlans.json'))
    config = plans_manager.get_configuration('3d_fullres')
    raw = join(in_phantom_world['nnUNet_raw'], os.path.basename(folder))
    for case in ('phantom_0000', 'phantom_0003'):
        key = f'{os.path.basename(folder)}/{case}'
        stock, view, _ = preprocess_ct_image(sitk.ReadImage(join(raw, 'imagesTr', f'{case}_0000.nii.gz')),
                                             plans_manager, config, load_json(join(raw, 'dataset.json')))
        cached = np.asarray(cache.load(key), dtype=np.float32)
        assert [list(b) for b in view.bbox] == cache.entries[key]['bbox']
        np.testing.assert_allclose(cached[0], stock[view.slicer], atol=1e-3)
        np.testing.assert_array_equal(cached[2], view.body)
        np.testing.assert_allclose(cached[1], view.clahe, atol=1e-3)
        assert np.abs(view.clahe - stock[view.slicer])[view.body].mean() > 0.02, 'CLAHE is not the identity'


def _write_ct(path, array, spacing=(1.5, 1.5, 3.0), direction=None, dtype=None):
    image = sitk.GetImageFromArray(array if dtype is None else array.astype(dtype))
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return image


def _make_raw_dataset(raw, name, images, labels=True, channels=None, ending='.nii.gz'):
    folder = raw / name
    (folder / 'imagesTr').mkdir(parents=True)
    if labels:
        (folder / 'labelsTr').mkdir()
    for case, (image_path_writer) in images.items():
        image = image_path_writer(folder / 'imagesTr' / f'{case}_0000{ending}')
        if labels:
            bone = np.nan_to_num(sitk.GetArrayFromImage(image)) > 200  # a real structure to label
            label = sitk.GetImageFromArray(bone.astype(np.uint8))
            label.CopyInformation(image)
            sitk.WriteImage(label, str(folder / 'labelsTr' / f'{case}{ending}'))
    json.dump({'channel_names': channels or {'0': 'CT'}, 'labels': {'background': 0, 'bone': 1},
               'numTraining': len(images), 'file_ending': ending}, open(folder / 'dataset.json', 'w'))
    return folder


def _body(shape, hu_body=40.0):
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    body = ((y - shape[1] / 2) / (shape[1] * 0.4)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.4)) ** 2 < 1
    volume = np.where(body, hu_body, -1000.0)
    volume[:, shape[1] // 2 - 3:shape[1] // 2 + 3, shape[2] // 2 - 3:shape[2] // 2 + 3] = 500  # a "spine"
    return volume


@pytest.fixture
def empty_world(tmp_path, monkeypatch):
    env = nnunet_env(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return tmp_path


def _good_case(shape=(30, 64, 64)):
    return lambda p: _write_ct(p, _body(shape), dtype=np.int16)


@pytest.mark.parametrize('problem, expected', [
    ('nan', 'NaN'), ('2d', '3D'), ('channels', 'CT channel'), ('corrupt', 'is corrupt'), ('small', 'smaller than the patch'),
])
def test_bad_input_one_line_error_and_nothing_written(empty_world, problem, expected):
    raw = empty_world / 'nnUNet_raw'
    images = {'a': _good_case(), 'b': _good_case()}
    channels, ending = None, '.nii.gz'
    if problem == 'nan':  # SimpleITK reads NaN in NIfTI as 0, so NaN reaches nnU-Net through formats like .mha
        ending = '.mha'
        volume = _body((30, 64, 64))
        volume[3, 3, 3] = np.nan
        images['b'] = lambda p: _write_ct(p, volume, dtype=np.float32)
    elif problem == '2d':
        images['b'] = lambda p: _write_ct(p, _body((1, 64, 64))[0], spacing=(1.5, 1.5))
    elif problem == 'channels':
        channels = {'0': 'CT', '1': 'PET'}
    elif problem == 'small':
        images['b'] = _good_case((4, 64, 64))
    folder = _make_raw_dataset(raw, 'Dataset777_Bad', images, channels=channels, ending=ending)
    if problem == 'corrupt':
        (folder / 'imagesTr' / 'b_0000.nii.gz').write_bytes(b'not a nifti file at all')
    with pytest.raises(ScreenerInputError, match=expected) as info:
        plan_and_preprocess(777, preset='tiny', num_processes=1)
    assert '\n' not in str(info.value)
    assert not os.listdir(empty_world / 'nnUNet_preprocessed'), 'nothing may be written for bad input'


def test_cli_errors_are_one_line_with_nonzero_exit(empty_world):
    env = {**os.environ}
    env.pop('nnUNet_raw')
    result = subprocess.run(['nnScreener_plan_and_preprocess', '-d', '501'], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count('\n') == 0 and 'nnUNet_raw' in result.stderr
    result = subprocess.run(['nnScreener_plan_and_preprocess', '-d', '999'], capture_output=True, text=True)
    assert result.returncode == 2 and 'unknown dataset' in result.stderr and result.stderr.strip().count('\n') == 0


def test_trainers_found_by_stock_nnunet_in_a_fresh_shell(tmp_path):
    code = ('from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; '
            'import os; print(f("nnScreenerFinetuneTrainer").__name__, os.environ["nnUNet_extTrainer"])')
    env = {k: v for k, v in os.environ.items() if k != 'nnUNet_extTrainer'}
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True).stdout
    assert 'nnScreenerFinetuneTrainer' in out
    env['nnUNet_extTrainer'] = str(tmp_path)  # a user's own trainer folder must be kept, searched first
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1].split()[-1].startswith(str(tmp_path) + os.pathsep)


def _copy_image(source, target):
    image = sitk.ReadImage(source)
    sitk.WriteImage(image, str(target))
    return image


REALCT_FILES = sorted(f for f in glob.glob(join(REALCT, '*.nii.gz')) if 'seg' not in f and 'gtv' not in f)


@pytest.mark.skipif(not REALCT_FILES, reason='../shared/realct not present')
def test_real_ct_plans_and_preprocesses_with_geometry_kept(empty_world):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    raw = empty_world / 'nnUNet_raw'
    images = {os.path.basename(f).replace('.nii.gz', ''): (lambda p, f=f: _copy_image(f, p)) for f in REALCT_FILES}
    _make_raw_dataset(raw, 'Dataset778_RealCT', images)
    with pytest.raises(ScreenerInputError, match=r'_0000\.nii\.gz is \(\d+, \d+, \d+\) voxels.*smaller than the patch'):
        plan_and_preprocess(778, preset='default', num_processes=2)
    plan_and_preprocess(778, preset='tiny', num_processes=2, allow_small_images=True)
    folder = empty_world / 'nnUNet_preprocessed' / 'Dataset778_RealCT' / 'nnScreenerPlans_3d_fullres'
    dataset = nnUNetDatasetBlosc2(str(folder))
    assert sorted(dataset.identifiers) == sorted(images)
    for f in REALCT_FILES:
        case = os.path.basename(f).replace('.nii.gz', '')
        data, _, _, properties = dataset.load_case(case)
        original = sitk.ReadImage(f)
        # geometry needed to map results back: spacing, origin and direction exactly as in the input
        np.testing.assert_allclose(properties['sitk_stuff']['spacing'], original.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(properties['sitk_stuff']['origin'], original.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(properties['sitk_stuff']['direction'], original.GetDirection(), atol=1e-6)
        assert tuple(properties['shape_before_cropping']) == original.GetSize()[::-1]
        expected = np.round(np.array(original.GetSize()[::-1]) * np.array(original.GetSpacing()[::-1])
                            / np.array(SCREENER_SPACING))
        np.testing.assert_allclose(np.asarray(data).shape[1:], expected, atol=1)
        assert 0 <= np.asarray(data).min() and np.asarray(data).max() <= 1
