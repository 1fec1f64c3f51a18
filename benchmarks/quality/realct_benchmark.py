"""Real-CT benchmark: Screener anomaly maps of the real scans in ../shared/realct, scored against the sarcoma masks.

    python benchmarks/quality/realct_benchmark.py --work /tmp/realct_bench --device cpu \\
        --phantom_results /tmp/demo/run/nnUNet_results --phantom_dataset 501

Everything lives under --work, with its own nnUNet_raw / _preprocessed / _results; re-running resumes (finished
steps are skipped, interrupted trainings continue). Steps:
  1 datasets   Dataset510_RealCTSarcoma: every <case>_ct.nii.gz with a <case>_gtv.nii.gz tumour mask (the three
               soft-tissue-sarcoma thigh CTs; labeled target); Dataset511_RealCTPretrain: every other CT, image-only
  2 plan       nnScreener plans and preprocessing; the Screener cache trains on the -pretrain_d scans only, so the
               sarcoma scans are held out of pretraining (checked)
  3 pretrain   descriptor -> condition -> density -> distillation on the pretraining scans
  4 predict    modular and distilled maps of every real CT with (a) this "realct" model and (b) a "phantom" model
               (--phantom_results, e.g. the nnScreener_demo's nnUNet_results; skipped if not given)
  5 evaluate   nnScreener_evaluate -images against the tumour masks (body-only pooled voxel AUROC, AUROC up to
               FPR 0.3, per-scan AUROC), plus two numbers over every body voxel (body_mask_hu): the AUROC of tumour
               vs the rest of the body, and the percentile of the median tumour score among the other body voxels
  6 overlays   PNGs of the 3 highest-scoring slices per scan, tumour contour in cyan
  7 report     realct_results.json and realct_results.md in --out (default <work>/results); the table is printed
"""
import argparse
import csv
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from os.path import abspath, dirname, isdir, isfile, join

import numpy as np
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from scipy.stats import percentileofscore
from sklearn.metrics import roc_auc_score

from nnscreener.evaluation.evaluate import PER_CASE_FILE, evaluate_anomaly_maps, json_ready
from nnscreener.inference.anomaly_maps import case_name, save_case_overlay
from nnscreener.preprocessing.body import body_mask_of_image
from nnscreener.inference.overlays import HEAT_PERCENTILES
from nnscreener.inference.predict import predict
from nnscreener.planners.presets import PRESETS
from nnscreener.planners.screener_planner import CONFIGURATION, SCREENER_PLANS_NAME
from nnscreener.preprocessing.plan_and_preprocess import plan_and_preprocess
from nnscreener.preprocessing.screener_cache import ScreenerCache, screener_cache_folder
from nnscreener.run.pretrain import pretrain
from nnscreener.training.stages import STAGE_TRAINERS, stage_checkpoint, stage_folder
from nnscreener.utilities.errors import ScreenerInputError, exit_on_input_error
from nnscreener.utilities.io import atomic_save_json, atomic_save_text
from nnscreener.utilities.paths import dataset_name

TARGET_ID, PRETRAIN_ID = 510, 511
TARGET_NAME, PRETRAIN_NAME = f'Dataset{TARGET_ID}_RealCTSarcoma', f'Dataset{PRETRAIN_ID}_RealCTPretrain'
DEFAULT_REALCT = join(dirname(abspath(__file__)), '..', '..', '..', 'shared', 'realct')
CT_SUFFIX, MASK_SUFFIX, FILE_ENDING = '_ct', '_gtv', '.nii.gz'
NNUNET_ENV = ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')
KINDS = ('modular', 'distilled')


# ---------------------------------------------------------------- step 1: raw datasets
def find_realct_scans(realct: str) -> tuple:
    """-> ({case: (ct, tumour mask)} of the scans with a mask, {case: ct} of the others). A CT is every file with
    '_ct' in its name (not the organ segmentations); its mask is the file with '_ct' replaced by '_gtv'."""
    if not isdir(realct):
        raise ScreenerInputError(f'{realct} does not exist: pass --realct /path/to/shared/realct')
    cts = sorted(join(realct, f) for f in os.listdir(realct) if f.endswith(FILE_ENDING) and CT_SUFFIX in f)
    labeled, unlabeled = {}, {}
    for ct in cts:
        mask = ct[:-len(CT_SUFFIX + FILE_ENDING)] + MASK_SUFFIX + FILE_ENDING
        if ct.endswith(CT_SUFFIX + FILE_ENDING) and isfile(mask):
            labeled[case_name(ct)[:-len(CT_SUFFIX)]] = (ct, mask)
        else:
            unlabeled[case_name(ct)] = ct
    if len(labeled) < 2 or not unlabeled:
        raise ScreenerInputError(f'{realct} needs >= 2 CTs with a *_gtv mask and >= 1 without (found {len(labeled)} '
                                 f'and {len(unlabeled)}): is it the shared/realct folder?')
    return labeled, unlabeled


