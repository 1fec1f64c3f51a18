"""Low-shot splits (nnScreener_lowshot_splits) and the paired trainer comparison (nnScreener_compare)."""
import json
import sys

import numpy as np
import pytest
from nnunetv2.evaluation.evaluate_predictions import save_summary_json
from scipy.stats import wilcoxon

from nnscreener.evaluation.compare import compare_entry, compare_trainers
from nnscreener.finetuning.lowshot_splits import (lowshot_splits_entry, make_lowshot_splits, min_cases_for_lowshot,
                                                  write_lowshot_splits)
from nnscreener.utilities.errors import ScreenerInputError

DATASET = 'Dataset501_Phantom'


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """Fresh nnUNet_raw / _preprocessed / _results folders (nnunetv2.paths reads os.environ at each use)."""
    folders = {}
    for name in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        monkeypatch.setenv(name, str(folders[name]))
    return folders


# ---------------------------------------------------------------- splits


def test_lowshot_splits_properties():
    cases = [f'case_{i:03d}' for i in range(40)]
    splits = make_lowshot_splits(cases, n_train=25, k=3, seed=0)
    assert len(splits) == 3
    vals = [set(s['val']) for s in splits]
    assert set.union(*vals) == set(cases) and sum(map(len, vals)) == 40  # validation folds partition the cases
    assert sorted(map(len, vals)) == [13, 13, 14]
    for split in splits:
        assert len(split['train']) == len(set(split['train'])) == 25
        assert not set(split['train']) & set(split['val'])
    assert make_lowshot_splits(list(reversed(cases)), 25, 3, seed=0) == splits  # deterministic, order-free
    assert make_lowshot_splits(cases, 25, 3, seed=1) != splits


def test_lowshot_splits_too_few_cases():
    assert min_cases_for_lowshot(25, 3) == 38  # 38 - ceil(38 / 3) = 25, 37 - 13 = 24
    make_lowshot_splits([str(i) for i in range(38)], 25, 3)
    with pytest.raises(ScreenerInputError, match='at least 38 cases.*has 37'):
        make_lowshot_splits([str(i) for i in range(37)], 25, 3)


def make_raw_dataset(raw, n_cases):
    folder = raw / DATASET
    (folder / 'imagesTr').mkdir(parents=True)
    (folder / 'labelsTr').mkdir()
    for i in range(n_cases):
        (folder / 'imagesTr' / f'ph_{i:03d}_0000.nii.gz').touch()
        (folder / 'labelsTr' / f'ph_{i:03d}.nii.gz').touch()
    (folder / 'dataset.json').write_text(json.dumps({'channel_names': {'0': 'CT'}, 'labels': {'background': 0,
                                                     'lesion': 1}, 'numTraining': n_cases, 'file_ending': '.nii.gz'}))


def test_write_lowshot_splits_in_nnunet_format(nnunet_env):
    make_raw_dataset(nnunet_env['nnUNet_raw'], 12)
    path = write_lowshot_splits(501, n_train=5, k=3, seed=0)
    assert path == str(nnunet_env['nnUNet_preprocessed'] / DATASET / 'splits_final.json')
    written = json.loads(open(path).read())
    assert written == make_lowshot_splits([f'ph_{i:03d}' for i in range(12)], 5, 3, 0)
    assert all(set(s) == {'train', 'val'} and all(isinstance(c, str) for c in s['train'] + s['val'])
               for s in written)
    assert write_lowshot_splits(DATASET, n_train=5, k=3, seed=0) == path  # same splits again: fine
    with pytest.raises(ScreenerInputError, match='--overwrite'):
        write_lowshot_splits(501, n_train=5, k=3, seed=1)
    write_lowshot_splits(501, n_train=5, k=3, seed=1, overwrite=True)
    assert json.loads(open(path).read()) == make_lowshot_splits([f'ph_{i:03d}' for i in range(12)], 5, 3, 1)


