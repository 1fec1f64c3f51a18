"""Low-shot fine-tuning on CT phantoms: nnU-Net from scratch vs from the distilled Screener UNet (paper Table 2).

    python benchmarks/quality/lowshot_benchmark.py --work /tmp/quality --device cpu --control \
        --results_json ../results/lowshot.json \
        --plot ../../documentation/images/lowshot_loss.png

Fine-tunes the seed-0 distilled UNet of phantom_benchmark.py (same --work; run that first, at least seed 0), whose
world it only reads. The labeled cases are phantoms of their own (Dataset502, phantom seed 1: none of them is a
pretraining or test phantom of the world; larger lesions than the world's, LABELED_PHANTOMS), planned with
`--screener_from` the world's target so that their plans build the distilled UNet, under --lowshot_work. Each arm
('lowshot', and with --control 'full_data') gets its own nnUNet_preprocessed (the labeled dataset's plans and files
linked, its own splits_final.json) and nnUNet_results. k folds whose validation parts partition the labeled
phantoms, each training on n labeled cases only (full data: every case outside the fold), stock `nnUNetv2_train` for
both trainers with one schedule, then `nnScreener_compare`'s API (per-case Dice, relative change, paired Wilcoxon)
per fold and pooled. Also measures how far fine-tuning moves the distilled weights and keeps both trainers' loss
curves. Re-running resumes finished folds.
"""
import argparse
import dataclasses
import os
import time
from concurrent.futures import ProcessPoolExecutor
from os.path import isdir, isfile, join

import numpy as np
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from matplotlib.figure import Figure
from scipy import ndimage

from nnscreener.evaluation.compare import compare_trainers, paired_dice_test
from nnscreener.evaluation.evaluate import json_ready
from nnscreener.evaluation.metrics import FULL_CONNECTIVITY
from nnscreener.finetuning.lowshot_splits import dataset_case_ids, write_lowshot_splits
from nnscreener.finetuning.nnunet_train import nnunet_train
from nnscreener.phantoms.generator import PRESETS
from nnscreener.phantoms.lesions import LESION_TYPES
from nnscreener.phantoms.make_phantoms import LESION_TYPES_FOLDER, dataset_folder_name, make_phantom_datasets
from nnscreener.planners.screener_planner import CONFIGURATION, SCREENER_PLANS_NAME
from nnscreener.preprocessing.plan_and_preprocess import plan_and_preprocess
from nnscreener.training.stages import stage_checkpoint
from nnscreener.trainers import nnscreener_finetune_trainers
from nnscreener.utilities.io import atomic_path, atomic_save_json
from world import TARGET, TARGET_NAME, machine, use_work_folder

LESION_LABEL = '1'
LABELED, LABELED_PHANTOM_SEED = 502, 1  # the world's phantoms are seed 0
LABELED_NAME = dataset_folder_name(LABELED, 'target')
# the world's tiny anatomy with 2-3 lesions per case of 1.6-2 times the diameters (median 839 lesion voxels per case
# against 145): the distilled UNet sees 16 x 24 x 24 voxels with 4-16 channels, and nnU-Net from scratch did not
# learn the world's lesions from 25 cases within CPU reach (fold 0: Dice 0.015 after 2000 steps, 0.062 after 6000)
LABELED_PHANTOMS = dataclasses.replace(
    PRESETS['tiny'], name='tiny_lowshot', lesions_per_case=(2, 3),
    lesion_diameter={1: (10, 26), 2: (16, 40), 3: (14, 40), 4: (14, 40), 5: (10, 24), 6: (10, 24)})
ARM_KEYS = {'scratch': 'nnScreenerFromScratchTrainer', 'screener': 'nnScreenerFinetuneTrainer'}


