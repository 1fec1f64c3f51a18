"""Tests of nnscreener.inference: sliding window, geometry inversion on synthetic and real CTs, scores, overlays."""
import csv
import json
import os
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnscreener.inference.anomaly_maps import (case_name, map_to_input_geometry, predict_anomaly_maps,
                                               preprocess_for_screener, save_case_overlay, scan_score,
                                               write_anomaly_map)
from nnscreener.inference.overlays import save_overlay_png
from nnscreener.inference.sliding_window import sliding_window_anomaly_map, sliding_window_anomaly_maps
from nnscreener.planners.screener_planner import CONFIGURATION
from nnscreener.preprocessing.body import body_mask_of_image
from nnscreener.preprocessing.plan_and_preprocess import plan_and_preprocess
from nnscreener.utilities.errors import ScreenerInputError

REAL_CT = Path(__file__).resolve().parents[2] / 'shared' / 'realct'
PATCH = (32, 48, 48)  # for the sliding-window tests; the plan-based tests use the plans' patch
SYNTH_SPACING_XYZ = (1.8, 1.8, 3.0)


class FnModel:
    """A `PatchAnomalyModel` from a function of (stock, clahe); records the shapes it was called with."""

    def __init__(self, fn, patch_size=PATCH):
        self.fn, self.patch_size, self.device = fn, tuple(patch_size), torch.device('cpu')
        self.calls, self.starts = [], []

    def __call__(self, stock, clahe, crop_start):
        self.calls.append(tuple(stock.shape))
        self.starts.append(crop_start)
        return self.fn(stock, clahe)


def identity_model(patch_size=PATCH):
    return FnModel(lambda stock, clahe: stock, patch_size)


def pooled_model(patch_size=PATCH):
    """Cheap stand-in for Screener's density output, which lives on a pooled grid (factor 2 divides any patch)."""
    return FnModel(lambda stock, clahe: F.avg_pool3d(stock, 2), patch_size)


def rescaled_hu(hu):
    return (np.clip(hu, -1000, 300) + 1000) / 1300


def synthetic_ct(shift):
    """Asymmetric phantom (z, y, x) in HU: off-centre body ellipse at 40 HU in air, a bright sphere labelled 1."""
    z, y, x = np.mgrid[:30, :80, :80]
    body = ((y - 44) / 28) ** 2 + ((x - 36) / 34) ** 2 < 1
    sphere = ((z - 12) * 3.0) ** 2 + ((y - 50) * 1.8) ** 2 + ((x - 25 - shift) * 1.8) ** 2 < 12 ** 2
    hu = np.where(body, 40.0, -1000.0) + np.where(sphere, 160.0, 0.0) + 200.0 * (x < 10) * body  # bright left rim
    return hu.astype(np.int16), sphere.astype(np.uint8)


def write_nifti(array, fname, spacing=SYNTH_SPACING_XYZ, origin=(0.0, 0.0, 0.0), direction=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(fname))
    return str(fname)


@pytest.fixture(scope='module')
def plans(tmp_path_factory):
    """Screener plans (tiny preset) made by the lead's planner on two synthetic labelled CTs."""
    root = tmp_path_factory.mktemp('nnunet')
    with pytest.MonkeyPatch.context() as mp:
        for name in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
            (root / name).mkdir()
            mp.setenv(name, str(root / name))
        raw = root / 'nnUNet_raw' / 'Dataset501_InferenceTest'
        (raw / 'imagesTr').mkdir(parents=True)
        (raw / 'labelsTr').mkdir()
        for i in range(2):
            hu, label = synthetic_ct(shift=8 * i)
            write_nifti(hu, raw / 'imagesTr' / f'case{i}_0000.nii.gz')
            write_nifti(label, raw / 'labelsTr' / f'case{i}.nii.gz')
        (raw / 'dataset.json').write_text(json.dumps({'channel_names': {'0': 'CT'},
                                                      'labels': {'background': 0, 'lesion': 1},
                                                      'numTraining': 2, 'file_ending': '.nii.gz'}))
        plans_file = plan_and_preprocess(501, preset='tiny', num_processes=1)
    plans_manager = PlansManager(plans_file)
    configuration_manager = plans_manager.get_configuration(CONFIGURATION)
    return plans_manager, configuration_manager, load_json(str(Path(plans_file).parent / 'dataset.json')), raw


