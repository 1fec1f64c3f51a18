"""Evaluation of unsupervised anomaly maps against pathology masks (paper Sec. 4.1): `nnScreener_evaluate`.

Reads `<case>.nii.gz` float anomaly maps and `<case>.nii.gz` reference masks (> 0 = pathology) and reports
voxel AUROC (1000 + 1000 sampled voxels per image, pooled over the dataset), AUROC and AUPRO up to FPR 0.3
(MVTec AD, normalised), per-case average precision, and Dice at one threshold chosen on a few pathological cases
and then fixed. Volumes are read one at a time (twice: sampling, then full-map counts), so datasets of any size fit.

With the CTs (`-images`), every metric is computed in the patient's body (`body_mask_hu`), as in the paper's
body-cropped space: the air around the patient and the table are never "normal" voxels. Without them the whole
image grid counts, air included (easy negatives that inflate AUROC and AUPRO).
"""
import csv
import io
import math
import os
import sys
import zlib
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk
from sklearn.metrics import average_precision_score, roc_auc_score

from nnscreener.evaluation.metrics import (aupro_from_counts, auroc_up_to_fpr, best_threshold_from_curves,
                                           dice_at_thresholds, dice_candidates, pooled_sampled_auroc, pro_counts,
                                           pro_thresholds, sample_voxels)
from nnscreener.inference.manifest import PREDICTIONS, listed_maps
from nnscreener.preprocessing.body import body_mask_of_image
from nnscreener.utilities.cli import argument_parser
from nnscreener.utilities.errors import ScreenerInputError, exit_on_input_error
from nnscreener.utilities.io import atomic_save_json, atomic_save_text, read_image
from nnscreener.utilities.output_folder import (MANIFEST_FILE, check_output_folder, claim_outputs, load_manifest,
                                                 output_folder_lock)

PER_CASE_FILE = 'metrics_per_case.csv'
SUMMARY_FILE = 'summary.json'
PER_CASE_COLUMNS = ('case', 'pathological', 'n_lesion_voxels', 'threshold_case', 'auroc', 'auroc_up_to_fpr',
                    'aupro_up_to_fpr', 'average_precision', 'dice')


