"""Unsupervised anomaly-map quality on CT phantoms, per lesion type and over training seeds (paper Tables 1 and 3).

    python benchmarks/quality/phantom_benchmark.py --work /tmp/quality --seeds 0 1 2 --device cpu

Fixed-seed phantoms: an image-only pretraining set (lesions in 15 % of cases) and a held-out labeled test set with
every lesion type. For each training seed, every method is pretrained, predicts the test set with
`nnScreener_predict`'s API (the density variants all at once, `predict_density_variants`) and is scored with
`nnScreener_evaluate`'s API on all lesions and on each lesion type (mask = that type; other lesions count as normal
tissue, as in the paper where a dataset's masks cover only its pathology). Writes phantom_quality.{json,md} and a
PNG of AUROC per lesion type to --out. Re-running resumes.
"""
import argparse
import os
import shutil
from os.path import isfile, join

import numpy as np
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import load_json
from matplotlib.figure import Figure

from nnscreener.evaluation.evaluate import evaluate_anomaly_maps, json_ready, map_agreement
from nnscreener.inference.predict import predict
from nnscreener.inference.variants import predict_density_variants
from nnscreener.phantoms.lesions import LESION_TYPES
from nnscreener.phantoms.make_phantoms import LESION_TYPES_FOLDER
from nnscreener.planners.presets import get_preset
from nnscreener.run.pretrain import pretrain
from nnscreener.utilities.io import atomic_path, atomic_save_json, atomic_save_text
from world import TARGET, fmt, machine, make_world, mean_sd, timed, use_results

# method -> (predict model kind, density-stage trainer); the Screener rows are the paper's ablations of Table 3, the
# first the model the preset plans (shown under its planned density model, `label`)
METHODS = {
    'Screener (learned cond. + Gaussian)': ('modular', None),
    'Screener (learned cond. + flow)': ('modular', 'nnScreenerDensityTrainer_flow'),
    'Screener (learned cond. + Gaussian variant)': ('modular', 'nnScreenerDensityTrainer_gaussian'),
    'Screener (no cond., marginal Gaussian)': ('modular', 'nnScreenerDensityTrainer_marginalGaussian'),
    'Screener (sin-cos cond. + Gaussian)': ('modular', 'nnScreenerDensityTrainer_sincosGaussian'),
    'Baseline: HU given position': ('intensity', 'nnScreenerIntensityTrainer'),
    'Baseline: 3D autoencoder': ('autoencoder', 'nnScreenerAutoencoderTrainer'),
    'Baseline: local contrast': ('local_contrast', None),
    'Screener distilled (UNet)': ('distilled', None),
}
SCREENER, DISTILLED = list(METHODS)[0], list(METHODS)[-1]
METHOD_IDS = dict(zip(METHODS, ('screener', 'flow', 'gaussian', 'marginal', 'sincos', 'intensity', 'autoencoder',
                                'local_contrast', 'distilled')))  # --methods
# keys of benchmarks/results/phantom_quality.json: the names for the two Screener models, else the trainer
RESULT_KEYS = {SCREENER: 'screener', DISTILLED: 'screener_distilled', 'Baseline: local contrast': 'local_contrast'}
# evaluation summary key -> (markdown title, key in the results JSON); all body-only (normal voxels from the body)
METRICS = {'auroc': ('voxel AUROC', 'auroc_body'), 'auroc_up_to_fpr': ('AUROC@FPR0.3', 'auroc_fpr03_body'),
           'aupro_up_to_fpr': ('AUPRO@FPR0.3', 'aupro_fpr03_body'), 'average_precision_mean': ('AP', 'ap'),
           'dice_mean': ('Dice (fixed threshold)', 'dice')}
ALL_LESIONS = 'all lesions'
PREDICT_BATCH = 32  # patches per forward pass: tiny-preset patches are small, per-call overhead dominates at 4


def slug(method: str) -> str:
    return ''.join(c if c.isalnum() else '_' for c in method).strip('_')


def train_methods(seed: int, device: str, timings: dict, methods) -> None:
    """The four Screener stages, then every other density-stage variant on the same descriptor and condition."""
    with timed(timings, 'pretrain: descriptor, condition, density, distillation'):
        pretrain(TARGET, device=device, continue_=True, seed=seed)
    for method in methods:
        trainer = METHODS[method][1]
        if trainer is not None:
            with timed(timings, f'train {method}'):
                pretrain(TARGET, stages=['density'], device=device, continue_=True, density_trainer=trainer,
                         seed=seed)


