"""Whole-CT anomaly maps: preprocess like nnU-Net, sliding window, back to the input geometry, NIfTI + scan scores.

The model is anything implementing `PatchAnomalyModel` (the modular Screener or the distilled UNet); loading it
from a trained model folder is `trained_model.py`'s job.
"""
import csv
import io
import os
from os.path import abspath, basename, isdir, isfile, join, normpath
from typing import Dict, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from scipy import ndimage
from tqdm import tqdm

from nnscreener.inference.manifest import PredictionRun
from nnscreener.inference.overlays import save_overlay_png
from nnscreener.inference.sliding_window import sliding_window_anomaly_map, sliding_window_anomaly_maps
from nnscreener.preprocessing.body import body_mask_of_image
from nnscreener.planners.settings import ScreenerSettings
from nnscreener.preprocessing.screener_cache import ScreenerView, screener_view
from nnscreener.preprocessing.validation import check_ct_image
from nnscreener.utilities.errors import ScreenerInputError
from nnscreener.utilities.io import atomic_path, atomic_save_json, dicom_series_id, read_image
from nnscreener.utilities.output_folder import check_output_folder, output_folder_lock

CT_FILE_ENDINGS = ('.nii.gz', '.nii', '.nrrd', '.mha')  # what SimpleITK reads and nnU-Net's SimpleITKIO accepts
NNUNET_CHANNEL_SUFFIX = '_0000'
SCAN_SCORE_PERCENTILE = 99.5
SCORE_FIELDS = ('case', 'scan_score', 'map_max', 'map_mean')
SCORES_CSV, SCORES_JSON = 'scores.csv', 'scores.json'
MAP_ENDING = '.nii.gz'
OVERLAY_FOLDER = 'overlays'


class PatchAnomalyModel(Protocol):
    """A patch-wise anomaly model: the modular Screener (descriptor + condition + density) or the distilled UNet.

    An optional attribute `uses_clahe = False` tells inference that `clahe` is ignored, so it is not computed.
    """
    patch_size: Tuple[int, int, int]  # (z, y, x), the plans' patch
    device: torch.device

    def __call__(self, stock: torch.Tensor, clahe: torch.Tensor, crop_start: torch.Tensor) -> torch.Tensor:
        """stock, clahe: (B, 1, *patch_size) in [0, 1] on `device` (stock nnU-Net input and its CLAHE).
        crop_start: (B, 3) long, CPU: (z, y, x) voxel of each patch's first voxel in the volume the sliding window
        runs over (the body box), exactly like the training loaders' `crop_start`.
        Returns the anomaly map (B, 1, z', y', x') at the patch resolution or lower (e.g. pooled by (2, 3, 3))."""


def preprocess_for_screener(image_file: str, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                            dataset_json: dict) -> Tuple[np.ndarray, ScreenerView, dict]:
    """Reads and checks one CT, then `preprocess_ct_image`: -> (stock, Screener view, properties)."""
    image = read_image(image_file)
    check_ct_image(image, image_file)  # no patch check: small images are zero-padded by the sliding window
    return preprocess_ct_image(image, plans_manager, configuration_manager, dataset_json)


def preprocess_ct_image(image: sitk.Image, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                        dataset_json: dict, with_clahe: bool = True) -> Tuple[np.ndarray, ScreenerView, dict]:
    """Stock nnU-Net preprocessing of the whole CT (crop to nonzero, resample, CTNormalization), then the body and
    its CLAHE exactly as in the Screener cache -> (stock (z, y, x) float32, ScreenerView, nnU-Net's properties).

    This is `DefaultPreprocessor.run_case` minus the file read: the image is already in memory (it was validated),
    and its array is taken in SimpleITK's order exactly as nnU-Net's SimpleITKIO does, so the map can be written
    back with the image's own geometry. The stock volume is not cropped: the map must cover the whole input.
    `with_clahe=False` skips CLAHE (the view's `clahe` is None) for models that never read it (the distilled UNet):
    CLAHE of a whole CT costs seconds.
    """
    if plans_manager.image_reader_writer_class is not SimpleITKIO:
        raise ScreenerInputError(f'the plans use {plans_manager.plans["image_reader_writer"]}, but Screener inference '
                                 f'reads CTs with SimpleITKIO; re-plan with SimpleITK-readable files (.nii.gz, .mha)')
    spacing = image.GetSpacing()
    properties = {'sitk_stuff': {'spacing': spacing, 'origin': image.GetOrigin(), 'direction': image.GetDirection()},
                  'spacing': [abs(s) for s in spacing[::-1]]}
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case_npy(sitk.GetArrayViewFromImage(image)[None], None, properties,
                                                    plans_manager, configuration_manager, dataset_json)
    stock = data[0].astype(np.float32, copy=False)
    clip_limit = ScreenerSettings.from_plans(plans_manager.plans).clahe_clip_limit
    view = screener_view(stock, configuration_manager, clip_limit, with_clahe)
    return stock, view, properties