# ---------------------------------------------------------------------------------------------- sliding window
def test_constant_model_gives_exactly_one_everywhere():
    model = FnModel(lambda s, c: torch.ones(s.shape[0], 1, 16, 16, 16))  # low-res output: upsampled
    volume = np.random.default_rng(0).random((45, 70, 101), dtype=np.float32)
    for on_device in (True, False):
        out = sliding_window_anomaly_map(volume, volume, model, step_size=0.5, batch_size=3,
                                         volume_on_device=on_device)
        assert out.dtype == np.float32 and out.shape == volume.shape
        np.testing.assert_array_equal(out, 1.0)
    assert all(call[2:] == PATCH for call in model.calls)


def test_overlaps_are_a_plain_mean_of_patch_maps():
    """A model returning its patch's mean: the map must be the plain (not Gaussian-weighted) mean over patches."""
    volume = np.random.default_rng(1).random((40, 60, 75), dtype=np.float32)
    volume[:, :, 40:] += 2.0  # a step edge, so different patches have different means
    model = FnModel(lambda s, c: s.mean(dim=(2, 3, 4), keepdim=True))
    out = sliding_window_anomaly_map(volume, np.zeros_like(volume), model, step_size=0.5, batch_size=4)

    total, count = np.zeros(volume.shape), np.zeros(volume.shape)
    for start in product(*compute_steps_for_sliding_window(volume.shape, PATCH, 0.5)):
        patch = tuple(slice(s, s + p) for s, p in zip(start, PATCH))
        total[patch] += volume[patch].mean()
        count[patch] += 1
    np.testing.assert_allclose(out, total / count, rtol=1e-5)
    # smooth: the map changes far less between neighbours than the image does at the edge
    assert np.abs(np.diff(out, axis=2)).max() < 0.3 * np.abs(np.diff(volume, axis=2)).max()


def test_small_volume_is_zero_padded_and_cropped_back():
    volume = np.random.default_rng(2).random((10, 20, 60), dtype=np.float32)  # smaller than the patch in z, y
    model = identity_model()
    out = sliding_window_anomaly_map(volume, volume, model)
    np.testing.assert_array_equal(out, volume)
    assert model.calls and all(call[2:] == PATCH for call in model.calls)
    padded = sliding_window_anomaly_map(volume, volume, FnModel(lambda s, c: (s == 0).float()))
    assert padded.max() == 0  # no padding voxel leaks into the cropped-back map


class PositionModel(FnModel):
    """Maps every voxel to its absolute position computed from crop_start: z * 10000 + y * 100 + x."""

    def __init__(self):
        super().__init__(None)

    def __call__(self, stock, clahe, crop_start):
        grids = torch.meshgrid(*(torch.arange(p) for p in self.patch_size), indexing='ij')
        start = crop_start.float()[:, :, None, None, None]
        z, y, x = (g[None] + start[:, a] for a, g in enumerate(grids))
        return (z * 10000 + y * 100 + x)[:, None]


@pytest.mark.parametrize('shape', [(45, 70, 101), (10, 20, 60)])  # the second is padded in z and y
def test_patch_positions_are_absolute_positions_in_the_volume(shape):
    """Sin-cos conditions are computed from crop_start: it must name each patch's voxel in the unpadded volume."""
    out = sliding_window_anomaly_map(np.zeros(shape, np.float32), np.zeros(shape, np.float32), PositionModel())
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing='ij')
    np.testing.assert_allclose(out, z * 10000 + y * 100 + x, atol=0.05)


