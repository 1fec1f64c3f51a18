"""Metrics of the unsupervised anomaly maps and nnScreener_evaluate end to end (tiny volumes, CPU)."""
import csv
import json
import os
import time

import numpy as np
import pytest
import SimpleITK as sitk
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from nnscreener.evaluation.evaluate import evaluate_anomaly_maps
from nnscreener.evaluation.metrics import (aupro_up_to_fpr, auroc_up_to_fpr, best_dice_threshold, dice,
                                           pooled_average_precision, pooled_sampled_auroc, pro_counts,
                                           pro_thresholds, sample_voxels, sampled_voxel_auroc)
from nnscreener.utilities.errors import ScreenerInputError


def two_lesions(shape=(12, 16, 16)):
    """A large lesion A and a small lesion B, not touching even diagonally (two 26-connected regions)."""
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[2:7, 2:10, 2:10] = True
    b[9:11, 12:14, 12:14] = True
    return a, b


# ---------------------------------------------------------------- AUROC


def test_sampled_auroc_with_all_voxels_equals_sklearn():
    rng = np.random.default_rng(0)
    mask = rng.random((8, 10, 12)) < 0.2
    score = rng.normal(size=mask.shape) + mask
    body = rng.random(mask.shape) < 0.7
    assert sampled_voxel_auroc(score, mask, n=None) == pytest.approx(roc_auc_score(mask.ravel(), score.ravel()))
    # the outside region restricts only the normal side
    keep = mask | body
    assert sampled_voxel_auroc(score, mask, n=None, outside=body) == pytest.approx(
        roc_auc_score(mask[keep], score[keep]))


def test_sampling_is_seeded_balanced_and_pooled_auroc_equals_sklearn():
    rng = np.random.default_rng(1)
    masks = [rng.random((6, 8, 8)) < p for p in (0.01, 0.3)]  # 1st has < 1000 lesion voxels -> with replacement
    scores = [rng.normal(size=m.shape) + 2 * m for m in masks]
    samples = [sample_voxels(s, m, 1000, np.random.default_rng(5)) for s, m in zip(scores, masks)]
    again = sample_voxels(scores[0], masks[0], 1000, np.random.default_rng(5))
    assert np.array_equal(samples[0][1], again[1])
    for (labels, values), s, m in zip(samples, scores, masks):
        assert labels.sum() == 1000 and (labels == 0).sum() == 1000
        assert np.isin(values[labels == 1], s[m]).all() and np.isin(values[labels == 0], s[~m]).all()
    labels, values = (np.concatenate(parts) for parts in zip(*samples))
    assert pooled_sampled_auroc(samples) == pytest.approx(roc_auc_score(labels, values))
    assert pooled_sampled_auroc(samples) > 0.8  # lesions are shifted by 2 sd


def test_auroc_of_perfect_and_constant_maps():
    mask = np.zeros((6, 6, 6), bool)
    mask[1:3, 1:3, 1:3] = True
    assert sampled_voxel_auroc(mask.astype(float), mask, rng=np.random.default_rng(0)) == 1.0
    assert sampled_voxel_auroc(np.full(mask.shape, 0.7), mask, rng=np.random.default_rng(0)) == 0.5
    assert auroc_up_to_fpr(mask.ravel(), mask.ravel().astype(float)) == pytest.approx(1.0)


def test_partial_auroc_matches_own_trapezoid_and_sklearn_mcclish():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 400)
    scores = rng.normal(size=400) + 0.8 * labels
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    # own trapezoid on a dense grid of the (right-continuous, linearly interpolated) ROC curve
    grid = np.linspace(0, 0.3, 300001)
    dense = np.interp(grid, fpr, tpr)  # vertical steps have zero width, so their interpolated value does not matter
    expected = np.trapezoid(dense, grid) / 0.3
    assert auroc_up_to_fpr(labels, scores, 0.3) == pytest.approx(expected, abs=1e-4)
    # sklearn's max_fpr result is McClish-corrected: undo it to get the plain partial area
    corrected = roc_auc_score(labels, scores, max_fpr=0.3)
    min_area, max_area = 0.5 * 0.3 ** 2, 0.3
    partial = min_area + (2 * corrected - 1) * (max_area - min_area)
    assert auroc_up_to_fpr(labels, scores, 0.3) == pytest.approx(partial / 0.3, abs=1e-12)
    # random scores give about max_fpr / 2 (MVTec normalisation), not 0.5
    noise = rng.random(20000)
    assert auroc_up_to_fpr(rng.integers(0, 2, 20000), noise, 0.3) == pytest.approx(0.15, abs=0.02)


# ---------------------------------------------------------------- AUPRO