def write_raw_datasets(labeled: dict, unlabeled: dict) -> list:
    """Writes both raw datasets (CTs symlinked, masks symlinked or, if needed, put on the CT grid); returns notes on
    masks that had to be changed. Existing datasets are kept (resume)."""
    raw = os.environ['nnUNet_raw']
    if not isdir(join(raw, TARGET_NAME)):
        def fill(tmp):
            notes = []
            for case, (ct, mask) in labeled.items():
                _link(ct, join(tmp, 'imagesTr', f'{case}_0000{FILE_ENDING}'))
                note = mask_on_ct_grid(ct, mask, join(tmp, 'labelsTr', case + FILE_ENDING))
                notes += [note] if note else []
            return {'labels': {'background': 0, 'tumour': 1}, 'numTraining': len(labeled),
                    'description': 'soft-tissue sarcoma thigh CTs (TCIA, CC BY 3.0) with GTV masks, from '
                                   'shared/realct', 'nnscreener_realct_notes': notes}
        _write_dataset(raw, TARGET_NAME, ['imagesTr', 'labelsTr'], fill)
    if not isdir(join(raw, PRETRAIN_NAME)):
        def fill(tmp):
            for case, ct in unlabeled.items():
                _link(ct, join(tmp, 'imagesTr', f'{case}_0000{FILE_ENDING}'))
            return {'labels': {'background': 0}, 'numTraining': len(unlabeled),
                    'description': 'real CTs of shared/realct without tumour masks; image-only pretraining data'}
        _write_dataset(raw, PRETRAIN_NAME, ['imagesTr'], fill)
    return load_json(join(raw, TARGET_NAME, 'dataset.json'))['nnscreener_realct_notes']


def _link(source: str, link: str) -> None:
    os.symlink(abspath(source), link)  # never copy or modify the shared scans