def make_labeled_dataset(world_preprocessed: str, root: str, n_cases: int, num_processes: int) -> str:
    """The labeled phantoms in root/nnUNet_raw, planned and preprocessed in root/nnUNet_preprocessed with the Screener
    of the world's target (linked there, only read); returns their preprocessed folder. Resumes."""
    use_work_folder(root)
    source = join(os.environ['nnUNet_preprocessed'], TARGET_NAME)
    if not os.path.lexists(source):
        os.symlink(join(world_preprocessed, TARGET_NAME), source)
    raw = join(os.environ['nnUNet_raw'], LABELED_NAME)
    if not isfile(join(raw, 'dataset.json')) or len(os.listdir(join(raw, 'labelsTr'))) != n_cases or \
            load_json(join(raw, 'dataset.json'))['nnscreener_phantom']['preset'] != LABELED_PHANTOMS.name:
        make_phantom_datasets(LABELED, None, n_cases, preset=LABELED_PHANTOMS, seed=LABELED_PHANTOM_SEED,
                              num_processes=num_processes)  # another --n_labeled or preset: generated anew
    plan_and_preprocess(LABELED, screener_from=TARGET, num_processes=num_processes, continue_=True)
    return join(os.environ['nnUNet_preprocessed'], LABELED_NAME)


def arm_environment(labeled_preprocessed: str, root: str) -> None:
    """Points nnU-Net at root/nnUNet_preprocessed (the labeled dataset's plans and data linked, nnU-Net only reads
    them; so this arm's splits_final.json leaves the others untouched) and root/nnUNet_results."""
    target = join(root, 'nnUNet_preprocessed', LABELED_NAME)
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(labeled_preprocessed):
        if name != 'splits_final.json' and not os.path.lexists(join(target, name)):
            os.symlink(join(labeled_preprocessed, name), join(target, name))
    os.environ['nnUNet_preprocessed'] = join(root, 'nnUNet_preprocessed')
    os.environ['nnUNet_results'] = join(root, 'nnUNet_results')
    os.makedirs(os.environ['nnUNet_results'], exist_ok=True)


def trainer_folder(trainer: str, fold: int) -> str:
    return join(os.environ['nnUNet_results'], LABELED_NAME, f'{trainer}__{SCREENER_PLANS_NAME}__{CONFIGURATION}',
                f'fold_{fold}')


def train_one(fold: int, trainer: str, weights, device: str, num_processes: int) -> float:
    """One stock nnUNetv2_train, its output in a log beside the results; returns its wall time (s)."""
    t0 = time.time()
    nnunet_train(LABELED, fold, trainer, weights, device, num_processes,
                 log_file=join(os.environ['nnUNet_results'], f'{trainer}_fold{fold}.log'))
    return time.time() - t0


def train_fold(fold: int, trainers: dict, distilled: str, args, timings: dict) -> None:
    """Both trainers of one fold, at once with --jobs 2 (each single-threaded: two cores, two trainings); in worker
    processes, because the log redirection of nnunet_train is per process."""
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {trainer: pool.submit(train_one, fold, trainer, distilled if arm == 'screener' else None,
                                        args.device, args.np) for arm, trainer in trainers.items()}
        for trainer, future in futures.items():
            timings[f'{trainer} fold {fold}'] = round(future.result())


def dice_stats(dice) -> dict:
    dice = np.asarray(dice, dtype=float)
    dice = dice[~np.isnan(dice)]
    return {'dice_mean': float(dice.mean()), 'dice_sd': float(dice.std(ddof=1)) if dice.size > 1 else 0.0,
            'n': int(dice.size)}


def table_row(dice_a, dice_b) -> dict:
    """{'scratch': mean, sd; 'screener': mean, sd, relative change, two-sided Wilcoxon p} over paired cases."""
    test = paired_dice_test(dice_a, dice_b)
    valid = ~(np.isnan(np.asarray(dice_a, float)) | np.isnan(np.asarray(dice_b, float)))
    return {'scratch': dice_stats(np.asarray(dice_a, float)[valid]),
            'screener': {**dice_stats(np.asarray(dice_b, float)[valid]),
                         'rel_change_pct': test['relative_change_percent'], 'p': test['p_value']},
            'n_pairs': test['n_pairs'], 'n_excluded_nan': test['n_excluded_nan']}


def comparison_rows(comparison: dict, folds) -> dict:
    """Pooled and per-fold rows of the lesion label from compare_trainers' paired per-case Dice."""
    label = comparison['labels'][LESION_LABEL]
    rows = {'pooled': table_row(label['dice_a'], label['dice_b']), 'per_fold': []}
    for fold in folds:
        keep = [case.startswith(f'fold_{fold}/') for case in label['cases']]
        rows['per_fold'].append({'fold': fold, **table_row(np.asarray(label['dice_a'])[keep],
                                                            np.asarray(label['dice_b'])[keep])})
    return rows