def type_references(raw: str, work: str) -> dict:
    """{lesion type name: (reference folder, [cases])}: masks of one type, for the cases that contain it."""
    types = {}
    for code, name in LESION_TYPES.items():
        folder = join(work, 'references_by_type', name)
        os.makedirs(folder, exist_ok=True)
        cases = []
        for f in sorted(os.listdir(join(raw, LESION_TYPES_FOLDER))):
            lesion_type = sitk.ReadImage(join(raw, LESION_TYPES_FOLDER, f))
            mask = sitk.GetArrayFromImage(lesion_type) == code
            if mask.any():
                cases.append(f[:-len('.nii.gz')])
                if not isfile(join(folder, f)):
                    image = sitk.GetImageFromArray(mask.astype(np.uint8))
                    image.CopyInformation(lesion_type)
                    with atomic_path(join(folder, f)) as tmp:
                        sitk.WriteImage(image, tmp, True)
        types[name] = (folder, cases)
    return types


def evaluate_method(maps: str, raw: str, types: dict) -> dict:
    """{ALL_LESIONS or type: summary}, body-only (the paper's way: normal voxels from the patient's body); per type
    on a folder of links to that type's cases' maps."""
    images = join(raw, 'imagesTr')
    results = {ALL_LESIONS: evaluate_anomaly_maps(maps, join(raw, 'labelsTr'), join(maps, 'evaluation'),
                                                  n_threshold_cases=5, verbose=False, images_folder=images)}
    for name, (reference, cases) in types.items():
        if len(cases) < 3:
            print(f'{name}: only {len(cases)} test case(s), not scored')
            continue
        subset = join(maps, 'by_type', name)
        shutil.rmtree(subset, ignore_errors=True)
        os.makedirs(subset)
        for case in cases:
            os.symlink(join(maps, case + '.nii.gz'), join(subset, case + '.nii.gz'))
        results[name] = evaluate_anomaly_maps(subset, reference, join(subset, 'evaluation'),
                                              n_threshold_cases=min(3, len(cases) - 2), verbose=False,
                                              images_folder=images)
    return results


def run_seed(seed: int, work: str, raw: str, types: dict, device: str, methods, tag: str = None) -> dict:
    """Trains and scores `methods` with training seed `seed`; `tag` (default seed<seed>) names the results and maps
    folders of this run."""
    tag = tag or f'seed{seed}'
    use_results(work, tag)
    timings = {}
    train_methods(seed, device, timings, methods)
    result = {'timings_s': timings, 'methods': {}}
    predict_settings = dict(batch_size=PREDICT_BATCH, overlays=2 if seed == 0 else 0, continue_=True,
                            reference_folder=join(raw, 'labelsTr'))
    modular = [m for m in methods if METHODS[m][0] == 'modular']
    if modular:
        with timed(timings, 'predict the density variants at once (shared descriptor and condition passes)'):
            predict_density_variants(join(raw, 'imagesTr'), {METHODS[m][1]: join(work, 'maps', tag, slug(m))
                                                             for m in modular}, TARGET, device, **predict_settings)
    for method in methods:
        kind, trainer = METHODS[method]
        maps = join(work, 'maps', tag, slug(method))
        if kind != 'modular':
            with timed(timings, f'predict {method}'):
                predict(join(raw, 'imagesTr'), maps, TARGET, kind, device if kind != 'local_contrast' else 'cpu',
                        **predict_settings)
        with timed(timings, f'evaluate {method}'):
            result['methods'][method] = evaluate_method(maps, raw, types)
    if SCREENER in methods and DISTILLED in methods:
        result['distilled_vs_modular'] = map_agreement(join(work, 'maps', tag, slug(SCREENER)),
                                                       join(work, 'maps', tag, slug(DISTILLED)),
                                                       images_folder=join(raw, 'imagesTr'))
    return result


def finished_seeds(results_file: str, settings: dict) -> dict:
    """{seed: result} of an earlier run's results file made with the same world and methods: a resumed run does not
    train, predict and score a finished seed again."""
    if not isfile(results_file):
        return {}
    earlier = load_json(results_file)
    same = ('preset', 'n_pretrain', 'n_test', 'phantom_seed', 'methods')
    if any(earlier['settings'].get(k) != settings[k] for k in same):
        return {}
    return {int(seed): result for seed, result in earlier['per_seed'].items()}