def json_ready(value):
    """NaN/inf -> None and numpy scalars -> Python, so the written JSON is strict."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _case_names(pred_folder: str, ref_folder: str, file_ending: str) -> List[str]:
    """The cases of the maps in pred_folder: those its predict manifest lists (naming the others in a warning), or,
    for maps from elsewhere (no manifest), every <case><file_ending>."""
    for name, folder in (('anomaly map', pred_folder), ('reference', ref_folder)):
        if not os.path.isdir(folder):
            raise ScreenerInputError(f'{name} folder {folder} does not exist')
    # dot-files are no maps: among them the temporary files a killed predict may have left
    present = sorted(f[:-len(file_ending)] for f in os.listdir(pred_folder)
                     if f.endswith(file_ending) and not f.startswith('.'))
    listed = listed_maps(pred_folder)
    cases = present if listed is None else sorted(c for c, f in listed[0].items() if f == c + file_ending)
    if listed is not None:
        _warn_about_unlisted(pred_folder, [c + file_ending for c in present if c not in cases], listed[1])
    if not cases:
        raise ScreenerInputError(f'no *{file_ending} anomaly maps in {pred_folder}')
    missing = [c for c in cases if not os.path.isfile(os.path.join(ref_folder, c + file_ending))]
    if missing:
        raise ScreenerInputError(f'no reference mask in {ref_folder} for case(s) {", ".join(missing)}: every anomaly '
                                 f'map <case>{file_ending} needs a reference <case>{file_ending}')
    return cases


def _warn_about_unlisted(pred_folder: str, unlisted: List[str], missing: List[str]) -> None:
    if unlisted:
        print(f'nnScreener_evaluate warning: {len(unlisted)} map(s) in {pred_folder} are not listed in its '
              f'{MANIFEST_FILE} (another model or an earlier run) and are not scored: {", ".join(unlisted)}',
              file=sys.stderr)
    if missing:
        print(f'nnScreener_evaluate warning: the predict run into {pred_folder} has no map yet for {len(missing)} '
              f'input(s) ({", ".join(missing)}); finish it with nnScreener_predict ... --c', file=sys.stderr)


def _image_files(images_folder: str, cases: List[str], file_ending: str) -> Dict[str, str]:
    """{case: CT file}: `<case><file_ending>` or nnU-Net style `<case>_0000<file_ending>` in images_folder."""
    if not os.path.isdir(images_folder):
        raise ScreenerInputError(f'CT images folder {images_folder} does not exist')
    files = {}
    for case in cases:
        found = [f for f in (case + file_ending, case + '_0000' + file_ending)
                 if os.path.isfile(os.path.join(images_folder, f))]
        if not found:
            raise ScreenerInputError(f'no CT for case {case} in {images_folder}: expected {case}{file_ending} or '
                                     f'{case}_0000{file_ending} (the scan its anomaly map was predicted from)')
        if len(found) > 1:
            raise ScreenerInputError(f'{" and ".join(found)} in {images_folder} are both case {case}: keep one')
        files[case] = os.path.join(images_folder, found[0])
    return files


def _check_same_geometry(case: str, score_image: sitk.Image, ref_image: sitk.Image,
                         other: str = 'reference') -> None:
    checks = (('size', score_image.GetSize(), ref_image.GetSize(), 0),
              ('spacing', score_image.GetSpacing(), ref_image.GetSpacing(), 1e-4),
              ('origin', score_image.GetOrigin(), ref_image.GetOrigin(), 1e-3),
              ('direction', score_image.GetDirection(), ref_image.GetDirection(), 1e-4))
    for what, got, expected, tolerance in checks:
        if len(got) != len(expected) or not np.allclose(got, expected, rtol=0, atol=tolerance):
            raise ScreenerInputError(f'case {case}: anomaly map {what} {_rounded(got)} differs from the '
                                     f'{other} {what} {_rounded(expected)}; maps must be on the grid '
                                     f'of the reference masks and CTs (predict them from the same images)')


def _rounded(values) -> tuple:
    """SimpleITK's sizes (int) and spacings (float) as plain numbers for a message."""
    return tuple(round(v, 4) if isinstance(v, float) else v for v in values)


def _read_case(pred_folder: str, ref_folder: str, case: str, file_ending: str, image_file: Optional[str] = None,
               bodies: Optional[Dict] = None):
    """-> (score map float32 (z, y, x), pathology mask bool (z, y, x), body bool (z, y, x) or None) after the
    geometry checks. The body (body_mask_hu of image_file, None without one) is computed for pathological cases
    only, and once: `bodies` keeps it bit-packed and zlib-compressed (~1.5 kB per 512 x 512 slice) between the two
    passes."""
    score_image = read_image(os.path.join(pred_folder, case + file_ending))
    ref_image = read_image(os.path.join(ref_folder, case + file_ending))
    _check_same_geometry(case, score_image, ref_image)
    if score_image.GetNumberOfComponentsPerPixel() != 1:
        raise ScreenerInputError(f'case {case}: the anomaly map must have one component per voxel')
    score_map = sitk.GetArrayFromImage(score_image).astype(np.float32)
    if not np.isfinite(score_map).all():
        raise ScreenerInputError(f'case {case}: the anomaly map contains NaN or infinite values')
    mask = sitk.GetArrayFromImage(ref_image) > 0
    if image_file is None:
        return score_map, mask, None
    bodies = {} if bodies is None else bodies
    if case not in bodies:
        ct_image = read_image(image_file)
        _check_same_geometry(case, score_image, ct_image, other=f'CT {os.path.basename(image_file)}')
        if not mask.any():  # a normal scan is left out of every metric: no body needed
            return score_map, mask, None
        body = body_mask_of_image(ct_image)
        bodies[case] = zlib.compress(np.packbits(body).tobytes(), 1)
    body = np.unpackbits(np.frombuffer(zlib.decompress(bodies[case]), np.uint8), count=mask.size)
    return score_map, mask, body.reshape(mask.shape).astype(bool)


