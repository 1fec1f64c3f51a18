"""`nnScreener_plan_and_preprocess`: nnU-Net fingerprint -> Screener plans -> stock preprocessing -> Screener cache."""
import json
from os.path import isdir, isfile, join
from typing import Sequence

from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.configuration import default_num_processes
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnscreener.planners.presets import PRESETS, SCREENER_SPACING
from nnscreener.planners.screener_planner import (CONFIGURATION, SCREENER_FROM, SCREENER_PLANS_NAME, nnScreenerPlanner,
                                                  planned_unet, screener_plans_file, screener_settings)
from nnscreener.planners.settings import ScreenerSettings
from nnscreener.planners.unets import DEFAULT_UNET, UNETS
from nnscreener.preprocessing.screener_cache import build_screener_cache, screener_cache_folder
from nnscreener.preprocessing.validation import check_raw_ct_dataset, load_ct_dataset_json
from nnscreener.training.stages import screener_dataset
from nnscreener.utilities.console import output_to_log
from nnscreener.utilities.cli import argument_parser
from nnscreener.utilities.errors import ScreenerInputError, exit_on_input_error
from nnscreener.utilities.paths import dataset_name, preprocessed_dataset_folder, raw_dataset_folder, require_env


def plan_and_preprocess(dataset_id, pretrain_dataset_ids: Sequence = (), preset: str = None,
                        num_processes: int = default_num_processes, allow_small_images: bool = False,
                        continue_: bool = False, screener_from=None, allow_non_hu: bool = False, unet: str = None,
                        gpu_memory_target: float = None) -> str:
    """Plans and preprocesses target dataset `dataset_id` the Screener way; returns the plans file.
    allow_non_hu: accept images whose values do not look like HU (`check_hounsfield_units`).

    The target may be image-only (no labelsTr): then nnU-Net's stock preprocessing for `nnUNetv2_train` is skipped
    (nothing to fine-tune) and the target is the Screener's pretraining data. Pretraining datasets (labeled or
    image-only) are preprocessed with the target's plans into the Screener cache. `screener_from` (a dataset id or
    name) makes the target use that dataset's pretrained Screener: its plans must give the same Screener input and
    network, no pretraining datasets and no Screener cache are needed. preset: default 'default', or the
    `screener_from` dataset's preset. unet: a name of nnscreener.planners.unets.UNETS (default 'plain', or the
    `screener_from` dataset's). gpu_memory_target: GB the batch sizes are fitted to (nnscreener.planners.gpu_memory;
    default: the preset's batch sizes).
    """
    require_env('nnUNet_raw', 'nnUNet_preprocessed')
    target = dataset_name(dataset_id)
    source = _screener_source(screener_from, target, pretrain_dataset_ids)
    source_settings = ScreenerSettings.from_plans(load_json(screener_plans_file(source))) if source else None
    preset = preset or (source_settings.preset if source else None) or 'default'
    unet = unet or (source_settings.unet if source else DEFAULT_UNET)
    # an unknown preset, override or UNet, or a memory target too small, is a one-line error before any work
    settings = screener_settings(preset, unet, gpu_memory_target,
                                 _num_labels(target) if gpu_memory_target is not None else 2)
    planner = dict(preset=preset, screener_from=source, unet=unet, gpu_memory_target=gpu_memory_target)
    if source is not None:
        _check_source_network(source, preset, settings)
    patch = None if allow_small_images else settings['patch_size']
    labeled = isdir(join(raw_dataset_folder(target), 'labelsTr'))
    sources = {target: check_raw_ct_dataset(raw_dataset_folder(target), labeled, patch, SCREENER_SPACING,
                                            require_label_names=True, allow_non_hu=allow_non_hu)}
    for d in pretrain_dataset_ids:
        name = dataset_name(d)
        sources[name] = check_raw_ct_dataset(raw_dataset_folder(name), False, patch, SCREENER_SPACING,
                                             allow_non_hu=allow_non_hu)

    plans_file = screener_plans_file(target)
    log_file = join(preprocessed_dataset_folder(target), 'nnscreener_plan_and_preprocess.log')
    if continue_ and _nnunet_preprocessing_complete(target, settings, sources[target], labeled):
        if load_json(plans_file)['screener'] != _screener_block(preset, settings, source):  # same nnU-Net data
            with output_to_log(log_file, f'nnScreenerPlanner of {target}'):
                nnScreenerPlanner(target, **planner).plan_experiment()
        print(f'{target}: nnU-Net preprocessing of these plans complete, kept (--c)')
    else:
        print(f'{target}: nnU-Net fingerprint, plans and preprocessing (their output: {log_file})', flush=True)
        with output_to_log(log_file, f'nnU-Net fingerprint, nnScreenerPlanner, preprocessing of {target}'):
            _run_nnunet_planning(target, planner, labeled, num_processes, continue_)
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


def _num_labels(target: str) -> int:
    """Outputs of the fine-tuning network (labels, background included); a dataset.json without labels is refused by
    the validation that follows."""
    return max(1, len(load_ct_dataset_json(raw_dataset_folder(target)).get('labels', {})))


def _screener_block(preset: str, settings: dict, source) -> dict:
    """The `screener` block the planner writes for these settings, as the plans' JSON holds it."""
    block = {'preset': preset, **settings, **({SCREENER_FROM: source} if source is not None else {})}
    return json.loads(json.dumps(block))


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
    if not isfile(screener_plans_file(source)):
        raise ScreenerInputError(f'{screener_plans_file(source)} missing: plan and pretrain {source} first '
                                 f'(nnScreener_plan_and_preprocess -d {source}, nnScreener_pretrain -d {source})')
    return source