def map_to_input_geometry(anomaly_map: np.ndarray, properties: dict, plans_manager: PlansManager,
                          configuration_manager: ConfigurationManager) -> np.ndarray:
    """Undoes nnU-Net's preprocessing for a (z, y, x) map at the plans' spacing -> float32 map on the raw image grid.

    Same steps and calls as nnU-Net's export (resample -> uncrop -> transpose back). Voxels outside nnU-Net's
    nonzero crop (the image's all-zero border, usually none for CT) get the map's minimum: "least anomalous", so the
    border never shows up as a finding.
    """
    resampled = configuration_manager.resampling_fn_probabilities(
        anomaly_map[None].astype(np.float32, copy=False), properties['shape_after_cropping_and_before_resampling'],
        configuration_manager.spacing, [properties['spacing'][i] for i in plans_manager.transpose_forward])
    resampled = np.asarray(resampled[0], dtype=np.float32)
    full = np.full(properties['shape_before_cropping'], resampled.min(), dtype=np.float32)
    full = insert_crop_into_image(full, resampled, properties['bbox_used_for_cropping'])
    return np.ascontiguousarray(full.transpose(plans_manager.transpose_backward))


def write_anomaly_map(anomaly_map: np.ndarray, reference: Union[str, sitk.Image], output_file: str) -> None:
    """float32 NIfTI with exactly the reference CT's size, spacing, origin and direction; written atomically.
    reference: the CT as read (e.g. a DICOM series, which has no single file to take a header from) or a CT file."""
    if isinstance(reference, str):
        header = sitk.ImageFileReader()
        header.SetFileName(reference)
        header.ReadImageInformation()  # header only: no second read of the voxels
        reference = header  # has the image's GetSize / GetSpacing / GetOrigin / GetDirection
    if tuple(anomaly_map.shape[::-1]) != reference.GetSize():
        raise ValueError(f'map shape {anomaly_map.shape} (z, y, x) does not match the CT\'s size '
                         f'{reference.GetSize()} (x, y, z)')
    image = sitk.GetImageFromArray(anomaly_map.astype(np.float32, copy=False))
    image.SetSpacing(reference.GetSpacing())
    image.SetOrigin(reference.GetOrigin())
    image.SetDirection(reference.GetDirection())
    with atomic_path(output_file) as tmp:
        sitk.WriteImage(image, tmp, True)


def scan_score(map_raw: np.ndarray, body: Optional[np.ndarray] = None,
               percentile: float = SCAN_SCORE_PERCENTILE) -> float:
    """Scan-level anomaly score: a high percentile of the map inside the body (the whole map if the mask is empty).

    Not the maximum: one noisy voxel (a stent artefact, a resampling edge) would decide the max, whereas the 99.5th
    percentile needs a lesion of ~0.5 % of the body to move.
    """
    values = map_raw[body] if body is not None and body.any() else map_raw
    return float(np.percentile(values, percentile))