def test_several_maps_per_patch_are_each_the_map_of_that_output_alone():
    """sliding_window_anomaly_maps (density variants on shared descriptors): channel k of a C-map model is what the
    sliding window gives a model returning that map alone, pooled outputs and overlaps included; the one-map
    function refuses a C-map model."""
    rng = np.random.default_rng(0)
    stock, clahe = (rng.random((40, 70, 60)).astype(np.float32) for _ in range(2))
    outputs = [lambda s, c: F.avg_pool3d(s, 2), lambda s, c: F.avg_pool3d(c, 2) ** 2]
    both = sliding_window_anomaly_maps(stock, clahe, FnModel(lambda s, c: torch.cat([f(s, c) for f in outputs], 1)),
                                       step_size=0.5, batch_size=3)
    assert both.shape == (2, 40, 70, 60)
    for k, f in enumerate(outputs):
        np.testing.assert_allclose(both[k], sliding_window_anomaly_map(stock, clahe, FnModel(f), 0.5, 3), atol=1e-6)
    with pytest.raises(ValueError, match='2 maps per patch'):
        sliding_window_anomaly_map(stock, clahe, FnModel(lambda s, c: torch.cat([s, c], 1)))


def test_model_with_wrong_output_shape_is_refused():
    volume = np.zeros(PATCH, np.float32)
    with pytest.raises(ValueError, match='B, 1, z, y, x'):
        sliding_window_anomaly_map(volume, volume, FnModel(lambda s, c: s[:, :, None]))


# ------------------------------------------------------------------------------------------ whole-CT geometry
def test_identity_map_in_input_geometry_reproduces_the_ct(plans, tmp_path):
    plans_manager, configuration_manager, dataset_json, _ = plans
    hu, _ = synthetic_ct(shift=4)
    image_file = write_nifti(hu, tmp_path / 'ct.nii.gz', origin=(10.0, -20.0, 5.0))
    stock, view, properties = preprocess_for_screener(image_file, plans_manager, configuration_manager, dataset_json)
    assert stock.shape == (40, 96, 96)  # 30 x 80 x 80 at (3, 1.8, 1.8) -> (2.25, 1.5, 1.5) mm
    assert view.clahe.shape == view.body.shape == stock[view.slicer].shape
    assert not np.allclose(stock[view.slicer], view.clahe)
    anomaly_map = sliding_window_anomaly_map(stock, stock, identity_model(configuration_manager.patch_size))
    map_raw = map_to_input_geometry(anomaly_map, properties, plans_manager, configuration_manager)
    assert map_raw.shape == hu.shape and map_raw.dtype == np.float32
    reference = rescaled_hu(hu)
    assert np.corrcoef(map_raw.ravel(), reference.ravel())[0, 1] > 0.95
    assert np.abs(map_raw - reference).mean() < 0.02  # a flipped or shifted axis would fail this


