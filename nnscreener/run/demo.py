"""`nnScreener_demo`: the whole Screener pipeline at tiny scale (the `demo` preset) on generated CT phantoms.

phantoms -> plan and preprocess -> pretrain (descriptor, condition, density, distillation) -> anomaly maps and their
evaluation -> low-shot fine-tuning from the distilled UNet vs from scratch -> Wilcoxon comparison. Everything is
written under one folder (default ./nnscreener_demo) with its own nnUNet_raw / _preprocessed / _results, so the
demo never touches a user's data; re-running it resumes where it stopped.
"""
import os
import time
from os.path import isdir, isfile, join

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnscreener.evaluation.compare import compare_trainers, markdown_table
from nnscreener.evaluation.evaluate import evaluate_anomaly_maps, map_agreement
from nnscreener.finetuning.lowshot_splits import write_lowshot_splits
from nnscreener.finetuning.nnunet_train import nnunet_train
from nnscreener.inference.predict import predict
from nnscreener.phantoms.make_phantoms import make_phantom_datasets
from nnscreener.planners.screener_planner import SCREENER_PLANS_NAME, screener_plans_file
from nnscreener.preprocessing.plan_and_preprocess import plan_and_preprocess
from nnscreener.run.pretrain import pretrain
from nnscreener.training.stages import stage_checkpoint
from nnscreener.utilities.cli import add_device_argument, argument_parser
from nnscreener.utilities.console import progress_bar
from nnscreener.utilities.errors import ScreenerInputError, exit_on_input_error

TARGET, PRETRAIN = 501, 500
TARGET_NAME = 'Dataset501_ScreenerPhantomLesions'
PRESET = 'demo'
FINETUNE, FROM_SCRATCH = 'nnScreenerFinetuneTrainer_tiny', 'nnScreenerFromScratchTrainer_tiny'
LEARNED_DICE = 0.1  # mean Dice from scratch from which the demo shows the paired test of the two arms