def find_ct_files(input_files_or_folder: Union[str, Sequence[str]]) -> Dict[str, str]:
    """{case: CT file or DICOM series folder} of predict's inputs:

    - a folder holding DICOM slices is one series, its case the folder's name;
    - any other folder is a folder of cases: its CT files (`*.nii.gz`, `*.nii`, `*.mha`, `*.nrrd`) and its
      subfolders holding a DICOM series (one level deep; subfolders without DICOM files are ignored);
    - a list holds CT files and series folders.
    nnU-Net style `<case>_0000.nii.gz` becomes `<case>`. A folder holding several series is refused (one series per
    folder), so is one holding DICOM slices beside CT files (which would be ignored)."""
    inputs = [input_files_or_folder] if isinstance(input_files_or_folder, str) else list(input_files_or_folder)
    if not inputs:
        raise ScreenerInputError('no input CT files given')
    if len(inputs) == 1 and isdir(inputs[0]) and dicom_series_id(inputs[0]) is None:
        inputs = _folder_of_cases(inputs[0])
    else:
        for f in inputs:
            _check_input(f)
    cases = {}
    for f in inputs:
        case = case_name(f)
        if case in cases:
            raise ScreenerInputError(f'{cases[case]} and {f} are both case {case}: one CT channel per case only; '
                                     f'remove one of them')
        cases[case] = f
    return cases


def _ct_files(folder: str) -> List[str]:
    return [join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(CT_FILE_ENDINGS)
            and not f.startswith('.') and isfile(join(folder, f))]


def _folder_of_cases(folder: str) -> List[str]:
    """The CT files and the series subfolders of a folder that is no series itself."""
    subfolders = [join(folder, f) for f in sorted(os.listdir(folder)) if not f.startswith('.')
                  and isdir(join(folder, f))]
    inputs = _ct_files(folder) + [f for f in subfolders if dicom_series_id(f) is not None]
    if not inputs:
        raise ScreenerInputError(f'{folder} contains no CT files ({", ".join("*" + e for e in CT_FILE_ENDINGS)}) and '
                                 f'no subfolder holding a DICOM series (searched one level deep)')
    return sorted(inputs)


def _check_input(path: str) -> None:
    """A CT file, or a folder holding one DICOM series and no CT files."""
    if isdir(path):
        if dicom_series_id(path) is None:
            raise ScreenerInputError(f'{path} holds no DICOM series: give CT files, folders each holding one DICOM '
                                     f'series, or one folder of them')
        if _ct_files(path):
            raise ScreenerInputError(f'{path} holds DICOM slices and CT files ({basename(_ct_files(path)[0])}, ...), '
                                     f'which would be ignored: move the series into a subfolder of its own')
    elif not isfile(path):
        raise ScreenerInputError(f'{path} does not exist (give CT files, DICOM series folders or one folder of them)')
    elif not path.endswith(CT_FILE_ENDINGS):
        raise ScreenerInputError(f'{path} is not a CT file ({", ".join("*" + e for e in CT_FILE_ENDINGS)}) or a '
                                 f'DICOM series folder')


def case_name(path: str) -> str:
    """A series folder's name; a CT file's name without its ending and nnU-Net's `_0000`. A name that is empty or
    starts with a dot (`_0000.nii.gz`, `..nii.gz`: the map would have no name or be a hidden file) is refused."""
    if isdir(path):
        name = basename(normpath(abspath(path)))
    else:
        name = basename(path)
        name = name[:-len(next(e for e in CT_FILE_ENDINGS if name.endswith(e)))]
        name = name[:-len(NNUNET_CHANNEL_SUFFIX)] if name.endswith(NNUNET_CHANNEL_SUFFIX) else name
    if not name or name.startswith('.'):
        raise ScreenerInputError(f'{path} gives the case name {name!r}, so its map {name + MAP_ENDING!r} would be '
                                 f'nameless or hidden: rename it (e.g. to case_001_0000.nii.gz)')
    return name