def test_lowshot_splits_from_preprocessed_folder_and_cli_errors(nnunet_env, monkeypatch, capsys):
    folder = nnunet_env['nnUNet_preprocessed'] / DATASET
    (folder / 'gt_segmentations').mkdir(parents=True)
    (folder / 'dataset.json').write_text(json.dumps({'file_ending': '.nii.gz'}))
    for i in range(9):
        (folder / 'gt_segmentations' / f'c{i}.nii.gz').touch()
    monkeypatch.setattr(sys, 'argv', ['nnScreener_lowshot_splits', '-d', '501', '-n', '4', '-k', '3'])
    lowshot_splits_entry()
    splits = json.loads((folder / 'splits_final.json').read_text())
    assert sorted(c for s in splits for c in s['val']) == [f'c{i}' for i in range(9)]
    # unknown dataset and missing variable: one line, exit code 2
    for argv, unset, message in ((['-d', '777'], None, "unknown dataset '777'"),
                                 (['-d', '501'], 'nnUNet_preprocessed', 'nnUNet_preprocessed not set')):
        if unset:
            monkeypatch.delenv(unset)
        monkeypatch.setattr(sys, 'argv', ['nnScreener_lowshot_splits'] + argv)
        with pytest.raises(SystemExit) as exit_info:
            lowshot_splits_entry()
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------- compare


def write_fold_summary(results, trainer, fold, dice_per_case):
    """nnU-Net validation/summary.json with per-case Dice per label, written by nnU-Net's own writer."""
    folder = results / DATASET / f'{trainer}__nnScreenerPlans__3d_fullres' / f'fold_{fold}' / 'validation'
    folder.mkdir(parents=True, exist_ok=True)
    per_case = [{'reference_file': f'/data/gt_segmentations/{case}.nii.gz',
                 'prediction_file': str(folder / f'{case}.nii.gz'),
                 'metrics': {label: {'Dice': d, 'IoU': d} for label, d in labels.items()}}
                for case, labels in dice_per_case.items()]
    means = {label: {'Dice': float(np.nanmean([c['metrics'][label]['Dice'] for c in per_case]))}
             for label in per_case[0]['metrics']}
    save_summary_json({'metric_per_case': per_case, 'mean': means, 'foreground_mean': {}}, str(folder / 'summary.json'))


def make_results(results, rng, drop_case_from_b=False):
    dice = {'A': {}, 'B': {}}
    for fold in range(3):
        cases = [f'ph_{fold}{i}' for i in range(6)]
        a = {c: {1: float(rng.uniform(0.1, 0.6)), 2: float(rng.uniform(0.3, 0.9))} for c in cases}
        b = {c: {1: a[c][1] + float(rng.uniform(-0.05, 0.2)), 2: a[c][2] + float(rng.uniform(-0.1, 0.1))}
             for c in cases}
        if fold == 0:
            a[cases[0]][1] = float('nan')  # reference and A's prediction empty: nnU-Net writes NaN
        if drop_case_from_b and fold == 1:
            del b[cases[-1]]
        write_fold_summary(results, 'A', fold, a)
        write_fold_summary(results, 'B', fold, b)
        dice['A'].update({(fold, c): v for c, v in a.items()})
        dice['B'].update({(fold, c): v for c, v in b.items()})
    return dice