def run_demo(folder: str = 'nnscreener_demo', device: str = 'cpu', num_labeled: int = 18, num_unlabeled: int = 24,
             lowshot_n: int = 10, folds: int = 3, num_processes: int = 2) -> dict:
    for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        os.environ[k] = os.path.abspath(join(folder, k))
        os.makedirs(os.environ[k], exist_ok=True)
    os.environ.setdefault('nnUNet_compile', 'false')
    _refuse_other_preset(folder)
    raw = join(os.environ['nnUNet_raw'], TARGET_NAME)
    steps = _Steps()
    steps.start('generating CT phantoms')
    if not isdir(raw):
        make_phantom_datasets(TARGET, PRETRAIN, num_labeled, num_unlabeled, preset='tiny', seed=0,
                              num_processes=num_processes)
    steps.start('planning and preprocessing (nnScreenerPlans, Screener cache with CLAHE)')
    plan_and_preprocess(TARGET, [PRETRAIN], preset=PRESET, num_processes=num_processes, continue_=True)
    steps.start('pretraining: descriptor -> condition -> density -> distillation')
    pretrain(TARGET, device=device, continue_=True)
    steps.start('unsupervised anomaly maps of the labeled phantoms, and their evaluation')
    summaries = {kind: _maps_and_metrics(raw, folder, kind, device) for kind in ('modular', 'distilled')}
    agreement = map_agreement(join(folder, 'anomaly_maps_modular'), join(folder, 'anomaly_maps_distilled'),
                              images_folder=join(raw, 'imagesTr'))
    print(f"distilled vs modular Screener: Pearson r of the maps {agreement['pearson_r_pooled']:.3f} (body voxels), "
          f"body AUROC {summaries['distilled']['auroc']:.3f} vs {summaries['modular']['auroc']:.3f}")
    steps.start(f'low-shot fine-tuning: {folds} folds x {lowshot_n} labeled cases, distilled init vs scratch')
    write_lowshot_splits(TARGET, lowshot_n, folds, seed=0, overwrite=True)
    _fine_tune(folds, device, num_processes)
    steps.start('comparison of the two fine-tuning arms')
    comparison = compare_trainers(TARGET, FROM_SCRATCH, FINETUNE, SCREENER_PLANS_NAME, tuple(range(folds)),
                                  verbose=False)
    _print_comparison(comparison)
    print(f'\nDemo finished in {_minutes(time.time() - steps.t0)}; everything is under {os.path.abspath(folder)}. '
          f'To use its models (nnScreener_predict -d {TARGET}, nnUNetv2_predict), first:\n'
          + '\n'.join(f'  export {k}={os.environ[k]}' for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')))
    return {'anomaly_maps': summaries, 'agreement': agreement, 'comparison': comparison}


def _refuse_other_preset(folder: str) -> None:
    """A demo folder of an earlier nnscreener (planned `tiny`) holds stages trained with other settings: resuming
    would re-plan it, lengthen its SSL stages and then stop at the density stage, whose features changed."""
    plans_file = screener_plans_file(TARGET_NAME)
    planned = load_json(plans_file).get('screener', {}).get('preset') if isfile(plans_file) else PRESET
    if planned != PRESET:
        raise ScreenerInputError(f'{os.path.abspath(folder)} holds a demo planned with preset {planned!r} by an '
                                 f'earlier nnscreener; this demo plans {PRESET!r}: give another -o, or remove that '
                                 f'folder')


class _Steps:
    """The demo's progress line: step k/6 with the time so far and an estimate of the time left, from the share of
    the demo's time each step took in a measured run."""
    # measured 2026-12-07 with the `demo` preset (-device cpu, 2 idle CPU cores: 6 s, 33 s, 255 s, 29 s, 203 s, 0 s)
    SHARES = (0.01, 0.06, 0.49, 0.06, 0.38, 0.0)

    def __init__(self):
        self.t0, self.k = time.time(), 0

    def start(self, text: str) -> None:
        elapsed, done = time.time() - self.t0, sum(self.SHARES[:self.k])
        timing = (f' ({_minutes(elapsed)} so far, about {_minutes(elapsed / done * (1 - done))} left)'
                  if done and elapsed >= 1 else '')
        self.k += 1
        print(f'\n==== nnScreener demo {self.k}/{len(self.SHARES)}{timing}: {text} ====', flush=True)


def _minutes(seconds: float) -> str:
    return f'{int(seconds // 60)} min {int(seconds % 60):02d} s'


def _maps_and_metrics(raw: str, folder: str, kind: str, device: str) -> dict:
    out = join(folder, f'anomaly_maps_{kind}')
    # the lesion masks' contours in the overlays: whether the top regions are the lesions is what a reader looks for
    predict(join(raw, 'imagesTr'), out, TARGET, kind, device, overlays=2, continue_=True,
            reference_folder=join(raw, 'labelsTr'))
    return evaluate_anomaly_maps(out, join(raw, 'labelsTr'), join(out, 'evaluation'), n_threshold_cases=4,
                                 images_folder=join(raw, 'imagesTr'))


def _fine_tune(folds: int, device: str, num_processes: int) -> None:
    """Per fold, stock nnUNetv2_train from scratch and from the distilled UNet; their console output in a log."""
    log_file = join(os.environ['nnUNet_results'], TARGET_NAME, 'nnscreener_demo_finetuning.log')
    print(f'nnUNetv2_train output (each training also logs to its fold folder): {log_file}', flush=True)
    arms = ((FROM_SCRATCH, None), (FINETUNE, stage_checkpoint(TARGET_NAME, 'distillation')))
    runs = [(fold, trainer, weights) for fold in range(folds) for trainer, weights in arms]
    with progress_bar(desc=_fine_tuning_desc(*runs[0][:2], folds), total=len(runs), unit='training') as bar:
        for fold, trainer, weights in runs:
            bar.set_description(_fine_tuning_desc(fold, trainer, folds))
            nnunet_train(TARGET, fold, trainer, weights, device, num_processes, log_file)
            bar.update()


def _fine_tuning_desc(fold: int, trainer: str, folds: int) -> str:
    return f'fine-tuning fold {fold + 1}/{folds}: {trainer}'


def _print_comparison(comparison: dict) -> None:
    """Mean Dice of both arms, and the paired test only where training from scratch learned the lesions at all: a
    difference between two Dice near 0 is noise of near-empty predictions, not an effect of the pretraining."""
    for row in comparison['labels'].values():
        print(f"{row['name']}: mean validation Dice over {row['n_pairs']} cases of {len(comparison['folds'])} folds: "
              f"{comparison['trainer_a']} {row['mean_dice_a']:.3f}, {comparison['trainer_b']} "
              f"{row['mean_dice_b']:.3f}")
    if all(row['mean_dice_a'] >= LEARNED_DICE for row in comparison['labels'].values()):
        print(markdown_table(comparison))
        return
    print(f'The demo\'s tiny fine-tuning schedule only shows that the commands work: from scratch, nnU-Net has not '
          f'learned the lesions yet (mean Dice below {LEARNED_DICE}), so no test of the difference is made. For a '
          f'real comparison train the trainers without _tiny (documentation/lowshot_finetuning.md).')


@exit_on_input_error
def demo_entry():
    parser = argument_parser('Run the whole Screener pipeline at tiny scale on CT phantoms.')
    parser.add_argument('-o', default='nnscreener_demo', help='working folder; everything is written under it')
    add_device_argument(parser, default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('-np', type=int, default=2, help='processes for phantom generation and preprocessing')
    args = parser.parse_args()
    run_demo(args.o, args.device, num_processes=args.np)