def test_predict_writes_maps_scores_overlays_and_continues(plans, tmp_path):
    plans_manager, configuration_manager, dataset_json, raw = plans
    out = tmp_path / 'maps'
    model = identity_model(configuration_manager.patch_size)
    records = predict_anomaly_maps(str(raw / 'imagesTr'), str(out), model, plans_manager, configuration_manager,
                                   dataset_json, overlays=1)
    assert [r['case'] for r in records] == ['case0', 'case1']  # nnU-Net's _0000 suffix is dropped
    for r in records:
        image = sitk.ReadImage(str(raw / 'imagesTr' / f"{r['case']}_0000.nii.gz"))
        anomaly_map = sitk.ReadImage(str(out / f"{r['case']}.nii.gz"))
        assert_same_geometry(anomaly_map, image)
        values = sitk.GetArrayFromImage(anomaly_map)
        assert np.corrcoef(values.ravel(), rescaled_hu(sitk.GetArrayFromImage(image)).ravel())[0, 1] > 0.95
        assert r['map_max'] == pytest.approx(values.max()) and r['map_mean'] == pytest.approx(values.mean())
    with open(out / 'scores.csv') as f:
        rows = list(csv.DictReader(f))
    assert [row['case'] for row in rows] == ['case0', 'case1'] and set(rows[0]) == {'case', 'scan_score',
                                                                                     'map_max', 'map_mean'}
    assert float(rows[1]['scan_score']) == pytest.approx(records[1]['scan_score'])
    assert json.loads((out / 'scores.json').read_text())[0]['case'] == 'case0'
    assert len(list((out / 'overlays').glob('*.png'))) == 1

    calls = len(model.calls)
    again = predict_anomaly_maps(str(raw / 'imagesTr'), str(out), model, plans_manager, configuration_manager,
                                 dataset_json, continue_=True)
    assert len(model.calls) == calls  # nothing recomputed
    assert [r['scan_score'] for r in again] == pytest.approx([r['scan_score'] for r in records])
    write_nifti(np.zeros((5, 6, 7), np.float32), out / 'case1.nii.gz')  # a stale map of another size is redone
    predict_anomaly_maps(str(raw / 'imagesTr'), str(out), model, plans_manager, configuration_manager,
                         dataset_json, continue_=True)
    assert len(model.calls) > calls
    assert_same_geometry(sitk.ReadImage(str(out / 'case1.nii.gz')),
                         sitk.ReadImage(str(raw / 'imagesTr' / 'case1_0000.nii.gz')))


def test_predict_smooths_inside_the_body_and_redoes_maps_of_another_smoothing(plans, tmp_path):
    """The plans' `map_smoothing_mm` (tiny: none) or predict's override: a smoothed map softens the sphere's edge,
    keeps the room at the map's floor, and is recorded, so --c keeps it only for the same smoothing."""
    plans_manager, configuration_manager, dataset_json, raw = plans
    model = identity_model(configuration_manager.patch_size)
    args = (str(raw / 'imagesTr'),)
    rest = (model, plans_manager, configuration_manager, dataset_json)
    predict_anomaly_maps(*args, str(tmp_path / 'plain'), *rest)
    predict_anomaly_maps(*args, str(tmp_path / 'smooth'), *rest, smoothing_mm=6.0)
    manifests = [load_json(str(tmp_path / f / 'nnscreener_manifest.json'))['predictions']['model']
                 for f in ('plain', 'smooth')]
    assert 'map_smoothing_mm' not in manifests[0] and manifests[1]['map_smoothing_mm'] == 6.0
    image = sitk.ReadImage(str(raw / 'imagesTr' / 'case0_0000.nii.gz'))
    body = body_mask_of_image(image)
    plain, smooth = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f / 'case0.nii.gz')))
                     for f in ('plain', 'smooth'))
    steepest = [np.abs(np.diff(m, axis=2))[body[:, :, 1:] & body[:, :, :-1]].max() for m in (plain, smooth)]
    assert steepest[1] < 0.5 * steepest[0]  # the sphere's edge, spread over the Gaussian
    assert np.mean(smooth[~body] == smooth.min()) > 0.95  # the room holds the floor (its rim follows the resampling)
    calls = len(model.calls)
    predict_anomaly_maps(*args, str(tmp_path / 'smooth'), *rest, continue_=True, smoothing_mm=6.0)
    assert len(model.calls) == calls  # the same smoothing: kept
    predict_anomaly_maps(*args, str(tmp_path / 'smooth'), *rest, continue_=True, smoothing_mm=0.0)
    assert len(model.calls) > calls  # another one: redone, as the map without smoothing
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'smooth' / 'case0.nii.gz'))), plain)


