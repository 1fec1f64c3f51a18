"""Findings report of a predict output folder: what a reader of the maps needs first (`nnScreener_findings`, or
`nnScreener_predict --findings_threshold / --normals`).

Per scan: the 26-connected regions of the map at or above a threshold (at or above, as nnScreener_evaluate's Dice
counts voxels), each with its centroid (mm in SimpleITK's physical LPS space, and voxel index), volume (mL), peak and
mean score and bounding box, sorted by peak score; a PNG of each top finding (three orthogonal slices through its
centroid); and a scan score calibrated to [0, 1] against normal scans. Written into the predict output folder as
`findings.json`, `findings.csv` and `findings/<case>_finding<k>.png`, each listed in its manifest first.

The threshold is fixed (a number, or the `dice_threshold` of an nnScreener_evaluate summary.json) or a percentile of
the body-voxel scores of normal scans' maps: a predict output folder of normal scans (`--normals`), made by the same
model (checked against both manifests), read through its manifest and scores.json only.
"""
import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from os.path import abspath, isdir, join
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from matplotlib.figure import Figure
from scipy import ndimage
from tqdm import tqdm

from nnscreener.inference.anomaly_maps import SCORES_JSON, lps_on_ct_grid
from nnscreener.inference.manifest import PREDICTIONS, listed_maps
from nnscreener.inference.overlays import LESION_CONNECTIVITY, draw_panel, heat_range, slice_window
from nnscreener.preprocessing.body import body_mask_of_image
from nnscreener.utilities.errors import ScreenerInputError, exit_on_input_error
from nnscreener.utilities.io import atomic_path, atomic_save_json, atomic_save_text, read_image
from nnscreener.utilities.output_folder import (check_output_folder, claim_outputs, load_manifest,
                                                output_folder_lock)

FINDINGS_JSON, FINDINGS_CSV, FINDINGS_FOLDER = 'findings.json', 'findings.csv', 'findings'
DEFAULT_PERCENTILE = 99.99  # normal scans then have, on average, 0.01 % of their body at or above the threshold
DEFAULT_MIN_VOLUME_ML = 0.1  # smaller regions (a few voxels where the map grazes the threshold) are only counted
DEFAULT_PNGS = 3  # PNGs of the highest-peak findings per scan
NORMAL_SAMPLE_VOXELS = 1_000_000  # body voxels sampled per normal scan for the percentile: each scan weighs the same
NEIGHBOURHOOD_MM = 10.0  # half side of the cube around a centroid whose HU decide the lung or soft-tissue window
REGION_COLOUR = 'lime'
CSV_COLUMNS = ('case', 'calibrated_score', 'scan_score', 'n_findings', 'finding', 'peak_score', 'mean_score',
               'volume_ml', 'centroid_x_mm', 'centroid_y_mm', 'centroid_z_mm', 'centroid_i', 'centroid_j',
               'centroid_k', 'bbox_i_min', 'bbox_j_min', 'bbox_k_min', 'bbox_i_max', 'bbox_j_max', 'bbox_k_max',
               'png')
TIE_RULE = 'fraction of the normal scans with a lower scan score, ties counting half'


# ------------------------------------------------------------------------------------------- pure functions
class MapFindings(NamedTuple):
    findings: List[dict]  # sorted by peak score, highest first
    labels: np.ndarray  # (z, y, x) connected-component labels of the map at or above the threshold
    region_ids: List[int]  # the label of each finding in `labels`
    n_smaller: int  # regions below the minimum volume, not listed