def carried_over(results_file: str, settings: dict) -> dict:
    """The per-seed results of the methods an earlier run scored and this one does not run, recorded in
    `settings['carried_over']`; the earlier run must have used the same phantoms and scored every requested seed."""
    earlier = load_json(results_file)
    same = ('n_pretrain', 'n_test', 'phantom_seed')
    methods = [m for m in earlier['settings']['methods'] if m not in settings['methods']]
    missing = [s for s in settings['seeds'] if str(s) not in earlier['per_seed']]
    if any(earlier['settings'].get(k) != settings[k] for k in same) or missing:
        raise SystemExit(f'{results_file}: other phantoms ({same}) or seeds {missing} not scored there')
    settings['carried_over'] = {'file': os.path.abspath(results_file), 'methods': methods,
                                'date': earlier['settings']['machine']['date'], 'preset': earlier['settings']['preset']}
    return {'methods': methods, 'per_seed': earlier['per_seed']}


def aggregate(per_seed: dict, methods) -> dict:
    """{method: {group: {metric: mean_sd over seeds}}}."""
    table = {}
    for method in methods:
        groups = {}
        for seed_result in per_seed.values():
            for group, summary in seed_result['methods'][method].items():
                for metric in METRICS:
                    groups.setdefault(group, {}).setdefault(metric, []).append(summary[metric])
        table[method] = {g: {m: mean_sd(v) for m, v in metrics.items()} for g, metrics in groups.items()}
    return table


# the default Screener row under a preset that plans another density model than its internal name says
PLANNED_LABELS = {'conditional_flow': 'learned cond. + flow', 'gaussian': 'no cond., marginal Gaussian',
                  'flow': 'no cond., marginal flow'}


def label(method: str, preset: str) -> str:
    """The method's name in tables: the default Screener row names the density model the preset plans (the runs'
    results keep the internal name, so their seeds stay comparable across presets)."""
    model = get_preset(preset)['density']['model']
    if method != SCREENER or model not in PLANNED_LABELS:
        return method
    return f'Screener ({PLANNED_LABELS[model]}, as planned)'


def results_json(table: dict, settings: dict, per_seed: dict) -> dict:
    """benchmarks/results/phantom_quality.json: means (and `<metric>_sd`, sample sd) over the seeds scored so far,
    body-only, keyed as the issue asks; the body AUROC of each seed too, in the order of `seeds`, since A/Bs on the
    same world are read seed by seed."""
    methods = {}
    for method, groups in table.items():
        key = RESULT_KEYS.get(method) or METHODS[method][1]
        methods[key] = {('all' if g == ALL_LESIONS else g): {
            **{METRICS[m][1]: stats[m]['mean'] for m in METRICS},
            **{METRICS[m][1] + '_sd': stats[m]['sd'] for m in METRICS},
            'auroc_body_per_seed': [per_seed[s]['methods'][method][g]['auroc'] for s in sorted(per_seed)]}
            for g, stats in groups.items()}
        methods[key]['method'] = label(method, settings['preset'])
    agreement = [r['distilled_vs_modular']['pearson_r_pooled'] for r in per_seed.values() if 'distilled_vs_modular' in r]
    return {'preset': settings['preset'], 'seeds': sorted(per_seed), 'methods': methods,
            'distilled_vs_modular_pearson_r': mean_sd(agreement)['mean'], 'evaluation': 'body-only',
            'settings': settings}


def markdown(table: dict, per_seed: dict, settings: dict) -> str:
    first = next(iter(table))
    groups = [ALL_LESIONS] + [n for n in LESION_TYPES.values() if n in table[first]]
    seeds = sorted(per_seed)
    lines = [f"Phantom benchmark: {settings['n_pretrain']} pretraining / {settings['n_test']} test phantoms "
             f"(phantom seed 0), preset `{settings['preset']}`, training seeds {seeds}, {settings['machine']['device']}"
             f", {settings['machine']['date']}. Body-only metrics (normal voxels from the patient's body). "
             f"Mean ± sd over seeds.", '']
    for metric, (title, _) in METRICS.items():
        lines += [f'**{title}**', '', '| Method | ' + ' | '.join(groups) + ' |', '|---' * (len(groups) + 1) + '|']
        for method, row in table.items():
            lines.append(f"| {label(method, settings['preset'])} | "
                         + ' | '.join(fmt(row[g][metric]) if g in row else '-' for g in groups) + ' |')
        lines.append('')
    if all('distilled_vs_modular' in per_seed[s] for s in seeds):
        agreement = mean_sd([per_seed[s]['distilled_vs_modular']['pearson_r_pooled'] for s in seeds])
        lines.append(f'Distilled vs modular map agreement: Pearson r (pooled voxels) {fmt(agreement)}.')
    counts = {g: per_seed[seeds[0]]['methods'][first][g]['n_pathological'] for g in groups}
    lines.append('Test cases per group: ' + ', '.join(f'{g} {n}' for g, n in counts.items()) + '.')
    return '\n'.join(lines) + '\n'