def own_checkpoint(checkpoint: str) -> dict:
    """A checkpoint this benchmark's trainings wrote (nnU-Net's hold numpy scalars in their log: no weights_only)."""
    return torch.load(checkpoint, map_location='cpu', weights_only=False)


def network_weights(checkpoint: str) -> dict:
    return own_checkpoint(checkpoint)['network_weights']


def weight_groups(weights: dict) -> dict:
    """{'encoder stage i' / 'decoder stage i': [conv and norm tensors]}; the aliases dynamic-network-architectures
    stores twice (all_modules, decoder.encoder) and the re-initialised seg_layers are left out."""
    groups = {}
    for key, value in weights.items():
        parts = key.split('.')
        if 'all_modules' in parts or key.startswith('decoder.encoder.') or 'seg_layers' in parts:
            continue
        if parts[0] == 'encoder' and parts[1] == 'stages':
            groups.setdefault(f'encoder stage {parts[2]}', []).append(value.float().flatten())
        elif parts[0] == 'decoder' and parts[1] in ('stages', 'transpconvs'):
            groups.setdefault(f'decoder stage {parts[2]}', []).append(value.float().flatten())
    return {name: torch.cat(tensors) for name, tensors in groups.items()}


def weight_change(distilled: str, finetuned: str, scratch: str) -> dict:
    """Per UNet stage: ||W_finetuned - W_distilled|| / ||W_distilled|| and the cosine of the two; the cosine between
    the from-scratch weights and the distilled ones is the level of no shared features."""
    start, end, other = (weight_groups(network_weights(c)) for c in (distilled, finetuned, scratch))
    cosine = torch.nn.functional.cosine_similarity
    return {name: {'relative_change': float((end[name] - w).norm() / w.norm()),
                   'cosine_finetuned_vs_distilled': float(cosine(end[name], w, dim=0)),
                   'cosine_scratch_vs_distilled': float(cosine(other[name], w, dim=0))}
            for name, w in start.items()}


def lesion_type_recall(fold_folders) -> dict:
    """Per lesion type, over the validation cases of the given folds: lesions (26-connected components of the type's
    mask), the share of them that the prediction touches, and the share of their voxels it covers (voxel recall).
    Tells whether Dice is lost to missed lesions or to lesions only partly segmented."""
    counts = {name: np.zeros(4) for name in LESION_TYPES.values()}  # lesions, touched, voxels, covered voxels
    types_folder = join(os.environ['nnUNet_raw'], LABELED_NAME, LESION_TYPES_FOLDER)
    for folder in fold_folders:
        validation = join(folder, 'validation')
        for case in sorted(f for f in os.listdir(validation) if f.endswith('.nii.gz')):
            predicted = sitk.GetArrayFromImage(sitk.ReadImage(join(validation, case))) > 0
            types = sitk.GetArrayFromImage(sitk.ReadImage(join(types_folder, case)))
            for code, name in LESION_TYPES.items():
                lesions, n = ndimage.label(types == code, structure=FULL_CONNECTIVITY)
                voxels = np.bincount(lesions.ravel(), minlength=n + 1)[1:]
                covered = np.bincount(lesions[predicted], minlength=n + 1)[1:]
                counts[name] += (n, (covered > 0).sum(), voxels.sum(), covered.sum())
    return {name: {'lesions': int(c[0]), 'touched': float(c[1] / c[0]) if c[0] else None,
                   'voxel_recall': float(c[3] / c[2]) if c[2] else None,
                   'mean_voxels': float(c[2] / c[0]) if c[0] else None}
            for name, c in counts.items()}


def predicted_volume_ratio(fold_folder: str) -> float:
    """Predicted over reference lesion voxels, summed over the fold's validation cases (nnU-Net's summary.json):
    above 1 the arm over-segments, below 1 it misses voxels."""
    lesion = load_json(join(fold_folder, 'validation', 'summary.json'))['mean'][LESION_LABEL]
    return lesion['n_pred'] / lesion['n_ref']