def map_findings(anomaly_map: sitk.Image, threshold: float, min_volume_ml: float = 0.0) -> MapFindings:
    """The 26-connected regions of the map at or above `threshold` of at least `min_volume_ml`, sorted by peak score
    (highest first). Each finding: peak and mean score, volume (mL) and voxel count, centroid (the regions' voxels'
    mean position, unweighted) as continuous voxel index (i, j, k) = SimpleITK's (x, y, z) order and in mm in
    SimpleITK's physical space (LPS: x to the patient's left, y posterior, z superior; through the direction
    matrix), the peak voxel and the bounding box (inclusive voxel indices, (i, j, k))."""
    values = sitk.GetArrayViewFromImage(anomaly_map)  # (z, y, x)
    labels, n = ndimage.label(values >= threshold, structure=LESION_CONNECTIVITY)
    index = np.arange(1, n + 1)
    n_voxels = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    voxel_ml = float(np.prod(anomaly_map.GetSpacing())) / 1000.0
    kept = index[n_voxels * voxel_ml >= min_volume_ml]
    if not kept.size:
        return MapFindings([], labels, [], int(n))
    # one pass over the volume per statistic, for all regions at once
    peaks = np.asarray(ndimage.maximum(values, labels, kept))
    means = ndimage.mean(values, labels, kept)
    peak_at = ndimage.maximum_position(values, labels, kept)
    centres = ndimage.center_of_mass(labels > 0, labels, kept)
    boxes = ndimage.find_objects(labels)
    findings, order = [], np.argsort(-peaks, kind='stable')
    for rank, k in enumerate(order, start=1):
        region = int(kept[k])
        centre = [float(c) for c in centres[k][::-1]]
        box = boxes[region - 1][::-1]
        findings.append({
            'finding': rank, 'peak_score': float(peaks[k]), 'mean_score': float(means[k]),
            'volume_ml': float(n_voxels[region - 1] * voxel_ml), 'n_voxels': int(n_voxels[region - 1]),
            'centroid_mm': list(anomaly_map.TransformContinuousIndexToPhysicalPoint(centre)),
            'centroid_voxel': centre, 'peak_voxel': [int(c) for c in peak_at[k][::-1]],
            'bbox_voxel': {'min': [s.start for s in box], 'max': [s.stop - 1 for s in box]}})
    return MapFindings(findings, labels, [int(kept[k]) for k in order], int(n - kept.size))


def calibrated_scores(scores: Sequence[float], normal_scores: Sequence[float]) -> np.ndarray:
    """Each score as the fraction of the normal scans' scores below it, ties counting half (the mid-rank, as AUROC
    counts ties): 0 below every normal scan, 1 above every one, 0.5 at their median; non-decreasing in the score.
    The same number means the same across models: how unusual the scan is among normal scans."""
    normal = np.sort(np.asarray(normal_scores, dtype=float))
    if normal.size == 0:
        raise ScreenerInputError('no normal scan scores to calibrate against')
    scores = np.asarray(scores, dtype=float)
    below, at_or_below = np.searchsorted(normal, scores, 'left'), np.searchsorted(normal, scores, 'right')
    return (below + at_or_below) / (2.0 * normal.size)


def body_voxel_percentile(map_and_ct: Sequence[Tuple[sitk.Image, sitk.Image]], percentile: float,
                          seed: int = 0) -> float:
    """The `percentile` of the maps' values in the CTs' bodies (`body_mask_of_image`), pooled over the scans with up
    to NORMAL_SAMPLE_VOXELS body voxels drawn per scan (seeded), so that every scan weighs the same."""
    rng, samples = np.random.default_rng(seed), []
    for anomaly_map, ct in map_and_ct:
        values = sitk.GetArrayViewFromImage(anomaly_map)[body_mask_of_image(ct)]
        if values.size > NORMAL_SAMPLE_VOXELS:
            values = rng.choice(values, NORMAL_SAMPLE_VOXELS, replace=False)
        samples.append(np.asarray(values, dtype=np.float32))
    return float(np.percentile(np.concatenate(samples), percentile))


