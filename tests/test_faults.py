"""Bad input and faults (issue 11, items 6-9 and the kill -9 cases): NaN/inf and non-HU scans, 4D files, corrupt
checkpoints, truncated or copied fold summaries, concurrent commands into one folder, stale temporary files, and
kill -9 of predict and of pretraining run as subprocesses, which must resume to the same final files."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TARGET_ID
from test_safety import (NAME, StockModel, ct_volume, folder_digest, one_line_error, phantom_plans, predict_maps,
                         run_cli, run_cli_ok, truncate, use_fresh_nnunet_folders)
from nnscreener.preprocessing.validation import check_ct_image
from nnscreener.utilities.errors import ScreenerInputError
from nnscreener.utilities.io import read_image


def write(array, fname, spacing=(1.5, 1.5, 2.25)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(fname))
    return str(fname)


def phantom_scan(env, case='phantom_0000'):
    return Path(env['nnUNet_raw']) / NAME / 'imagesTr' / f'{case}_0000.nii.gz'


# ------------------------------------------------------------------------------------- 7. NaN/inf, non-HU, 4D
@pytest.mark.parametrize('ending', ['.nii.gz', '.nii', '.mha', '.nrrd'])
def test_nan_and_inf_voxels_are_refused_in_every_format(tmp_path, ending):
    array = ct_volume().astype(np.float32)
    array[3, 4, 5], array[20, 10, 7] = np.nan, -np.inf
    fname = write(array, tmp_path / f'ct{ending}')
    if ending.startswith('.nii'):  # what the check is for: SimpleITK's NIfTI reader makes them 0 HU, silently
        assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(fname))).all()
    with pytest.raises(ScreenerInputError, match=f'ct{ending} contains 2 NaN/inf voxels') as error:
        check_ct_image(read_image(fname), fname)
    assert '\n' not in str(error.value) and 'planning' not in str(error.value)
    big_endian = tmp_path / 'be.nii'  # other byte order, float64: the scan reads the header's own layout
    import nibabel
    nibabel.save(nibabel.Nifti1Image(array.astype('>f8').transpose(2, 1, 0), np.eye(4)), big_endian)
    with pytest.raises(ScreenerInputError, match='be.nii contains 2 NaN/inf voxels'):
        read_image(str(big_endian))


def test_values_that_cannot_be_hu_are_refused_with_their_range_unless_allowed(tmp_path):
    hu = ct_volume()
    cases = {'uint8': np.clip(hu + 1000, 0, 255).astype(np.uint8), 'unit': ((hu + 1000) / 1300).astype(np.float32),
             'raw_dicom': (hu + 1024).astype(np.int16)}  # grey values, [0, 1], stored without the rescale
    for name, array in cases.items():
        fname = write(array, tmp_path / f'{name}.nii.gz')
        span = f'{float(array.min()):g} to {float(array.max()):g} \\({array.dtype}\\)'
        with pytest.raises(ScreenerInputError, match=f'{name}.nii.gz does not look like CT in HU: its values span '
                                                     f'{span}.*--allow_non_hu'):
            check_ct_image(read_image(fname), fname)
        check_ct_image(read_image(fname), fname, allow_non_hu=True)
    check_ct_image(read_image(write(hu, tmp_path / 'hu.nii.gz')), 'hu.nii.gz')  # -900..90 HU passes


def test_a_4d_or_2d_file_is_named_by_its_dimension(tmp_path):
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(ct_volume((8, 10, 12)))] * 3)
    with pytest.raises(ScreenerInputError, match=r'\(4D\): Screener needs 3D CT'):
        check_ct_image(four_d, 'ct4d.nii.gz')
    with pytest.raises(ScreenerInputError, match=r'\(2D\): Screener needs 3D CT'):
        check_ct_image(sitk.GetImageFromArray(ct_volume((1, 10, 12))[0]), 'slice.nii.gz')


def test_predict_refuses_bad_scans_in_one_line_and_leaves_no_output_folder(in_phantom_world, tmp_path, monkeypatch,
                                                                           capsys):
    from nnscreener.inference.predict import predict_entry
    scan = sitk.ReadImage(str(phantom_scan(in_phantom_world)))
    nan_scan = sitk.Cast(scan, sitk.sitkFloat32)
    nan_scan[5, 5, 5] = float('nan')
    bad = {'nan': (nan_scan, 'contains 1 NaN/inf voxels'),
           'grey': (sitk.Cast(sitk.Clamp(scan + 1000, lowerBound=0, upperBound=255), sitk.sitkUInt8),
                    'does not look like CT in HU')}
    for name, (image, message) in bad.items():
        sitk.WriteImage(image, str(tmp_path / f'{name}.nii.gz'))
        out = tmp_path / f'maps_{name}'
        code = run_cli(monkeypatch, predict_entry, '-i', tmp_path / f'{name}.nii.gz', '-o', out, '-d', TARGET_ID,
                       '--model', 'local_contrast', '-device', 'cpu')
        assert code == 2 and message in one_line_error(capsys)
        assert not out.exists(), 'an early error left an output folder behind'
    run_cli_ok(monkeypatch, predict_entry, '-i', tmp_path / 'grey.nii.gz', '-o', tmp_path / 'maps_grey', '-d',
               TARGET_ID, '--model', 'local_contrast', '-device', 'cpu', '--allow_non_hu')
    assert (tmp_path / 'maps_grey' / 'grey.nii.gz').is_file()


def test_plan_and_preprocess_refuses_a_non_hu_case_before_nnunet_reads_it(tmp_path, monkeypatch, capsys):
    from nnscreener.preprocessing.plan_and_preprocess import plan_and_preprocess_entry
    use_fresh_nnunet_folders(tmp_path, monkeypatch)
    raw = tmp_path / 'nnUNet_raw' / 'Dataset778_Grey'
    (raw / 'imagesTr').mkdir(parents=True)
    for i in range(2):
        write((ct_volume((40, 64, 64)) + 1024 * i).astype(np.int16), raw / 'imagesTr' / f'case{i}_0000.nii.gz')
    (raw / 'dataset.json').write_text(json.dumps({'channel_names': {'0': 'CT'}, 'labels': {'background': 0},
                                                  'numTraining': 2, 'file_ending': '.nii.gz'}))
    assert run_cli(monkeypatch, plan_and_preprocess_entry, '-d', 778, '--preset', 'tiny', '-np', 1) == 2
    assert 'case1_0000.nii.gz does not look like CT in HU' in one_line_error(capsys)
    assert not list((tmp_path / 'nnUNet_preprocessed').rglob('*.json')), 'nnU-Net fingerprinted a non-HU case'


# ------------------------------------------------------------------------------------- 8. messages, not tracebacks
def test_a_corrupt_checkpoint_is_called_corrupt(pretrained_world, tmp_path, monkeypatch, capsys):
    from nnscreener.inference.predict import predict_entry
    env, _ = pretrained_world
    results = tmp_path / 'nnUNet_results'
    shutil.copytree(Path(env['nnUNet_results']) / NAME, results / NAME)
    for k, v in {**env, 'nnUNet_results': str(results)}.items():
        monkeypatch.setenv(k, v)
    checkpoint = next(results.glob(f'{NAME}/nnScreenerDistillationTrainer__*/fold_all/checkpoint_final.pth'))
    for damage in (lambda f: truncate(f, 0.5), lambda f: f.write_bytes(os.urandom(4096)), lambda f: f.write_bytes(b'')):
        damage(checkpoint)
        code = run_cli(monkeypatch, predict_entry, '-i', phantom_scan(env), '-o', tmp_path / 'maps', '-d', TARGET_ID,
                       '--model', 'distilled', '-device', 'cpu')
        error = one_line_error(capsys)
        assert code == 2 and 'checkpoint_final.pth is truncated or corrupt' in error, error
        assert 'does not fit its plans' not in error and not (tmp_path / 'maps').exists()


def test_garbage_bytes_are_a_corrupt_checkpoint_whatever_torch_trips_over(tmp_path):
    from nnscreener.training.stage_trainer import load_plain_checkpoint
    checkpoint = tmp_path / 'checkpoint_final.pth'
    for seed in range(20):  # these seeds include bytes on which torch's unpickler raises IndexError, not its own error
        checkpoint.write_bytes(np.random.default_rng(seed).bytes(4096))
        with pytest.raises(ScreenerInputError, match='checkpoint_final.pth is truncated or corrupt'):
            load_plain_checkpoint(str(checkpoint), 'cpu')


def test_evaluate_geometry_message_has_plain_numbers(in_phantom_world, tmp_path):
    from nnscreener.evaluation.evaluate import evaluate_anomaly_maps
    (tmp_path / 'maps').mkdir()
    (tmp_path / 'refs').mkdir()
    write(np.zeros((8, 10, 12), np.float32), tmp_path / 'maps' / 'c.nii.gz')
    write(np.ones((8, 10, 13), np.uint8), tmp_path / 'refs' / 'c.nii.gz')
    with pytest.raises(ScreenerInputError, match=r'anomaly map size \(12, 10, 8\) differs from the reference size '
                                                 r'\(13, 10, 8\)') as error:
        evaluate_anomaly_maps(str(tmp_path / 'maps'), str(tmp_path / 'refs'), str(tmp_path / 'eval'),
                              n_threshold_cases=1, verbose=False)
    assert 'np.' not in str(error.value)


def test_temporary_files_of_a_killed_run_are_removed_and_never_scored(in_phantom_world, tmp_path):
    from nnscreener.evaluation.evaluate import _case_names
    _, configuration_manager, _ = phantom_plans(in_phantom_world)
    out = tmp_path / 'maps'
    predict_maps([phantom_scan(in_phantom_world)], out, StockModel(configuration_manager))
    (out / '.tmp_abc123.nii.gz').write_bytes(b'half a map')  # what a kill during an atomic write leaves
    (out / 'overlays').mkdir()
    (out / 'overlays' / '.tmp_x.png').write_bytes(b'half a png')
    shutil.copytree(out, tmp_path / 'copied_maps', ignore=shutil.ignore_patterns('nnscreener_manifest.json'))
    refs = tmp_path / 'refs'
    refs.mkdir()
    shutil.copy(Path(in_phantom_world['nnUNet_raw']) / NAME / 'labelsTr' / 'phantom_0000.nii.gz', refs)
    # maps from elsewhere (no manifest): every <case>.nii.gz counts, a dot-file is no case
    assert _case_names(str(tmp_path / 'copied_maps'), str(refs), '.nii.gz') == ['phantom_0000']
    predict_maps([phantom_scan(in_phantom_world)], out, StockModel(configuration_manager), continue_=True)
    assert not list(out.rglob('.tmp_*')), 'the next run into the folder removes them'


# ------------------------------------------------------------------------------------- 9. compare and the splits
def test_compare_refuses_a_copied_fold_summary_and_a_truncated_one(nnunet_env_compare, monkeypatch, capsys):
    from test_compare_and_splits import DATASET, make_results
    from nnscreener.evaluation.compare import compare_entry, compare_trainers
    results = Path(nnunet_env_compare['nnUNet_results'])
    make_results(results, np.random.default_rng(0))
    summaries = {f: results / DATASET / 'B__nnScreenerPlans__3d_fullres' / f'fold_{f}' /
                 'validation' / 'summary.json' for f in range(3)}
    honest = compare_trainers(501, 'A', 'B', verbose=False)
    shutil.copy(summaries[0], summaries[1])
    with pytest.raises(ScreenerInputError, match='B: case ph_00 is in the validation summaries of fold_0 and fold_1'):
        compare_trainers(501, 'A', 'B', verbose=False)
    # with nnU-Net's splits_final.json at hand, each fold must hold exactly its validation cases
    splits = [{'train': [], 'val': [f'ph_{fold}{i}' for i in range(6)]} for fold in range(3)]
    (Path(nnunet_env_compare['nnUNet_preprocessed']) / DATASET).mkdir()
    (Path(nnunet_env_compare['nnUNet_preprocessed']) / DATASET / 'splits_final.json').write_text(json.dumps(splits))
    with pytest.raises(ScreenerInputError, match='B fold_1: its validation summary holds 6 cases that are not the 6 '
                                                 'validation cases of fold 1'):
        compare_trainers(501, 'A', 'B', verbose=False)
    make_results(results, np.random.default_rng(0))  # the honest summaries again: they match the splits
    assert compare_trainers(501, 'A', 'B', verbose=False)['labels']['1']['p_value'] == honest['labels']['1'][
        'p_value']
    truncate(summaries[2], 0.6)
    monkeypatch.setattr(sys, 'argv', ['nnScreener_compare', '-d', '501', '-a', 'A', '-b', 'B'])
    with pytest.raises(SystemExit) as exit_info:
        compare_entry()
    assert exit_info.value.code == 2
    error = one_line_error(capsys)
    assert 'fold_2/validation/summary.json is truncated or not an nnU-Net validation summary' in error
    assert 'nnUNetv2_train 501 3d_fullres 2 -p nnScreenerPlans -tr B --val' in error


@pytest.fixture
def nnunet_env_compare(tmp_path, monkeypatch):
    return use_fresh_nnunet_folders(tmp_path, monkeypatch)


# ------------------------------------------------------------------------------------- 6. one command per folder
def test_a_second_command_into_a_busy_folder_is_refused_without_touching_it(in_phantom_world, tmp_path,
                                                                            monkeypatch, capsys):
    from nnscreener.evaluation.evaluate import evaluate_entry
    from nnscreener.inference.predict import predict_entry
    from nnscreener.utilities.output_folder import output_folder_lock
    _, configuration_manager, _ = phantom_plans(in_phantom_world)
    out = tmp_path / 'maps'
    predict_maps([phantom_scan(in_phantom_world, f'phantom_000{i}') for i in range(3)], out,
                 StockModel(configuration_manager))
    before = folder_digest(out)
    with output_folder_lock(str(out)):  # as a running predict holds it
        for entry, args in ((predict_entry, ('-i', phantom_scan(in_phantom_world), '-o', out, '-d', TARGET_ID,
                                             '--model', 'local_contrast', '-device', 'cpu', '--c')),
                            (evaluate_entry, ('-pred', out, '-ref', Path(in_phantom_world['nnUNet_raw']) / NAME /
                                              'labelsTr', '--n_threshold_cases', 1))):
            assert run_cli(monkeypatch, entry, *args) == 2
            assert 'is in use by another running nnscreener command' in one_line_error(capsys)
    assert folder_digest(out) == before


def test_concurrent_predicts_into_one_folder_never_lose_scores(in_phantom_world, tmp_path):
    """Two real processes: one may be refused, and whatever finished is listed, scored and consistent."""
    raw = Path(in_phantom_world['nnUNet_raw']) / NAME / 'imagesTr'
    out = tmp_path / 'maps'
    runs = [predict_process(in_phantom_world, sorted(raw.iterdir())[3 * i:3 * i + 3], out) for i in range(2)]
    outcomes = [(p.wait(timeout=600), p.stderr.read()) for p in runs]
    assert all(code in (0, 2) for code, _ in outcomes) and any(code == 0 for code, _ in outcomes), outcomes
    assert all('in use by another running nnscreener command' in err for code, err in outcomes if code == 2)
    listed = json.loads((out / 'nnscreener_manifest.json').read_text())['predictions']['maps']
    scored = [line.split(',')[0] for line in (out / 'scores.csv').read_text().splitlines()[1:]]
    assert sorted(scored) == sorted(listed) and all((out / name).is_file() for name in listed.values())


def predict_process(env, images, out, *extra):
    return subprocess.Popen([sys.executable, '-c', 'from nnscreener.inference.predict import predict_entry; '
                             'predict_entry()', '-i', *map(str, images), '-o', str(out), '-d', str(TARGET_ID),
                             '--model', 'local_contrast', '-device', 'cpu', *extra],
                            env={**os.environ, **env, 'OMP_NUM_THREADS': '1'}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# ------------------------------------------------------------------------------------- kill -9
def kill_when(process, condition, timeout=300):
    """SIGKILL `process` as soon as `condition()` holds; False if the process ended first."""
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if condition():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.01)
    return False


def test_a_killed_predict_resumes_to_the_same_files(in_phantom_world, tmp_path):
    raw = Path(in_phantom_world['nnUNet_raw']) / NAME / 'imagesTr'
    images = sorted(raw.iterdir())
    whole, killed = tmp_path / 'whole', tmp_path / 'killed'
    assert predict_process(in_phantom_world, images, whole).wait(timeout=600) == 0

    def one_map_listed():
        try:
            return len(json.loads((killed / 'nnscreener_manifest.json').read_text())['predictions']['maps']) >= 1
        except (OSError, ValueError, KeyError):
            return False

    assert kill_when(predict_process(in_phantom_world, images, killed), one_map_listed), 'predict ended before kill'
    assert not (killed / 'scores.csv').exists()
    resumed = predict_process(in_phantom_world, images, killed, '--c')
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in whole.iterdir())
    for image in images:
        name = image.name.replace('_0000.nii.gz', '.nii.gz')
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(killed / name))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(whole / name))))
    assert (killed / 'scores.csv').read_text() == (whole / 'scores.csv').read_text()


def test_a_killed_pretraining_resumes_to_the_same_model(phantom_world, tmp_path):
    preprocessed = tmp_path / 'nnUNet_preprocessed'  # plans of 40 descriptor steps, a checkpoint every 10
    shutil.copytree(Path(phantom_world['nnUNet_preprocessed']) / NAME, preprocessed / NAME)
    plans_file = preprocessed / NAME / 'nnScreenerPlans.json'
    plans = json.loads(plans_file.read_text())
    plans['screener']['ssl']['num_steps'], plans['screener']['checkpoint_every'] = 40, 10
    plans_file.write_text(json.dumps(plans))

    def pretrain_process(results, *extra):
        env = {**os.environ, **phantom_world, 'nnUNet_preprocessed': str(preprocessed),
               'nnUNet_results': str(results), 'OMP_NUM_THREADS': '1'}
        return subprocess.Popen(['nnScreener_pretrain', '-d', str(TARGET_ID), '--stages', 'descriptor', '-device',
                                 'cpu', *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stage_folder(results):
        return results / NAME / 'nnScreenerDescriptorTrainer__nnScreenerPlans__3d_fullres' / 'fold_all'

    whole, killed = tmp_path / 'whole', tmp_path / 'killed'
    assert pretrain_process(whole).wait(timeout=900) == 0
    latest = stage_folder(killed) / 'checkpoint_latest.pth'
    assert kill_when(pretrain_process(killed), latest.is_file), 'pretraining ended before kill'
    assert not (stage_folder(killed) / 'checkpoint_final.pth').exists()
    resumed_from = torch.load(latest, weights_only=True)['screener']['step']
    resumed = pretrain_process(killed, '--c')
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()[-2000:]
    final = [torch.load(stage_folder(r) / 'checkpoint_final.pth', weights_only=True) for r in (whole, killed)]
    assert 0 < resumed_from < 40 and final[1]['screener']['step'] == 40
    for key in final[0]['network_weights']:
        torch.testing.assert_close(final[1]['network_weights'][key], final[0]['network_weights'][key], rtol=0,
                                   atol=0, msg=key)
    assert final[1]['screener']['history']['steps'] == list(range(1, 41))


def test_batch_i_is_the_same_whatever_the_workers_and_the_first_batch(in_phantom_world, monkeypatch):
    """What makes a resumed stage equal to an uninterrupted one: batch i depends on (seed, i) only."""
    from nnscreener.preprocessing.screener_cache import ScreenerCache, screener_cache_folder
    from nnscreener.training.data_loaders import CropPairLoader, multiprocess_loader
    _, configuration_manager, _ = phantom_plans(in_phantom_world)
    cache = ScreenerCache(screener_cache_folder(str(Path(in_phantom_world['nnUNet_preprocessed']) / NAME),
                                                configuration_manager))

    def batches(n_proc, first_batch, n):
        monkeypatch.setenv('nnUNet_n_proc_DA', str(n_proc))
        loader = multiprocess_loader(CropPairLoader(cache, 2, configuration_manager.patch_size, 16, seed=5,
                                                    first_batch=first_batch), pin_memory=False)
        drawn = [next(loader) for _ in range(n)]
        if hasattr(loader, '_finish'):
            loader._finish()
        return drawn

    single, workers, resumed = batches(0, 0, 5), batches(2, 0, 5), batches(2, 3, 2)
    for a, b in zip(single + single[3:], workers + resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not np.array_equal(single[0]['view1'], single[1]['view1'])