def training_record(fold_folder: str) -> dict:
    """nnU-Net's per-epoch log kept in the checkpoint (train and validation loss, pseudo Dice on validation patches)
    and the wall times of the epochs and of the final validation (until its summary.json was written)."""
    logging = own_checkpoint(join(fold_folder, 'checkpoint_final.pth'))['logging']
    record = {key: [float(v) for v in logging[key]] for key in ('train_losses', 'val_losses', 'mean_fg_dice')}
    start, end = logging['epoch_start_timestamps'][0], logging['epoch_end_timestamps'][-1]
    summary_time = os.path.getmtime(join(fold_folder, 'validation', 'summary.json'))
    return {**record, 'training_s': round(end - start), 'validation_s': round(summary_time - end)}


def save_loss_plot(curves: dict, fname: str) -> None:
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2)
    for name, c in curves.items():  # 'scratch fold 0': ...
        style = dict(color='tab:blue' if name.startswith('scratch') else 'tab:red', alpha=0.7)
        axes[0].plot(c['train_losses'], label=name, **style)
        axes[1].plot(c['mean_fg_dice'], **style)
    axes[0].set(xlabel='epoch', ylabel='training loss (Dice + CE)')
    axes[1].set(xlabel='epoch', ylabel='pseudo Dice (validation patches)')
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(fname) as tmp:
        fig.savefig(tmp, dpi=110)


def run_arm(arm: str, n_train: int, args, distilled: str, trainers: dict, timings: dict) -> dict:
    """Trains (resuming) and compares one arm; returns its results block: pooled and per-fold table rows, weight
    changes, lesion-type recall, predicted volume and loss curves."""
    arm_environment(args.labeled_preprocessed, join(args.lowshot_work, arm))
    write_lowshot_splits(LABELED, n_train, args.folds, seed=0, overwrite=True)
    folds = list(range(args.control_folds if arm == 'full_data' else args.run_folds or args.folds))
    for fold in folds:
        train_fold(fold, trainers, distilled, args, timings)
    comparison = compare_trainers(LABELED, trainers['scratch'], trainers['screener'], SCREENER_PLANS_NAME,
                                  tuple(folds), output_folder=join(args.lowshot_work, arm, 'comparison'),
                                  verbose=False)
    folders = {a: [trainer_folder(t, f) for f in folds] for a, t in trainers.items()}
    final = {a: join(fs[0], 'checkpoint_final.pth') for a, fs in folders.items()}
    rows = comparison_rows(comparison, folds)
    return {**rows['pooled'], 'per_fold': rows['per_fold'], 'n_train': n_train, 'folds_done': folds,
            'weight_change_fold0': weight_change(distilled, final['screener'], final['scratch']),
            'lesion_type_recall': {a: lesion_type_recall(f) for a, f in folders.items()},
            'predicted_volume_ratio': {a: [predicted_volume_ratio(f) for f in fs] for a, fs in folders.items()},
            'loss_curves': {f'{a} fold {fold}': training_record(f)
                            for a, fs in folders.items() for fold, f in zip(folds, fs)}}


def labeled_phantoms_record() -> dict:
    """The labeled set's lesions: per case, per lesion type (diameters in mm) and the median lesion voxels per case."""
    dataset = load_json(join(os.environ['nnUNet_raw'], LABELED_NAME, 'dataset.json'))
    per_case = [sum(counts.values()) for counts in dataset['nnscreener_lesion_voxels'].values()]
    return {'preset': LABELED_PHANTOMS.name, 'lesions_per_case': list(LABELED_PHANTOMS.lesions_per_case),
            'lesion_diameter_mm': {LESION_TYPES[c]: list(d) for c, d in LABELED_PHANTOMS.lesion_diameter.items()},
            'median_lesion_voxels_per_case': float(np.median(per_case))}


