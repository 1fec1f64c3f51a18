"""Gather benchmarks/results/condition_probes_seed0.json from seed-0 phantom_benchmark.py work folders and the
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

OUT = join(dirname(__file__), '..', 'results', 'condition_probes_seed0.json')
TITLE = 'Wider context for the conditions, and what they see of the lesions: preset cpu_wide, training seed 0'
NOTE = ("Both runs train on the phantoms of the `cpu` world (/tmp/qw, the seed-0 reference of "
        "condition_ab_seed0.json: 0.657-0.686 modular, 0.708-0.712 distilled over three rebuilds). The second run "
        "keeps the descriptor and condition of the first and retrains density and distillation with the paper's "
        "conditions; its wall time is inflated by a probe run sharing the two cores. One training seed: differences "
        "below ~0.05 body AUROC are within the seed spread of the 3-seed tables.")
DECOY_NOTE = ("The lesions and a decoy of normal body of the same size (the lesion masks rolled by half the box "
              "along x, clear of the lesions) are altered alike (in-painted by the median of their shell, or "
              "replaced by the condition model's mask token); descriptors from the CT, conditions from the altered "
              "copy; 42 test phantoms, up to 1000 voxels per case and group. 'lesion vs decoy' compares lesions with "
              "normal tissue whose conditions were altered the same way: the fair ceiling of conditions that do not "
              "see the lesion.")
LABELS = {'cpu_wide:leaveout=2': 'leave-out cells of 2 mask blocks (16 x 24 x 24), patch 32 x 48 x 48',
          'cpu_wide': "the paper's conditions, patch 32 x 48 x 48 (descriptor and condition of the run above)"}


def run_entry(work: str) -> dict:
    saved = json.load(open(join(work, 'results', 'phantom_quality.json')))
    per_seed = saved['per_seed']
    settings = {**saved['settings'], 'seeds': sorted(int(s) for s in per_seed)}
    summary = results_json(saved['table'], settings, per_seed)
    machine = settings['machine']
    minutes = saved['timings_s'][f"seed {settings['seeds'][0]}"] / 60
    return {'preset': settings['preset'], 'label': LABELS.get(settings['preset'], settings['preset']),
            'command': machine['command'], 'device': machine['device'], 'methods': summary['methods'],
            'distilled_vs_modular_pearson_r': summary['distilled_vs_modular_pearson_r'],
            'trained': f"{machine['date']} ({minutes:.0f} min)"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', nargs='+', required=True, help='phantom_benchmark.py work folders (seed 0)')
    parser.add_argument('--probes', nargs='+', required=True, help='condition_oracle.py --probes results')
    parser.add_argument('--decoys', nargs='+', required=True, help='condition_oracle.py --decoy results')
    args = parser.parse_args()
    result = {'title': TITLE, 'seed': 0, 'note': NOTE, 'runs': [run_entry(w) for w in args.runs],
              'probes': [json.load(open(f)) for f in args.probes], 'decoy_note': DECOY_NOTE,
              'decoys': [json.load(open(f)) for f in args.decoys]}
    atomic_save_json(json_ready(result), OUT)
    print(f'wrote {OUT}')


if __name__ == '__main__':
    main()