def _check_source_network(source: str, preset: str, settings: dict) -> None:
    """Before any image is read: a preset whose patch or network differs from the source Screener's. The planner
    checks the finished plans in full (spacing, intensities, the network nnU-Net builds)."""
    planned = load_json(screener_plans_file(source))['screener']  # compared as the JSON holds it
    differ = _differing_keys(planned, settings, NETWORK_KEYS)
    if differ:
        source_settings = ScreenerSettings.from_dict(planned)
        raise ScreenerInputError(f'preset {preset} with the {planned_unet(settings)} UNet gives another '
                                 f'{", ".join(differ)} than the Screener of {source} (preset {source_settings.preset}, '
                                 f'{source_settings.unet} UNet): plan with --preset {source_settings.preset} --unet '
                                 f'{source_settings.unet}, or leave --preset and --unet out')


# preset keys that shape nnU-Net's plans configuration and preprocessed data; the others only steer the training
NETWORK_KEYS = ('patch_size', 'base_num_features', 'max_num_features', 'unet')  # what a pretrained Screener's weights fit
CONFIGURATION_KEYS = NETWORK_KEYS + ('finetune_batch_size',)


def _differing_keys(planned: dict, settings: dict, keys) -> list:
    return [k for k in keys if planned.get(k) != json.loads(json.dumps(settings.get(k)))]  # tuples as in JSON


def _nnunet_preprocessing_complete(target: str, settings: dict, cases: dict, labeled: bool) -> bool:
    """Plans whose configuration these preset settings would make again exist, and every case of a labeled target
    has its properties file, which nnU-Net writes last per case (an image-only target has no nnU-Net data)."""
    plans_file = screener_plans_file(target)
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


def _run_nnunet_planning(target: str, planner: dict, labeled: bool, num_processes: int, continue_: bool) -> None:
    """nnU-Net's fingerprint, nnScreenerPlanner(target, **planner), and nnU-Net's preprocessing of a labeled target."""
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
    nnScreenerPlanner(target, **planner).plan_experiment()
    if labeled:  # nnUNetv2_train's data; the Screener cache reads the images itself
        preprocess_dataset(dataset_id, SCREENER_PLANS_NAME, (CONFIGURATION,), (num_processes,))


@exit_on_input_error
def plan_and_preprocess_entry():
    parser = argument_parser('Fingerprint, plan (nnScreenerPlans) and preprocess a CT dataset '
                             'for Screener; pretraining datasets go into the Screener cache.')
    parser.add_argument('-d', type=str, required=True,
                        help='target dataset id or name: labeled (fine-tuning) or image-only (Screener only)')
    parser.add_argument('-pretrain_d', type=str, nargs='*', default=[],
                        help='additional pretraining datasets (ids or names), may be image-only (no labelsTr) '
                             '(default: none)')
    parser.add_argument('--preset', default=None,
                        help=f'{", ".join(sorted(PRESETS))} (default = paper scale, cpu = CPU scale, tiny = tests), '
                             f'optionally with overrides, e.g. tiny:steps=900,clahe=0.01 (default: default, or the '
                             f'preset of the --screener_from dataset)')
    parser.add_argument('-np', type=int, default=default_num_processes,
                        help='processes of nnU-Net\'s fingerprint and preprocessing and of the Screener cache')
    parser.add_argument('--allow_small_images', action='store_true',
                        help='zero-pad images smaller than the patch (nnU-Net behaviour) instead of refusing them')
    parser.add_argument('--allow_non_hu', action='store_true',
                        help='accept images whose values do not look like CT in HU (none below 0, or a range under '
                             '10), which are refused by default')
    parser.add_argument('--c', action='store_true', help='continue: keep the fingerprint and cached cases')
    parser.add_argument('--screener_from', default=None,
                        help='dataset id or name whose pretrained Screener this dataset uses (no pretraining of its '
                             'own; its plans must give the same spacing, patch, network and CT intensities) '
                             '(default: none, the dataset gets its own Screener)')
    parser.add_argument('--unet', default=None, choices=list(UNETS),
                        help='the UNet of every Screener network and of fine-tuning: nnU-Net\'s PlainConvUNet (plain) '
                             'or its residual-encoder UNet with the block counts of nnUNetPlannerResEncM/L/XL (ResEncM, '
                             'ResEncL, ResEncXL: the same network, each with its planner\'s memory calibration) '
                             '(default: plain, or the UNet of the --screener_from dataset)')
    parser.add_argument('-gpu_memory_target', type=float, default=None,
                        help='GPU memory in GB the batch sizes are fitted to, estimated as nnU-Net\'s planners do '
                             '(nnUNetPlannerResEncL: 24); patch and widths stay the preset\'s (default: the preset\'s '
                             'batch sizes)')
    args = parser.parse_args()
    plans_file = plan_and_preprocess(_as_id(args.d), [_as_id(d) for d in args.pretrain_d], args.preset, args.np,
                                     args.allow_small_images, args.c,
                                     None if args.screener_from is None else _as_id(args.screener_from),
                                     args.allow_non_hu, args.unet, args.gpu_memory_target)
    print(f'Screener plans: {plans_file}')


def _as_id(value: str):
    return int(value) if value.isdigit() else value