def test_compare_trainers_matches_scipy_and_writes_outputs(nnunet_env, tmp_path):
    dice = make_results(nnunet_env['nnUNet_results'], np.random.default_rng(0))
    result = compare_trainers(501, 'A', 'B', folds=(0, 1, 2), output_folder=str(tmp_path / 'cmp'), verbose=False)
    keys = sorted(dice['A'])
    for label in (1, 2):
        a = np.array([dice['A'][k][label] for k in keys])
        b = np.array([dice['B'][k][label] for k in keys])
        valid = ~np.isnan(a)
        row = result['labels'][str(label)]
        assert row['n_pairs'] == valid.sum() == (17 if label == 1 else 18)
        assert row['n_excluded_nan'] == (1 if label == 1 else 0)
        assert row['mean_dice_a'] == pytest.approx(a[valid].mean(), abs=1e-12)
        assert row['relative_change_percent'] == pytest.approx(
            (b[valid].mean() - a[valid].mean()) / a[valid].mean() * 100, abs=1e-9)
        assert row['p_value'] == pytest.approx(wilcoxon(b[valid], a[valid]).pvalue, abs=1e-15)
    assert result['labels']['1']['p_value'] < 0.01  # B is clearly better on label 1
    markdown = (tmp_path / 'cmp' / 'comparison.md').read_text()
    assert '| A | ' in markdown and '↑' in markdown and 'p < 0.01' in markdown
    means = [result['labels'][label][f'mean_dice_{arm}'] for arm in 'ab' for label in '12']
    assert all(f'{m:.3f}' in markdown for m in means)  # 3 decimals: 0.00 vs 0.00 next to an arrow said nothing
    saved = json.loads((tmp_path / 'cmp' / 'comparison.json').read_text())
    assert saved['labels']['1']['dice_a'][0] is None  # NaN stored as null, the JSON stays strict
    assert (tmp_path / 'cmp' / 'comparison.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_compare_refuses_mismatched_cases_and_missing_summary(nnunet_env, monkeypatch, capsys):
    make_results(nnunet_env['nnUNet_results'], np.random.default_rng(1), drop_case_from_b=True)
    with pytest.raises(ScreenerInputError, match=r'only A: \[fold_1/ph_15\]; only B: \[\]'):
        compare_trainers(501, 'A', 'B', verbose=False)
    monkeypatch.setattr(sys, 'argv', ['nnScreener_compare', '-d', '501', '-a', 'A', '-b', 'B', '-f', '0', '3'])
    with pytest.raises(SystemExit) as exit_info:
        compare_entry()
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert 'fold_3' in error and 'nnUNetv2_train 501 3d_fullres 3 -p nnScreenerPlans -tr A' in error


# ---------------------------------------------------------------- the CPU low-shot benchmark's trainer pair


def test_cpu_lowshot_trainer_pair_differs_only_in_initialisation(in_phantom_world):
    """The benchmark's two arms: nnUNetv2_train finds both, they build with one schedule (4 patches per step, 1 of
    them around a lesion), and the Finetune one adds nothing but the name (the distilled weights come in through
    stock -pretrained_weights)."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnscreener.phantoms.make_phantoms import dataset_folder_name
    from nnscreener.utilities.paths import preprocessed_dataset_folder
    folder = preprocessed_dataset_folder(dataset_folder_name(501, 'target'))
    built = []
    for name in ('nnScreenerFromScratchTrainer_cpuLowshot', 'nnScreenerFinetuneTrainer_cpuLowshot'):
        cls = recursive_find_trainer_class_by_name(name)  # as nnUNetv2_train finds it
        plans = {**load_json(join(folder, 'nnScreenerPlans.json')), 'continue_training': False}
        built.append(cls(plans, '3d_fullres', 0, load_json(join(folder, 'dataset.json')), torch.device('cpu')))
    scratch, finetune = built
    assert not {k for k in vars(type(finetune)) if not k.startswith('__')}
    schedule = ('num_epochs', 'warmup_epochs', 'num_iterations_per_epoch', 'num_val_iterations_per_epoch',
                'initial_lr', 'weight_decay', 'oversample_foreground_percent', 'inference_allowed_mirroring_axes')
    assert [getattr(scratch, k) for k in schedule] == [getattr(finetune, k) for k in schedule]
    assert scratch.num_epochs * scratch.num_iterations_per_epoch == 15000
    # the schedule's batch reaches nnU-Net (which reads it in initialize), and its loader draws round(batch * (1 - p))
    # random patches per batch, the rest around foreground: two and two
    batch = scratch.configuration_manager.batch_size
    assert batch == finetune.configuration_manager.batch_size == 4
    assert round(batch * (1 - scratch.oversample_foreground_percent)) == 2


def test_demo_shows_the_paired_test_only_where_training_from_scratch_learned(nnunet_env, capsys):
    """The demo's last step: a 'significant' change between two Dice near 0 is noise, so no arrow and no p-value."""
    from nnscreener.run.demo import _print_comparison
    rng = np.random.default_rng(2)
    for fold in range(3):
        a = {f'ph_{fold}{i}': {1: float(rng.uniform(0, 1e-3))} for i in range(6)}
        write_fold_summary(nnunet_env['nnUNet_results'], 'A', fold, a)
        write_fold_summary(nnunet_env['nnUNet_results'], 'B', fold, {c: {1: 2 * d[1]} for c, d in a.items()})
    near_zero = compare_trainers(501, 'A', 'B', verbose=False)
    assert near_zero['labels']['1']['p_value'] < 0.01  # what compare's own table reports
    _print_comparison(near_zero)
    printed = capsys.readouterr().out
    assert 'only shows that the commands work' in printed and '0.000' in printed
    assert not any(s in printed for s in ('↑', '↓', 'p <', 'p ='))

    make_results(nnunet_env['nnUNet_results'], rng)  # from scratch Dice 0.1 to 0.6: the table with the test
    _print_comparison(compare_trainers(501, 'A', 'B', verbose=False))
    printed = capsys.readouterr().out
    assert '↑' in printed and 'p < 0.01' in printed and 'commands work' not in printed
