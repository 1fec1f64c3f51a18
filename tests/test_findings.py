"""Findings report (nnscreener.inference.findings): connected regions of a map with centroid in mm, volume in mL,
peak and mean score, bounding box; calibrated scan scores; the report of a predict folder with normals."""
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnscreener.inference.findings import (FindingsSettings, body_voxel_percentile, calibrated_scores,
                                           findings_entry, map_findings)
from nnscreener.inference.predict import predict, predict_entry
from nnscreener.utilities.output_folder import load_manifest

SPACING = (0.8, 0.9, 1.5)  # x, y, z mm
ORIGIN = (-31.5, 12.25, 140.0)
DIRECTION = (0, 1, 0, 1, 0, 0, 0, 0, -1)  # x and y swapped, z flipped: any mix-up of index and mm shows


def synthetic_map(spheres, shape_zyx=(40, 70, 64), seed=0):
    """A map image with noise below 1 and, per (centre_mm, radius_mm, peak), a sphere in physical space whose values
    fall from `peak` at its centre to peak / 2 at its surface (all above 2 for peak > 4)."""
    image = sitk.Image(shape_zyx[::-1], sitk.sitkFloat32)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    index = np.indices(shape_zyx).reshape(3, -1)[::-1].T.astype(float)  # (i, j, k) per voxel
    points = (np.asarray(DIRECTION).reshape(3, 3) @ (index * SPACING).T).T + ORIGIN
    values = np.random.default_rng(seed).uniform(0, 1, len(points))
    spheres_masks = []
    for centre, radius, peak in spheres:
        distance = np.linalg.norm(points - centre, axis=1)
        inside = distance < radius
        values = np.where(inside, peak * (1 - 0.5 * distance / radius), values)
        spheres_masks.append(inside.reshape(shape_zyx))
    result = sitk.GetImageFromArray(values.reshape(shape_zyx).astype(np.float32))
    result.CopyInformation(image)
    return result, spheres_masks


def test_a_sphere_is_one_finding_at_its_physical_centre_with_its_volume():
    centre, radius = np.array([-2.3, 35.1, 118.7]), 7.0
    image, (sphere,) = synthetic_map([(centre, radius, 6.0)])
    found = map_findings(image, threshold=2.0)
    assert len(found.findings) == 1 and found.n_smaller == 0
    finding = found.findings[0]
    assert np.linalg.norm(np.array(finding['centroid_mm']) - centre) < 0.2  # voxels are 0.8 - 1.5 mm
    np.testing.assert_allclose(image.TransformContinuousIndexToPhysicalPoint(finding['centroid_voxel']),
                               finding['centroid_mm'])
    assert finding['volume_ml'] == pytest.approx(4 / 3 * math.pi * radius ** 3 / 1000, rel=0.03)
    assert finding['n_voxels'] == sphere.sum()
    values = sitk.GetArrayFromImage(image)
    assert finding['peak_score'] == pytest.approx(values[sphere].max())
    assert finding['mean_score'] == pytest.approx(values[sphere].mean(), rel=1e-5)
    z, y, x = np.nonzero(sphere)
    assert finding['bbox_voxel'] == {'min': [x.min(), y.min(), z.min()], 'max': [x.max(), y.max(), z.max()]}
    assert values[tuple(finding['peak_voxel'][::-1])] == finding['peak_score']


def test_separate_regions_are_sorted_by_peak_and_small_ones_only_counted():
    big_low = (np.array([-10.0, 20.0, 120.0]), 8.0, 4.5)
    small_high = (np.array([10.0, 45.0, 100.0]), 4.0, 9.0)
    tiny = (np.array([15.0, 15.0, 90.0]), 1.6, 9.5)  # ~17 uL: below the minimum volume, though the highest
    image, _ = synthetic_map([big_low, small_high, tiny])
    found = map_findings(image, threshold=2.0, min_volume_ml=0.05)
    assert [f['finding'] for f in found.findings] == [1, 2] and found.n_smaller == 1
    first, second = found.findings
    assert np.linalg.norm(np.array(first['centroid_mm']) - small_high[0]) < 0.3  # highest peak first,
    assert np.linalg.norm(np.array(second['centroid_mm']) - big_low[0]) < 0.3  # not the largest
    assert first['peak_score'] > second['peak_score'] and first['volume_ml'] < second['volume_ml']
    labels = found.labels
    assert [int((labels == r).sum()) for r in found.region_ids] == [first['n_voxels'], second['n_voxels']]
    assert len(map_findings(image, threshold=2.0).findings) == 3  # no minimum: the tiny one is listed
    assert map_findings(image, threshold=20.0).findings == []


def test_calibration_is_the_mid_rank_among_normal_scans():
    normals = [1.0, 2.0, 2.0, 3.0]
    scores = np.linspace(0, 4, 81)
    calibrated = calibrated_scores(scores, normals)
    assert np.all(np.diff(calibrated) >= 0) and calibrated.min() == 0 and calibrated.max() == 1
    assert calibrated_scores([0.5, 1.0, 2.0, 2.5, 3.0, 3.01, 1e9], normals).tolist() == [
        0, 0.125, 0.5, 0.75, 0.875, 1, 1]  # ties count half; above every normal scan: 1
    assert calibrated_scores([5.0], [5.0]).tolist() == [0.5]