def test_predict_input_errors(plans, tmp_path):
    plans_manager, configuration_manager, dataset_json, raw = plans
    args = (identity_model(configuration_manager.patch_size), plans_manager, configuration_manager, dataset_json)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ScreenerInputError, match='no CT files'):
        predict_anomaly_maps(str(tmp_path / 'empty'), str(tmp_path / 'out'), *args)
    corrupt = tmp_path / 'bad' / 'broken.nii.gz'
    corrupt.parent.mkdir()
    corrupt.write_bytes(b'not a nifti')
    with pytest.raises(ScreenerInputError, match='broken.nii.gz'):
        predict_anomaly_maps(str(corrupt.parent), str(tmp_path / 'out'), *args)
    with pytest.raises(ScreenerInputError, match='step_size'):
        predict_anomaly_maps(str(raw / 'imagesTr'), str(tmp_path / 'out'), *args, step_size=0)
    plain = write_nifti(synthetic_ct(0)[0], tmp_path / 'plain.nii.gz')
    with pytest.raises(ScreenerInputError, match='overwrite'):
        predict_anomaly_maps([plain], str(tmp_path), *args)
    assert case_name('/a/b/lung_003_0000.nii.gz') == 'lung_003' and case_name('x_0001.mha') == 'x_0001'


def test_map_follows_the_direction_matrix(plans, tmp_path):
    """The same phantom stored y-flipped (flipped array, direction diag(1, -1, 1)) gets the same map in physical
    space: resampled onto the unflipped grid, the two maps agree."""
    plans_manager, configuration_manager, dataset_json, _ = plans
    hu, _ = synthetic_ct(shift=4)
    folder = tmp_path / 'in'
    folder.mkdir()
    write_nifti(hu, folder / 'plain.nii.gz')
    write_nifti(np.ascontiguousarray(hu[:, ::-1]), folder / 'flipped.nii.gz',
                origin=(0.0, (hu.shape[1] - 1) * SYNTH_SPACING_XYZ[1], 0.0), direction=(1, 0, 0, 0, -1, 0, 0, 0, 1))
    predict_anomaly_maps(str(folder), str(tmp_path / 'out'), identity_model(configuration_manager.patch_size),
                         plans_manager, configuration_manager, dataset_json)
    plain, flipped = (sitk.ReadImage(str(tmp_path / 'out' / f'{c}.nii.gz')) for c in ('plain', 'flipped'))
    on_plain_grid = sitk.GetArrayFromImage(sitk.Resample(flipped, plain, sitk.Transform(), sitk.sitkNearestNeighbor))
    np.testing.assert_allclose(on_plain_grid, sitk.GetArrayFromImage(plain), atol=1e-4)
    assert not np.allclose(sitk.GetArrayFromImage(flipped), sitk.GetArrayFromImage(plain), atol=0.1)


def assert_same_geometry(image, reference):
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
    assert image.GetPixelID() == sitk.sitkFloat32


@pytest.mark.skipif(not REAL_CT.is_dir(), reason='shared/realct is not beside the project')
def test_real_scans_keep_their_geometry_and_alignment(plans, tmp_path, monkeypatch):
    """Size, spacing, origin, direction of every map equal the scan's; the map of the (pooled) identity model is
    aligned with the scan, so no axis was flipped or transposed (int16/int32/float32 storage, 3 directions)."""
    plans_manager, configuration_manager, dataset_json, _ = plans
    # CLAHE cannot move voxels and the pooled model ignores it: skip it to save time
    monkeypatch.setattr('nnscreener.preprocessing.screener_cache.apply_clahe', lambda volume, clip_limit: volume)
    scans = sorted(REAL_CT.glob('*_ct*.nii.gz'))
    assert len(scans) >= 10
    for scan in scans:
        name, image_file = scan.name, str(scan)
        stock, _, properties = preprocess_for_screener(image_file, plans_manager, configuration_manager, dataset_json)
        anomaly_map = sliding_window_anomaly_map(stock, stock, pooled_model(configuration_manager.patch_size),
                                                 step_size=1.0, batch_size=8)
        map_raw = map_to_input_geometry(anomaly_map, properties, plans_manager, configuration_manager)
        out_file = str(tmp_path / name.replace('.nii.gz', '.nii'))  # uncompressed: same header, faster
        write_anomaly_map(map_raw, image_file, out_file)
        image = sitk.ReadImage(image_file)
        assert_same_geometry(sitk.ReadImage(out_file), image)
        hu = sitk.GetArrayFromImage(image)
        correlation = np.corrcoef(map_raw.ravel(), rescaled_hu(hu).ravel())[0, 1]
        assert correlation > 0.95, (name, correlation)
        flipped = np.corrcoef(map_raw[:, ::-1].ravel(), rescaled_hu(hu).ravel())[0, 1]
        assert flipped < correlation - 0.05, (name, correlation, flipped)  # the check can see a y-flip


