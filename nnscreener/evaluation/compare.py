"""Paired comparison of two nnU-Net trainers on the same folds, as in the paper's Table 2: `nnScreener_compare`.

Reads each fold's `validation/summary.json` written by `nnUNetv2_train` for trainer A (e.g. from scratch) and B
(e.g. fine-tuned from Screener), pairs the per-case Dice by (fold, case), and reports per label the mean Dice of
both, the relative change (B - A) / A in % and the two-sided Wilcoxon signed-rank p-value.

NaN Dice: nnU-Net writes NaN when reference and prediction are both empty and averages with np.nanmean, i.e. it
ignores such cases. We follow that: a (fold, case) pair is left out of a label's comparison when either trainer's
Dice is NaN, so both means and the test use the same cases (the count left out is reported).
"""
import json
import math
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy.stats import wilcoxon

from nnscreener.evaluation.evaluate import json_ready
from nnscreener.finetuning.lowshot_splits import SPLITS_FILE
from nnscreener.utilities.cli import argument_parser
from nnscreener.utilities.errors import ScreenerInputError, exit_on_input_error
from nnscreener.utilities.io import atomic_path, atomic_save_json, atomic_save_text
from nnscreener.utilities.output_folder import check_output_folder, claim_outputs, output_folder_lock
from nnscreener.utilities.paths import dataset_name, require_env

OUTPUT_BASENAME = 'comparison'


def _case_id(reference_file: str) -> str:
    name = os.path.basename(reference_file)
    return name[:-len('.nii.gz')] if name.endswith('.nii.gz') else os.path.splitext(name)[0]


def _trainer_folder(results_dataset_folder: str, trainer: str, plans: str, configuration: str) -> str:
    return os.path.join(results_dataset_folder, f'{trainer}__{plans}__{configuration}')


def _load_fold_dice(path: str, train_command: str) -> Dict[str, Dict[str, float]]:
    """{case id: {label key: Dice}} of one nnU-Net validation summary.json."""
    if not os.path.isfile(path):
        raise ScreenerInputError(f'{path} not found: train and validate this fold with `{train_command}` '
                                 f'(add --val if training already finished)')
    try:
        with open(path) as f:
            summary = json.load(f)  # nnU-Net writes NaN literals, which json accepts
        return {_case_id(entry['reference_file']): {label: metrics['Dice']
                                                    for label, metrics in entry['metrics'].items()}
                for entry in summary['metric_per_case']}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ScreenerInputError(f'{path} is truncated or not an nnU-Net validation summary ({type(e).__name__}: '
                                 f'{str(e)[:80]}): re-create it with `{train_command} --val`')


def _check_fold_cases(fold_cases: Dict[int, List[str]], trainer: str, dataset: str) -> None:
    """Each fold's summary must hold exactly that fold's validation cases of splits_final.json, or, where that file
    is not at hand, cases no other fold holds (the folds partition the dataset): a summary copied from another fold
    would otherwise enter the test twice and halve its p-value."""
    splits_file = os.path.join(os.environ.get('nnUNet_preprocessed', ''), dataset, SPLITS_FILE)
    splits = _load_splits(splits_file) if os.path.isfile(splits_file) else None
    seen = {}
    for fold, cases in fold_cases.items():
        expected = None if splits is None or fold >= len(splits) else sorted(splits[fold]['val'])
        if expected is not None and sorted(cases) != expected:
            raise ScreenerInputError(f'{trainer} fold_{fold}: its validation summary holds {len(cases)} cases that '
                                     f'are not the {len(expected)} validation cases of fold {fold} in {splits_file} '
                                     f'(a summary copied from another fold, or trained with other splits?): '
                                     f're-validate that fold with nnUNetv2_train ... --val')
        for case in cases:
            if case in seen:
                raise ScreenerInputError(f'{trainer}: case {case} is in the validation summaries of fold_{seen[case]} '
                                         f'and fold_{fold}, but the folds must partition the cases (a summary '
                                         f'copied from another fold?): re-validate them with nnUNetv2_train ... --val')
            seen[case] = fold


def _load_splits(splits_file: str) -> List[Dict]:
    try:
        with open(splits_file) as f:
            return [{'val': list(fold['val'])} for fold in json.load(f)]
    except (ValueError, KeyError, TypeError) as e:
        raise ScreenerInputError(f'{splits_file} is damaged ({type(e).__name__}): re-create it '
                                 f'(nnScreener_lowshot_splits, or nnUNetv2_train writes the default one)')


def _label_names(trainer_folder: str) -> Dict[str, str]:
    """Label key ('1') -> name from the dataset.json nnU-Net copies into the trainer folder (empty if absent)."""
    path = os.path.join(trainer_folder, 'dataset.json')
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        labels = json.load(f).get('labels', {})
    return {str(value): name for name, value in labels.items() if isinstance(value, int)}


