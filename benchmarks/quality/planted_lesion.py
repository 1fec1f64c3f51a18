"""Does each trained method answer a lesion where it is? A -500 HU sphere (6 mm radius) planted in the soft tissue of
test phantoms, maps of the same scan with and without it, per method of the phantom benchmark.

    python benchmarks/quality/planted_lesion.py --work /tmp/qcpu2 --tags seed0 seed1 --cases 6 \
        --results_json benchmarks/results/planted_lesion.json

Reads the trained models of `phantom_benchmark.py --work <work>` (nnUNet_results_<tag>). Per method and case:
the planted sphere's mean map against the same voxels of the unplanted scan (a rise is a detection), and the share
of the body outside the sphere that scores below the sphere's mean (1 = the sphere is the top finding).
"""
import argparse
import glob
import os
from os.path import isfile, join

import numpy as np
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnscreener.inference.predict import predict
from nnscreener.phantoms.planted import plant_sphere
from nnscreener.planners.screener_planner import SCREENER_PLANS_NAME
from nnscreener.planners.settings import ScreenerSettings
from nnscreener.training.stages import stage_checkpoint
from nnscreener.utilities.io import atomic_save_json
from phantom_benchmark import METHOD_IDS, METHODS, label, slug
from world import TARGET, TARGET_NAME, machine, mean_sd, use_results, use_work_folder

NOT_TRAINED = ('Baseline: local contrast',)  # no model: the same map for every tag


def trained(method: str) -> bool:
    """Whether the current run trained `method` (phantom_benchmark.py --methods may have left it out)."""
    kind, trainer = METHODS[method]
    stage = 'distillation' if kind == 'distilled' else 'density'
    return method in NOT_TRAINED or isfile(stage_checkpoint(TARGET_NAME, stage, trainer))


def map_of(image: str, out: str, method: str) -> np.ndarray:
    kind, trainer = METHODS[method]
    record, = predict([image], out, TARGET, kind, 'cpu', density_trainer=trainer if kind == 'modular' else None)
    return sitk.GetArrayFromImage(sitk.ReadImage(record['anomaly_map']))


def score_case(image: str, work: str, tag: str, method: str) -> dict:
    case = os.path.basename(image)[:-len('_0000.nii.gz')]
    planted_file = join(work, 'planted', f'{case}_0000.nii.gz')
    sphere, body = plant_sphere(image, planted_file)
    out = join(work, 'planted_maps', tag, slug(method))
    healthy = map_of(image, join(out, 'healthy', case), method)
    planted = map_of(planted_file, join(out, 'planted', case), method)
    return {'rise': float(planted[sphere].mean() - healthy[sphere].mean()),
            'rise_in_sd': float((planted[sphere].mean() - healthy[sphere].mean()) / healthy[body].std()),
            'body_below_sphere': float((planted[body & ~sphere] < planted[sphere].mean()).mean())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work', required=True, help='work folder of phantom_benchmark.py (trained models)')
    parser.add_argument('--tags', nargs='+', default=['seed0'], help='training runs (nnUNet_results_<tag>)')
    parser.add_argument('--cases', type=int, default=6, help='test phantoms to plant into (default 6)')
    parser.add_argument('--results_json', default=None, help='also write the summary here')
    args = parser.parse_args()
    use_work_folder(args.work)
    plans = load_json(join(os.environ['nnUNet_preprocessed'], TARGET_NAME, SCREENER_PLANS_NAME + '.json'))
    preset = ScreenerSettings.from_plans(plans).preset  # names the default Screener row after its density model
    images = sorted(glob.glob(join(os.environ['nnUNet_raw'], TARGET_NAME, 'imagesTr', '*_0000.nii.gz')))[:args.cases]
    results = {}
    use_results(args.work, args.tags[0])
    for method in filter(trained, METHODS):
        rows = []
        for tag in args.tags[:1] if method in NOT_TRAINED else args.tags:
            use_results(args.work, tag)
            rows += [score_case(image, args.work, tag, method) for image in images]
        results[METHOD_IDS[method]] = {'method': label(method, preset), 'n': len(rows),
                                       'share_of_cases_with_a_rise': float(np.mean([r['rise'] > 0 for r in rows])),
                                       **{k: mean_sd([r[k] for r in rows]) for k in rows[0]}}
        print(f"{method}: rise in {results[METHOD_IDS[method]]['share_of_cases_with_a_rise']:.0%} of {len(rows)}, "
              f"body below sphere {results[METHOD_IDS[method]]['body_below_sphere']}", flush=True)
    summary = {'settings': {'work': args.work, 'preset': preset, 'tags': args.tags, 'cases': args.cases,
                            'sphere': '-500 HU, 6 mm radius', 'machine': machine()}, 'methods': results}
    atomic_save_json(summary, join(args.work, 'planted_lesion.json'))
    if args.results_json:
        atomic_save_json(summary, args.results_json)


if __name__ == '__main__':
    main()
