"""Checks of raw CT datasets before anything is written: one actionable line per problem.

nnU-Net itself would fail later with a long traceback (or, for NaN voxels, not at all and train on garbage).
"""
from os.path import isdir, isfile, join
from typing import Dict, Sequence

import numpy as np
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
from tqdm import tqdm

from nnscreener.utilities.errors import ScreenerInputError
from nnscreener.utilities.io import read_image


def load_ct_dataset_json(raw_folder: str) -> dict:
    fname = join(raw_folder, 'dataset.json')
    if not isfile(fname):
        raise ScreenerInputError(f'{fname} is missing; every nnU-Net raw dataset needs a dataset.json')
    dataset_json = load_json(fname)
    if 'file_ending' not in dataset_json:
        raise ScreenerInputError(f'{fname} has no "file_ending" (e.g. ".nii.gz"); nnU-Net needs it to find the images')
    channels = dataset_json.get('channel_names', dataset_json.get('modality', {}))
    if len(channels) != 1 or str(list(channels.values())[0]).upper() != 'CT':
        raise ScreenerInputError(f'{fname}: Screener needs exactly one CT channel (channel_names {{"0": "CT"}}), '
                                 f'found {channels}')
    return dataset_json


def check_ct_image(image: sitk.Image, fname: str, patch_size: Sequence[int] = None,
                   target_spacing: Sequence[float] = None, allow_non_hu: bool = False) -> None:
    """3D, one channel, finite, in HU (unless `allow_non_hu`); optionally at least one patch large after resampling
    to `target_spacing` (z, y, x)."""
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise ScreenerInputError(f'{fname} has size {image.GetSize()} ({image.GetDimension()}D): Screener needs 3D CT '
                                 f'volumes of at least 2 voxels per axis; give one 3D volume per file')
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ScreenerInputError(f'{fname} has {image.GetNumberOfComponentsPerPixel()} components per voxel: '
                                 f'Screener needs single-channel CT in HU')
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ScreenerInputError(f'{fname} contains {int((~np.isfinite(array)).sum())} NaN/inf voxels: '
                                 f'fill them (e.g. with -1000 HU) and run again')
    if not allow_non_hu:
        check_hounsfield_units(array, fname)
    if patch_size is not None:
        shape = resampled_shape(image, target_spacing)
        if any(s < p for s, p in zip(shape, patch_size)):
            raise ScreenerInputError(
                f'{fname} is {tuple(int(s) for s in shape)} voxels (z, y, x) at {tuple(target_spacing)} mm, smaller '
                f'than the patch {tuple(patch_size)}; remove it, or pass --allow_small_images to zero-pad it like '
                f'nnU-Net does')


def check_hounsfield_units(array: np.ndarray, fname: str) -> None:
    """Refuses values that cannot be CT in HU: a patient's CT always holds fat (about -100 HU), lung or air (-1000)
    below 0, so an image without a negative value, or one spanning less than 10 units ([0, 1] or [-1, 1]
    normalised data), was stored without its rescale (raw DICOM values, HU + 1024) or converted to grey values.
    The models would run on it and produce meaningless maps."""
    low, high = float(array.min()), float(array.max())
    if low >= 0 or high - low < 10:
        raise ScreenerInputError(f'{fname} does not look like CT in HU: its values span {low:g} to {high:g} '
                                 f'({array.dtype}), where CT has fat and air below 0 HU; convert it to HU (e.g. '
                                 f'apply the DICOM rescale slope and intercept), or pass --allow_non_hu if it is HU')


def resampled_shape(image: sitk.Image, target_spacing: Sequence[float]) -> np.ndarray:
    size_zyx = np.array(image.GetSize()[::-1], dtype=float)
    spacing_zyx = np.array(image.GetSpacing()[::-1], dtype=float)
    return np.round(size_zyx * spacing_zyx / np.array(target_spacing)).astype(int)


def check_raw_ct_dataset(raw_folder: str, require_labels: bool, patch_size: Sequence[int] = None,
                         target_spacing: Sequence[float] = None, require_label_names: bool = False,
                         allow_non_hu: bool = False) -> Dict[str, dict]:
    """Validates every image (and label) of a raw dataset (`check_ct_image`); returns nnU-Net's
    {case: {'images', 'label'}} dict.

    require_label_names: dataset.json must have "labels" (nnU-Net's trainers, the Screener stages among them, read
    them from the planned dataset, even an image-only one)."""
    dataset_json = load_ct_dataset_json(raw_folder)
    if require_label_names and 'labels' not in dataset_json:
        raise ScreenerInputError(f'{join(raw_folder, "dataset.json")} has no "labels": nnU-Net\'s trainers need them; '
                                 f'for an image-only dataset add "labels": {{"background": 0}}')
    if not isdir(join(raw_folder, 'imagesTr')):
        raise ScreenerInputError(f'{raw_folder}/imagesTr is missing')
    cases = get_filenames_of_train_images_and_targets(raw_folder, dataset_json)
    if not cases:
        raise ScreenerInputError(f'{raw_folder}/imagesTr has no images ending in {dataset_json["file_ending"]}')
    for case, files in tqdm(cases.items(), desc=f'checking {raw_folder}', leave=False):
        image = read_image(files['images'][0])
        check_ct_image(image, files['images'][0], patch_size, target_spacing, allow_non_hu)
        if require_labels:
            check_label_matches(image, files['label'])
    return cases


def check_label_matches(image: sitk.Image, label_file: str) -> None:
    label = read_image(label_file)
    if label.GetSize() != image.GetSize() or not np.allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-3):
        raise ScreenerInputError(f'{label_file}: size/spacing {label.GetSize()}/{label.GetSpacing()} differ from '
                                 f'its image {image.GetSize()}/{image.GetSpacing()}')