def test_aupro_perfect_and_one_of_two_lesions():
    a, b = two_lesions()
    lesions = a | b
    assert aupro_up_to_fpr([lesions.astype(float)], [lesions]) == pytest.approx(1.0)
    # one lesion found perfectly, the other not at all: PRO = 0.5 at FPR 0, then linear to (1, 1), i.e.
    # PRO(f) = 0.5 + f / 2, whose mean over [0, 0.3] is 0.575. Lesions count equally although A is 80x larger ...
    assert aupro_up_to_fpr([a.astype(float)], [lesions]) == pytest.approx(0.575)
    assert aupro_up_to_fpr([b.astype(float)], [lesions]) == pytest.approx(0.575)
    # ... whereas voxel-level AUROC up to 0.3 weighs voxels: TPR at FPR 0 is |B| / (|A| + |B|) for the B-only map
    tpr_b = b.sum() / lesions.sum()
    assert auroc_up_to_fpr(lesions.ravel(), b.ravel().astype(float)) == pytest.approx(tpr_b + (1 - tpr_b) * 0.15)
    # a constant map is random: diagonal PRO curve -> max_fpr / 2 / max_fpr
    assert aupro_up_to_fpr([np.zeros(a.shape)], [lesions]) == pytest.approx(0.15)


def test_pro_counts_regions_use_full_connectivity_and_match_brute_force():
    rng = np.random.default_rng(3)
    mask = np.zeros((6, 6, 6), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # diagonal neighbours: one region with 26-connectivity
    mask[4:6, 4:6, 4:6] = True
    score = rng.random(mask.shape)
    thresholds = np.sort(rng.random(7))
    overlap, false_positives, n_normal = pro_counts(score, mask, thresholds)
    assert overlap.shape == (2, 7) and n_normal == (~mask).sum()
    first = np.array([(score[[1, 2], [1, 2], [1, 2]] >= t).mean() for t in thresholds])
    second = np.array([(score[4:6, 4:6, 4:6] >= t).mean() for t in thresholds])
    assert np.allclose(overlap, [first, second])
    assert np.array_equal(false_positives, [(score[~mask] >= t).sum() for t in thresholds])


def test_aupro_is_fast_enough_for_a_handful_of_64_cubes():
    rng = np.random.default_rng(4)
    mask = np.zeros((64, 64, 64), bool)
    mask[10:20, 10:20, 10:20] = mask[40:44, 40:44, 40:44] = True
    maps = [rng.random(mask.shape) + 0.7 * mask for _ in range(5)]
    start = time.perf_counter()
    value = aupro_up_to_fpr(maps, [mask] * 5)
    assert time.perf_counter() - start < 1.0
    assert 0.5 < value < 1.0


def test_aupro_grid_matches_exact_curve_on_all_distinct_scores():
    """With every distinct score as a threshold the PRO curve is exact (MVTec AD); the default grid is close."""
    rng = np.random.default_rng(5)
    a, b = two_lesions()
    score = rng.random(a.shape) + 0.6 * a + 0.3 * b
    exact = aupro_up_to_fpr([score], [a | b], thresholds=np.unique(score))
    assert aupro_up_to_fpr([score], [a | b], n_thresholds=1000) == pytest.approx(exact, abs=5e-3)
    thresholds = pro_thresholds(score[~(a | b)], score[a | b], 0.3, 100)
    assert np.all(np.diff(thresholds) > 0)


# ---------------------------------------------------------------- AP and Dice


def test_pooled_average_precision_equals_sklearn():
    rng = np.random.default_rng(6)
    masks = [rng.random((5, 6, 7)) < 0.1 for _ in range(3)]
    maps = [rng.random(m.shape) + m for m in masks]
    expected = average_precision_score(np.concatenate([m.ravel() for m in masks]),
                                       np.concatenate([s.ravel() for s in maps]))
    assert pooled_average_precision(maps, masks) == pytest.approx(expected)


def test_dice_and_best_threshold_on_hand_built_case():
    a, b = two_lesions()
    assert dice(a, a | b) == pytest.approx(2 * a.sum() / (2 * a.sum() + b.sum()))
    assert np.isnan(dice(np.zeros(3, bool), np.zeros(3, bool)))
    # background 0.1, a decoy bright region 0.9, the lesion 0.5 (A) -> the best threshold keeps A and drops background:
    # t in (0.1, 0.5]; with candidates from in-mask scores it must be exactly 0.5 (0.9 would drop the lesion)
    score = np.full(a.shape, 0.1)
    score[a] = 0.5
    score[0, 0, 0] = 0.9
    threshold, best = best_dice_threshold([score], [a])
    assert threshold == pytest.approx(0.5)
    assert best == pytest.approx(dice(score >= 0.5, a))
    # two cases: the mean per-case Dice decides
    threshold, _ = best_dice_threshold([score, score], [a, a], n_candidates=10)
    assert threshold == pytest.approx(0.5)


# ---------------------------------------------------------------- evaluate_anomaly_maps end to end


def write_nifti(path, array, spacing=(0.8, 0.8, 2.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def make_cases(tmp_path, n_pathological=4, n_normal=1):
    pred, ref = tmp_path / 'pred', tmp_path / 'ref'
    pred.mkdir()
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_pathological + n_normal):
        mask = np.zeros((10, 14, 14), np.uint8)
        if i < n_pathological:
            mask[2:5, 3:7, 3:7] = 1
            mask[7:9, 10:12, 10:12] = 2  # second label, also pathology (> 0)
        score = (rng.random(mask.shape) * 0.5 + 0.45 * (mask > 0)).astype(np.float32)
        write_nifti(pred / f'case_{i}.nii.gz', score)
        write_nifti(ref / f'case_{i}.nii.gz', mask)
    return pred, ref


def test_evaluate_anomaly_maps_end_to_end(tmp_path, capsys):
    pred, ref = make_cases(tmp_path)
    summary = evaluate_anomaly_maps(str(pred), str(ref), str(tmp_path / 'out'), n_threshold_cases=2, seed=0)
    assert summary['n_pathological'] == 4 and summary['normal_cases'] == ['case_4']
    assert len(summary['threshold_cases']) == 2
    # lesion scores in [0.45, 0.95), background in [0, 0.5): the Dice-optimal threshold is about 0.5 (candidates
    # are sampled lesion scores, so it can land just above)
    assert 0.9 < summary['auroc'] <= 1.0 and 0.7 < summary['aupro_up_to_fpr'] <= 1.0
    assert 0.45 <= summary['dice_threshold'] <= 0.52 and summary['dice_mean'] > 0.8
    written = json.loads((tmp_path / 'out' / 'summary.json').read_text())
    assert written['auroc'] == pytest.approx(summary['auroc'])
    rows = list(csv.DictReader((tmp_path / 'out' / 'metrics_per_case.csv').open()))
    assert [r['case'] for r in rows] == [f'case_{i}' for i in range(5)]
    assert rows[4]['pathological'] == 'False' and rows[4]['auroc'] == '' and rows[0]['dice'] != ''
    assert sum(r['threshold_case'] == 'True' for r in rows) == 2
    held_out = [float(r['dice']) for r in rows[:4] if r['threshold_case'] == 'False']
    assert summary['dice_mean'] == pytest.approx(np.mean(held_out))
    printed = capsys.readouterr().out
    assert 'voxel AUROC' in printed and f'Anomaly-map metrics of the maps in {pred}:' in printed  # no manifest
    # same seed -> same numbers
    again = evaluate_anomaly_maps(str(pred), str(ref), str(tmp_path / 'out2'), n_threshold_cases=2, seed=0,
                                  verbose=False)
    assert again['auroc'] == summary['auroc'] and again['threshold_cases'] == summary['threshold_cases']


def test_evaluate_refuses_geometry_mismatch_and_missing_reference(tmp_path):
    pred, ref = make_cases(tmp_path)
    write_nifti(pred / 'case_2.nii.gz', np.zeros((10, 14, 14), np.float32), spacing=(1.0, 0.8, 2.0))
    with pytest.raises(ScreenerInputError, match='case_2.*spacing'):
        evaluate_anomaly_maps(str(pred), str(ref), n_threshold_cases=2, verbose=False)
    write_nifti(pred / 'case_2.nii.gz', np.zeros((10, 14, 13), np.float32))
    with pytest.raises(ScreenerInputError, match='case_2.*size'):
        evaluate_anomaly_maps(str(pred), str(ref), n_threshold_cases=2, verbose=False)
    write_nifti(pred / 'extra.nii.gz', np.zeros((10, 14, 14), np.float32))
    with pytest.raises(ScreenerInputError, match='extra'):
        evaluate_anomaly_maps(str(pred), str(ref), n_threshold_cases=2, verbose=False)


def test_evaluate_needs_held_out_pathological_cases(tmp_path):
    pred, ref = make_cases(tmp_path, n_pathological=2)
    with pytest.raises(ScreenerInputError, match='2 pathological'):
        evaluate_anomaly_maps(str(pred), str(ref), n_threshold_cases=2, verbose=False)


def test_map_agreement_is_pearson_r(tmp_path):
    from nnscreener.evaluation.evaluate import map_agreement
    for folder, sign in (('a', 1), ('b', -2)):
        (tmp_path / folder).mkdir()
        for case in ('c0', 'c1'):
            values = np.random.default_rng(int(case[1])).normal(size=(4, 5, 6)).astype(np.float32)
            sitk.WriteImage(sitk.GetImageFromArray(sign * values), str(tmp_path / folder / f'{case}.nii.gz'))
    result = map_agreement(str(tmp_path / 'a'), str(tmp_path / 'b'))
    assert result['pearson_r_pooled'] == pytest.approx(-1.0) and result['n_cases'] == 2


# ---------------------------------------------------------------- body-only evaluation (-images)


def test_pro_counts_region_restricts_the_false_positives_only():
    rng = np.random.default_rng(7)
    a, b = two_lesions()
    score = rng.random(a.shape)
    region = np.zeros(a.shape, bool)
    region[:, 1:12, :] = True  # cuts through lesion B (rows 12:14): its voxels outside still count as lesion
    thresholds = np.sort(rng.random(5))
    overlap, false_positives, n_normal = pro_counts(score, a | b, thresholds, region=region)
    assert np.allclose(overlap, pro_counts(score, a | b, thresholds)[0])
    normal = region & ~(a | b)
    assert n_normal == normal.sum() < (~(a | b)).sum()
    assert np.array_equal(false_positives, [(score[normal] >= t).sum() for t in thresholds])


def body_ct_and_lesion(shape=(20, 40, 40)):
    """Synthetic CT (z, y, x) in HU: a body ellipse at 40 HU in -1000 HU air, and a lesion mask inside it whose last
    rows reach into the air (lesion voxels outside the body must still count as lesion)."""
    _, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    body = ((y - 20) / 14) ** 2 + ((x - 20) / 16) ** 2 < 1
    ct = np.where(body, 40, -1000).astype(np.int16)
    lesion = np.zeros(shape, bool)
    lesion[6:12, 12:20, 14:22] = True
    lesion[8:10, 33:36, 18:21] = True  # rows 34-35 are air (the ellipse ends at y = 33)
    assert (lesion & ~body).any()
    return ct, body, lesion


def write_body_cases(tmp_path, map_of, n_cases=4, ct_suffix=''):
    """pred/, ref/, images/ of n_cases copies of body_ct_and_lesion; map_of(body, lesion, rng) -> float map."""
    folders = [tmp_path / f for f in ('pred', 'ref', 'images')]
    for folder in folders:
        folder.mkdir()
    ct, body, lesion = body_ct_and_lesion()
    rng = np.random.default_rng(11)
    for i in range(n_cases):
        write_nifti(folders[0] / f'case_{i}.nii.gz', map_of(body, lesion, rng).astype(np.float32))
        write_nifti(folders[1] / f'case_{i}.nii.gz', lesion.astype(np.uint8))
        write_nifti(folders[2] / f'case_{i}{ct_suffix}.nii.gz', ct)
    return [str(f) for f in folders]


def run_evaluate_cli(monkeypatch, *args):
    from nnscreener.evaluation.evaluate import evaluate_entry
    monkeypatch.setattr('sys.argv', ['nnScreener_evaluate', *args])
    evaluate_entry()


@pytest.mark.parametrize('region', ['default', 'whole_image', 'body'])
def test_cli_perfect_and_inverted_maps(tmp_path, monkeypatch, region):
    for name, sign in (('perfect', 1), ('inverted', -1)):
        case_dir = tmp_path / name
        case_dir.mkdir()
        pred, ref, images = write_body_cases(case_dir, lambda body, lesion, rng: (lesion if sign > 0 else ~lesion),
                                             ct_suffix='_0000')  # nnU-Net style CT names
        out = case_dir / 'out'
        region_args = {'default': [], 'whole_image': ['--whole_image'], 'body': ['-images', images]}[region]
        run_evaluate_cli(monkeypatch, '-pred', pred, '-ref', ref, '-o', str(out), '--n_threshold_cases', '2',
                         *region_args)
        summary = json.loads((out / 'summary.json').read_text())
        assert summary['settings']['region'] == ('body' if region == 'body' else 'whole_image')
        if sign > 0:
            assert summary['auroc'] == 1.0 and summary['auroc_up_to_fpr'] == pytest.approx(1.0)
            assert summary['aupro_up_to_fpr'] == pytest.approx(1.0)
            assert summary['dice_mean'] == 1.0 and summary['average_precision_mean'] == pytest.approx(1.0)
        else:
            assert summary['auroc'] == 0.0 and summary['auroc_up_to_fpr'] == 0.0
            assert summary['dice_mean'] < 0.2


def test_body_only_vs_whole_image(tmp_path, capsys):
    """Air scores low, body moderate, lesion higher but overlapping the body: the air is easy negatives, so the
    whole-image AUROC is inflated; the body-only AUROC is the roc_auc of the body voxels."""
    def map_of(body, lesion, rng):
        score = np.where(body, rng.uniform(0.2, 0.8, body.shape), rng.uniform(0.0, 0.05, body.shape))
        return np.where(lesion, rng.uniform(0.4, 1.0, body.shape), score)  # P(lesion > body) = 1 - 0.5 * (2/3)^2

    pred, ref, images = write_body_cases(tmp_path, map_of)
    body_only = evaluate_anomaly_maps(pred, ref, str(tmp_path / 'body'), n_threshold_cases=2, images_folder=images)
    assert 'whole image' not in capsys.readouterr().err
    whole = evaluate_anomaly_maps(pred, ref, str(tmp_path / 'whole'), n_threshold_cases=2)
    assert 'air' in capsys.readouterr().err  # the one-line warning
    assert whole['settings']['region'] == 'whole_image' and whole['settings']['images_folder'] is None
    assert body_only['settings']['region'] == 'body'
    assert body_only['settings']['images_folder'] == os.path.abspath(images)
    assert whole['auroc'] > body_only['auroc'] + 0.07
    assert whole['aupro_up_to_fpr'] > body_only['aupro_up_to_fpr'] + 0.05

    from nnscreener.preprocessing.body import body_mask_hu
    ct, ellipse, _ = body_ct_and_lesion()
    body = body_mask_hu(ct, (2.0, 0.8, 0.8))
    assert (body == ellipse).mean() > 0.99  # the scenario is what it claims to be
    maps = [sitk.GetArrayFromImage(sitk.ReadImage(f'{pred}/case_{i}.nii.gz')) for i in range(4)]
    lesions = [sitk.GetArrayFromImage(sitk.ReadImage(f'{ref}/case_{i}.nii.gz')) > 0 for i in range(4)]
    keep = [body | m for m in lesions]
    expected = roc_auc_score(np.concatenate([m[k] for m, k in zip(lesions, keep)]),
                             np.concatenate([s[k] for s, k in zip(maps, keep)]))
    assert expected == pytest.approx(1 - 0.5 * (2 / 3) ** 2, abs=0.02)
    assert body_only['auroc'] == pytest.approx(expected, abs=0.02)  # 4 x (1000 + 1000) samples
    # average precision needs no sampling: exactly sklearn's on body | mask (lesion voxels in the air included)
    rows = {r['case']: r for r in csv.DictReader((tmp_path / 'body' / 'metrics_per_case.csv').open())}
    for i, (s, m, k) in enumerate(zip(maps, lesions, keep)):
        assert float(rows[f'case_{i}']['average_precision']) == pytest.approx(average_precision_score(m[k], s[k]))
    whole_rows = {r['case']: r for r in csv.DictReader((tmp_path / 'whole' / 'metrics_per_case.csv').open())}
    assert float(whole_rows['case_0']['average_precision']) == pytest.approx(
        average_precision_score(lesions[0].ravel(), maps[0].ravel()))
    # --whole_image ignores the images
    forced = evaluate_anomaly_maps(pred, ref, str(tmp_path / 'forced'), n_threshold_cases=2, images_folder=images,
                                   whole_image=True, verbose=False)
    assert forced['auroc'] == whole['auroc'] and forced['settings']['region'] == 'whole_image'


def test_body_evaluation_refuses_missing_or_misaligned_ct(tmp_path, monkeypatch, capsys):
    pred, ref, images = write_body_cases(tmp_path, lambda body, lesion, rng: lesion.astype(float))
    os.remove(os.path.join(images, 'case_2.nii.gz'))
    with pytest.raises(SystemExit) as exit_info:
        run_evaluate_cli(monkeypatch, '-pred', pred, '-ref', ref, '-images', images, '--n_threshold_cases', '2')
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'case_2' in err and 'CT' in err
    write_nifti(os.path.join(images, 'case_2.nii.gz'), np.zeros((20, 40, 40), np.int16), spacing=(0.8, 0.8, 2.5))
    with pytest.raises(ScreenerInputError, match='case_2.*spacing.*CT'):
        evaluate_anomaly_maps(pred, ref, n_threshold_cases=2, images_folder=images, verbose=False)
    with pytest.raises(ScreenerInputError, match='does not exist'):
        evaluate_anomaly_maps(pred, ref, n_threshold_cases=2, images_folder=str(tmp_path / 'nope'), verbose=False)
