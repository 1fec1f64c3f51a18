"""`nnScreener_plan_and_preprocess`: nnU-Net fingerprint -> Screener plans -> stock preprocessing -> Screener cache."""
import argparse
import json
from os.path import isdir, isfile, join
from typing import Sequence

from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.configuration import default_num_processes
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnscreener.planners.presets import PRESETS, SCREENER_SPACING, get_preset
from nnscreener.planners.screener_planner import CONFIGURATION, SCREENER_FROM, SCREENER_PLANS_NAME, nnScreenerPlanner
from nnscreener.preprocessing.screener_cache import build_screener_cache, screener_cache_folder
from nnscreener.preprocessing.validation import check_raw_ct_dataset
from nnscreener.training.stages import screener_dataset
from nnscreener.utilities.errors import ScreenerInputError, exit_on_input_error
from nnscreener.utilities.paths import dataset_name, preprocessed_dataset_folder, raw_dataset_folder, require_env


def plan_and_preprocess(dataset_id, pretrain_dataset_ids: Sequence = (), preset: str = None,
                        num_processes: int = default_num_processes, allow_small_images: bool = False,
                        continue_: bool = False, screener_from=None) -> str:
    """Plans and preprocesses target dataset `dataset_id` the Screener way; returns the plans file.

    The target may be image-only (no labelsTr): then nnU-Net's stock preprocessing for `nnUNetv2_train` is skipped
    (nothing to fine-tune) and the target is the Screener's pretraining data. Pretraining datasets (labeled or
    image-only) are preprocessed with the target's plans into the Screener cache. `screener_from` (a dataset id or
    name) makes the target use that dataset's pretrained Screener: its plans must give the same Screener input and
    network, no pretraining datasets and no Screener cache are needed. preset: default 'default', or the
    `screener_from` dataset's preset.
    """
    require_env('nnUNet_raw', 'nnUNet_preprocessed')
    target = dataset_name(dataset_id)
    source = _screener_source(screener_from, target, pretrain_dataset_ids)
    preset = preset or (load_json(_plans_file(source))['screener']['preset'] if source else 'default')
    settings = get_preset(preset)  # an unknown preset or override is a one-line error before any work
    if source is not None:
        _check_source_network(source, preset, settings)
    patch = None if allow_small_images else settings['patch_size']
    labeled = isdir(join(raw_dataset_folder(target), 'labelsTr'))
    sources = {target: check_raw_ct_dataset(raw_dataset_folder(target), labeled, patch, SCREENER_SPACING,
                                            require_label_names=True)}
    for d in pretrain_dataset_ids:
        name = dataset_name(d)
        sources[name] = check_raw_ct_dataset(raw_dataset_folder(name), False, patch, SCREENER_SPACING)

    plans_file = _plans_file(target)
    if continue_ and _nnunet_preprocessing_complete(target, settings, sources[target], labeled):
        planned = load_json(plans_file)['screener']
        if (planned.get('preset'), planned.get(SCREENER_FROM)) != (preset, source):  # same nnU-Net data
            nnScreenerPlanner(target, preset=preset, screener_from=source).plan_experiment()
        print(f'{target}: nnU-Net preprocessing of these plans complete, kept (--c)')
    else:
        _run_nnunet_planning(target, preset, source, labeled, num_processes, continue_)
    if not labeled:
        print(f'{target} is image-only (no labelsTr): planned for the Screener stages and nnScreener_predict; '
              f'nnUNetv2_train needs a labeled dataset')
    if source is not None:  # no Screener stage trains for this dataset
        print(f'{target} uses the Screener of {source}: no Screener cache, nothing to pretrain')
        return plans_file
    plans_manager = PlansManager(plans_file)
    configuration_manager = plans_manager.get_configuration(CONFIGURATION)
    dataset_json = load_json(join(preprocessed_dataset_folder(target), 'dataset.json'))
    build_screener_cache(screener_cache_folder(preprocessed_dataset_folder(target), configuration_manager), sources,
                         plans_manager, configuration_manager, dataset_json, num_processes, skip_existing=continue_,
                         target=target)
    return plans_file


def _plans_file(name: str) -> str:
    return join(preprocessed_dataset_folder(name), SCREENER_PLANS_NAME + '.json')


def _screener_source(screener_from, target: str, pretrain_dataset_ids: Sequence):
    """The dataset whose pretrained Screener the target is to use (None: its own), checked for use."""
    if screener_from is None:
        return None
    if pretrain_dataset_ids:
        raise ScreenerInputError('--screener_from reuses a pretrained Screener, so there is nothing to pretrain on: '
                                 'drop -pretrain_d, or drop --screener_from to pretrain a new Screener')
    source = screener_dataset(dataset_name(screener_from))  # one that borrows itself: the one it borrows from
    if source == target:
        raise ScreenerInputError(f'{target} cannot use its own Screener through --screener_from: plan it without '
                                 f'--screener_from')
    if not isfile(_plans_file(source)):
        raise ScreenerInputError(f'{_plans_file(source)} missing: plan and pretrain {source} first '
                                 f'(nnScreener_plan_and_preprocess -d {source}, nnScreener_pretrain -d {source})')
    return source