def save_finding_png(ct_hu: np.ndarray, anomaly_map: np.ndarray, region: np.ndarray, body: np.ndarray,
                     spacing: Sequence[float], centre: Sequence[int], out_png: str, title: str) -> str:
    """PNG (atomic) of the axial, coronal and sagittal slice through `centre` (z, y, x voxel) of LPS-oriented
    (z, y, x) arrays: the CT in a lung window when more than 30 % of the body around the centre (a cube of
    2 x NEIGHBOURHOOD_MM) is lung, else soft tissue (`slice_window`); the map above the body's 95th percentile with
    its colour scale capped at the 99.9th (`heat_range`); the region's contour. spacing: (z, y, x) mm.
    Returns the window's name."""
    half = [max(1, int(round(NEIGHBOURHOOD_MM / s))) for s in spacing]
    cube = tuple(slice(max(0, c - h), c + h + 1) for c, h in zip(centre, half))
    window_name, window = slice_window(ct_hu[cube], body[cube])
    z, y, x = centre
    # rows down = posterior (axial) or inferior (coronal, sagittal: flipped so the head is up); columns: patient's
    # right on the left (axial, coronal), anterior on the left (sagittal)
    views = (('axial', np.s_[z], spacing[1] / spacing[2]), ('coronal', np.s_[::-1, y], spacing[0] / spacing[2]),
             ('sagittal', np.s_[::-1, :, x], spacing[0] / spacing[1]))
    fig = Figure(figsize=(13.0, 5.0), layout='constrained')
    axes = fig.subplots(1, 3)
    heat = heat_range(anomaly_map, body)
    for ax, (name, view, aspect) in zip(axes, views):
        image = draw_panel(ax, ct_hu[view], anomaly_map[view], window, heat, aspect, region[view], REGION_COLOUR)
        ax.set_title(name, fontsize=9)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label='anomaly score (body p95 to p99.9)')
    fig.suptitle(title, fontsize=11)
    fig.supxlabel(f'{window_name} window;  green: the finding\'s region;  radiological view (patient\'s right on the '
                  f'left)', fontsize=8)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100)
    return window_name


# ------------------------------------------------------------------------------------ thresholds and normals
@dataclass(frozen=True)
class FindingsSettings:
    threshold: Optional[str] = None  # a number, or an nnScreener_evaluate summary.json (its dice_threshold)
    normals: Optional[str] = None  # a predict output folder of normal scans (same model)
    percentile: float = DEFAULT_PERCENTILE  # threshold = this percentile of the normals' body voxels (no threshold)
    min_volume_ml: float = DEFAULT_MIN_VOLUME_ML
    n_png: int = DEFAULT_PNGS


class FindingsReference(NamedTuple):
    threshold: float
    threshold_source: str
    model: dict  # the model identity the threshold and the normals belong to
    normals_folder: Optional[str]
    normal_scores: Optional[List[float]]


def resolve_reference(settings: FindingsSettings, model: dict) -> FindingsReference:
    """The threshold (fixed, or the percentile of the normals' body voxels) and the normal scans' scan scores for
    maps of `model` (a predict manifest's model identity); threshold and normals of another model are refused."""
    if settings.threshold is None and settings.normals is None:
        raise ScreenerInputError('findings need a threshold: give --findings_threshold (a number or the summary.json '
                                 'of nnScreener_evaluate) or --normals (a predict output folder of normal scans)')
    if not 0 < settings.percentile < 100 or settings.min_volume_ml < 0 or settings.n_png < 0:
        raise ScreenerInputError(f'--findings_percentile must lie in (0, 100), --findings_min_ml and --findings_png '
                                 f'be >= 0; got {settings.percentile}, {settings.min_volume_ml}, {settings.n_png}')
    normals = None
    if settings.normals is not None:
        normals_model, normals = predict_folder_records(settings.normals, 'normal scans')
        _check_same_model(model, normals_model, f'the normal scans in {settings.normals}')
    if settings.threshold is not None:
        threshold, source = _fixed_threshold(settings.threshold, model)
    else:
        pairs = (_lps_ct_and_maps(r, settings.normals)[::-1] for r in
                 tqdm(normals, desc=f'normal scans: body-voxel scores ({len(normals)} scans)'))
        threshold = body_voxel_percentile(pairs, settings.percentile)
        source = (f'{settings.percentile:g}th percentile of the body-voxel scores of {len(normals)} normal scans in '
                  f'{abspath(settings.normals)}')
    return FindingsReference(threshold, source, model, abspath(settings.normals) if normals else None,
                             [float(r['scan_score']) for r in normals] if normals else None)