# ------------------------------------------------------------------------------------------- scores, overlays
def test_scan_score_is_a_robust_percentile_inside_the_body():
    rng = np.random.default_rng(3)
    anomaly_map = rng.normal(0, 1, (20, 50, 50)).astype(np.float32)
    body = np.zeros(anomaly_map.shape, bool)
    body[:, 10:40, 10:40] = True
    base = scan_score(anomaly_map, body)
    assert base == pytest.approx(np.percentile(anomaly_map[body], 99.5))
    noisy = anomaly_map.copy()
    noisy[5, 20, 20] = 1000.0  # one hot voxel: the max would jump, the score barely moves
    assert scan_score(noisy, body) - base < 0.1
    lesion = anomaly_map.copy()
    lesion[8:12, 20:27, 20:27] += 10.0  # ~1 % of the body
    assert scan_score(lesion, body) > base + 5
    outside = anomaly_map.copy()
    outside[:, :5] = 1000.0  # anomalies in the air are ignored
    assert scan_score(outside, body) == pytest.approx(base)
    assert scan_score(anomaly_map) == pytest.approx(np.percentile(anomaly_map, 99.5))


def test_overlay_png_shows_the_top_slices(tmp_path):
    hu, sphere = synthetic_ct(shift=0)
    anomaly_map = rescaled_hu(hu).astype(np.float32) + 2.0 * sphere
    out_png = tmp_path / 'overlay.png'
    mask = sphere.copy()
    mask[25:28, 40:45, 50:55] = 1  # a second lesion: the sphere is the one high region, so 2 panels
    save_overlay_png(hu, anomaly_map, (3.0, 1.8, 1.8), str(out_png), n_slices=3, mask=mask, title='case - model')
    import matplotlib.image
    png = matplotlib.image.imread(str(out_png))
    assert png.ndim == 3 and 200 < png.shape[0] < 800 and png.shape[1] > 1.5 * png.shape[0]  # 2 panels in a row
    assert png[..., :3].std() > 0.1  # not blank
    assert [f.name for f in tmp_path.iterdir()] == ['overlay.png']  # atomic: no temporary file left
    with pytest.raises(ValueError, match='one'):
        save_overlay_png(hu, anomaly_map[1:], (3.0, 1.8, 1.8), str(out_png))


