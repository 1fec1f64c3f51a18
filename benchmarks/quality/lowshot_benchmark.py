"""Low-shot fine-tuning on CT phantoms: nnU-Net from scratch vs from the distilled Screener UNet (paper Table 2).

    python benchmarks/quality/lowshot_benchmark.py --work /tmp/quality --device cpu

Runs on the world of phantom_benchmark.py (same --work; run that first, at least seed 0, for the distilled UNet):
k folds whose validation parts partition the labeled phantoms, each training on n labeled cases only, with stock
`nnUNetv2_train`; then `nnScreener_compare`'s API (per-case Dice, relative change, paired Wilcoxon). Writes
lowshot.{json,md,png} to --out. Re-running resumes finished folds.
"""
import argparse
import os
import shutil
from os.path import join

from nnscreener.evaluation.compare import OUTPUT_BASENAME, compare_trainers
from nnscreener.evaluation.evaluate import json_ready
from nnscreener.finetuning.lowshot_splits import write_lowshot_splits
from nnscreener.finetuning.nnunet_train import nnunet_train
from nnscreener.planners.screener_planner import SCREENER_PLANS_NAME
from nnscreener.training.stages import stage_checkpoint
from nnscreener.utilities.io import atomic_save_json
from world import TARGET, TARGET_NAME, machine, timed, use_results, use_work_folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work', required=True, help='the work folder of phantom_benchmark.py')
    parser.add_argument('--out', default=None, help='results folder (default <work>/results)')
    parser.add_argument('--n_train', type=int, default=25, help='labeled training cases per fold')
    parser.add_argument('--folds', type=int, default=3)
    parser.add_argument('--pretrain_seed', type=int, default=0, help='whose distilled UNet initialises fine-tuning')
    parser.add_argument('--schedule', default='cpuBenchmark',
                        help='trainer suffix: cpuBenchmark (12 x 20 iterations), 100epochs, or "" (300 epochs)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('-np', type=int, default=2, help='nnU-Net worker processes')
    args = parser.parse_args()
    out = args.out or join(args.work, 'results')
    os.makedirs(out, exist_ok=True)
    suffix = f'_{args.schedule}' if args.schedule else ''
    scratch, finetune = f'nnScreenerFromScratchTrainer{suffix}', f'nnScreenerFinetuneTrainer{suffix}'
    timings = {}
    use_work_folder(args.work)
    if not os.path.isdir(join(os.environ['nnUNet_preprocessed'], TARGET_NAME)):
        raise SystemExit(f'no phantom world in {args.work}: run phantom_benchmark.py --work {args.work} first')
    use_results(args.work, f"seed{args.pretrain_seed}")
    write_lowshot_splits(TARGET, args.n_train, args.folds, seed=0, overwrite=True)
    distilled = stage_checkpoint(TARGET_NAME, 'distillation')
    for fold in range(args.folds):
        with timed(timings, scratch):
            nnunet_train(TARGET, fold, scratch, None, args.device, args.np)
        with timed(timings, finetune):
            nnunet_train(TARGET, fold, finetune, distilled, args.device, args.np)
    comparison = compare_trainers(TARGET, scratch, finetune, SCREENER_PLANS_NAME, tuple(range(args.folds)),
                                  output_folder=join(args.work, 'lowshot_comparison'))
    for ending in ('.md', '.png'):
        shutil.copyfile(join(args.work, 'lowshot_comparison', OUTPUT_BASENAME + ending), join(out, 'lowshot' + ending))
    atomic_save_json(json_ready({'settings': {**vars(args), 'machine': machine()}, 'timings_s': timings,
                                 'comparison': comparison}), join(out, 'lowshot.json'))


if __name__ == '__main__':
    main()