def paired_dice_test(dice_a: Sequence[float], dice_b: Sequence[float]) -> Dict:
    """Mean Dice of A and B, relative change (B - A) / A in %, two-sided Wilcoxon signed-rank p-value (scipy
    defaults: zero differences dropped), over the pairs where neither Dice is NaN."""
    dice_a, dice_b = np.asarray(dice_a, dtype=float), np.asarray(dice_b, dtype=float)
    valid = ~(np.isnan(dice_a) | np.isnan(dice_b))
    a, b = dice_a[valid], dice_b[valid]
    result = {'n_pairs': int(valid.sum()), 'n_excluded_nan': int((~valid).sum()),
              'mean_dice_a': float(a.mean()) if a.size else math.nan,
              'mean_dice_b': float(b.mean()) if b.size else math.nan, 'p_value': math.nan}
    mean_a, mean_b = result['mean_dice_a'], result['mean_dice_b']
    result['relative_change_percent'] = (mean_b - mean_a) / mean_a * 100 if mean_a else math.nan
    if a.size:
        with warnings.catch_warnings():
            # all-zero differences: scipy warns about 0/0 in the normal approximation and returns p = 1
            warnings.simplefilter('ignore', RuntimeWarning)
            result['p_value'] = float(wilcoxon(b, a).pvalue)
    return result


def _format_change(row: Dict) -> str:
    if math.isnan(row['relative_change_percent']):
        return f"{row['mean_dice_b']:.3f}"
    arrow = '↑' if row['relative_change_percent'] >= 0 else '↓'
    p = row['p_value']
    p_text = 'p n/a' if math.isnan(p) else ('p < 0.01' if p < 0.01 else f'p = {p:.2f}')
    return f"{row['mean_dice_b']:.3f} {arrow} {abs(row['relative_change_percent']):.0f}% ({p_text})"


def markdown_table(result: Dict) -> str:
    """The Table 2 style comparison.md of a compare_trainers result: mean Dice (3 decimals), change and p-value."""
    rows = list(result['labels'].values())
    counts = ', '.join(f"{row['name']}: {row['n_pairs']} paired cases"
                       + (f" ({row['n_excluded_nan']} with NaN Dice left out)" if row['n_excluded_nan'] else '')
                       for row in rows)
    lines = ['| Model | ' + ' | '.join(row['name'] for row in rows) + ' |',
             '|' + ' --- |' * (len(rows) + 1),
             f"| {result['trainer_a']} | " + ' | '.join(f"{row['mean_dice_a']:.3f}" for row in rows) + ' |',
             f"| {result['trainer_b']} | " + ' | '.join(_format_change(row) for row in rows) + ' |']
    return (f"Dice of {result['trainer_b']} vs {result['trainer_a']} ({result['dataset']}, {result['plans']}, "
            f"{result['configuration']}, folds {', '.join(map(str, result['folds']))}); relative change and two-sided "
            f"Wilcoxon signed-rank p-value on per-case Dice. {counts}.\n\n" + '\n'.join(lines) + '\n')