def test_overlay_slices_are_the_top_region_and_every_lesion_centre():
    from nnscreener.inference.overlays import overlay_slices
    shape = (40, 30, 30)
    body = np.zeros(shape, bool)
    body[:, 3:27, 3:27] = True
    anomaly_map = np.random.default_rng(0).random(shape).astype(np.float32) * 0.1
    anomaly_map[4:7, 10:13, 10:13] = 1.0  # the highest-scoring region, centred on z = 5
    anomaly_map[20, 15, 15] = 10.0  # one noisy voxel in the body: smoothed, it is below the region
    anomaly_map[30, 0, 0] = 100.0  # far above everything, but in the air
    anomaly_map[34:36, 20:22, 20:22] = 0.6  # a third, weaker region
    mask = np.zeros(shape, np.uint8)
    mask[10:15, 5:12, 5:12] = 1  # lesion 1 (the larger), centre z = 12
    mask[24:27, 20:22, 20:22] = 2  # lesion 2, centre z = 25
    assert overlay_slices(anomaly_map, body, mask) == [('top region', 5), ('lesion 1', 12), ('lesion 2', 25)]
    # without the body the air voxel wins; without a mask there is only the top region
    assert overlay_slices(anomaly_map, None, None) == [('top region', 30)]
    # further top regions: other high regions, >= 20 mm (here 10 slices of 2 mm) from the earlier ones
    panels = overlay_slices(anomaly_map, body, mask, n_top=3, spacing=(2.0, 1.0, 1.0))
    assert panels[:3] == [('top region 1', 5), ('lesion 1', 12), ('lesion 2', 25)]
    assert panels[3] == ('top region 2', 20)  # the next region by its maximum: the (smoothed) noisy voxel
    assert len(panels) == 5 and panels[4][0] == 'top region 3' and panels[4][1] in (34, 35)
    # 1 mm slices: the noisy voxel's slice is 15 mm from the top region's, too close to be shown again
    assert [p[1] in (34, 35) for p in overlay_slices(anomaly_map, body, mask, n_top=3, spacing=(1.0,) * 3)[3:]] \
        == [True]
    on_top = mask.copy()
    on_top[4:7, 20:23, 20:23] = 3  # a lesion on the top region's slice (the 2nd largest): named in its panel
    assert overlay_slices(anomaly_map, body, on_top) == [('top region + lesion 2', 5), ('lesion 1', 12),
                                                         ('lesion 3', 25)]
    # a concave lesion whose centre of mass misses it: the nearest slice the lesion is in
    curved = np.zeros(shape, np.uint8)
    curved[8:10, 5:8, 5:20] = curved[8:30, 5:8, 5:7] = curved[28:30, 5:8, 5:20] = 1
    (_, z), = overlay_slices(anomaly_map, body, curved)[1:]
    assert curved[z].any()
    # at most max_panels panels: the largest lesions first
    many = np.zeros(shape, np.uint8)
    for k in range(8):
        many[2 + 4 * k:4 + 4 * k, 20:20 + k + 2, 5:7] = 1
    panels = overlay_slices(anomaly_map, body, many, max_panels=6)
    assert len(panels) == 6 and [label for label, _ in panels[1:]] == [f'lesion {k}' for k in range(1, 6)]
    assert [z for _, z in panels[1:]] == [2 + 4 * k for k in (7, 6, 5, 4, 3)]  # centre 2.5 + 4k -> first slice


def test_overlay_colour_scale_ignores_a_single_extreme_voxel():
    from nnscreener.inference.overlays import heat_range
    rng = np.random.default_rng(1)
    anomaly_map = rng.normal(0, 1, (20, 40, 40)).astype(np.float32)
    body = np.zeros(anomaly_map.shape, bool)
    body[:, 5:35, 5:35] = True
    vmin, vmax = heat_range(anomaly_map, body)
    assert vmin == pytest.approx(np.percentile(anomaly_map[body], 95))
    assert vmax == pytest.approx(np.percentile(anomaly_map[body], 99.9))
    spiked = anomaly_map.copy()
    spiked[10, 20, 20] = 1e6
    spiked[0, 0, 0] = -1e6  # outside the body: ignored
    assert heat_range(spiked, body) == pytest.approx((vmin, vmax), abs=0.1)  # one order statistic further
    assert 2.5 < heat_range(spiked, body)[1] < 4.0
    binary = body & (rng.random(body.shape) < 0.0005)  # top 5 % of the body all 0: vmax is the maximum
    assert heat_range(binary.astype(np.float32), body) == (0.0, 1.0)