def test_body_voxel_percentile_pools_the_normals_bodies_only():
    """Outside the body the map is high (the table): the threshold must come from body voxels only."""
    ct = np.full((10, 40, 40), -1000, np.int16)
    ct[:, 8:32, 8:32] = 40
    ct_image = sitk.GetImageFromArray(ct)
    ct_image.SetSpacing((1.5, 1.5, 3.0))
    maps = []
    for offset in (0.0, 1.0):
        values = np.where(ct > -500, np.linspace(offset, offset + 1, ct.size).reshape(ct.shape), 100.0)
        image = sitk.GetImageFromArray(values.astype(np.float32))
        image.CopyInformation(ct_image)
        maps.append((image, ct_image))
    threshold = body_voxel_percentile(maps, 50)
    body_values = np.concatenate([sitk.GetArrayFromImage(m)[ct > -500] for m, _ in maps])
    assert threshold == pytest.approx(np.percentile(body_values, 50), rel=1e-5) and threshold < 100


# ------------------------------------------------------------------------------ the report of a predict folder
def run_cli(monkeypatch, entry, *args):
    monkeypatch.setattr(sys, 'argv', ['nnScreener', *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        entry()
    return exit_info.value.code


def test_findings_report_of_a_predict_folder_against_normals(in_phantom_world, tmp_path, monkeypatch, capsys):
    """predict --normals writes findings.json / .csv / PNGs claimed in the manifest; the threshold is the normals'
    body-voxel percentile, the calibrated scores rank the scans among the normals; nnScreener_findings redoes the
    report with an evaluate summary's threshold and removes the PNGs it no longer makes; normals of another
    setting are refused before any map is computed."""
    raw = Path(in_phantom_world['nnUNet_raw'])
    normal_images, images = (sorted(map(str, next(raw.glob(f'Dataset{d}_*')).glob('imagesTr/*.nii.gz')))[:n]
                             for d, n in ((500, 3), (501, 2)))  # a few cases: the test is about the bookkeeping
    normals, out = tmp_path / 'normals', tmp_path / 'maps'
    predict(normal_images, str(normals), 501, 'local_contrast', 'cpu')
    predict(images, str(out), 501, 'local_contrast', 'cpu',
            findings=FindingsSettings(normals=str(normals), percentile=99.9, n_png=1))
    report = json.loads((out / 'findings.json').read_text())
    normal_scores = [r['scan_score'] for r in json.loads((normals / 'scores.json').read_text())]
    assert report['normals']['n_scans'] == len(normal_scores) == 3
    maps = [(sitk.ReadImage(str(normals / f"{r['case']}.nii.gz")), sitk.ReadImage(r['image']))
            for r in json.loads((normals / 'scores.json').read_text())]
    assert report['threshold'] == pytest.approx(body_voxel_percentile(maps, 99.9), rel=1e-6)
    scans = report['scans']
    assert [s['scan_score'] for s in scans] == sorted((s['scan_score'] for s in scans), reverse=True)
    for scan in scans:
        assert scan['calibrated_score'] == calibrated_scores([scan['scan_score']], normal_scores)[0]
        assert [f['peak_score'] for f in scan['findings']] == sorted((f['peak_score'] for f in scan['findings']),
                                                                     reverse=True)
        assert all(f['peak_score'] >= report['threshold'] for f in scan['findings'])
    pngs = [f['png'] for s in scans for f in s['findings'] if f['png']]
    assert len(pngs) == sum(1 for s in scans if s['findings']) > 0
    assert all((out / p).stat().st_size > 10_000 for p in pngs)
    assert set(pngs + ['findings.json', 'findings.csv']) <= set(load_manifest(str(out))['files'])
    with open(out / 'findings.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(max(1, s['n_findings']) for s in scans)

    summary = tmp_path / 'summary.json'
    summary.write_text(json.dumps({'dice_threshold': report['threshold'] * 2, 'settings': {'pred_folder': str(out)}}))
    monkeypatch.setattr(sys, 'argv', ['nnScreener_findings', '-i', str(out), '--findings_threshold', str(summary),
                                      '--findings_png', '0'])
    findings_entry()
    again = json.loads((out / 'findings.json').read_text())
    assert again['threshold'] == report['threshold'] * 2 and 'dice_threshold of' in again['threshold_source']
    assert again['normals'] is None and all(s['calibrated_score'] is None for s in again['scans'])
    assert not list((out / 'findings').glob('*.png'))  # the earlier report's PNGs are gone with it
    voxels = [sum(f['n_voxels'] for s in r['scans'] for f in s['findings']) for r in (again, report)]
    assert voxels[0] <= voxels[1]  # each region at twice the threshold lies in a listed one at the threshold

    other = tmp_path / 'normals_step1'
    predict(normal_images[:1], str(other), 501, 'local_contrast', 'cpu', step_size=1.0)
    capsys.readouterr()
    code = run_cli(monkeypatch, predict_entry, '-i', *images, '-o', tmp_path / 'new', '-d', 501, '--model',
                   'local_contrast', '-device', 'cpu', '--normals', other)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith('nnScreener error: ') and '\n' not in err and 'step_size' in err, err
    assert not (tmp_path / 'new').exists() or not list((tmp_path / 'new').glob('*.nii.gz'))