def _check_source_network(source: str, preset: str, settings: dict) -> None:
    """Before any image is read: a preset whose patch or network differs from the source Screener's. The planner
    checks the finished plans in full (spacing, intensities, the network nnU-Net builds)."""
    planned = load_json(_plans_file(source))['screener']
    differ = _differing_keys(planned, settings, NETWORK_KEYS)
    if differ:
        raise ScreenerInputError(f'preset {preset} gives another {", ".join(differ)} than the Screener of {source} '
                                 f'(preset {planned["preset"]}): plan with --preset {planned["preset"]}, or leave '
                                 f'--preset out')


# preset keys that shape nnU-Net's plans configuration and preprocessed data; the others only steer the training
NETWORK_KEYS = ('patch_size', 'base_num_features', 'max_num_features')  # what a pretrained Screener's weights fit
CONFIGURATION_KEYS = NETWORK_KEYS + ('finetune_batch_size',)


def _differing_keys(planned: dict, settings: dict, keys) -> list:
    return [k for k in keys if planned.get(k) != json.loads(json.dumps(settings[k]))]  # tuples as in JSON


def _nnunet_preprocessing_complete(target: str, settings: dict, cases: dict, labeled: bool) -> bool:
    """Plans whose configuration these preset settings would make again exist, and every case of a labeled target
    has its properties file, which nnU-Net writes last per case (an image-only target has no nnU-Net data)."""
    plans_file = _plans_file(target)
    if not isfile(plans_file):
        return False
    planned = load_json(plans_file).get('screener', {})
    if _differing_keys(planned, settings, CONFIGURATION_KEYS):
        return False
    folder = join(preprocessed_dataset_folder(target), f'{SCREENER_PLANS_NAME}_{CONFIGURATION}')
    return not labeled or all(isfile(join(folder, case + '.pkl')) for case in cases)


class ImageOnlyFingerprintExtractor(DatasetFingerprintExtractor):
    """nnU-Net's fingerprint of a dataset without labelsTr: each image stands in for its own segmentation, so nnU-Net
    reads shapes, spacings and nonzero crops as usual, and its foreground intensity statistics are those of the
    voxels above 0 (unused: the Screener plans fix the CT intensities). nnU-Net's workers call its static
    analyze_case, so the labels are replaced here rather than the analysis overridden."""

    def __init__(self, dataset_name_or_id, num_processes: int = 8, verbose: bool = False):
        super().__init__(dataset_name_or_id, num_processes, verbose)
        for case in self.dataset.values():
            case['label'] = case['images'][0]


def _run_nnunet_planning(target: str, preset: str, source, labeled: bool, num_processes: int,
                         continue_: bool) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id
    dataset_id = convert_dataset_name_to_id(target)
    fingerprint_exists = isfile(join(preprocessed_dataset_folder(target), 'dataset_fingerprint.json'))
    try:  # nnU-Net's integrity check is about labels; images are checked by check_raw_ct_dataset
        extract_fingerprint_dataset(dataset_id, DatasetFingerprintExtractor if labeled else ImageOnlyFingerprintExtractor,
                                    num_processes=num_processes, check_dataset_integrity=labeled,
                                    clean=not (continue_ and fingerprint_exists))
    except (AssertionError, RuntimeError) as e:  # nnU-Net's integrity check: keep its first line, drop the trace
        raise ScreenerInputError(f'{target} failed nnU-Net\'s dataset integrity check: '
                                 f'{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}')
    nnScreenerPlanner(target, preset=preset, screener_from=source).plan_experiment()
    if labeled:  # nnUNetv2_train's data; the Screener cache reads the images itself
        preprocess_dataset(dataset_id, SCREENER_PLANS_NAME, (CONFIGURATION,), (num_processes,))


@exit_on_input_error
def plan_and_preprocess_entry():
    parser = argparse.ArgumentParser(description='Fingerprint, plan (nnScreenerPlans) and preprocess a CT dataset '
                                                 'for Screener; pretraining datasets go into the Screener cache.')
    parser.add_argument('-d', type=str, required=True,
                        help='target dataset id or name: labeled (fine-tuning) or image-only (Screener only)')
    parser.add_argument('-pretrain_d', type=str, nargs='*', default=[],
                        help='additional pretraining datasets (ids or names), may be image-only (no labelsTr)')
    parser.add_argument('--preset', default=None,
                        help=f'{", ".join(sorted(PRESETS))} (default: paper scale; cpu: CPU scale; tiny: tests), '
                             f'optionally with overrides, e.g. tiny:steps=900,clahe=0.01 (default: default, or the '
                             f'preset of the --screener_from dataset)')
    parser.add_argument('-np', type=int, default=default_num_processes, help='number of processes')
    parser.add_argument('--allow_small_images', action='store_true',
                        help='zero-pad images smaller than the patch (nnU-Net behaviour) instead of refusing them')
    parser.add_argument('--c', action='store_true', help='continue: keep the fingerprint and cached cases')
    parser.add_argument('--screener_from', default=None,
                        help='dataset id or name whose pretrained Screener this dataset uses (no pretraining of its '
                             'own; its plans must give the same spacing, patch, network and CT intensities) '
                             '(default: none, the dataset gets its own Screener)')
    args = parser.parse_args()
    plans_file = plan_and_preprocess(_as_id(args.d), [_as_id(d) for d in args.pretrain_d], args.preset, args.np,
                                     args.allow_small_images, args.c,
                                     None if args.screener_from is None else _as_id(args.screener_from))
    print(f'Screener plans: {plans_file}')


def _as_id(value: str):
    return int(value) if value.isdigit() else value