def test_overlay_window_is_lung_where_most_of_the_body_is_lung():
    from nnscreener.inference.overlays import LUNG_WINDOW, SOFT_TISSUE_WINDOW, slice_window
    ct = np.full((40, 40), -1000.0)
    body = np.zeros(ct.shape, bool)
    body[5:35, 5:35] = True
    ct[body] = 40.0
    assert slice_window(ct, body) == ('soft tissue', SOFT_TISSUE_WINDOW)  # the air outside does not count
    ct[10:30, 8:20] = ct[10:30, 21:32] = -850.0  # lungs: 460 of 900 body voxels
    assert slice_window(ct, body) == ('lung', LUNG_WINDOW)
    assert (LUNG_WINDOW[0] + LUNG_WINDOW[1]) / 2 == -600 and LUNG_WINDOW[1] - LUNG_WINDOW[0] == 1500
    assert (SOFT_TISSUE_WINDOW[0] + SOFT_TISSUE_WINDOW[1]) / 2 == 40


def test_predict_overlays_are_titled_and_show_existing_reference_masks(plans, tmp_path, monkeypatch):
    import nnscreener.inference.anomaly_maps as anomaly_maps
    plans_manager, configuration_manager, dataset_json, raw = plans
    references = tmp_path / 'ref'
    references.mkdir()
    (references / 'case0.nii.gz').write_bytes((raw / 'labelsTr' / 'case0.nii.gz').read_bytes())  # none for case1
    calls = []

    def recording_overlay(*args, **kwargs):
        calls.append(kwargs)
        return save_case_overlay(*args, **kwargs)

    monkeypatch.setattr(anomaly_maps, 'save_case_overlay', recording_overlay)
    predict_anomaly_maps(str(raw / 'imagesTr'), str(tmp_path / 'maps'), identity_model(configuration_manager.patch_size),
                         plans_manager, configuration_manager, dataset_json, overlays=2, model_name='distilled',
                         reference_folder=str(references))
    by_title = {c['title']: c['mask_file'] for c in calls}
    assert by_title == {'case0 - distilled': str(references / 'case0.nii.gz'), 'case1 - distilled': None}
    assert sorted(f.name for f in (tmp_path / 'maps' / 'overlays').iterdir()) == ['case0.png', 'case1.png']


@pytest.mark.skipif(not REAL_CT.is_dir(), reason='shared/realct is not beside the project')
def test_case_overlay_of_a_real_scan_with_its_mask(tmp_path):
    image_file = str(REAL_CT / 'STS_002_ct.nii.gz')
    image = sitk.ReadImage(image_file)
    write_anomaly_map(rescaled_hu(sitk.GetArrayFromImage(image)).astype(np.float32), image_file,
                      str(tmp_path / 'map.nii.gz'))
    save_case_overlay(image_file, str(tmp_path / 'map.nii.gz'), str(tmp_path / 'sts.png'),
                      mask_file=str(REAL_CT / 'STS_002_gtv.nii.gz'))
    assert os.path.getsize(tmp_path / 'sts.png') > 10_000


def test_local_contrast_baseline_through_predict_lights_the_lesion_edge_not_the_flat_body(plans, tmp_path,
                                                                                          monkeypatch):
    """`nnScreener_predict --model local_contrast` needs only the dataset's plans; |HU - local median| is high at the
    bright sphere's edge and zero in flat tissue (so any learned model must beat it on lesions with soft edges)."""
    from scipy.ndimage import binary_dilation, binary_erosion
    from nnscreener.inference.predict import predict
    _, _, _, raw = plans
    root = raw.parent.parent
    for name in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(name, str(root / name))
    out = tmp_path / 'local_contrast'
    predict(str(raw / 'imagesTr' / 'case0_0000.nii.gz'), str(out), 501, 'local_contrast', 'cpu')
    anomaly_map = sitk.GetArrayFromImage(sitk.ReadImage(str(out / 'case0.nii.gz')))
    hu, sphere = synthetic_ct(shift=0)
    sphere = sphere > 0
    flat = binary_erosion(hu > -500, iterations=4) & ~binary_dilation(sphere, iterations=4) & (np.arange(80) > 16)
    edge = binary_dilation(sphere, iterations=1) & ~binary_erosion(sphere, iterations=1)
    assert np.median(anomaly_map[edge]) > 5 * np.median(anomaly_map[flat]) + 1e-3