def predict_folder_records(folder: str, what: str = 'maps') -> Tuple[dict, List[dict]]:
    """(model identity, score records of scores.json with 'anomaly_map' the listed map's path) of the maps a predict
    output folder's manifest lists. Only JSON is read."""
    listed = listed_maps(folder) if isdir(folder) else None
    if listed is None:
        raise ScreenerInputError(f'{folder} ({what}) is no nnScreener_predict output folder (no manifest listing '
                                 f'maps): give the -o folder of a predict run')
    maps, missing = listed
    if missing or not maps:
        raise ScreenerInputError(f'the predict run into {folder} ({what}) has no map yet for {len(missing)} of its '
                                 f'inputs: finish it with nnScreener_predict ... --c')
    try:
        with open(join(folder, SCORES_JSON)) as f:
            records = {r['case']: r for r in json.load(f)}
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ScreenerInputError(f'{join(folder, SCORES_JSON)} is missing or damaged ({e}): rerun the predict into '
                                 f'{folder} with --c')
    if any(case not in records for case in maps):
        raise ScreenerInputError(f'{join(folder, SCORES_JSON)} does not cover the maps the manifest lists: rerun the '
                                 f'predict into {folder} with --c')
    model = load_manifest(folder)[PREDICTIONS]['model']
    return model, [{**records[case], 'anomaly_map': join(folder, name)} for case, name in sorted(maps.items())]


def _fixed_threshold(spec: str, model: dict) -> Tuple[float, str]:
    try:
        value, source = float(spec), 'fixed number'
    except ValueError:
        value, source = _summary_threshold(spec, model), f'dice_threshold of {abspath(spec)}'
    if not math.isfinite(value):
        raise ScreenerInputError(f'the findings threshold must be finite, got {value} ({source})')
    return value, source


def _summary_threshold(summary_file: str, model: dict) -> float:
    """The dice_threshold of an nnScreener_evaluate summary.json, checked to be of `model`'s maps when the folder
    it evaluated still has its manifest."""
    try:
        with open(summary_file) as f:
            summary = json.load(f)
        value = float(summary['dice_threshold'])
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ScreenerInputError(f'--findings_threshold {summary_file} is no number and no nnScreener_evaluate '
                                 f'summary.json with a dice_threshold ({type(e).__name__}: {e})')
    pred_folder = (summary.get('settings') or {}).get('pred_folder')
    listed = listed_maps(pred_folder) if pred_folder and isdir(pred_folder) else None
    if listed is None:
        print(f'nnScreener findings: cannot check that {summary_file} was computed on maps of this model (the folder '
              f'it evaluated, {pred_folder}, has no predict manifest): its threshold is in the units of that model',
              file=sys.stderr)
    else:
        _check_same_model(model, load_manifest(pred_folder)[PREDICTIONS]['model'],
                          f'the maps {summary_file} evaluated ({pred_folder})')
    return value


def _check_same_model(ours: dict, theirs: dict, what: str) -> None:
    ours, theirs = json.loads(json.dumps(ours)), json.loads(json.dumps(theirs))  # as the manifests hold them
    if ours != theirs:
        keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ScreenerInputError(f'{what} were made by another model or setting (differs in: {", ".join(keys)}): '
                                 f'scores are only comparable within one model; predict them with the same -d, '
                                 f'--model, --density_trainer, --step_size and --smoothing_mm')


def _lps_ct_and_maps(record: dict, folder: str, *images: sitk.Image) -> List[sitk.Image]:
    """The CT a map was predicted from (scores.json's 'image': a file or a DICOM series folder), and the map (or
    `images` on the map's grid), reoriented to LPS; a map not on its CT's grid is refused."""
    if not os.path.exists(record['image']):
        raise ScreenerInputError(f'{record["image"]}, the CT of case {record["case"]} in {folder}, does not exist: '
                                 f'restore it (its body and HU are needed), or use --findings_threshold and '
                                 f'--findings_png 0')
    images = images or (read_image(record['anomaly_map']),)
    return lps_on_ct_grid([read_image(record['image']), *images], [record['image']] + [record['anomaly_map']] *
                          len(images))