def body_anomaly_map(stock: np.ndarray, view: ScreenerView, model: PatchAnomalyModel, step_size: float = 0.5,
                     batch_size: int = 4, smoothing: Optional[Sequence[float]] = None) -> np.ndarray:
    """Sliding-window map of the body only: the windows run over the body box the Screener cache trained on (the
    paper crops every CT to the body), and every voxel outside the body mask gets the body's minimum ("least
    anomalous"): the models never saw the table or the room, whose features are out of distribution.
    smoothing: Gaussian sigma (z, y, x voxels) of `smooth_body_map`; None = the map as the model gives it."""
    clahe = view.clahe if view.clahe is not None else stock[view.slicer]
    return _body_only(sliding_window_anomaly_map(stock[view.slicer], clahe, model, step_size, batch_size), view,
                      stock.shape, smoothing)


def body_anomaly_maps(stock: np.ndarray, view: ScreenerView, model: PatchAnomalyModel, step_size: float = 0.5,
                      batch_size: int = 4, smoothing: Optional[Sequence[float]] = None) -> np.ndarray:
    """`body_anomaly_map` of a model with C maps per patch (`sliding_window_anomaly_maps`) -> (C, z, y, x)."""
    clahe = view.clahe if view.clahe is not None else stock[view.slicer]
    box_maps = sliding_window_anomaly_maps(stock[view.slicer], clahe, model, step_size, batch_size)
    return np.stack([_body_only(box_map, view, stock.shape, smoothing) for box_map in box_maps])


def _body_only(box_map: np.ndarray, view: ScreenerView, shape, smoothing: Optional[Sequence[float]]) -> np.ndarray:
    """The body box's map in a volume of `shape`, every voxel outside the body at the body's minimum, then smoothed
    by `smooth_body_map` if `smoothing` is given."""
    floor = _body_minimum(box_map, view.body)
    anomaly_map = np.full(shape, floor, dtype=np.float32)
    anomaly_map[view.slicer] = np.where(view.body, box_map, floor)
    if smoothing is None:
        return anomaly_map
    body = np.zeros(shape, bool)
    body[view.slicer] = view.body
    return smooth_body_map(anomaly_map, body, smoothing)


