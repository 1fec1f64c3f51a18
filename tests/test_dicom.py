"""DICOM series input (issue 12): a series written from a real CT reads back with the NIfTI's geometry and HU, predict
writes its map on the series' grid, folders of several series and nameless inputs are one-line errors."""
import locale
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TARGET_ID
from nnscreener.inference.anomaly_maps import find_ct_files
from nnscreener.utilities.errors import ScreenerInputError
from nnscreener.utilities.io import gdcm_guard, read_image

REAL_CT = Path(__file__).resolve().parents[2] / 'shared' / 'realct'
SOURCE = REAL_CT / 'example_ct_sm.nii.gz'  # abdomen, int16 HU, direction diag(-1, -1, 1)
pytestmark = pytest.mark.skipif(not SOURCE.is_file(), reason='shared/realct is not beside the project')
UID_ROOT = '1.2.826.0.1.3680043.2.1125.7'
RESCALE_INTERCEPT = -1024  # stored = HU + 1024, as most CT scanners store it


def source_image() -> sitk.Image:
    """20 slices of the real CT, in-plane every second voxel (61 x 51 x 20 at 6 x 6 x 3 mm): small, real HU."""
    return sitk.ReadImage(str(SOURCE))[::2, ::2, 5:25]


def write_dicom_series(image: sitk.Image, folder: Path, series: int) -> Path:
    """One CT slice file per z (int16, Rescale Intercept / Slope / Type HU, ImagePositionPatient of each slice, the
    orientation from the direction matrix, one SeriesInstanceUID), as a scanner exports a series."""
    folder.mkdir(parents=True, exist_ok=True)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        ct_slice = sitk.Cast(image[:, :, k], sitk.sitkInt16)  # HU: the writer stores HU - intercept
        tags = {'0008|0060': 'CT', '0008|0016': '1.2.840.10008.5.1.4.1.1.2', '0010|0020': 'TEST',
                '0020|000d': f'{UID_ROOT}.1', '0020|000e': f'{UID_ROOT}.{series}',
                '0008|0018': f'{UID_ROOT}.{series}.{k + 1}', '0020|0013': str(k + 1),
                '0020|0037': '\\'.join(f'{v:.6f}' for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                '0020|0032': '\\'.join(f'{v:.6f}' for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
                '0018|0050': f'{image.GetSpacing()[2]:g}', '0028|1052': str(RESCALE_INTERCEPT), '0028|1053': '1',
                '0028|1054': 'HU'}
        for key, value in tags.items():
            ct_slice.SetMetaData(key, value)
        writer.SetFileName(str(folder / f'IM{series:02d}_{k:04d}.dcm'))
        with gdcm_guard():  # GDCM's writer sets the C locale too
            writer.Execute(ct_slice)
    return folder


def assert_same_geometry(image, reference):
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)


def test_a_series_reads_back_with_the_nifti_geometry_and_hu(tmp_path):
    source = source_image()
    before = locale.setlocale(locale.LC_ALL)
    series = write_dicom_series(source, tmp_path / 'patient_07', series=1)
    image = read_image(str(series))
    assert locale.setlocale(locale.LC_ALL) == before, 'GDCM left the C locale: text I/O would become ASCII'
    assert_same_geometry(image, source)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source))  # rescale applied
    assert image.GetDirection() != (1, 0, 0, 0, 1, 0, 0, 0, 1)  # the test would not see a lost direction otherwise

    (series / 'IM01_0007.dcm').unlink()  # a missing slice: the reader would stretch the volume over the gap
    with pytest.raises(ScreenerInputError, match='not evenly spaced'):
        read_image(str(series))