# --------------------------------------------------------------------------------------------------- report
def write_findings_report(folder: str, reference: FindingsReference, min_volume_ml: float = DEFAULT_MIN_VOLUME_ML,
                          n_png: int = DEFAULT_PNGS) -> dict:
    """findings.json, findings.csv and findings/<case>_finding<k>.png (the n_png highest-peak findings of each scan)
    of the maps listed in the predict output folder `folder`, scans by scan score (highest first). Every file is
    listed in the folder's manifest before it is written and written atomically; PNGs of an earlier report that this
    one does not make again are removed. Returns the report (findings.json's content)."""
    model, records = predict_folder_records(folder)
    _check_same_model(model, reference.model, f'the threshold ({reference.threshold_source}) and normals')
    calibrated = (calibrated_scores([r['scan_score'] for r in records], reference.normal_scores)
                  if reference.normal_scores else [None] * len(records))
    with output_folder_lock(folder, (FINDINGS_FOLDER,)):
        earlier = [join(FINDINGS_FOLDER, f) for f in sorted(os.listdir(join(folder, FINDINGS_FOLDER)))] if isdir(
            join(folder, FINDINGS_FOLDER)) else []
        check_output_folder(folder, (FINDINGS_JSON, FINDINGS_CSV, *earlier))  # nothing of the user's is overwritten
        scans = [_scan_findings(folder, record, score, reference.threshold, min_volume_ml, n_png)
                 for record, score in tqdm(list(zip(records, calibrated)), desc='findings')]
        scans.sort(key=lambda s: -s['scan_score'])
        report = {'threshold': reference.threshold, 'threshold_source': reference.threshold_source,
                  'connectivity': 26, 'min_volume_ml': min_volume_ml, 'model': model,
                  'normals': None if reference.normal_scores is None else {
                      'folder': reference.normals_folder, 'n_scans': len(reference.normal_scores),
                      'calibration': TIE_RULE},
                  'scans': scans}
        claim_outputs(folder, (FINDINGS_JSON, FINDINGS_CSV))
        atomic_save_text(_findings_csv(scans), join(folder, FINDINGS_CSV))
        atomic_save_json(report, join(folder, FINDINGS_JSON))
        written = {f['png'] for s in scans for f in s['findings']}
        for name in earlier:
            if name not in written and name in load_manifest(folder)['files']:
                os.remove(join(folder, name))
    return report


def _scan_findings(folder: str, record: dict, calibrated: Optional[float], threshold: float, min_volume_ml: float,
                   n_png: int) -> dict:
    anomaly_map = read_image(record['anomaly_map'])
    found = map_findings(anomaly_map, threshold, min_volume_ml)
    pngs = [join(FINDINGS_FOLDER, f'{record["case"]}_finding{k}.png') for k in range(1, 1 + min(n_png,
                                                                                             len(found.findings)))]
    for finding, png in zip(found.findings, pngs + [None] * len(found.findings)):
        finding.update(png=png, window=None)  # the window: set with the PNG
    if pngs:
        claim_outputs(folder, pngs)
        _save_finding_pngs(folder, record, anomaly_map, found, len(pngs))
    return {'case': record['case'], 'image': record['image'], 'anomaly_map': abspath(record['anomaly_map']),
            'scan_score': record['scan_score'], 'calibrated_score': None if calibrated is None else float(calibrated),
            'n_findings': len(found.findings), 'n_smaller_regions': found.n_smaller, 'findings': found.findings}


def _save_finding_pngs(folder: str, record: dict, anomaly_map: sitk.Image, found: MapFindings, n: int) -> None:
    """The PNGs of the first n findings, on the CT, map and regions reoriented to LPS."""
    labels = sitk.GetImageFromArray(found.labels.astype(np.int32))
    labels.CopyInformation(anomaly_map)
    ct, lps_map, lps_labels = _lps_ct_and_maps(record, folder, anomaly_map, labels)
    ct_hu, map_values, regions = (sitk.GetArrayFromImage(i) for i in (ct, lps_map, lps_labels))
    body = body_mask_of_image(ct)
    for finding, region in zip(found.findings[:n], found.region_ids):
        centre = ct.TransformPhysicalPointToIndex(finding['centroid_mm'])[::-1]
        centre = [min(max(c, 0), s - 1) for c, s in zip(centre, ct_hu.shape)]
        title = (f'{record["case"]}  finding {finding["finding"]}: peak {finding["peak_score"]:.3g}, mean '
                 f'{finding["mean_score"]:.3g}, {finding["volume_ml"]:.2f} mL\ncentroid '
                 f'({", ".join(f"{v:.1f}" for v in finding["centroid_mm"])}) mm LPS, voxel '
                 f'({", ".join(f"{v:.0f}" for v in finding["centroid_voxel"])}) of the map')
        finding['window'] = save_finding_png(ct_hu, map_values, regions == region, body, ct.GetSpacing()[::-1],
                                             centre, join(folder, finding['png']), title)