def plot(table: dict, preset: str, out_png: str) -> None:
    groups = [g for g in [ALL_LESIONS, *LESION_TYPES.values()] if g in table[next(iter(table))]]
    figure = Figure(figsize=(2.0 + 1.6 * len(groups), 5.0))
    axes = figure.subplots()
    width = 0.8 / len(table)
    for i, (method, row) in enumerate(table.items()):
        means = [row[g]['auroc']['mean'] if g in row else np.nan for g in groups]
        sds = [row[g]['auroc']['sd'] if g in row else 0 for g in groups]
        axes.bar(np.arange(len(groups)) + i * width - 0.4 + width / 2, means, width, yerr=sds,
                 label=label(method, preset), capsize=2)
    axes.axhline(0.5, color='grey', lw=0.8, ls='--')
    axes.set_xticks(np.arange(len(groups)), [g.replace('_', '\n') for g in groups], fontsize=8)
    axes.set_ylabel('body voxel AUROC (mean ± sd over seeds)')
    axes.set_ylim(0.3, 1.0)
    axes.legend(fontsize=7, ncol=4, loc='upper center', bbox_to_anchor=(0.5, -0.2))
    figure.tight_layout()
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, dpi=120, format='png')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work', required=True, help='work folder (nnU-Net folders, maps); resumable')
    parser.add_argument('--out', default=None, help='results folder (default <work>/results)')
    parser.add_argument('--preset', default='tiny_long', help='nnscreener preset (tiny_long: CPU scale)')
    parser.add_argument('--n_pretrain', type=int, default=48, help='unlabeled pretraining phantoms')
    parser.add_argument('--n_test', type=int, default=42, help='labeled test phantoms (every lesion type)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='training seeds')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('-np', type=int, default=2, help='processes for phantoms and preprocessing')
    parser.add_argument('--methods', nargs='+', default=None, choices=list(METHOD_IDS.values()),
                        help='a subset of the methods (default: all)')
    parser.add_argument('--carry_over', default=None,
                        help="an earlier run's <work>/results/phantom_quality.json: the methods not in --methods are "
                             "taken from it, seed by seed (for methods whose code path a change did not touch)")
    parser.add_argument('--results_json', default=None,
                        help='also write the issue-format summary here (e.g. benchmarks/results/phantom_quality.json)')
    args = parser.parse_args()
    methods = [m for m in METHODS if args.methods is None or METHOD_IDS[m] in args.methods]
    out = args.out or join(args.work, 'results')
    os.makedirs(out, exist_ok=True)
    settings = {'preset': args.preset, 'n_pretrain': args.n_pretrain, 'n_test': args.n_test, 'seeds': args.seeds,
                'phantom_seed': 0, 'machine': machine(), 'methods': methods}
    timings = {}
    with timed(timings, 'phantoms, planning, preprocessing'):
        raw = make_world(args.work, args.preset, args.n_pretrain, args.n_test, num_processes=args.np)
        types = type_references(raw, args.work)
    carried = carried_over(args.carry_over, settings) if args.carry_over else {}
    shown = [m for m in METHODS if m in methods or m in carried.get('methods', [])]
    finished = finished_seeds(join(out, 'phantom_quality.json'), settings)
    per_seed = {}
    for seed in args.seeds:
        if seed in finished:
            print(f'seed {seed}: scored by an earlier run of the same settings, kept')
            per_seed[seed] = finished[seed]
        else:
            with timed(timings, f'seed {seed}'):
                per_seed[seed] = run_seed(seed, args.work, raw, types, args.device, methods)
        if carried:
            per_seed[seed]['methods'].update({m: carried['per_seed'][str(seed)]['methods'][m]
                                              for m in carried['methods']})
        table = aggregate(per_seed, shown)  # after every seed, so a long run shows results early
        atomic_save_json(json_ready({'settings': settings, 'timings_s': timings, 'table': table,
                                     'per_seed': per_seed}), join(out, 'phantom_quality.json'))
        atomic_save_text(markdown(table, per_seed, settings), join(out, 'phantom_quality.md'))
        plot(table, args.preset, join(out, 'phantom_quality_auroc.png'))
        if args.results_json:
            atomic_save_json(json_ready(results_json(table, settings, per_seed)), args.results_json)
    print(open(join(out, 'phantom_quality.md')).read())
    print(f'wall time: ' + ', '.join(f'{k} {v / 60:.1f} min' for k, v in timings.items()))


if __name__ == '__main__':
    main()