def test_inputs_series_folders_folders_of_them_and_nameless_files(tmp_path):
    """-i: one series folder (case = its name), a folder of CT files and series subfolders (others ignored), or a
    list; several series in one folder, and names without a case, are one-line errors naming the path."""
    source = source_image()
    mixed = tmp_path / 'inputs'
    write_dicom_series(source, mixed / 'patient_07', series=1)
    sitk.WriteImage(source, str(mixed / 'patient_08_0000.nii.gz'))
    (mixed / 'notes').mkdir()
    (mixed / 'notes' / 'readme.txt').write_text('not a series')
    assert find_ct_files(str(mixed)) == {'patient_07': str(mixed / 'patient_07'),
                                         'patient_08': str(mixed / 'patient_08_0000.nii.gz')}
    assert find_ct_files(str(mixed / 'patient_07') + '/') == {'patient_07': str(mixed / 'patient_07') + '/'}
    assert list(find_ct_files([str(mixed / 'patient_07'), str(mixed / 'patient_08_0000.nii.gz')])) == [
        'patient_07', 'patient_08']

    write_dicom_series(source, mixed / 'patient_07', series=2)  # a second series in the same folder
    for given in (str(mixed), str(mixed / 'patient_07')):
        with pytest.raises(ScreenerInputError, match=f'{mixed / "patient_07"} holds 2 DICOM series: .*own'):
            find_ct_files(given)
    with pytest.raises(ScreenerInputError, match='notes contains no CT files .* and no subfolder holding a DICOM'):
        find_ct_files(str(mixed / 'notes'))
    with pytest.raises(ScreenerInputError, match='notes holds no DICOM series'):
        find_ct_files([str(mixed / 'notes'), str(mixed / 'patient_08_0000.nii.gz')])
    for name in ('_0000.nii.gz', '..nii.gz'):
        shutil.copy(mixed / 'patient_08_0000.nii.gz', tmp_path / name)
        with pytest.raises(ScreenerInputError, match=f'{tmp_path / name} gives the case name .*rename it'):
            find_ct_files([str(tmp_path / name)])


def test_predict_on_a_series_writes_the_map_on_its_grid(pretrained_world, tmp_path, monkeypatch, capsys):
    """The distilled tiny Screener through the command line: `<series folder name>.nii.gz` on the series' grid; --c
    keeps it until a slice file changes; a folder of two series and a nameless file are exit 2 with one line."""
    from nnscreener.inference.predict import predict_entry
    from nnscreener.utilities.output_folder import load_manifest
    env, _ = pretrained_world
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    source = source_image()
    series = write_dicom_series(source, tmp_path / 'dicom' / 'patient_07', series=1)
    nifti = tmp_path / 'patient_07_as_nifti.nii.gz'
    sitk.WriteImage(source, str(nifti))
    out = tmp_path / 'maps'
    args = ('-o', out, '-d', TARGET_ID, '--model', 'distilled', '-device', 'cpu')
    run_cli(monkeypatch, predict_entry, '-i', series, nifti, *args)
    anomaly_map = sitk.ReadImage(str(out / 'patient_07.nii.gz'))
    assert_same_geometry(anomaly_map, source)
    values = sitk.GetArrayFromImage(anomaly_map)
    assert anomaly_map.GetPixelID() == sitk.sitkFloat32 and np.ptp(values) > 0
    # the same scan as NIfTI gets the same map: nothing of the series was lost, shifted or flipped
    from_nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(out / nifti.name)))
    np.testing.assert_allclose(values, from_nifti, atol=1e-5)
    inputs = load_manifest(str(out))['predictions']['inputs']['patient_07']
    assert inputs['path'] == str(series) and inputs['bytes'] == sum(f.stat().st_size for f in series.iterdir())

    written, nifti_written = (os.stat(out / f).st_mtime_ns for f in ('patient_07.nii.gz', nifti.name))
    run_cli(monkeypatch, predict_entry, '-i', series, nifti, *args, '--c')
    assert os.stat(out / 'patient_07.nii.gz').st_mtime_ns == written  # kept: the same series
    slice_file = sorted(series.iterdir())[3]
    os.utime(slice_file, ns=(written + 10 ** 9, written + 10 ** 9))  # a slice replaced (touched) after the map
    run_cli(monkeypatch, predict_entry, '-i', series, nifti, *args, '--c')
    assert os.stat(out / 'patient_07.nii.gz').st_mtime_ns != written
    assert os.stat(out / nifti.name).st_mtime_ns == nifti_written  # only the changed one redone

    write_dicom_series(source, series, series=2)
    capsys.readouterr()
    for bad, message in ((series.parent, f'{series} holds 2 DICOM series'),
                         (tmp_path / '_0000.nii.gz', 'gives the case name')):
        if bad.suffix:
            sitk.WriteImage(source, str(bad))
        assert run_cli(monkeypatch, predict_entry, '-i', bad, *args, expect_exit=True) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith('nnScreener error: ') and '\n' not in err and message in err, err


def run_cli(monkeypatch, entry, *args, expect_exit=False):
    monkeypatch.setattr(sys, 'argv', ['nnScreener_predict', *map(str, args)])
    if not expect_exit:
        return entry()
    with pytest.raises(SystemExit) as exit_info:
        entry()
    return exit_info.value.code