def _per_case_csv(rows: List[Dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PER_CASE_COLUMNS, lineterminator='\n')
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ('' if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return buffer.getvalue()


def _print_summary(summary: Dict) -> None:
    region = summary['settings']['region']
    print(f"Anomaly-map metrics of {_maps_model(summary['settings']['pred_folder'])}:")
    lines = [('cases (pathological / normal)', f"{summary['n_pathological']} / {summary['n_normal']}"),
             ('region', 'body (normal voxels inside the patient)' if region == 'body' else
              'whole image (air counts as normal)'),
             ('voxel AUROC (pooled)', f"{summary['auroc']:.3f}"),
             (f"AUROC up to FPR {summary['max_fpr']}", f"{summary['auroc_up_to_fpr']:.3f}"),
             (f"AUPRO up to FPR {summary['max_fpr']}", f"{summary['aupro_up_to_fpr']:.3f}"),
             ('average precision (mean per case)', f"{summary['average_precision_mean']:.3f}"),
             ('Dice threshold', f"{summary['dice_threshold']:.4g}"),
             ('Dice (held-out cases)', f"{summary['dice_mean']:.3f} +- {summary['dice_std']:.3f}")]
    width = max(len(k) for k, _ in lines)
    print('\n'.join(f'{k:<{width}}  {v}' for k, v in lines))


def _maps_model(pred_folder: str) -> str:
    """The model that made the maps, as their predict manifest records it, and where they are."""
    model = load_manifest(pred_folder).get(PREDICTIONS, {}).get('model') or {}
    if 'model' not in model:  # maps from elsewhere
        return f'the maps in {pred_folder}'
    variant = f" ({model['density_trainer']})" if model.get('density_trainer') else ''
    return f"the {model['model']}{variant} model of {model.get('dataset')}, maps in {pred_folder}"


def _sample_cases(read, cases: List[str], n_voxels: int, rng: np.random.Generator,
                  image_files: Dict[str, str]) -> Dict[str, tuple]:
    """Pass 1: geometry checks of every case and, per pathological case (non-empty mask), n_voxels voxels sampled
    inside and n_voxels outside its mask (in the body where there is one) -> {case: (labels, scores)}."""
    samples = {}
    for case in cases:
        score_map, mask, body = read(case)
        n_lesion_voxels = int(mask.sum())
        if n_lesion_voxels == mask.size:
            raise ScreenerInputError(f'case {case}: the reference mask covers the whole image, so there are no '
                                     f'normal voxels to compare with')
        if n_lesion_voxels and body is not None and not (body & ~mask).any():
            raise ScreenerInputError(f'case {case}: no body voxels outside the reference mask (is '
                                     f'{image_files[case]} its CT in HU?), so there are no normal voxels')
        if n_lesion_voxels:
            samples[case] = sample_voxels(score_map, mask, n_voxels, rng, outside=body)
    return samples


def _threshold_cases(pathological: List[str], n_threshold_cases: int, rng: np.random.Generator,
                     ref_folder: str) -> List[str]:
    """The seeded choice of the pathological cases the Dice threshold is chosen on; at least one must be left over."""
    if len(pathological) <= n_threshold_cases:
        raise ScreenerInputError(f'{len(pathological)} pathological case(s) (non-empty reference mask) in '
                                 f'{ref_folder}; choosing the Dice threshold on {n_threshold_cases} of them leaves '
                                 f'none to score: lower --n_threshold_cases or add cases')
    return sorted(rng.choice(pathological, n_threshold_cases, replace=False).tolist())


def _pooled(samples: Dict[str, tuple]) -> tuple:
    """(labels, scores) of the sampled voxels of all cases together."""
    return tuple(np.concatenate(parts) for parts in zip(*samples.values()))


def _case_metrics(case: str, score_map: np.ndarray, mask: np.ndarray, body: Optional[np.ndarray], sample: tuple,
                  thresholds: np.ndarray, max_fpr: float, dice_thresholds: np.ndarray) -> tuple:
    """One pathological case's row (all but Dice, which needs the chosen threshold), its PRO counts at `thresholds`
    and its Dice at each of `dice_thresholds`, over the evaluated region (body | mask with a body)."""
    counts = pro_counts(score_map, mask, thresholds, region=body)
    row = {'case': case, 'pathological': True, 'n_lesion_voxels': int(mask.sum()),
           'auroc': float(roc_auc_score(*sample)), 'auroc_up_to_fpr': auroc_up_to_fpr(*sample, max_fpr=max_fpr),
           'aupro_up_to_fpr': aupro_from_counts(*([c] for c in counts), max_fpr=max_fpr)}
    if body is not None:
        keep = body | mask
        score_map, mask = score_map[keep], mask[keep]
    row['average_precision'] = float(average_precision_score(mask.ravel(), score_map.ravel()))
    return row, counts, dice_at_thresholds(score_map, mask, dice_thresholds)


def _full_map_pass(read, cases: List[str], threshold_cases: bool, samples: Dict[str, tuple], thresholds: np.ndarray,
                   max_fpr: float, dice_thresholds: np.ndarray) -> tuple:
    """Pass 2 over `cases` (the threshold cases or the held-out ones) -> ({case: row}, [PRO counts], [Dice at
    dice_thresholds]), both lists in case order."""
    rows, counts, dice_curves = {}, [], []
    for case in cases:
        row, case_counts, dice_curve = _case_metrics(case, *read(case), samples[case], thresholds, max_fpr,
                                                     dice_thresholds)
        rows[case] = {**row, 'threshold_case': threshold_cases}
        counts.append(case_counts)
        dice_curves.append(dice_curve)
    return rows, counts, dice_curves


def _set_dice(rows: Dict[str, Dict], dice_curves: List[np.ndarray], index: int) -> None:
    for row, curve in zip(rows.values(), dice_curves):
        row['dice'] = float(curve[index])


def _normal_row(case: str) -> Dict:
    """A normal scan (empty reference mask) is in no metric."""
    return {'case': case, 'pathological': False, 'n_lesion_voxels': 0, 'threshold_case': False,
            **{k: np.nan for k in PER_CASE_COLUMNS[4:]}}


def _summary(cases: List[str], rows: Dict[str, Dict], samples: Dict[str, tuple], counts: List, dice_threshold: float,
             max_fpr: float, settings: Dict) -> Dict:
    """The dataset's metrics from the per-case rows and samples (summary.json): Dice over the held-out cases."""
    pathological = sorted(samples)
    normal = [c for c in cases if c not in samples]
    threshold_cases = [c for c in pathological if rows[c]['threshold_case']]
    held_out_dice = [rows[c]['dice'] for c in pathological if not rows[c]['threshold_case']]
    labels, scores = _pooled(samples)
    return {
        'n_cases': len(cases), 'n_pathological': len(pathological), 'n_normal': len(normal), 'normal_cases': normal,
        'max_fpr': max_fpr,
        'auroc': pooled_sampled_auroc(list(samples.values())),
        'auroc_up_to_fpr': auroc_up_to_fpr(labels, scores, max_fpr),
        'aupro_up_to_fpr': aupro_from_counts(*zip(*counts), max_fpr=max_fpr),
        'auroc_per_case_mean': float(np.mean([rows[c]['auroc'] for c in pathological])),
        'average_precision_mean': float(np.mean([rows[c]['average_precision'] for c in pathological])),
        'dice_threshold': dice_threshold, 'threshold_cases': threshold_cases,
        'dice_threshold_cases_mean': float(np.mean([rows[c]['dice'] for c in threshold_cases])),
        'dice_mean': float(np.mean(held_out_dice)), 'dice_std': float(np.std(held_out_dice)),
        'settings': settings,
    }


def evaluate_anomaly_maps(pred_folder: str, ref_folder: str, output_folder: Optional[str] = None,
                          n_threshold_cases: int = 10, seed: int = 0, n_voxels: int = 1000, max_fpr: float = 0.3,
                          n_thresholds: int = 1000, file_ending: str = '.nii.gz', verbose: bool = True,
                          images_folder: Optional[str] = None, whole_image: bool = False) -> Dict:
    """Scores every `<case>` map of pred_folder against ref_folder/<case>; writes the per-case CSV and summary.json.

    Region: with images_folder (the CTs `<case>.nii.gz` or `<case>_0000.nii.gz` the maps were predicted from) and
    not whole_image, only the patient's body (`body_mask_hu`) counts: normal voxels are drawn from body & ~mask,
    AUPRO's false positives are body voxels, AP and Dice are over body | mask (lesion voxels outside the body still
    count). Otherwise the whole image grid counts, air included (summary['settings']['region']).

    Cases with an empty reference mask are normal scans: they have no pathological voxels to sample, so they are
    left out of every metric (listed in summary.json). For the other cases:
    - AUROC (the paper's number): n_voxels inside + n_voxels outside the mask per image, pooled over all images;
      AUROC up to max_fpr from the same samples; per-case AUROCs from each image's own samples.
    - AUPRO up to max_fpr: all voxels, PRO curve over all lesions of all images at n_thresholds thresholds.
    - Dice: the threshold maximising the mean Dice of n_threshold_cases pathological cases (seeded choice) is fixed
      and applied to all cases; the summary's dice_mean/dice_std are over the other (held-out) cases.
    Returns the summary dict. output_folder defaults to pred_folder.
    """
    if n_threshold_cases < 1:
        raise ScreenerInputError(f'n_threshold_cases must be >= 1, got {n_threshold_cases}')
    output_folder = pred_folder if output_folder is None else output_folder
    outputs = (PER_CASE_FILE, SUMMARY_FILE)
    check_output_folder(output_folder, outputs)
    cases = _case_names(pred_folder, ref_folder, file_ending)
    use_body = images_folder is not None and not whole_image
    image_files = _image_files(images_folder, cases, file_ending) if use_body else {}
    if verbose and images_folder is None and not whole_image:
        print('nnScreener_evaluate warning: no -images given, so the whole image counts and the air around the '
              'patient is "normal" (inflates AUROC/AUPRO); the paper\'s body-only numbers need -images <CT folder>',
              file=sys.stderr)
    bodies = {}  # the bodies _read_case keeps between the two passes

    def read(case):
        return _read_case(pred_folder, ref_folder, case, file_ending, image_files.get(case), bodies)

    rng = np.random.default_rng(seed)  # the voxel samples first, then the threshold cases: one stream, in this order
    samples = _sample_cases(read, cases, n_voxels, rng, image_files)
    pathological = sorted(samples)
    threshold_cases = _threshold_cases(pathological, n_threshold_cases, rng, ref_folder)
    held_out = [c for c in pathological if c not in threshold_cases]
    labels, scores = _pooled(samples)
    thresholds = pro_thresholds(scores[labels == 0], scores[labels == 1], max_fpr, n_thresholds)

    # pass 2: the threshold cases first, because the held-out ones need the Dice threshold chosen on them
    candidates = dice_candidates(np.concatenate([samples[c][1][samples[c][0] == 1] for c in threshold_cases]),
                                 n_thresholds)
    rows, counts, dice_curves = _full_map_pass(read, threshold_cases, True, samples, thresholds, max_fpr,
                                                candidates)
    dice_threshold, _ = best_threshold_from_curves(candidates, dice_curves)
    _set_dice(rows, dice_curves, int(np.searchsorted(candidates, dice_threshold)))
    held_out_rows, held_out_counts, held_out_dice = _full_map_pass(read, held_out, False, samples, thresholds,
                                                                   max_fpr, np.array([dice_threshold]))
    _set_dice(held_out_rows, held_out_dice, 0)
    rows.update(held_out_rows)
    rows.update({c: _normal_row(c) for c in cases if c not in samples})

    settings = {'n_voxels_per_side': n_voxels, 'seed': seed, 'n_thresholds': n_thresholds,
                'n_threshold_cases': n_threshold_cases, 'connectivity': 26, 'file_ending': file_ending,
                'pred_folder': os.path.abspath(pred_folder), 'ref_folder': os.path.abspath(ref_folder),
                'region': 'body' if use_body else 'whole_image',
                'images_folder': os.path.abspath(images_folder) if use_body else None}
    summary = _summary(cases, rows, samples, counts + held_out_counts, dice_threshold, max_fpr, settings)
    with output_folder_lock(output_folder):  # the default output folder is the maps folder a predict may hold
        claim_outputs(output_folder, outputs)
        atomic_save_text(_per_case_csv([rows[c] for c in cases]), os.path.join(output_folder, PER_CASE_FILE))
        atomic_save_json(json_ready(summary), os.path.join(output_folder, SUMMARY_FILE))
    if verbose:
        _print_summary(summary)
    return summary


@exit_on_input_error
def evaluate_entry():
    parser = argument_parser('Evaluate Screener anomaly maps against pathology masks: voxel AUROC '
                             '(sampled, pooled), AUROC/AUPRO up to FPR 0.3, AP, Dice at a '
                             'threshold fixed on a few pathological cases.')
    parser.add_argument('-pred', required=True, help='folder with <case>.nii.gz float anomaly maps')
    parser.add_argument('-ref', required=True, help='folder with <case>.nii.gz reference masks (> 0 = pathology)')
    parser.add_argument('-o', default=None, help='output folder for metrics_per_case.csv and summary.json '
                                                 '(default: the -pred folder)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the voxel sampling and threshold-case choice')
    parser.add_argument('--n_threshold_cases', type=int, default=10,
                        help='pathological cases used to choose the Dice threshold (paper: 10)')
    parser.add_argument('--n_voxels', type=int, default=1000,
                        help='voxels sampled inside and outside the mask per image (paper: 1000)')
    parser.add_argument('--max_fpr', type=float, default=0.3, help='FPR limit of AUROC/AUPRO (paper: 0.3)')
    parser.add_argument('-images', default=None,
                        help='folder with the CTs (<case>.nii.gz or <case>_0000.nii.gz) the maps were predicted '
                             'from: metrics in the patient\'s body only, as in the paper (recommended)')
    parser.add_argument('--whole_image', action='store_true',
                        help='count every voxel of the image grid, air around the patient included (-images unused)')
    args = parser.parse_args()
    evaluate_anomaly_maps(args.pred, args.ref, args.o, n_threshold_cases=args.n_threshold_cases, seed=args.seed,
                          n_voxels=args.n_voxels, max_fpr=args.max_fpr, images_folder=args.images,
                          whole_image=args.whole_image)


def map_agreement(folder_a: str, folder_b: str, file_ending: str = '.nii.gz',
                  images_folder: Optional[str] = None) -> Dict[str, float]:
    """Pearson r between two sets of anomaly maps of the same cases (e.g. distilled vs modular), pooled over the
    voxels and the mean of the per-case r; with images_folder over the body voxels only (outside it both maps hold
    their body minimum, which would inflate r)."""
    from scipy.stats import pearsonr
    cases = _case_names(folder_a, folder_b, file_ending)
    images = _image_files(images_folder, cases, file_ending) if images_folder else {}
    maps = []
    for case in cases:
        pair = [sitk.GetArrayFromImage(read_image(os.path.join(f, case + file_ending))) for f in (folder_a, folder_b)]
        if case in images:
            body = body_mask_of_image(read_image(images[case]))
            pair = [m[body] for m in pair]
        maps.append([m.ravel() for m in pair])
    per_case = [pearsonr(a, b)[0] for a, b in maps]
    pooled = pearsonr(np.concatenate([a for a, _ in maps]), np.concatenate([b for _, b in maps]))[0]
    return {'pearson_r_pooled': float(pooled), 'pearson_r_mean_per_case': float(np.mean(per_case)),
            'n_cases': len(cases), 'region': 'body' if images else 'whole_image'}
