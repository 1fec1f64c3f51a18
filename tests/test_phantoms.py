"""CT phantom generator: determinism, plausible HU per tissue, lesions inside their organs, dataset files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import binary_erosion

from nnscreener.phantoms.anatomy import BodyModel, Tissue
from nnscreener.phantoms.generator import PRESETS, _sample_geometry, generate_phantom_case
from nnscreener.phantoms.lesions import LESION_ORGANS, LESION_TYPES
from nnscreener.phantoms.make_phantoms import ROLE_SEED, make_phantom_datasets
from nnscreener.utilities.errors import ScreenerInputError

TARGET_SPACING = np.array([2.25, 1.5, 1.5])  # what nnscreener resamples to (z, y, x)


@pytest.fixture(scope='module')
def cases():
    """Eight tiny cases with lesions (seeds 0-7)."""
    return [generate_phantom_case(np.random.default_rng(s), 'tiny', with_lesions=True) for s in range(8)]


@pytest.fixture(scope='module')
def datasets(tmp_path_factory):
    raw = tmp_path_factory.mktemp('raw')
    folders = make_phantom_datasets(501, 500, num_labeled=3, num_unlabeled=7, preset='tiny', seed=7,
                                    unlabeled_lesion_fraction=0.15, raw_folder=str(raw))
    return raw, folders


def test_same_seed_same_case_other_seed_other_case():
    a, b = (generate_phantom_case(np.random.default_rng(11), 'tiny') for _ in range(2))
    c = generate_phantom_case(np.random.default_rng(12), 'tiny')
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.lesion_type, b.lesion_type)
    assert (a.spacing, a.origin, a.direction) == (b.spacing, b.origin, b.direction)
    assert a.hu.shape != c.hu.shape or not np.array_equal(a.hu, c.hu)
    assert (a.spacing, a.origin) != (c.spacing, c.origin)


def test_hu_of_each_tissue_is_plausible(cases):
    """Mean HU over the (in-plane eroded, so away from partial-volume edges) voxels of each tissue."""
    inner = {t: [] for t in (Tissue.AIR, Tissue.LUNG, Tissue.FAT_VISCERAL, Tissue.MUSCLE, Tissue.LIVER)}
    bone = []
    struct = np.zeros((3, 3, 3), bool)
    struct[1] = True
    for case in cases:
        assert case.hu.dtype == np.int16 and case.lesion_type.dtype == np.uint8 and case.tissue.dtype == np.uint8
        healthy = case.lesion_type == 0
        for t in inner:
            inner[t].append(case.hu[binary_erosion(case.tissue == t, struct, iterations=2) & healthy])
        bone.append(case.hu[np.isin(case.tissue, (Tissue.BONE_CANCELLOUS, Tissue.BONE_CORTICAL))])
    mean = {t: np.concatenate(v).mean() for t, v in inner.items()}
    assert -1010 < mean[Tissue.AIR] < -985
    assert -950 < mean[Tissue.LUNG] < -700
    assert -150 < mean[Tissue.FAT_VISCERAL] < -50
    assert 20 < mean[Tissue.MUSCLE] < 80 and 20 < mean[Tissue.LIVER] < 80
    assert np.concatenate(bone).mean() > 200
    air = np.concatenate(inner[Tissue.AIR])
    assert 8 < air[air > -1024].std() < 25  # realistic noise (the -1024 clip truncates its lower tail)


def test_lesions_lie_inside_their_organ_and_body(cases):
    seen = set()
    for case in cases:
        codes = [int(c) for c in np.unique(case.lesion_type) if c]
        assert codes, 'a case generated with lesions has none'
        for code in codes:
            tissue = case.tissue[case.lesion_type == code]
            assert np.isin(tissue, LESION_ORGANS[code]).all(), LESION_TYPES[code]
            seen.add(code)
    assert seen & {1, 2} and seen & {3, 4, 5, 6}  # lung and abdominal lesions both occur
    clean = generate_phantom_case(np.random.default_rng(0), 'tiny', with_lesions=False)
    assert not clean.lesion_type.any()


def test_anatomy_and_contrast_of_lesions(cases):
    """Lung lesions are denser than the parenchyma around them; tumours differ from their organ by > 10 HU."""
    for case in cases:
        for code in np.unique(case.lesion_type[case.lesion_type > 0]):
            lesion_hu = np.median(case.hu[case.lesion_type == code])
            if code in (1, 2):
                assert lesion_hu > np.median(case.hu[case.tissue == Tissue.LUNG]) + 150
            else:
                organ = LESION_ORGANS[code][0]
                organ_hu = np.median(case.hu[(case.tissue == organ) & (case.lesion_type == 0)])
                assert abs(lesion_hu - organ_hu) > 10 and (lesion_hu > organ_hu) == (code in (4, 6))


def test_tiny_geometry_survives_resampling(cases):
    for case in cases:
        direction = np.array(case.direction).reshape(3, 3)
        assert np.array_equal(np.abs(direction), np.eye(3))
        assert 1.6 <= case.spacing[1] == case.spacing[2] <= 2.05 and 2.0 <= case.spacing[0] <= 2.5
        # the body (HU > -500; the table too) after resampling to 2.25 x 1.5 x 1.5 mm holds a 32 x 48 x 48 patch
        fg = np.argwhere(case.hu > -500)
        extent = (fg.max(0) - fg.min(0) + 1) * np.array(case.spacing) / TARGET_SPACING
        assert (extent >= (32, 48, 48)).all(), extent
        assert (np.array(case.hu.shape) * case.spacing / TARGET_SPACING >= (32, 48, 48)).all()


def test_default_preset_geometry():
    for seed in range(3):
        rng = np.random.default_rng(seed)
        body = BodyModel(rng, min_vessel_radius=5.)  # coarse trees: only the geometry is under test
        mm_per_model = np.array([1., 1., 1.])
        grid, spacing, origin, direction = _sample_geometry(rng, PRESETS['default'], body, mm_per_model)
        assert grid.shape[1:] == (512, 512) and 0.6 <= spacing[1] <= 1.0 and 1.0 <= spacing[0] <= 5.0
        assert grid.shape[0] * spacing[0] / TARGET_SPACING[0] >= 64
        assert grid.shape[0] <= PRESETS['default'].max_slices
        width = 2 * body.prof['width'].max()
        assert grid.shape[2] * spacing[2] > width  # the whole patient fits the field of view


def test_labeled_dataset_files(datasets):
    raw, folders = datasets
    folder = folders['target']
    assert os.path.basename(folder) == 'Dataset501_ScreenerPhantomLesions'
    with open(os.path.join(folder, 'dataset.json')) as f:
        meta = json.load(f)
    assert meta['channel_names'] == {'0': 'CT'} and meta['labels'] == {'background': 0, 'lesion': 1}
    assert meta['numTraining'] == 3 and meta['file_ending'] == '.nii.gz'
    assert {int(k): v for k, v in meta['nnscreener_lesion_types'].items()} == LESION_TYPES
    assert len(meta['nnscreener_cases_with_lesions']) == 3
    for i in range(3):
        name = f'phantom_{i:04d}'
        image = sitk.ReadImage(os.path.join(folder, 'imagesTr', f'{name}_0000.nii.gz'))
        label = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, 'labelsTr', f'{name}.nii.gz')))
        types = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, 'lesion_typesTr', f'{name}.nii.gz')))
        assert image.GetPixelID() == sitk.sitkInt16
        assert set(np.unique(label)) == {0, 1} and np.array_equal(label, types > 0)
        if i == 0:  # the files hold exactly what the generator returns for that case's seed
            case = generate_phantom_case(np.random.default_rng([7, ROLE_SEED['target'], 0]), 'tiny', True)
            assert np.array_equal(sitk.GetArrayFromImage(image), case.hu) and np.array_equal(types, case.lesion_type)
            np.testing.assert_allclose(image.GetSpacing(), case.spacing[::-1], atol=1e-5)
            np.testing.assert_allclose(image.GetOrigin(), case.origin, atol=1e-3)
            np.testing.assert_allclose(image.GetDirection(), case.direction, atol=1e-6)
    assert os.path.getsize(os.path.join(folder, 'montage.png')) > 10000
    assert sorted(os.listdir(raw)) == ['Dataset500_ScreenerPhantomPretrain', 'Dataset501_ScreenerPhantomLesions']


def test_unlabeled_dataset_has_rare_lesions_and_no_labels(datasets):
    folder = datasets[1]['pretrain']
    assert os.path.basename(folder) == 'Dataset500_ScreenerPhantomPretrain'
    assert not os.path.exists(os.path.join(folder, 'labelsTr'))
    with open(os.path.join(folder, 'dataset.json')) as f:
        meta = json.load(f)
    assert meta['labels'] == {'background': 0} and meta['numTraining'] == 7
    with_lesions = [f for f in sorted(os.listdir(os.path.join(folder, 'lesion_typesTr')))
                    if sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, 'lesion_typesTr', f))).any()]
    assert 1 <= len(with_lesions) <= round(0.15 * 7) + 1
    assert [f[:-7] for f in with_lesions] == meta['nnscreener_cases_with_lesions']
    assert len(os.listdir(os.path.join(folder, 'imagesTr'))) == 7
    assert os.path.exists(os.path.join(folder, 'montage.png'))


def test_refuses_an_id_taken_by_another_dataset(tmp_path):
    (tmp_path / 'Dataset501_SomethingElse').mkdir()
    with pytest.raises(ScreenerInputError, match='501'):
        make_phantom_datasets(501, None, num_labeled=1, raw_folder=str(tmp_path))
    with pytest.raises(ScreenerInputError, match='different'):
        make_phantom_datasets(502, 502, raw_folder=str(tmp_path))
    assert os.listdir(tmp_path) == ['Dataset501_SomethingElse']  # nothing half-written


def test_cli_without_nnunet_raw_fails_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != 'nnUNet_raw'}
    code = 'import sys; from nnscreener.phantoms.make_phantoms import make_phantoms_entry; ' \
           'sys.argv = ["nnScreener_make_phantoms", "-d", "501", "-n_labeled", "1"]; make_phantoms_entry()'
    result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'export nnUNet_raw=' in lines[0]