def smooth_body_map(body_map: np.ndarray, body: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    """A whole volume's body-only map (the body's minimum outside the body) smoothed by a Gaussian of `sigma` voxels;
    outside the body the smoothed body's minimum again.

    Why: one pooled cell's density score is noisy, and a lesion spans several cells, so averaging over a few mm
    ranks lesions above healthy tissue more often (anomalib blurs its maps for the same reason). The minimum outside
    the body is smoothed in, which pulls the skin's rim, where the windows saw room air, towards "least anomalous".
    Beyond the volume's faces the body goes on (a scan ends inside the patient), so the faces extend the map
    ('nearest') instead of pulling a lesion in the first or last slice down."""
    smoothed = ndimage.gaussian_filter(body_map.astype(np.float32), sigma, mode='nearest')
    return np.where(body, smoothed, _body_minimum(smoothed, body)).astype(np.float32, copy=False)


def _body_minimum(anomaly_map: np.ndarray, body: np.ndarray) -> float:
    """The least anomalous body voxel's score (the whole map's minimum where there is no body)."""
    return anomaly_map[body].min() if body.any() else anomaly_map.min()


def map_smoothing_sigma(smoothing_mm: float, configuration_manager: ConfigurationManager) -> Optional[tuple]:
    """A Gaussian sigma in mm -> (z, y, x) voxels of the plans' spacing, the grid maps are computed on; 0 -> None."""
    if smoothing_mm < 0:
        raise ScreenerInputError(f'map smoothing must be >= 0 mm, got {smoothing_mm}')
    return tuple(smoothing_mm / s for s in configuration_manager.spacing) if smoothing_mm > 0 else None


def map_smoothing_mm(plans_manager: PlansManager, asked: Optional[float] = None) -> float:
    """The smoothing asked for, else the plans' `screener.map_smoothing_mm` (0 for plans from before it existed: the
    map as the model gives it)."""
    return ScreenerSettings.from_plans(plans_manager.plans).map_smoothing_mm if asked is None else asked


def map_identity(model_identity: dict, step_size: float, smoothing_mm: float) -> dict:
    """What makes a map this run's in the predict manifest: the model, the step size and the smoothing (absent when
    0, so the maps of a model that does not smooth keep the identity they had before the option existed)."""
    return {**model_identity, 'step_size': step_size, **({'map_smoothing_mm': smoothing_mm} if smoothing_mm else {})}


def predict_anomaly_maps(input_files_or_folder: Union[str, Sequence[str]], output_folder: str,
                         model: PatchAnomalyModel, plans_manager: PlansManager,
                         configuration_manager: ConfigurationManager, dataset_json: dict, step_size: float = 0.5,
                         batch_size: int = 4, overlays: int = 0, continue_: bool = False,
                         model_name: Optional[str] = None, reference_folder: Optional[str] = None,
                         model_identity: Optional[dict] = None, allow_non_hu: bool = False,
                         smoothing_mm: Optional[float] = None) -> List[dict]:
    """Anomaly map `<case>.nii.gz` for every CT, plus `scores.csv` / `scores.json` and, for the `overlays`
    highest-scoring scans, `overlays/<case>.png`. Returns the score records. The overlays are titled
    '<case> - <model_name>' and show the contour of `reference_folder/<case>.nii.gz` where that mask exists.

    The output folder must be new or hold only files of nnscreener (`check_output_folder`); its manifest records
    `model_identity` (default: the model name) with the step size (and the smoothing, if any), the inputs and their
    maps (`PredictionRun`). smoothing_mm: Gaussian sigma of `smooth_body_map`; None = the plans' `map_smoothing_mm`.
    Fails fast: the first unreadable or invalid CT (`check_ct_image`, with `allow_non_hu`) stops the run with one
    line naming the file. Maps already written stay; `continue_` keeps the maps the manifest lists as this model's
    map of the same input (their scores are recomputed from them) and recomputes the others.
    """
    if not 0 < step_size <= 1 or batch_size < 1:
        raise ScreenerInputError(f'step_size must be in (0, 1] and batch_size >= 1, got {step_size} and {batch_size}')
    cases = find_ct_files(input_files_or_folder)
    with output_folder_lock(output_folder, (OVERLAY_FOLDER,)):
        manifest = check_output_folder(output_folder, (), only_ours=True, subfolders=(OVERLAY_FOLDER,))
        smoothing_mm = map_smoothing_mm(plans_manager, smoothing_mm)
        smoothing = map_smoothing_sigma(smoothing_mm, configuration_manager)
        identity = map_identity(model_identity or {'model': model_name or type(model).__name__}, step_size,
                                smoothing_mm)
        outputs = {case: case + MAP_ENDING for case in cases}
        run = PredictionRun(output_folder, manifest, cases, outputs, identity, continue_)
        run.claim((SCORES_CSV, SCORES_JSON))
        records = [_case_map_and_scores(case, image_file, run, model, plans_manager, configuration_manager,
                                        dataset_json, step_size, batch_size, allow_non_hu, smoothing)
                   for case, image_file in tqdm(cases.items(), desc=f'anomaly maps ({model_name or "model"})')]
        save_scores(records, output_folder)
        _save_overlays(sorted(records, key=lambda r: -r['scan_score'])[:overlays], run, reference_folder, model_name)
    return records


def _case_map_and_scores(case: str, image_file: str, run: PredictionRun, model: PatchAnomalyModel,
                         plans_manager: PlansManager, configuration_manager: ConfigurationManager, dataset_json: dict,
                         step_size: float, batch_size: int, allow_non_hu: bool,
                         smoothing: Optional[tuple]) -> dict:
    """The case's map (kept if `run` vouches for the existing one, else computed and written) -> its score record."""
    image = read_image(image_file)
    check_ct_image(image, image_file, allow_non_hu=allow_non_hu)
    map_file = join(run.folder, run.outputs[case])
    map_raw = _existing_map(map_file, image) if case in run.maps_to_keep else None
    if map_raw is None:
        stock, view, properties = preprocess_ct_image(image, plans_manager, configuration_manager, dataset_json,
                                                      with_clahe=getattr(model, 'uses_clahe', True))
        anomaly_map = body_anomaly_map(stock, view, model, step_size, batch_size, smoothing)
        map_raw = map_to_input_geometry(anomaly_map, properties, plans_manager, configuration_manager)
        write_anomaly_map(map_raw, image, map_file)
        run.record_map(case, run.outputs[case])
    return {'case': case, 'scan_score': scan_score(map_raw, body_mask_of_image(image)),
            'map_max': float(map_raw.max()), 'map_mean': float(map_raw.mean()),
            'image': abspath(image_file), 'anomaly_map': abspath(map_file)}


def _save_overlays(shown: List[dict], run: PredictionRun, reference_folder: Optional[str],
                   model_name: Optional[str]) -> None:
    """overlays/<case>.png of the `shown` records, with the reference contour where `reference_folder` has a mask."""
    run.claim(join(OVERLAY_FOLDER, r['case'] + '.png') for r in shown)
    for record in shown:
        out_png = join(run.folder, OVERLAY_FOLDER, record['case'] + '.png')
        mask_file = join(reference_folder, record['case'] + '.nii.gz') if reference_folder else None
        save_case_overlay(record['image'], record['anomaly_map'], out_png,
                          mask_file=mask_file if mask_file and isfile(mask_file) else None,
                          title=record['case'] + (f' - {model_name}' if model_name else ''))


def _existing_map(map_file: str, image: sitk.Image) -> Optional[np.ndarray]:
    """The saved map of `image`, or None if there is none of its size, or it cannot be read: it is then redone."""
    try:
        anomaly_map = read_image(map_file)
    except ScreenerInputError:
        return None
    return sitk.GetArrayFromImage(anomaly_map) if anomaly_map.GetSize() == image.GetSize() else None


def save_scores(records: List[dict], output_folder: str) -> None:
    """scores.json (all fields) and scores.csv (case, scan_score, map_max, map_mean), both atomic."""
    atomic_save_json(records, join(output_folder, SCORES_JSON))
    text = io.StringIO()
    writer = csv.DictWriter(text, SCORE_FIELDS, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(records)
    with atomic_path(join(output_folder, SCORES_CSV)) as tmp:
        with open(tmp, 'w', newline='') as f:
            f.write(text.getvalue())


def save_case_overlay(image_file: str, anomaly_map_file: str, out_png: str, n_slices: int = 3,
                      mask_file: Optional[str] = None, title: Optional[str] = None) -> None:
    """Overlay PNG (save_overlay_png) of a CT, its map and optionally its reference mask, all reoriented to LPS so
    slices show in the radiological convention. title defaults to the case name. The map and the mask must be on
    the CT's grid."""
    files = (image_file, anomaly_map_file, mask_file)
    images = lps_on_ct_grid([read_image(f) if f else None for f in files], files)
    ct, anomaly_map, mask = (sitk.GetArrayFromImage(i) if i else None for i in images)
    save_overlay_png(ct, anomaly_map, images[0].GetSpacing()[::-1], out_png, n_slices, mask,
                     title=case_name(image_file) if title is None else title)


def lps_on_ct_grid(images: Sequence[Optional[sitk.Image]], names: Sequence[Optional[str]]) -> List[sitk.Image]:
    """images[0] a CT and the others images on its grid (its map, a mask; None stays None), all reoriented to LPS,
    so that slices show in the radiological convention whatever the scan's direction matrix. An image not on the
    CT's grid is refused with one line; names: the files they were read from."""
    images = [sitk.DICOMOrient(i, 'LPS') if i is not None else None for i in images]
    for image, fname in zip(images[1:], names[1:]):
        if image is not None and (image.GetSize() != images[0].GetSize() or not np.allclose(
                image.GetSpacing(), images[0].GetSpacing(), atol=1e-3) or not np.allclose(
                image.GetOrigin(), images[0].GetOrigin(), atol=1e-2)):
            raise ScreenerInputError(f'{fname} (size {image.GetSize()}, spacing {image.GetSpacing()}) is not on the '
                                     f'grid of its CT {names[0]} (size {images[0].GetSize()}, spacing '
                                     f'{images[0].GetSpacing()})')
    return images
