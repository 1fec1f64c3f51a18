"""`nnScreener_demo`: the whole Screener pipeline at tiny scale on generated CT phantoms.

phantoms -> plan and preprocess -> pretrain (descriptor, condition, density, distillation) -> anomaly maps and their
evaluation -> low-shot fine-tuning from the distilled UNet vs from scratch -> Wilcoxon comparison. Everything is
written under one folder (default ./nnscreener_demo) with its own nnUNet_raw / _preprocessed / _results, so the
demo never touches a user's data; re-running it resumes where it stopped.
"""
import argparse
import os
from os.path import isdir, join

import torch

from nnscreener.evaluation.compare import compare_trainers
from nnscreener.evaluation.evaluate import evaluate_anomaly_maps, map_agreement
from nnscreener.finetuning.lowshot_splits import write_lowshot_splits
from nnscreener.finetuning.nnunet_train import nnunet_train
from nnscreener.inference.predict import predict
from nnscreener.phantoms.make_phantoms import make_phantom_datasets
from nnscreener.planners.screener_planner import SCREENER_PLANS_NAME
from nnscreener.preprocessing.plan_and_preprocess import plan_and_preprocess
from nnscreener.run.pretrain import pretrain
from nnscreener.training.stages import stage_checkpoint
from nnscreener.utilities.errors import exit_on_input_error

TARGET, PRETRAIN = 501, 500
FINETUNE, FROM_SCRATCH = 'nnScreenerFinetuneTrainer_tiny', 'nnScreenerFromScratchTrainer_tiny'


def run_demo(folder: str = 'nnscreener_demo', device: str = 'cpu', num_labeled: int = 18, num_unlabeled: int = 24,
             lowshot_n: int = 10, folds: int = 3, num_processes: int = 2) -> dict:
    for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        os.environ[k] = os.path.abspath(join(folder, k))
        os.makedirs(os.environ[k], exist_ok=True)
    os.environ.setdefault('nnUNet_compile', 'false')
    raw = join(os.environ['nnUNet_raw'], 'Dataset501_ScreenerPhantomLesions')
    if not isdir(raw):
        _step('1/6 generating CT phantoms')
        make_phantom_datasets(TARGET, PRETRAIN, num_labeled, num_unlabeled, preset='tiny', seed=0,
                              num_processes=num_processes)
    _step('2/6 planning and preprocessing (nnScreenerPlans, Screener cache with CLAHE)')
    plan_and_preprocess(TARGET, [PRETRAIN], preset='tiny', num_processes=num_processes, continue_=True)
    _step('3/6 pretraining: descriptor -> condition -> density -> distillation')
    pretrain(TARGET, device=device, continue_=True)
    _step('4/6 unsupervised anomaly maps of the labeled phantoms, and their evaluation')
    summaries = {kind: _maps_and_metrics(raw, folder, kind, device) for kind in ('modular', 'distilled')}
    agreement = map_agreement(join(folder, 'anomaly_maps_modular'), join(folder, 'anomaly_maps_distilled'),
                              images_folder=join(raw, 'imagesTr'))
    print(f"distilled vs modular: Pearson r {agreement['pearson_r_pooled']:.3f} (body voxels), body AUROC "
          f"{summaries['distilled']['auroc']:.3f} vs {summaries['modular']['auroc']:.3f}")
    _step(f'5/6 low-shot fine-tuning: {folds} folds x {lowshot_n} labeled cases, distilled init vs scratch')
    write_lowshot_splits(TARGET, lowshot_n, folds, seed=0, overwrite=True)
    for fold in range(folds):
        nnunet_train(TARGET, fold, FROM_SCRATCH, None, device, num_processes)
        nnunet_train(TARGET, fold, FINETUNE, stage_checkpoint('Dataset501_ScreenerPhantomLesions', 'distillation'),
                     device, num_processes)
    _step('6/6 comparison (paired Wilcoxon signed-rank test across folds)')
    comparison = compare_trainers(TARGET, FROM_SCRATCH, FINETUNE, SCREENER_PLANS_NAME, tuple(range(folds)))
    print(f'\nDemo finished; everything is under {os.path.abspath(folder)}')
    return {'anomaly_maps': summaries, 'agreement': agreement, 'comparison': comparison}


def _step(text: str) -> None:
    print(f'\n======== nnScreener demo: {text} ========', flush=True)


def _maps_and_metrics(raw: str, folder: str, kind: str, device: str) -> dict:
    out = join(folder, f'anomaly_maps_{kind}')
    predict(join(raw, 'imagesTr'), out, TARGET, kind, device, overlays=2, continue_=True)
    return evaluate_anomaly_maps(out, join(raw, 'labelsTr'), join(out, 'evaluation'), n_threshold_cases=4,
                                 images_folder=join(raw, 'imagesTr'))


@exit_on_input_error
def demo_entry():
    parser = argparse.ArgumentParser(description='Run the whole Screener pipeline at tiny scale on CT phantoms.')
    parser.add_argument('-o', default='nnscreener_demo', help='working folder (default ./nnscreener_demo)')
    parser.add_argument('-device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        choices=['cuda', 'cpu', 'mps'])
    parser.add_argument('-np', type=int, default=2, help='processes for phantom generation and preprocessing')
    args = parser.parse_args()
    run_demo(args.o, args.device, num_processes=args.np)