def schedule(trainer: str) -> dict:
    cls = getattr(nnscreener_finetune_trainers, trainer)
    return {'trainer_pair': list(ARM_KEYS[a] + trainer[len('nnScreenerFromScratchTrainer'):] for a in ARM_KEYS),
            'epochs': cls.EPOCHS, 'iterations_per_epoch': cls.ITERATIONS, 'warmup_epochs': cls.WARMUP_EPOCHS,
            'val_iterations_per_epoch': cls.VAL_ITERATIONS, 'batch_size': cls.BATCH,
            'random_patches_per_batch': round(cls.BATCH * (1 - cls.FOREGROUND_PATCHES)),
            'initial_lr': 1e-2, 'optimizer': 'SGD momentum 0.99 nesterov, warm-up then poly decay',
            'mirroring': False} if hasattr(cls, 'EPOCHS') else {'trainer_pair': trainer}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work', required=True, help='the work folder of phantom_benchmark.py (only read)')
    parser.add_argument('--lowshot_work', default=None, help='folder for the trainings (default <work>_lowshot)')
    parser.add_argument('--results_json', default=None, help='summary JSON (default <lowshot_work>/lowshot.json)')
    parser.add_argument('--plot', default=None, help='loss-curve PNG (default <lowshot_work>/lowshot_loss.png)')
    parser.add_argument('--n_labeled', type=int, default=100, help='labeled phantoms (the full-data control trains '
                                                                  'on those outside the validation fold)')
    parser.add_argument('--n_train', type=int, default=25, help='labeled training cases per fold')
    parser.add_argument('--folds', type=int, default=3)
    parser.add_argument('--run_folds', type=int, default=None,
                        help='train and compare folds 0..n-1 of the k-fold splits only (default: all k)')
    parser.add_argument('--control', action='store_true', help='also the full-data control (every case outside '
                                                               'the validation fold, both trainers)')
    parser.add_argument('--control_folds', type=int, default=3, help='folds of the control (0..n-1)')
    parser.add_argument('--pretrain_seed', type=int, default=0, help='whose distilled UNet initialises fine-tuning')
    parser.add_argument('--schedule', default='cpuLowshot',
                        help='trainer suffix: cpuLowshot (300 x 50 iterations), 100epochs, or "" (300 epochs)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--jobs', type=int, default=2, choices=[1, 2], help='trainings at once (the two trainers)')
    parser.add_argument('-np', type=int, default=1, help='nnU-Net worker processes per training (and processes for '
                                                         'the labeled phantoms)')
    args = parser.parse_args()
    args.lowshot_work = os.path.abspath(args.lowshot_work or args.work.rstrip('/') + '_lowshot')
    suffix = f'_{args.schedule}' if args.schedule else ''
    trainers = {arm: name + suffix for arm, name in ARM_KEYS.items()}
    use_work_folder(args.work)
    args.world_preprocessed = os.environ['nnUNet_preprocessed']
    if not isdir(join(args.world_preprocessed, TARGET_NAME)):
        raise SystemExit(f'no phantom world in {args.work}: run phantom_benchmark.py --work {args.work} first')
    os.environ['nnUNet_results'] = os.path.abspath(join(args.work, f'nnUNet_results_seed{args.pretrain_seed}'))
    distilled = stage_checkpoint(TARGET_NAME, 'distillation')
    if not isfile(distilled):
        raise SystemExit(f'{distilled} missing: run phantom_benchmark.py --seeds {args.pretrain_seed} first')
    args.labeled_preprocessed = make_labeled_dataset(args.world_preprocessed, args.lowshot_work, args.n_labeled,
                                                     args.np)
    n_cases = len(dataset_case_ids(LABELED))
    timings = {}
    plans = load_json(join(args.labeled_preprocessed, SCREENER_PLANS_NAME + '.json'))
    result = {'folds': args.folds, 'n_train': args.n_train, 'n_cases': n_cases,
              'batch_dice': plans['configurations'][CONFIGURATION]['batch_dice']}  # the loss of both arms
    lowshot = run_arm('lowshot', args.n_train, args, distilled, trainers, timings)
    result.update(lowshot)
    if args.control:
        n_full = n_cases - -(-n_cases // args.folds)  # every case outside the largest validation fold
        result['full_data'] = run_arm('full_data', n_full, args, distilled, trainers, timings)
    save_loss_plot(lowshot['loss_curves'], args.plot or join(args.lowshot_work, 'lowshot_loss.png'))
    result.update(machine(), seeds={'phantoms': 0, 'labeled_phantoms': LABELED_PHANTOM_SEED, 'splits': 0,
                                    'pretraining': args.pretrain_seed},
                  labeled_phantoms=labeled_phantoms_record(),
                  schedule=schedule(trainers['scratch']), distilled_checkpoint=distilled,
                  timings_s_this_run=timings)
    out = args.results_json or join(args.lowshot_work, 'lowshot.json')
    atomic_save_json(json_ready(result), out)
    print(f"written {out}: scratch {result['scratch']['dice_mean']:.3f}, "
          f"screener {result['screener']['dice_mean']:.3f} (p = {result['screener']['p']:.3g})")


if __name__ == '__main__':
    main()