def _write_dataset(raw: str, name: str, subfolders: list, fill) -> None:
    """Fill a hidden temporary folder, then rename it: a crash never leaves a half-written dataset."""
    tmp = tempfile.mkdtemp(prefix=f'.{name}.', dir=raw)
    try:
        for sub in subfolders:
            os.makedirs(join(tmp, sub))
        dataset = {'channel_names': {'0': 'CT'}, 'file_ending': FILE_ENDING, 'name': name, **fill(tmp)}
        atomic_save_json(dataset, join(tmp, 'dataset.json'))
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        os.rename(tmp, join(raw, name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def mask_on_ct_grid(ct_file: str, mask_file: str, out_file: str):
    """Symlinks a binary mask on the CT's grid; otherwise writes it resampled (nearest neighbour) onto the grid and
    binarised (> 0). Returns a note saying what was changed, or None."""
    ct, mask = sitk.ReadImage(ct_file), sitk.ReadImage(mask_file)
    same_grid = (ct.GetSize() == mask.GetSize() and np.allclose(ct.GetSpacing(), mask.GetSpacing(), atol=1e-4)
                 and np.allclose(ct.GetOrigin(), mask.GetOrigin(), atol=1e-3)
                 and np.allclose(ct.GetDirection(), mask.GetDirection(), atol=1e-4))
    values = np.unique(sitk.GetArrayViewFromImage(mask))
    if same_grid and set(values.tolist()) <= {0, 1}:
        _link(mask_file, out_file)
        return None
    if not same_grid:
        mask = sitk.Resample(mask, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    binary = sitk.GetImageFromArray((sitk.GetArrayViewFromImage(mask) > 0).astype(np.uint8))
    binary.CopyInformation(ct)
    sitk.WriteImage(binary, out_file, True)
    return (f'{os.path.basename(mask_file)}: ' + ('resampled onto the CT grid (nearest neighbour), ' if not same_grid
                                                  else '') + f'binarised > 0 (values were {values.tolist()[:6]})')


# ---------------------------------------------------------------- step 2: plans, and the held-out check
def pretraining_cases() -> list:
    """The Screener cache keys the models train on; refuses if a target (sarcoma) scan is among them."""
    folder = join(os.environ['nnUNet_preprocessed'], TARGET_NAME)
    plans_manager = PlansManager(join(folder, SCREENER_PLANS_NAME + '.json'))
    keys = ScreenerCache(screener_cache_folder(folder, plans_manager.get_configuration(CONFIGURATION))).pretraining_keys
    leaked = [k for k in keys if k.startswith(TARGET_NAME + '/')]
    if leaked:
        raise RuntimeError(f'the sarcoma scans {leaked} are in the pretraining set: they would not be held out')
    return keys


# ---------------------------------------------------------------- step 4: maps
@contextmanager
def results_folder(folder: str):
    """predict() finds the model through $nnUNet_results. nnUNet_raw / _preprocessed are hidden meanwhile, so a
    dataset id of the other model's world cannot clash with the one asked for."""
    saved = {k: os.environ.pop(k, None) for k in NNUNET_ENV}
    os.environ['nnUNet_results'] = folder
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def model_info(results: str, dataset) -> dict:
    with results_folder(results):
        name = str(dataset_name(dataset))  # nnU-Net returns a numpy string
        plans = join(dirname(stage_folder(name, 'density')), 'plans.json')
        screener = load_json(plans)['screener'] if isfile(plans) else {}
    # presets get retuned: the steps each stage was planned with say what "tiny_long" meant for this model
    return {'nnUNet_results': abspath(results), 'dataset': name, 'preset': screener.get('preset'),
            'num_steps': {s: screener[s]['num_steps'] for s in ('ssl', 'density', 'distillation') if s in screener}}


# ---------------------------------------------------------------- step 5: evaluation
def tumour_ranks(ct_file: str, map_file: str, mask_file: str) -> dict:
    """Body-only numbers (body = `body_mask_hu`: the patient with lungs and gas, without table and room air) a person
    can read:
    auroc_body: tumour voxels vs the other body voxels, every voxel (no air outside the body as easy negatives);
    tumour_median_percentile: % of the other body voxels scoring below the tumour's median score (50 = chance);
    tumour_above_heat_fraction: fraction of tumour voxels above the other body voxels' 95th percentile (the overlays
    colour roughly these); tumour_fraction_of_body: how much of the scanned body is tumour."""
    images = [sitk.ReadImage(f) for f in (ct_file, map_file, mask_file)]
    ct, anomaly_map, tumour = (sitk.GetArrayFromImage(i) for i in images)
    tumour = tumour > 0
    body = body_mask_of_image(images[0])
    rest = anomaly_map[body & ~tumour]
    inside = anomaly_map[tumour]
    labels = np.concatenate([np.ones(inside.size), np.zeros(rest.size)])
    return {'auroc_body': float(roc_auc_score(labels, np.concatenate([inside, rest]))),
            'tumour_median_percentile': float(percentileofscore(rest, np.median(inside), kind='mean')),
            'tumour_above_heat_fraction': float(np.mean(inside > np.percentile(rest, HEAT_PERCENTILES[0]))),
            'tumour_fraction_of_body': float(tumour.sum() / max(1, (body | tumour).sum()))}


def evaluate_maps(maps: str, labeled: dict, masks: dict, eval_folder: str) -> dict:
    """nnScreener_evaluate on the sarcoma maps only (symlinked, with masks named like the maps), plus the body-only
    numbers of `tumour_ranks`."""
    pred, ref, images = (join(eval_folder, f) for f in ('maps', 'reference', 'images'))
    shutil.rmtree(eval_folder, ignore_errors=True)
    for folder in (pred, ref, images):
        os.makedirs(folder)
    per_scan = {}
    for case, (ct, _) in labeled.items():
        name = case_name(ct)
        _link(join(maps, name + FILE_ENDING), join(pred, name + FILE_ENDING))
        _link(masks[case], join(ref, name + FILE_ENDING))
        _link(ct, join(images, name + FILE_ENDING))
        per_scan[name] = tumour_ranks(ct, join(maps, name + FILE_ENDING), masks[case])
    summary = evaluate_anomaly_maps(pred, ref, eval_folder, n_threshold_cases=1, verbose=False,
                                    images_folder=images)
    with open(join(eval_folder, PER_CASE_FILE), newline='') as f:
        for row in csv.DictReader(f):
            per_scan[row['case']].update({k: float(row[k]) for k in ('auroc', 'auroc_up_to_fpr', 'dice')})
    keys = ('auroc', 'auroc_up_to_fpr', 'aupro_up_to_fpr', 'auroc_per_case_mean', 'average_precision_mean',
            'dice_threshold', 'threshold_cases', 'dice_mean')
    return {**{k: summary[k] for k in keys}, 'per_scan': per_scan, 'evaluation': abspath(eval_folder)}


# ---------------------------------------------------------------- report
def markdown_table(results: list, cases: list) -> str:
    head = (['model', 'kind', 'pooled AUROC', 'AUROC@FPR0.3'] + [f'AUROC {c}' for c in cases] +
            ['body AUROC (per scan)', 'tumour median percentile (per scan)'])
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in results:
        scans = [r['per_scan'][c] for c in cases]
        cells = [r['model'], r['kind'], f"{r['auroc']:.3f}", f"{r['auroc_up_to_fpr']:.3f}"]
        cells += [f"{s['auroc']:.3f}" for s in scans]
        cells += [' / '.join(f"{s['auroc_body']:.2f}" for s in scans),
                  ' / '.join(f"{s['tumour_median_percentile']:.0f}" for s in scans)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def markdown_report(report: dict) -> str:
    cases = sorted(report['results'][0]['per_scan']) if report['results'] else []
    steps = ', '.join(f"{k} {_seconds(v['work_s'])}" + (' (earlier run)' if v['done_earlier'] else '')
                      for k, v in report['steps'].items())
    scans = sorted({c for r in report['results'] for c in r['scan_scores']})
    score_head = ['scan'] + [f"{r['model']} {r['kind']}" for r in report['results']]
    score_lines = ['| ' + ' | '.join(score_head) + ' |', '|' + '---|' * len(score_head)]
    score_lines += ['| ' + ' | '.join([c] + [f"{r['scan_scores'][c]:.3g}" for r in report['results']]) + ' |'
                    for c in scans]
    return '\n'.join([
        '# Real-CT benchmark', '',
        f"`{report['command']}`", '',
        f"Device: {report['device']['summary']}; preset {report['preset']}, seed {report['seed']}; "
        f"this run {report['total_wall_s']:.0f} s. Steps (wall time of the run that did the work): {steps}.", '',
        'AUROCs against the sarcoma GTV masks (normal voxels sampled from the body, as nnScreener_evaluate -images). '
        'Body AUROC: tumour vs every other body voxel. Tumour median percentile: % of the other body voxels '
        'scoring below the median tumour voxel (50 = chance).', '',
        markdown_table(report['results'], cases), '',
        'Scan scores (99.5th percentile of the map inside the body) of every real CT:', '',
        '\n'.join(score_lines), ''])


def _seconds(value) -> str:
    return 'unknown' if value is None else f'{value:.0f} s'


def device_info(device: str) -> dict:
    info = {'device': device, 'torch': torch.__version__, 'cpu': platform.processor() or platform.machine(),
            'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads()}
    if device == 'cuda':
        info['gpu'] = torch.cuda.get_device_name()
    info['summary'] = (info.get('gpu') or f"CPU ({info['cpu']}, {info['torch_threads']} torch threads of "
                                          f"{info['cpu_count']} cores)") + f", torch {info['torch']}"
    return info


# ---------------------------------------------------------------- driver
class Steps:
    """Wall time of each step. `wall_s`: in this run; `done_earlier`: its outputs were complete at the start;
    `work_s`: in the run that did the step's work (this one, or an earlier one of a resumed benchmark: kept in
    `record_file`, so a crash after hours of pretraining does not lose its times)."""

    def __init__(self, record_file: str):
        self.record_file, self.times = record_file, {}
        self.work = load_json(record_file) if isfile(record_file) else {}

    @contextmanager
    def __call__(self, name: str, done_earlier: bool = False):
        print(f'\n======== real-CT benchmark: {name}' + (' (done earlier)' if done_earlier else '') + ' ========',
              flush=True)
        start = time.perf_counter()
        yield
        wall = round(time.perf_counter() - start, 1)
        if not done_earlier:
            self.work[name] = wall
            atomic_save_json(self.work, self.record_file)
        self.times[name] = {'wall_s': wall, 'done_earlier': done_earlier, 'work_s': self.work.get(name)}


def run_benchmark(args) -> dict:
    start = time.perf_counter()
    work = abspath(args.work)
    out = abspath(args.out or join(work, 'results'))
    for k in NNUNET_ENV:
        os.environ[k] = join(work, k)
        os.makedirs(os.environ[k], exist_ok=True)
    os.environ.setdefault('nnUNet_compile', 'false')
    labeled, unlabeled = find_realct_scans(abspath(args.realct))
    step = Steps(join(work, 'step_times.json'))

    with step('1 datasets', all(isdir(join(os.environ['nnUNet_raw'], n)) for n in (TARGET_NAME, PRETRAIN_NAME))):
        notes = write_raw_datasets(labeled, unlabeled)
    masks = {case: join(os.environ['nnUNet_raw'], TARGET_NAME, 'labelsTr', case + FILE_ENDING) for case in labeled}
    with step('2 plan and preprocess'):
        plan_and_preprocess(TARGET_ID, [PRETRAIN_ID], preset=args.preset, num_processes=args.num_processes,
                            allow_small_images=args.allow_small_images, continue_=True)
        pretrain_keys = pretraining_cases()
    for stage in STAGE_TRAINERS:
        with step(f'3 pretrain {stage}', isfile(stage_checkpoint(TARGET_NAME, stage))):
            pretrain(TARGET_ID, stages=(stage,), device=args.device, continue_=True, seed=args.seed)

    models = {'realct': model_info(os.environ['nnUNet_results'], TARGET_ID)}
    if args.phantom_results:
        models['phantom'] = model_info(abspath(args.phantom_results), args.phantom_dataset)
    else:
        print('no --phantom_results given: the phantom-trained model is skipped')
    scans = [ct for ct, _ in labeled.values()] + list(unlabeled.values())
    results = []
    for model, info in models.items():
        for kind in KINDS:
            tag = f'{model}_{kind}'
            maps = join(work, 'maps', tag)
            done = all(isfile(join(maps, case_name(f) + FILE_ENDING)) for f in scans)
            with step(f'4 predict {tag}', done), results_folder(info['nnUNet_results']):
                records = predict(scans, maps, info['dataset'], model=kind, device=args.device,
                                  step_size=args.step_size, batch_size=args.batch_size, overlays=0, continue_=True)
            with step(f'5 evaluate {tag}'):
                metrics = evaluate_maps(maps, labeled, masks, join(out, 'evaluation', tag))
            with step(f'6 overlays {tag}'):
                overlays = save_overlays(scans, labeled, masks, maps, join(out, 'overlays', tag))
            results.append({'model': model, 'kind': kind, **metrics, 'maps': maps, 'overlays': overlays,
                            'scan_scores': {r['case']: r['scan_score'] for r in records}})

    report = {'command': shlex.join([sys.executable] + sys.argv), 'device': device_info(args.device),
              'preset': args.preset, 'seed': args.seed, 'step_size': args.step_size, 'batch_size': args.batch_size,
              'realct': abspath(args.realct), 'work': work,
              'datasets': {'target': TARGET_NAME, 'target_cases': sorted(labeled), 'pretrain': PRETRAIN_NAME,
                           'pretrain_cases': sorted(unlabeled), 'pretraining_cache_keys': pretrain_keys,
                           'mask_notes': notes},
              'models': models, 'steps': step.times, 'results': results,
              'total_wall_s': round(time.perf_counter() - start, 1)}
    report = json_ready(report)
    atomic_save_json(report, join(out, 'realct_results.json'))
    if args.results_json:
        summary = issue_summary(report)
        if args.label:
            summary = labelled_into(load_json(args.results_json), summary, args.label)
        atomic_save_json(summary, args.results_json)
    text = markdown_report(report)
    atomic_save_text(text, join(out, 'realct_results.md'))
    print('\n' + text + f'\nwritten to {out}/realct_results.json and .md')
    return report


# the numbers before median-aggregated conditions (2026-12-01 09:52 UTC, tiny_long with the paper's conditions, the
# same body mask, CLAHE and evaluation), kept beside the new ones in realct_quality.json
BEFORE = {'realct_modular': {'STS_001_ct': (0.471, 44.8), 'STS_002_ct': (0.712, 71.2), 'STS_003_ct': (0.694, 74.1)},
          'realct_distilled': {'STS_001_ct': (0.420, 39.4), 'STS_002_ct': (0.791, 79.9), 'STS_003_ct': (0.729, 78.4)}}


def issue_summary(report: dict) -> dict:
    """benchmarks/results/realct_quality.json: per model and scan, body AUROC and the tumour median percentile."""
    models = {f"{r['model']}_{r['kind']}": {scan: {'body_auroc': v['auroc_body'],
                                                   'tumour_median_percentile': v['tumour_median_percentile']}
                                            for scan, v in r['per_scan'].items()} for r in report['results']}
    before = {m: {scan: {'body_auroc': a, 'tumour_median_percentile': p} for scan, (a, p) in scans.items()}
              for m, scans in BEFORE.items()}
    return {'preset': report['preset'], 'seed': report['seed'], 'command': report['command'],
            'machine': {'device': report['device']['summary'], 'torch': torch.__version__,
                        'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), 'command': report['command']},
            'models': models, 'before': before}


def labelled_into(existing: dict, summary: dict, label: str) -> dict:
    """`existing` with this run's models added as realct_<kind>_<label> and a note of what the label stands for, so
    a second preset is read beside the run the file holds (whose preset, seed and machine lines stay)."""
    merged = dict(existing)
    merged['models'] = {**existing['models'],
                        **{f'{model}_{label}': scans for model, scans in summary['models'].items()}}
    merged['note'] = (existing.get('note', '') + f"; realct_*_{label} = preset {summary['preset']}, seed "
                      f"{summary['seed']}, {summary['machine']['date']}, command: `{summary['command']}`").lstrip('; ')
    return merged


def save_overlays(scans: list, labeled: dict, masks: dict, maps: str, folder: str) -> str:
    """Top-3-slice overlay of every scan; the sarcoma scans with their tumour contour. Existing PNGs are kept."""
    mask_of = {ct: masks[case] for case, (ct, _) in labeled.items()}
    for ct in scans:
        png = join(folder, case_name(ct) + '.png')
        if not isfile(png):
            save_case_overlay(ct, join(maps, case_name(ct) + FILE_ENDING), png, n_slices=3, mask_file=mask_of.get(ct))
    return folder


@exit_on_input_error
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work', default='realct_bench', help='working folder (nnUNet_raw/_preprocessed/_results)')
    parser.add_argument('--out', default=None, help='results folder (default <work>/results)')
    parser.add_argument('--realct', default=DEFAULT_REALCT, help='the real scans (default ../shared/realct)')
    parser.add_argument('--preset', default='tiny_long', help=f'a preset ({", ".join(sorted(PRESETS))}), '
                                                                  f'optionally with :steps=N')
    parser.add_argument('--results_json', default=None, help='also write the per-scan summary here '
                                                             '(e.g. benchmarks/results/realct_quality.json)')
    parser.add_argument('--label', default=None,
                        help='add this run to the existing --results_json as realct_<kind>_<label> instead of '
                             'replacing it (e.g. --preset cpu --label cpu beside the tiny_long run)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        choices=['cuda', 'cpu', 'mps'])
    parser.add_argument('--seed', type=int, default=0, help='training seed of every pretraining stage')
    parser.add_argument('--phantom_results', default=None,
                        help='nnUNet_results folder of a phantom-trained Screener (e.g. <demo folder>/nnUNet_results)')
    parser.add_argument('--phantom_dataset', default='501', help='its dataset id or name (default 501)')
    parser.add_argument('--num_processes', type=int, default=2, help='preprocessing processes')
    parser.add_argument('--allow_small_images', action='store_true',
                        help='zero-pad scans smaller than the patch (needed for the default preset)')
    parser.add_argument('--step_size', type=float, default=0.5, help='sliding-window step, fraction of the patch')
    parser.add_argument('--batch_size', type=int, default=None,
                        help='patches per forward pass (default: 4 as nnScreener_predict; 32 on CPU, where the tiny '
                             'presets\' small batches are dominated by per-call overhead)')
    args = parser.parse_args()
    if args.batch_size is None:
        args.batch_size = 32 if args.device == 'cpu' else 4
    if args.phantom_dataset.isdigit():
        args.phantom_dataset = int(args.phantom_dataset)
    if args.label and not (args.results_json and isfile(args.results_json)):
        raise ScreenerInputError('--label adds this run to an existing --results_json: give that file')
    if args.phantom_results and not isdir(args.phantom_results):
        raise ScreenerInputError(f'--phantom_results {args.phantom_results} is not a folder (give an nnUNet_results)')
    run_benchmark(args)


if __name__ == '__main__':
    main()
