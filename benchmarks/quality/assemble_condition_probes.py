"""Gather benchmarks/results/condition_probes.json from phantom_benchmark.py work folders and the
condition_oracle.py --probes / --decoy results of their worlds; every number is read from those files, the texts
(run labels, notes) are this script's.

    python benchmarks/quality/assemble_condition_probes.py --runs /tmp/qwide /tmp/qwp \
        --probes /tmp/exp/probes_cpu_wide.json /tmp/exp/probes_cpu.json \
        --decoys /tmp/exp/decoy_cpu_wide.json /tmp/exp/decoy_cpu.json
"""
import argparse
import json
from os.path import dirname, join

from nnscreener.evaluation.evaluate import json_ready
from nnscreener.utilities.io import atomic_save_json
from phantom_benchmark import results_json

OUT = join(dirname(__file__), '..', 'results', 'condition_probes.json')
TITLE = 'Wider context for the conditions, and what they see of the lesions: preset cpu_wide'
NOTE = ("Both runs train on the phantoms of the `cpu` world (/tmp/qw, the seed-0 reference of "
        "condition_ab_seed0.json: 0.657-0.686 modular, 0.708-0.712 distilled over three rebuilds). The second run "
        "keeps the descriptor and condition of the first and retrains density and distillation with the paper's "
        "conditions; its seed-0 wall time is inflated by a probe run sharing the two cores. One or two training seeds: "
        "differences below ~0.05 body AUROC are within the seed spread of the 3-seed tables.")
DECOY_NOTE = ("The lesions and a decoy of normal body of the same size (the lesion masks rolled by half the box "
              "along x, clear of the lesions) are altered alike (in-painted by the median of their shell, or "
              "replaced by the condition model's mask token); descriptors from the CT, conditions from the altered "
              "copy; 42 test phantoms, up to 1000 voxels per case and group. 'lesion vs decoy' compares lesions with "
              "normal tissue whose conditions were altered the same way: the fair ceiling of conditions that do not "
              "see the lesion.")
LABELS = {'cpu_wide:leaveout=2': 'leave-out cells of 2 mask blocks (16 x 24 x 24), patch 32 x 48 x 48',
          'cpu_wide': "the paper's conditions, patch 32 x 48 x 48 (seed 0: descriptor and condition of the run above, "
                      "08:45 UTC; seed 1: every stage, its descriptor resumed from a checkpoint of a run stopped at "
                      "09:26 UTC)"}


MODULAR, DISTILLED = 'Screener (learned cond. + Gaussian)', 'Screener distilled (UNet)'


def auroc_of(seed_result: dict, method: str) -> float:
    return seed_result['methods'][method]['all lesions']['auroc']


def run_entry(work: str) -> dict:
    saved = json.load(open(join(work, 'results', 'phantom_quality.json')))
    per_seed = saved['per_seed']
    settings = {**saved['settings'], 'seeds': sorted(int(s) for s in per_seed)}
    summary = results_json(saved['table'], settings, per_seed)
    machine = settings['machine']
    minutes = {seed: sum(per_seed[seed]['timings_s'].values()) / 60 for seed in per_seed}
    label = LABELS.get(settings['preset'], settings['preset'])
    if len(per_seed) > 1:  # the row is the mean; name each seed's body AUROC
        label += f"; training seeds {', '.join(map(str, settings['seeds']))}, mean of " + ', '.join(
            f"seed {seed}: {auroc_of(per_seed[seed], MODULAR):.3f} modular / {auroc_of(per_seed[seed], DISTILLED):.3f}"
            f" distilled" for seed in sorted(per_seed, key=int))
    return {'preset': settings['preset'], 'label': label, 'seeds': settings['seeds'],
            'command': machine['command'], 'device': machine['device'], 'methods': summary['methods'],
            'distilled_vs_modular_pearson_r': summary['distilled_vs_modular_pearson_r'],
            'trained': f"from {machine['date']}; " + ', '.join(f'seed {seed} {m:.0f} min'
                                                               for seed, m in minutes.items())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', nargs='+', required=True, help='phantom_benchmark.py work folders')
    parser.add_argument('--probes', nargs='+', required=True, help='condition_oracle.py --probes results')
    parser.add_argument('--decoys', nargs='+', required=True, help='condition_oracle.py --decoy results')
    args = parser.parse_args()
    result = {'title': TITLE, 'note': NOTE, 'runs': [run_entry(w) for w in args.runs],
              'probes': [json.load(open(f)) for f in args.probes], 'decoy_note': DECOY_NOTE,
              'decoys': [json.load(open(f)) for f in args.decoys]}
    atomic_save_json(json_ready(result), OUT)
    print(f'wrote {OUT}')


if __name__ == '__main__':
    main()
