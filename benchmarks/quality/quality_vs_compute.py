"""Map quality against training compute: the Screener (modular and distilled) trained at several step budgets of the
`tiny` and `cpu` presets on the phantom benchmark's world, scored body-only on its test set.

    python benchmarks/quality/quality_vs_compute.py --work /tmp/qvc --device cpu \
        --budgets tiny:steps=100 tiny:steps=300 tiny:steps=900 tiny:steps=2700 cpu:steps=300 cpu:steps=600 cpu:steps=1200

A budget is a preset with every stage trained N steps (`nnscreener.planners.presets.get_preset`); its compute is the
steps times the per-step cost measured by benchmarks/speed on 2 idle cores (STEP_SECONDS), and the measured wall time
of the four stages is recorded beside it. One world (the phantom benchmark's phantoms,
seed 0) serves every budget; each budget has its own nnUNet_results and maps. A finished budget is kept on re-runs,
with the times of the run that trained it. Writes quality_vs_compute.json and .png to --out.
"""
import argparse
import re
from os.path import isfile, join

from batchgenerators.utilities.file_and_folder_operations import load_json
from matplotlib.figure import Figure

from nnscreener.evaluation.evaluate import json_ready
from nnscreener.planners.presets import get_preset
from nnscreener.utilities.io import atomic_path, atomic_save_json
from phantom_benchmark import ALL_LESIONS, DISTILLED, METRICS, SCREENER, run_seed, slug, type_references
from world import machine, make_world

PRETRAIN_TIMING = 'pretrain: descriptor, condition, density, distillation'
# seconds per step (SSL, density, distillation) on 2 CPU cores without other load, by benchmarks/speed/bench_speed.py
# (--preset tiny --device cpu --steps 20, 2026-11-23; --preset cpu_wide --steps 5, 2026-12-01). The curve's compute
# axis is steps x these costs: wall times of budgets trained while other jobs shared the cores are recorded too, but
# inflated. `cpu` and `tiny_long` are the tiny networks.
TINY_STEP_SECONDS = (1 / 18.5, 1 / 36.9, 1 / 15.2)
STEP_SECONDS = {'tiny': TINY_STEP_SECONDS, 'tiny_long': TINY_STEP_SECONDS, 'cpu': TINY_STEP_SECONDS,
                'cpu_wide': (1 / 3.83, 1 / 8.57, 1 / 2.23)}


def compute_minutes(budget: str) -> float:
    """Uncontended pretraining minutes of a budget: descriptor + condition (SSL), density, distillation steps."""
    preset = get_preset(budget)
    ssl, density, distillation = STEP_SECONDS[budget.split(':')[0]]
    return (2 * preset['ssl']['num_steps'] * ssl + preset['density']['num_steps'] * density
            + preset['distillation']['num_steps'] * distillation) / 60
CURVE_METRICS = ('auroc', 'auroc_up_to_fpr', 'aupro_up_to_fpr', 'average_precision_mean', 'dice_mean')


def run_budget(budget: str, work: str, n_pretrain: int, n_test: int, device: str, seed: int) -> dict:
    done = join(work, f'budget_{slug(budget)}.json')
    if isfile(done):
        return load_json(done)
    raw = make_world(work, budget, n_pretrain, n_test)
    result = run_seed(seed, work, raw, type_references(raw, work), device, [SCREENER, DISTILLED],
                      tag=f'{slug(budget)}_seed{seed}')
    record = budget_record(budget, seed, result)
    atomic_save_json(json_ready(record), done)
    return record


def budget_record(budget: str, seed: int, run: dict, **extra) -> dict:
    """One point of the curve from a run_seed result (or a phantom_benchmark.py seed, which has the same keys)."""
    return {'budget': budget, 'seed': seed, **extra, 'compute_minutes': compute_minutes(budget),
            'wall_minutes': run['timings_s'][PRETRAIN_TIMING] / 60,
            'distilled_vs_modular': run['distilled_vs_modular'],
            **{key: {m: run['methods'][method][ALL_LESIONS][m] for m in CURVE_METRICS}
               for key, method in (('screener', SCREENER), ('screener_distilled', DISTILLED))}}


def curve_name(budget: str) -> str:
    """The budget without its step count: budgets of one curve differ in steps only (tiny, cpu, tiny:clahe=0.01)."""
    return re.sub(r'steps=\d+,?', '', budget).rstrip(':,')


def record_from_phantom_benchmark(path: str, seed: int) -> dict:
    """A budget measured by phantom_benchmark.py on the same world (its preset and training seed), so the curve
    does not train it again."""
    result = load_json(path)
    return budget_record(result['settings']['preset'], seed, result['per_seed'][str(seed)], **{'from': path})


def plot(records: list, out_png: str) -> None:
    figure = Figure(figsize=(11, 4))
    for ax, metric in zip(figure.subplots(1, 3), ('auroc', 'auroc_up_to_fpr', 'dice_mean')):
        for preset in dict.fromkeys(curve_name(r['budget']) for r in records):
            rows = sorted((r for r in records if curve_name(r['budget']) == preset),
                          key=lambda r: r['compute_minutes'])
            minutes = [r['compute_minutes'] for r in rows]
            for key, style in (('screener', '-o'), ('screener_distilled', '--s')):
                ax.plot(minutes, [r[key][metric] for r in rows], style, label=f'{preset} {key.replace("_", " ")}')
        ax.set_xscale('log')
        ax.set_xlabel('pretraining compute, minutes of 2 CPU cores')
        ax.set_title(f'{METRICS[metric][0]} (body)')
        ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figure.tight_layout()
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, dpi=110, format='png')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work', required=True)
    parser.add_argument('--budgets', nargs='+', required=True, help='presets with step counts, e.g. tiny:steps=300')
    parser.add_argument('--from_phantom_benchmark', nargs='*', default=[],
                        help="phantom_quality.json files of phantom_benchmark.py runs on the same world: their preset "
                             "joins the curve as measured there")
    parser.add_argument('--n_pretrain', type=int, default=48)
    parser.add_argument('--n_test', type=int, default=42)
    parser.add_argument('--seed', type=int, default=0, help='training seed')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--out', default='benchmarks/results/quality_vs_compute.json')
    parser.add_argument('--png', default='documentation/images/quality_vs_compute.png')
    args = parser.parse_args()
    records = [record_from_phantom_benchmark(path, args.seed) for path in args.from_phantom_benchmark]
    for budget in args.budgets:
        records.append(run_budget(budget, args.work, args.n_pretrain, args.n_test, args.device, args.seed))
        atomic_save_json(json_ready({'machine': machine(), 'n_pretrain': args.n_pretrain, 'n_test': args.n_test,
                                     'evaluation': 'body-only', 'budgets': records}), args.out)
        plot(records, args.png)
        r = records[-1]
        print(f"{r['budget']}: {r['compute_minutes']:.1f} min, body AUROC modular {r['screener']['auroc']:.3f} "
              f"distilled {r['screener_distilled']['auroc']:.3f}")


if __name__ == '__main__':
    main()