def _save_paired_plot(result: Dict, fname: str) -> None:
    """Box plot of both trainers per label, each case's two Dice values joined by a line."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    labels = result['labels']
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 4), squeeze=False)
    for ax, row in zip(axes[0], labels.values()):
        pairs = np.array([row['dice_a'], row['dice_b']], dtype=float)
        pairs = pairs[:, ~np.isnan(pairs).any(axis=0)]
        ax.plot([0, 1], pairs, color='grey', alpha=0.4, linewidth=0.8, marker='o', markersize=3)
        ax.boxplot(list(pairs), positions=[0, 1], widths=0.35, showfliers=False)
        ax.set_xticks([0, 1], [result['trainer_a'], result['trainer_b']], rotation=15, fontsize=7)
        ax.set_ylabel('Dice')
        ax.set_title(f"{row['name']}: p = {row['p_value']:.3g}", fontsize=9)
    fig.tight_layout()
    with atomic_path(fname) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _describe(keys: List[Tuple[int, str]], at_most: int = 10) -> str:
    return ', '.join(f'fold_{f}/{c}' for f, c in keys[:at_most]) + (' ...' if len(keys) > at_most else '')


def _paired_cases(dice_a: Dict[Tuple[int, str], Dict[str, float]],
                  dice_b: Dict[Tuple[int, str], Dict[str, float]], trainer_a: str, trainer_b: str) -> List:
    """Sorted (fold, case) keys present for both trainers; refuses differing case sets."""
    only_a, only_b = sorted(set(dice_a) - set(dice_b)), sorted(set(dice_b) - set(dice_a))
    if only_a or only_b:
        raise ScreenerInputError(f'the trainers were validated on different cases (were they trained with the same '
                                 f'splits_final.json?): only {trainer_a}: [{_describe(only_a)}]; only {trainer_b}: '
                                 f'[{_describe(only_b)}]')
    return sorted(dice_a)


def compare_trainers(dataset: Union[int, str], trainer_a: str, trainer_b: str, plans: str = 'nnScreenerPlans',
                     folds: Sequence[int] = (0, 1, 2), configuration: str = '3d_fullres',
                     output_folder: Optional[str] = None, verbose: bool = True) -> Dict:
    """Paired per-case Dice comparison of trainer B against trainer A (the reference, e.g. from scratch).

    Writes comparison.md (Table 2 style), comparison.json (per label: means, relative change, p-value, n and the
    paired per-case values) and comparison.png to output_folder (default: $nnUNet_results/DatasetXXX_Name/
    compare__A__vs__B__plans__configuration). Returns the JSON content.
    """
    require_env('nnUNet_results')
    results_folder = os.path.join(os.environ['nnUNet_results'], dataset_name(dataset))
    outputs = [OUTPUT_BASENAME + ending for ending in ('.md', '.json', '.png')]
    if output_folder is not None:  # a folder the user named; the default one in nnUNet_results is ours
        check_output_folder(output_folder, outputs)
    dice = {}
    for trainer in (trainer_a, trainer_b):
        folder = _trainer_folder(results_folder, trainer, plans, configuration)
        dice[trainer], fold_cases = {}, {}
        for fold in folds:
            command = f'nnUNetv2_train {dataset} {configuration} {fold} -p {plans} -tr {trainer}'
            fold_dice = _load_fold_dice(os.path.join(folder, f'fold_{fold}', 'validation', 'summary.json'), command)
            dice[trainer].update({(fold, case): values for case, values in fold_dice.items()})
            fold_cases[fold] = list(fold_dice)
        _check_fold_cases(fold_cases, trainer, os.path.basename(results_folder))
    keys = _paired_cases(dice[trainer_a], dice[trainer_b], trainer_a, trainer_b)
    label_keys = sorted({label for values in dice[trainer_a].values() for label in values})
    names = _label_names(_trainer_folder(results_folder, trainer_a, plans, configuration))

    labels = {}
    for label in label_keys:
        dice_a = [dice[trainer_a][key].get(label, math.nan) for key in keys]
        dice_b = [dice[trainer_b][key].get(label, math.nan) for key in keys]
        labels[label] = {'name': names.get(label, f'label {label}'), **paired_dice_test(dice_a, dice_b),
                         'cases': [f'fold_{f}/{c}' for f, c in keys], 'dice_a': dice_a, 'dice_b': dice_b}
    result = {'dataset': os.path.basename(results_folder), 'plans': plans, 'configuration': configuration,
              'folds': list(folds), 'trainer_a': trainer_a, 'trainer_b': trainer_b, 'labels': labels}

    user_folder = output_folder is not None
    if not user_folder:
        output_folder = os.path.join(results_folder, f'compare__{trainer_a}__vs__{trainer_b}__{plans}__{configuration}')
    markdown = markdown_table(result)
    md_file, json_file, png_file = (os.path.join(output_folder, name) for name in outputs)
    with output_folder_lock(output_folder):
        if user_folder:
            claim_outputs(output_folder, outputs)
        atomic_save_text(markdown, md_file)
        atomic_save_json(json_ready(result), json_file)
        _save_paired_plot(result, png_file)
    if verbose:
        print(markdown + f'\nwritten to {output_folder}')
    return result


@exit_on_input_error
def compare_entry():
    parser = argument_parser('Paired per-case Dice comparison of two nnU-Net trainers on the same '
                             'folds (mean Dice, relative change, Wilcoxon signed-rank p-value).')
    parser.add_argument('-d', required=True, help='dataset id or name')
    parser.add_argument('-p', default='nnScreenerPlans', help='plans identifier (default: nnScreenerPlans)')
    parser.add_argument('-a', required=True, help='reference trainer A, e.g. nnScreenerFromScratchTrainer')
    parser.add_argument('-b', required=True, help='trainer B compared against A, e.g. nnScreenerFinetuneTrainer')
    parser.add_argument('-f', nargs='+', type=int, default=[0, 1, 2], help='folds (default: 0 1 2)')
    parser.add_argument('-c', default='3d_fullres', help='configuration (default: 3d_fullres)')
    parser.add_argument('-o', default=None, help='output folder (default: under $nnUNet_results/DatasetXXX_Name)')
    args = parser.parse_args()
    compare_trainers(args.d, args.a, args.b, args.p, args.f, args.c, args.o)
