"""`nnScreener_plan_and_preprocess`: nnU-Net fingerprint -> Screener plans -> stock preprocessing -> Screener cache."""
import argparse
import json
import os
from os.path import isdir, isfile, join
from typing import Sequence

from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.configuration import default_num_processes
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnscreener.planners.presets import PRESETS, SCREENER_SPACING, get_preset
from nnscreener.planners.screener_planner import CONFIGURATION, SCREENER_PLANS_NAME, nnScreenerPlanner
from nnscreener.preprocessing.screener_cache import build_screener_cache, screener_cache_folder
from nnscreener.preprocessing.validation import check_raw_ct_dataset
from nnscreener.utilities.errors import ScreenerInputError, exit_on_input_error
from nnscreener.utilities.paths import dataset_name, preprocessed_dataset_folder, raw_dataset_folder, require_env


def plan_and_preprocess(dataset_id, pretrain_dataset_ids: Sequence = (), preset: str = 'default',
                        num_processes: int = default_num_processes, allow_small_images: bool = False,
                        continue_: bool = False) -> str:
    """Plans and preprocesses target dataset `dataset_id` the Screener way; returns the plans file.

    Pretraining datasets (labeled or image-only) are preprocessed with the target's plans into the Screener cache.
    """
    require_env('nnUNet_raw', 'nnUNet_preprocessed')
    settings = get_preset(preset)  # an unknown preset or override is a one-line error before any work
    target = dataset_name(dataset_id)
    patch = None if allow_small_images else settings['patch_size']
    if not isdir(join(raw_dataset_folder(target), 'labelsTr')):
        raise ScreenerInputError(f'target dataset {target} has no labelsTr: nnU-Net plans need a labeled target; '
                                 f'give image-only data with -pretrain_d and a labeled dataset with -d')
    sources = {target: check_raw_ct_dataset(raw_dataset_folder(target), True, patch, SCREENER_SPACING)}
    for d in pretrain_dataset_ids:
        name = dataset_name(d)
        sources[name] = check_raw_ct_dataset(raw_dataset_folder(name), False, patch, SCREENER_SPACING)

    plans_file = join(preprocessed_dataset_folder(target), SCREENER_PLANS_NAME + '.json')
    if continue_ and _nnunet_preprocessing_complete(target, settings, sources[target]):
        if load_json(plans_file)['screener'].get('preset') != preset:  # same nnU-Net data, other training settings
            nnScreenerPlanner(target, preset=preset).plan_experiment()
        print(f'{target}: nnU-Net preprocessing of these plans complete, kept (--c)')
    else:
        _run_nnunet_planning(target, preset, num_processes, continue_)
    plans_manager = PlansManager(plans_file)
    configuration_manager = plans_manager.get_configuration(CONFIGURATION)
    dataset_json = load_json(join(preprocessed_dataset_folder(target), 'dataset.json'))
    build_screener_cache(screener_cache_folder(preprocessed_dataset_folder(target), configuration_manager), sources,
                         plans_manager, configuration_manager, dataset_json, num_processes, skip_existing=continue_,
                         target=target)
    return plans_file


# preset keys that shape nnU-Net's plans configuration and preprocessed data; the others only steer the training
CONFIGURATION_KEYS = ('patch_size', 'base_num_features', 'max_num_features', 'finetune_batch_size')


def _nnunet_preprocessing_complete(target: str, settings: dict, cases: dict) -> bool:
    """Plans whose configuration these preset settings would make again exist, and every case has its properties
    file, which nnU-Net writes last per case."""
    plans_file = join(preprocessed_dataset_folder(target), SCREENER_PLANS_NAME + '.json')
    if not isfile(plans_file):
        return False
    planned = load_json(plans_file).get('screener', {})
    if any(planned.get(k) != json.loads(json.dumps(settings[k])) for k in CONFIGURATION_KEYS):  # tuples as in JSON
        return False
    folder = join(preprocessed_dataset_folder(target), f'{SCREENER_PLANS_NAME}_{CONFIGURATION}')
    return all(isfile(join(folder, case + '.pkl')) for case in cases)


def _run_nnunet_planning(target: str, preset: str, num_processes: int, continue_: bool) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id
    dataset_id = convert_dataset_name_to_id(target)
    fingerprint_exists = isfile(join(preprocessed_dataset_folder(target), 'dataset_fingerprint.json'))
    try:
        extract_fingerprint_dataset(dataset_id, num_processes=num_processes, check_dataset_integrity=True,
                                    clean=not (continue_ and fingerprint_exists))
    except (AssertionError, RuntimeError) as e:  # nnU-Net's integrity check: keep its first line, drop the trace
        raise ScreenerInputError(f'{target} failed nnU-Net\'s dataset integrity check: '
                                 f'{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}')
    nnScreenerPlanner(target, preset=preset).plan_experiment()
    preprocess_dataset(dataset_id, SCREENER_PLANS_NAME, (CONFIGURATION,), (num_processes,))


@exit_on_input_error
def plan_and_preprocess_entry():
    parser = argparse.ArgumentParser(description='Fingerprint, plan (nnScreenerPlans) and preprocess a CT dataset '
                                                 'for Screener; pretraining datasets go into the Screener cache.')
    parser.add_argument('-d', type=str, required=True, help='target dataset id or name (labeled, for fine-tuning)')
    parser.add_argument('-pretrain_d', type=str, nargs='*', default=[],
                        help='additional pretraining datasets (ids or names), may be image-only (no labelsTr)')
    parser.add_argument('--preset', default='default',
                        help=f'{", ".join(sorted(PRESETS))} (default: paper scale; cpu: CPU scale; tiny: tests), '
                             f'optionally with overrides, e.g. tiny:steps=900,clahe=0.01')
    parser.add_argument('-np', type=int, default=default_num_processes, help='number of processes')
    parser.add_argument('--allow_small_images', action='store_true',
                        help='zero-pad images smaller than the patch (nnU-Net behaviour) instead of refusing them')
    parser.add_argument('--c', action='store_true', help='continue: keep the fingerprint and cached cases')
    args = parser.parse_args()
    plans_file = plan_and_preprocess(_as_id(args.d), [_as_id(d) for d in args.pretrain_d], args.preset, args.np,
                                     args.allow_small_images, args.c)
    print(f'Screener plans: {plans_file}')


def _as_id(value: str):
    return int(value) if value.isdigit() else value