def _findings_csv(scans: List[dict]) -> str:
    """One row per finding; a scan without findings gets one row with its scores only."""
    rows = []
    for scan in scans:
        head = {k: scan[k] for k in ('case', 'calibrated_score', 'scan_score', 'n_findings')}
        rows += [head] if not scan['findings'] else [{
            **head, **{k: f[k] for k in ('finding', 'peak_score', 'mean_score', 'volume_ml', 'png')},
            **dict(zip(('centroid_x_mm', 'centroid_y_mm', 'centroid_z_mm'), f['centroid_mm'])),
            **dict(zip(('centroid_i', 'centroid_j', 'centroid_k'), f['centroid_voxel'])),
            **dict(zip(('bbox_i_min', 'bbox_j_min', 'bbox_k_min'), f['bbox_voxel']['min'])),
            **dict(zip(('bbox_i_max', 'bbox_j_max', 'bbox_k_max'), f['bbox_voxel']['max']))}
            for f in scan['findings']]
    text = io.StringIO()
    writer = csv.DictWriter(text, CSV_COLUMNS, lineterminator='\n')
    writer.writeheader()
    writer.writerows({k: ('' if v is None else v) for k, v in row.items()} for row in rows)
    return text.getvalue()


def findings(predict_folder: str, settings: FindingsSettings) -> dict:
    """The findings report of an existing predict output folder (its maps are not recomputed)."""
    model, _ = predict_folder_records(predict_folder)
    return write_findings_report(predict_folder, resolve_reference(settings, model), settings.min_volume_ml,
                                 settings.n_png)


# ---------------------------------------------------------------------------------------------- command line
def add_findings_arguments(parser: argparse.ArgumentParser) -> None:
    """The findings options, the same in nnScreener_predict and nnScreener_findings."""
    parser.add_argument('--findings_threshold', default=None,
                        help='findings threshold: a number (map units), or the summary.json of nnScreener_evaluate '
                             '(its dice_threshold); default: the --findings_percentile of the --normals')
    parser.add_argument('--normals', default=None,
                        help='the output folder of an nnScreener_predict run on normal scans, same model: calibrates '
                             'the scan scores to [0, 1] and, without --findings_threshold, sets the threshold')
    parser.add_argument('--findings_percentile', type=float, default=DEFAULT_PERCENTILE,
                        help='with --normals and no --findings_threshold: the threshold is this percentile of the '
                             'normal scans\' body-voxel scores (default: %(default)s)')
    parser.add_argument('--findings_min_ml', type=float, default=DEFAULT_MIN_VOLUME_ML,
                        help='smaller regions are counted, not listed (default: %(default)s mL)')
    parser.add_argument('--findings_png', type=int, default=DEFAULT_PNGS,
                        help='PNGs of the N highest-peak findings of every scan (default: %(default)s)')


def findings_settings(args: argparse.Namespace) -> Optional[FindingsSettings]:
    """The findings options of the command line; None when neither a threshold nor normals are given."""
    if args.findings_threshold is None and args.normals is None:
        defaults = FindingsSettings()
        if (args.findings_percentile, args.findings_min_ml, args.findings_png) != (
                defaults.percentile, defaults.min_volume_ml, defaults.n_png):
            raise ScreenerInputError('the --findings_* options need --findings_threshold or --normals (which '
                                     'threshold the maps)')
        return None
    return FindingsSettings(args.findings_threshold, args.normals, args.findings_percentile, args.findings_min_ml,
                            args.findings_png)


@exit_on_input_error
def findings_entry():
    parser = argparse.ArgumentParser(description='Findings report of an nnScreener_predict output folder: connected '
                                                 'regions of every map above a threshold (centroid, volume, peak, '
                                                 'bounding box; JSON, CSV, PNGs) and scan scores calibrated against '
                                                 'normal scans.')
    parser.add_argument('-i', required=True, help='output folder of nnScreener_predict (the report is written there)')
    add_findings_arguments(parser)
    args = parser.parse_args()
    settings = findings_settings(args) or FindingsSettings()  # neither: resolve_reference says what to give
    report = findings(args.i, settings)
    n = sum(s['n_findings'] for s in report['scans'])
    print(f'{n} findings in {len(report["scans"])} scans (threshold {report["threshold"]:.4g}, '
          f'{report["threshold_source"]}): {join(args.i, FINDINGS_CSV)}')
