"""Bad input and unsafe outputs (issue 11, items 2-5): truncated NIfTI files are refused by every reader, output
folders never overwrite or mix with data we did not write, predict outputs never mix models, and a killed retrain
resumes the new run."""
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from conftest import TARGET_ID, nnunet_env
from nnscreener.utilities.errors import ScreenerInputError
from nnscreener.utilities.io import check_image_complete, read_image

NAME = 'Dataset501_ScreenerPhantomLesions'


def truncate(path, fraction=0.5) -> str:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:int(len(data) * fraction)])
    return str(path)


def folder_digest(folder) -> dict:
    """{relative path: sha256} of every file below `folder`: what must not change when a command is refused."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


def one_line_error(capsys) -> str:
    """The error line, the last of stderr (a progress bar it interrupted may stand above it); no traceback."""
    err = capsys.readouterr().err.strip()
    assert 'Traceback' not in err and err.count('nnScreener error: ') == 1, err
    line = err.splitlines()[-1]
    assert line.startswith('nnScreener error: '), err
    return line


def run_cli(monkeypatch, entry, *args):
    monkeypatch.setattr(sys, 'argv', ['nnScreener', *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        entry()
    return exit_info.value.code


def use_fresh_nnunet_folders(root, monkeypatch) -> dict:
    env = nnunet_env(root)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def ct_volume(shape=(34, 40, 50)):
    """int16 HU with a different value on every slice, so a zero-filled slice cannot pass for a real one."""
    z = np.arange(shape[0], dtype=np.int16)[:, None, None]
    return np.broadcast_to(-900 + 30 * z, shape).astype(np.int16)


# ------------------------------------------------------------------------------------- 2. truncated NIfTI files
@pytest.mark.parametrize('ending', ['.nii.gz', '.nii', '.mha', '.nrrd'])
def test_a_truncated_image_is_refused_in_every_format(tmp_path, ending):
    array = ct_volume()
    fname = str(tmp_path / f'ct{ending}')
    sitk.WriteImage(sitk.GetImageFromArray(array), fname, ending != '.nii')
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(fname)), array)  # complete files read as before
    truncate(fname)
    if ending.startswith('.nii'):  # what the check is for: SimpleITK itself zero-fills the missing half
        assert (sitk.GetArrayFromImage(sitk.ReadImage(fname))[-5:] == 0).all()
    with pytest.raises(ScreenerInputError, match=f'ct{ending}' + ('.* truncated' if ending.startswith('.nii') else
                                                                 ': file is corrupt')) as error:
        read_image(fname)
    assert '\n' not in str(error.value)


def test_corrupt_or_short_gzip_payloads_and_nifti2_are_checked(tmp_path):
    import nibabel
    array = ct_volume()
    raw = str(tmp_path / 'ct.nii')
    sitk.WriteImage(sitk.GetImageFromArray(array), raw, False)
    data = Path(raw).read_bytes()
    (tmp_path / 'short.nii.gz').write_bytes(gzip.compress(data[:len(data) // 2]))  # a complete gzip of half a NIfTI
    (tmp_path / 'plain.nii.gz').write_bytes(data[:len(data) // 2])  # half a plain NIfTI named .nii.gz: it reads
    for name in ('short', 'plain'):
        with pytest.raises(ScreenerInputError, match=f'{name}.nii.gz is truncated: its header describes'):
            read_image(str(tmp_path / f'{name}.nii.gz'))
    packed = bytearray(gzip.compress(data))
    packed[-8] ^= 0xFF  # the stored CRC32
    (tmp_path / 'crc.nii.gz').write_bytes(bytes(packed))
    with pytest.raises(ScreenerInputError, match='crc.nii.gz is corrupt.*CRC'):
        read_image(str(tmp_path / 'crc.nii.gz'))
    (tmp_path / 'members.nii.gz').write_bytes(gzip.compress(data[:500]) + gzip.compress(data[500:]))  # valid gzip
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(str(tmp_path / 'members.nii.gz'))), array)
    nifti2 = str(tmp_path / 'ct2.nii')  # SimpleITK reads no NIfTI-2, but the size check knows its header
    nibabel.save(nibabel.Nifti2Image(array.transpose(2, 1, 0), np.eye(4)), nifti2)
    check_image_complete(nifti2)
    with pytest.raises(ScreenerInputError, match='ct2.nii is truncated'):
        check_image_complete(truncate(nifti2, 0.9))


def test_predict_and_evaluate_refuse_truncated_inputs(in_phantom_world, tmp_path):
    from nnscreener.evaluation.evaluate import evaluate_anomaly_maps
    from nnscreener.inference.anomaly_maps import save_case_overlay
    raw = Path(in_phantom_world['nnUNet_raw']) / NAME
    images = tmp_path / 'images'
    images.mkdir()
    for case in ('phantom_0000', 'phantom_0001'):
        shutil.copy(raw / 'imagesTr' / f'{case}_0000.nii.gz', images)
    truncate(images / 'phantom_0001_0000.nii.gz')
    plans_manager, configuration_manager, dataset_json = phantom_plans(in_phantom_world)
    with pytest.raises(ScreenerInputError, match='phantom_0001_0000.nii.gz is truncated'):
        predict_maps(images, tmp_path / 'maps', StockModel(configuration_manager))
    assert (tmp_path / 'maps' / 'phantom_0000.nii.gz').is_file()  # fail fast: maps before it stay
    assert not (tmp_path / 'maps' / 'phantom_0001.nii.gz').exists()

    references = tmp_path / 'references'
    references.mkdir()
    shutil.copy(raw / 'labelsTr' / 'phantom_0000.nii.gz', references)
    truncate(references / 'phantom_0000.nii.gz', 0.3)
    with pytest.raises(ScreenerInputError, match='references/phantom_0000.nii.gz is truncated'):
        evaluate_anomaly_maps(str(tmp_path / 'maps'), str(references), str(tmp_path / 'eval'), n_threshold_cases=1,
                              verbose=False)
    with pytest.raises(ScreenerInputError, match='phantom_0000.nii.gz is truncated'):  # the overlays' mask
        save_case_overlay(str(images / 'phantom_0000_0000.nii.gz'), str(tmp_path / 'maps' / 'phantom_0000.nii.gz'),
                          str(tmp_path / 'overlay.png'), mask_file=str(references / 'phantom_0000.nii.gz'))


@pytest.mark.parametrize('broken', ['image', 'label'])
def test_plan_and_preprocess_refuses_a_truncated_case_before_nnunet_reads_it(tmp_path, monkeypatch, broken):
    from nnscreener.preprocessing.plan_and_preprocess import plan_and_preprocess
    use_fresh_nnunet_folders(tmp_path, monkeypatch)
    raw = tmp_path / 'nnUNet_raw' / 'Dataset777_Truncated'
    (raw / 'imagesTr').mkdir(parents=True)
    (raw / 'labelsTr').mkdir()
    for i in range(2):
        image = sitk.GetImageFromArray(ct_volume((40, 64, 64)))
        image.SetSpacing((1.5, 1.5, 2.25))
        sitk.WriteImage(image, str(raw / 'imagesTr' / f'case{i}_0000.nii.gz'))
        label = sitk.GetImageFromArray(np.zeros((40, 64, 64), np.uint8))
        label.CopyInformation(image)
        sitk.WriteImage(label, str(raw / 'labelsTr' / f'case{i}.nii.gz'))
    (raw / 'dataset.json').write_text(json.dumps({'channel_names': {'0': 'CT'}, 'labels': {'background': 0,
                                                                                          'lesion': 1},
                                                  'numTraining': 2, 'file_ending': '.nii.gz'}))
    truncate(raw / ('imagesTr/case1_0000.nii.gz' if broken == 'image' else 'labelsTr/case1.nii.gz'))
    with pytest.raises(ScreenerInputError, match='case1.* is truncated'):
        plan_and_preprocess(777, preset='tiny', num_processes=1)
    assert not list((tmp_path / 'nnUNet_preprocessed').rglob('*.json')), 'nnU-Net fingerprinted a truncated case'


# ------------------------------------------------------------------------------------- 3. output folders
class StockModel:
    """A PatchAnomalyModel whose map is its stock input (in [0, 1]) plus `offset`: two offsets, two models whose maps
    tell apart at a glance."""
    uses_clahe = False

    def __init__(self, configuration_manager, offset=0.0):
        self.patch_size, self.device = tuple(configuration_manager.patch_size), torch.device('cpu')
        self.offset, self.calls = offset, 0

    def __call__(self, stock, clahe, crop_start):
        self.calls += 1
        return stock + self.offset


def phantom_plans(env):
    folder = Path(env['nnUNet_preprocessed']) / NAME
    plans_manager = PlansManager(str(folder / 'nnScreenerPlans.json'))
    return plans_manager, plans_manager.get_configuration('3d_fullres'), load_json(str(folder / 'dataset.json'))


def predict_maps(inputs, out, model, **kwargs):
    from nnscreener.inference.anomaly_maps import predict_anomaly_maps
    plans_manager, configuration_manager, dataset_json = phantom_plans(os.environ)
    inputs = [str(f) for f in inputs] if isinstance(inputs, list) else str(inputs)
    return predict_anomaly_maps(inputs, str(out), model, plans_manager, configuration_manager, dataset_json,
                                **kwargs)


@pytest.fixture
def raw_copy(in_phantom_world, tmp_path):
    """A raw dataset with one phantom case, outside nnUNet_raw (so its folder names alone must protect it)."""
    raw, copy = Path(in_phantom_world['nnUNet_raw']) / NAME, tmp_path / 'Dataset777_Copy'
    for sub, f in (('imagesTr', 'phantom_0000_0000.nii.gz'), ('labelsTr', 'phantom_0000.nii.gz')):
        (copy / sub).mkdir(parents=True)
        shutil.copy(raw / sub / f, copy / sub / f)
    shutil.copy(raw / 'dataset.json', copy)
    return copy


def test_predict_refuses_dataset_nnunet_and_foreign_folders_before_any_compute(raw_copy, tmp_path, monkeypatch,
                                                                                capsys):
    """Every refusal: exit 2, one line, and not one file added or changed (local_contrast would run in a second)."""
    from nnscreener.inference.predict import predict_entry
    image = raw_copy / 'imagesTr' / 'phantom_0000_0000.nii.gz'
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'notes.txt').write_text('my own file')
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    refusals = {raw_copy / 'labelsTr': 'raw dataset folder', raw_copy / 'imagesTr': 'raw dataset folder',
                raw_copy: 'raw dataset folder', Path(os.environ['nnUNet_results']) / 'maps': 'inside \\$nnUNet_results',
                Path(os.environ['nnUNet_raw']) / 'maps': 'inside \\$nnUNet_raw',
                mine: 'holds 1 file\\(s\\) nnscreener did not write \\(notes.txt\\)', a_file: 'is an existing file',
                a_file / 'maps': 'cannot be written'}
    before = {root: folder_digest(root) for root in (raw_copy, mine, os.environ['nnUNet_results'],
                                                     os.environ['nnUNet_raw'])}
    for out, message in refusals.items():
        code = run_cli(monkeypatch, predict_entry, '-i', image, '-o', out, '-d', TARGET_ID, '--model',
                       'local_contrast', '-device', 'cpu')
        assert code == 2 and re.search(message, one_line_error(capsys)), out
    assert {root: folder_digest(root) for root in before} == before
    assert a_file.read_text() == 'x'
    # the folder is checked before the model is even looked up (dataset 999 does not exist)
    assert run_cli(monkeypatch, predict_entry, '-i', image, '-o', mine, '-d', 999, '-device', 'cpu') == 2
    assert 'nnscreener did not write' in one_line_error(capsys)
    # the same predict into a new folder works, and a rerun into it (all files ours) too
    for _ in range(2):
        run_cli_ok(monkeypatch, predict_entry, '-i', image, '-o', tmp_path / 'maps', '-d', TARGET_ID, '--model',
                   'local_contrast', '-device', 'cpu')
    assert (tmp_path / 'maps' / 'phantom_0000.nii.gz').is_file()


def run_cli_ok(monkeypatch, entry, *args):
    monkeypatch.setattr(sys, 'argv', ['nnScreener', *map(str, args)])
    entry()


def test_evaluate_and_compare_never_overwrite_a_file_they_did_not_write(in_phantom_world, raw_copy, tmp_path,
                                                                        monkeypatch, capsys):
    from test_compare_and_splits import make_results
    from nnscreener.evaluation.compare import compare_entry
    from nnscreener.evaluation.evaluate import evaluate_entry
    raw = Path(in_phantom_world['nnUNet_raw']) / NAME
    plans_manager, configuration_manager, _ = phantom_plans(in_phantom_world)
    images = [raw / 'imagesTr' / f'phantom_000{i}_0000.nii.gz' for i in range(3)]
    predict_maps(images, tmp_path / 'maps', StockModel(configuration_manager))
    capsys.readouterr()
    users = tmp_path / 'users'
    users.mkdir()
    (users / 'summary.json').write_text('{"my": "results"}')
    evaluate = ('-pred', tmp_path / 'maps', '-ref', raw / 'labelsTr', '--n_threshold_cases', 1)
    for out, message in ((users, 'summary.json'), (raw_copy / 'labelsTr', 'raw dataset folder')):
        assert run_cli(monkeypatch, evaluate_entry, *evaluate, '-o', out) == 2
        assert message in one_line_error(capsys)
    assert (users / 'summary.json').read_text() == '{"my": "results"}'
    assert folder_digest(raw_copy / 'labelsTr') == {'phantom_0000.nii.gz': hashlib.sha256(
        (raw / 'labelsTr' / 'phantom_0000.nii.gz').read_bytes()).hexdigest()}
    for _ in range(2):  # the default output folder is the predict folder: listed in its manifest, so rerunnable
        run_cli_ok(monkeypatch, evaluate_entry, *evaluate)
    assert (tmp_path / 'maps' / 'summary.json').is_file()
    capsys.readouterr()

    use_fresh_nnunet_folders(tmp_path / 'compare', monkeypatch)  # for compare's fold summaries
    make_results(tmp_path / 'compare' / 'nnUNet_results', np.random.default_rng(0))
    (users / 'comparison.md').write_text('my table')
    compare = ('-d', 501, '-a', 'A', '-b', 'B')
    assert run_cli(monkeypatch, compare_entry, *compare, '-o', users) == 2
    assert 'comparison.md' in one_line_error(capsys) and (users / 'comparison.md').read_text() == 'my table'
    for _ in range(2):
        run_cli_ok(monkeypatch, compare_entry, *compare, '-o', tmp_path / 'comparison')
    assert (tmp_path / 'comparison' / 'comparison.json').is_file()


# ------------------------------------------------------------------------------------- 4. no mixed models
def test_predict_continue_recomputes_maps_of_another_model_setting_or_input(in_phantom_world, tmp_path, capsys):
    from nnscreener.utilities.output_folder import load_manifest
    raw = Path(in_phantom_world['nnUNet_raw']) / NAME
    images = tmp_path / 'images'
    images.mkdir()
    for i in range(2):
        shutil.copy(raw / 'imagesTr' / f'phantom_000{i}_0000.nii.gz', images)
    _, configuration_manager, _ = phantom_plans(in_phantom_world)
    out = tmp_path / 'maps'
    cases = ('phantom_0000', 'phantom_0001')

    def run(model, name, **kwargs):
        calls = model.calls
        predict_maps(images, out, model, continue_=True, model_identity={'model': name}, **kwargs)
        return model.calls - calls

    def map_means():
        return [sitk.GetArrayFromImage(sitk.ReadImage(str(out / f'{case}.nii.gz'))).mean() for case in cases]

    model_a, model_b = StockModel(configuration_manager), StockModel(configuration_manager, offset=10.0)
    assert run(model_a, 'A') > 0 and run(model_a, 'A') == 0  # --c keeps this model's maps
    assert max(map_means()) < 1
    assert run(model_b, 'B') > 0
    assert 'made by another model' in capsys.readouterr().err
    assert min(map_means()) > 9, 'maps of model A were kept for model B'
    manifest = load_manifest(str(out))['predictions']
    assert manifest['model'] == {'model': 'B', 'step_size': 0.5}
    assert sorted(manifest['maps']) == list(cases)
    patches_per_run = run(model_b, 'B', step_size=1.0)  # another step size: other maps
    assert patches_per_run > 0 and run(model_b, 'B', step_size=1.0) == 0
    scan = sitk.ReadImage(str(images / 'phantom_0001_0000.nii.gz'))
    sitk.WriteImage(scan + 50, str(images / 'phantom_0001_0000.nii.gz'))  # another scan, same size, same name
    assert 0 < run(model_b, 'B', step_size=1.0) < patches_per_run  # only that case is redone


def test_evaluate_scores_exactly_the_listed_maps_and_names_the_others(in_phantom_world, tmp_path, capsys):
    from nnscreener.evaluation.evaluate import PER_CASE_FILE, evaluate_anomaly_maps
    raw = Path(in_phantom_world['nnUNet_raw']) / NAME
    _, configuration_manager, _ = phantom_plans(in_phantom_world)
    images = [raw / 'imagesTr' / f'phantom_000{i}_0000.nii.gz' for i in range(4)]
    out = tmp_path / 'maps'
    predict_maps(images, out, StockModel(configuration_manager))
    predict_maps(images[:3], out, StockModel(configuration_manager, offset=10.0))  # a rerun on fewer inputs
    assert 'phantom_0003.nii.gz' in capsys.readouterr().err  # predict says it is no longer listed
    shutil.copy(out / 'phantom_0000.nii.gz', out / 'phantom_0009.nii.gz')  # a map a user put there
    references = tmp_path / 'references'
    shutil.copytree(raw / 'labelsTr', references)
    shutil.copy(references / 'phantom_0000.nii.gz', references / 'phantom_0009.nii.gz')  # it would be scored too
    evaluate_anomaly_maps(str(out), str(references), str(tmp_path / 'eval'), n_threshold_cases=1, verbose=False)
    err = capsys.readouterr().err
    assert '2 map(s)' in err and 'phantom_0003.nii.gz' in err and 'phantom_0009.nii.gz' in err
    scored = [line.split(',')[0] for line in (tmp_path / 'eval' / PER_CASE_FILE).read_text().splitlines()[1:]]
    assert scored == ['phantom_0000', 'phantom_0001', 'phantom_0002']
    assert [line.split(',')[0] for line in (out / 'scores.csv').read_text().splitlines()[1:]] == scored


def test_predict_manifest_names_the_model_its_checkpoints_and_plans(pretrained_world, tmp_path, monkeypatch):
    from nnscreener.inference.predict import predict
    from nnscreener.training.stages import stage_checkpoint
    from nnscreener.utilities.io import file_sha256
    from nnscreener.utilities.output_folder import load_manifest
    env, _ = pretrained_world
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    image = str(Path(env['nnUNet_raw']) / NAME / 'imagesTr' / 'phantom_0000_0000.nii.gz')
    predict(image, str(tmp_path / 'maps'), TARGET_ID, 'local_contrast', 'cpu')
    local = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'maps' / 'phantom_0000.nii.gz')))
    predict(image, str(tmp_path / 'maps'), TARGET_ID, 'distilled', 'cpu', continue_=True)
    model = load_manifest(str(tmp_path / 'maps'))['predictions']['model']
    checkpoint = stage_checkpoint(NAME, 'distillation')
    assert model['model'] == 'distilled' and model['dataset'] == NAME and model['preset'] == 'tiny'
    assert model['checkpoints'] == {os.path.relpath(checkpoint, env['nnUNet_results']): file_sha256(checkpoint)}
    distilled = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'maps' / 'phantom_0000.nii.gz')))
    assert not np.allclose(local, distilled), 'the local-contrast map was kept for the distilled model'


# ------------------------------------------------------------------------------------- 5. stage runs and --c
@pytest.fixture
def short_plans(phantom_world, tmp_path, monkeypatch):
    """The phantom world with its own results folder and plans whose SSL stages train 3 steps (checkpoint every
    step); returns a function that edits those plans."""
    preprocessed = tmp_path / 'nnUNet_preprocessed'
    shutil.copytree(Path(phantom_world['nnUNet_preprocessed']) / NAME, preprocessed / NAME)
    for k, v in {**phantom_world, 'nnUNet_preprocessed': str(preprocessed),
                 'nnUNet_results': str(tmp_path / 'nnUNet_results')}.items():
        monkeypatch.setenv(k, v)
    plans_file = preprocessed / NAME / 'nnScreenerPlans.json'

    def edit(**ssl):
        plans = json.loads(plans_file.read_text())
        plans['screener']['ssl'].update(ssl)
        plans['screener']['checkpoint_every'] = 1
        plans_file.write_text(json.dumps(plans))

    edit(num_steps=3)
    return edit


def descriptor_state():
    from nnscreener.training.stages import stage_checkpoint
    return torch.load(stage_checkpoint(NAME, 'descriptor'), weights_only=True)['screener']


def test_a_killed_retrain_resumes_the_new_run_and_changed_plans_are_not_skipped(short_plans, monkeypatch, capsys):
    from nnscreener.run.pretrain import pretrain
    from nnscreener.training.stage_runs import current_run_id
    from nnscreener.training.stage_trainer import nnScreenerStageTrainer
    from nnscreener.training.stages import stage_checkpoint, stage_folder
    first = pretrain(TARGET_ID, ['descriptor'], device='cpu')['descriptor']
    old = descriptor_state()
    assert old['step'] == 3 and old['run_id'] == current_run_id(stage_folder(NAME, 'descriptor'))

    original_step = nnScreenerStageTrainer.train_step

    def killed_at_step_2(self, batch):  # after the checkpoint of step 2
        if self.current_step == 2:
            raise KeyboardInterrupt
        return original_step(self, batch)

    monkeypatch.setattr(nnScreenerStageTrainer, 'train_step', killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        pretrain(TARGET_ID, ['descriptor'], device='cpu')  # a fresh retrain, killed
    assert not os.path.exists(first), 'the old model is still there to be taken for the new one'
    monkeypatch.setattr(nnScreenerStageTrainer, 'train_step', original_step)
    pretrain(TARGET_ID, ['descriptor'], device='cpu', continue_=True)
    new = descriptor_state()
    assert new['run_id'] != old['run_id'] and new['history']['steps'] == [1, 2, 3]
    assert 'continuing' in capsys.readouterr().out

    short_plans(num_steps=4)  # more steps: --c continues the finished stage to the new count
    pretrain(TARGET_ID, ['descriptor'], device='cpu', continue_=True)
    longer = descriptor_state()
    assert longer['step'] == 4 and longer['history']['steps'] == [1, 2, 3, 4]
    assert longer['run_id'] == new['run_id']
    pretrain(TARGET_ID, ['descriptor'], device='cpu', continue_=True)  # finished with these plans: skipped
    assert 'finished earlier' in capsys.readouterr().out and descriptor_state()['step'] == 4

    lr = longer['plans_screener']['ssl']['lr']
    for change, message in (({'lr': lr * 2}, 'ssl.lr'), ({'num_steps': 2}, 'trained 4 steps')):
        short_plans(**{'num_steps': 4, 'lr': lr, **change})
        with pytest.raises(ScreenerInputError, match=message):
            pretrain(TARGET_ID, ['descriptor'], device='cpu', continue_=True)
    assert os.path.isfile(stage_checkpoint(NAME, 'descriptor')), 'a refused --c must not touch the model'


def test_continue_ignores_checkpoints_of_an_earlier_run(tmp_path):
    """A kill between writing the new run id and removing the old checkpoints: --c must not take them."""
    from nnscreener.training.stage_runs import RUN_FILE, plan_stage_run
    screener = {'descriptor_dim': 8, 'checkpoint_every': 10, 'ssl': {'num_steps': 6, 'lr': 1e-3},
                'density': {'num_steps': 3}}
    for name, step in (('checkpoint_final.pth', 6), ('checkpoint_latest.pth', 4)):
        torch.save({'screener': {'run_id': 'old', 'step': step, 'plans_screener': screener}}, tmp_path / name)
    assert plan_stage_run(str(tmp_path), 'ssl', screener, True).finished  # no run file: an older nnscreener's
    (tmp_path / RUN_FILE).write_text(json.dumps({'run_id': 'old'}))
    assert plan_stage_run(str(tmp_path), 'ssl', screener, True).finished
    changed_elsewhere = {**screener, 'density': {'num_steps': 99}, 'checkpoint_every': 5, 'preset': 'other'}
    assert plan_stage_run(str(tmp_path), 'ssl', changed_elsewhere, True).finished  # not this stage's settings
    (tmp_path / RUN_FILE).write_text(json.dumps({'run_id': 'new'}))
    run = plan_stage_run(str(tmp_path), 'ssl', screener, True)
    assert not run.finished and run.resume_from is None and run.run_id != 'old'
    assert not (tmp_path / 'checkpoint_final.pth').exists()  # the fresh run cleared them


def test_a_stage_is_stale_when_an_upstream_stage_block_changes(tmp_path):
    """The distilled UNet regresses the density stage's map and the density model fits the SSL features: --c must
    refuse a finished distillation when the density block changed (e.g. density.condition_median), and a finished
    density stage when the SSL block changed; a downstream block never invalidates an upstream stage."""
    from nnscreener.training.stage_runs import RUN_FILE, plan_stage_run
    screener = {'descriptor_dim': 8, 'ssl': {'num_steps': 6, 'lr': 1e-3},
                'density': {'num_steps': 3, 'condition_median': 1}, 'distillation': {'num_steps': 2}}
    (tmp_path / RUN_FILE).write_text(json.dumps({'run_id': 'run'}))

    def finished(block, planned):
        torch.save({'screener': {'run_id': 'run', 'step': screener[block]['num_steps'], 'plans_screener': screener}},
                   tmp_path / 'checkpoint_final.pth')
        return plan_stage_run(str(tmp_path), block, planned, True).finished

    median = {**screener, 'density': {'num_steps': 3, 'condition_median': 5}}
    with pytest.raises(ScreenerInputError, match='density.condition_median'):
        finished('distillation', median)
    with pytest.raises(ScreenerInputError, match='ssl.lr'):
        finished('density', {**screener, 'ssl': {'num_steps': 6, 'lr': 2e-3}})
    with pytest.raises(ScreenerInputError, match='ssl.num_steps'):  # upstream steps count: other features
        finished('distillation', {**screener, 'ssl': {'num_steps': 7, 'lr': 1e-3}})
    assert finished('ssl', median) and finished('density', {**screener, 'distillation': {'num_steps': 9}})


def test_the_descriptor_stays_finished_when_only_the_condition_models_masking_changes(tmp_path):
    """The descriptor shares the `ssl` block with the condition model but never masks: new mask blocks (the
    `maskblock` preset override) or condition steps (`condsteps`) must retrain the condition model and what reads it,
    not the descriptor."""
    from nnscreener.trainers.nnscreener_ssl_trainers import nnScreenerConditionTrainer, nnScreenerDescriptorTrainer
    from nnscreener.training.stage_runs import RUN_FILE, plan_stage_run
    screener = {'descriptor_dim': 8, 'condition_dim': 8, 'ssl': {'num_steps': 6, 'mask_block_size': [4, 8, 8]},
                'density': {'num_steps': 3}}
    (tmp_path / RUN_FILE).write_text(json.dumps({'run_id': 'run'}))
    torch.save({'screener': {'run_id': 'run', 'step': 6, 'plans_screener': screener}},
               tmp_path / 'checkpoint_final.pth')
    blocks = {**screener, 'ssl': {'num_steps': 6, 'mask_block_size': [8, 12, 12]}}
    assert plan_stage_run(str(tmp_path), 'ssl', blocks, True, nnScreenerDescriptorTrainer.settings_not_learned).finished
    with pytest.raises(ScreenerInputError, match='ssl.mask_block_size'):
        plan_stage_run(str(tmp_path), 'ssl', blocks, True, nnScreenerConditionTrainer.settings_not_learned)
    # nor a longer condition model (condsteps)
    longer = {**screener, 'ssl': {**screener['ssl'], 'condition_num_steps': 12}}
    assert plan_stage_run(str(tmp_path), 'ssl', longer, True, nnScreenerDescriptorTrainer.settings_not_learned).finished
    with pytest.raises(ScreenerInputError, match='ssl.condition_num_steps'):
        plan_stage_run(str(tmp_path), 'ssl', longer, True, nnScreenerConditionTrainer.settings_not_learned)


def test_demo_refuses_a_folder_of_an_earlier_demo_before_touching_it(tmp_path, monkeypatch, capsys):
    """A demo folder planned `tiny` (nnscreener before the `demo` preset): resuming would re-plan it and lengthen its
    trained stages, so the demo stops with one line and leaves every file of it as it was."""
    from nnscreener.run.demo import TARGET_NAME, demo_entry
    folder = tmp_path / 'nnscreener_demo'
    use_fresh_nnunet_folders(folder, monkeypatch)  # run_demo sets these itself; monkeypatch restores them after
    plans = folder / 'nnUNet_preprocessed' / TARGET_NAME / 'nnScreenerPlans.json'
    plans.parent.mkdir(parents=True)
    plans.write_text(json.dumps({'plans_name': 'nnScreenerPlans', 'screener': {'preset': 'tiny'}}))
    before = folder_digest(folder)
    assert run_cli(monkeypatch, demo_entry, '-o', folder, '-device', 'cpu') == 2
    line = one_line_error(capsys)
    assert "'tiny'" in line and "'demo'" in line and '-o' in line
    assert folder_digest(folder) == before
    assert not (folder / 'nnUNet_raw' / TARGET_NAME).exists(), 'no phantoms may be generated'
