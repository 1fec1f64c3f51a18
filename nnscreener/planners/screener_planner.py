"""The Screener experiment planner: nnU-Net's planner with the paper's fixed spacing, patch and CT intensities.

Only `3d_fullres` is planned. The UNet (nnU-Net's PlainConvUNet or its residual-encoder UNet,
`nnscreener.planners.unets`) and its topology (stages, strides, kernels) come from nnU-Net's own
`get_pool_and_conv_props` for the fixed patch; the preprocessor and normalisation keep nnU-Net's stock names
(`DefaultPreprocessor`, `CTNormalization`) so stock `nnUNetv2_train` / `nnUNetv2_predict` run on these plans.
"""
import json
import shutil
from os.path import join
from typing import Union

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.json_export import recursive_fix_for_json_export

from nnscreener.planners.gpu_memory import fit_to_gpu_memory
from nnscreener.planners.presets import CT_CLIP_RANGE, SCREENER_SPACING, get_preset
from nnscreener.planners.unets import DEFAULT_UNET, plans_architecture, unet_spec
from nnscreener.utilities.errors import ScreenerInputError
from nnscreener.utilities.paths import preprocessed_dataset_folder

SCREENER_PLANS_NAME = 'nnScreenerPlans'

CONFIGURATION = '3d_fullres'
SCREENER_FROM = 'screener_from'  # `screener` key: the dataset whose pretrained Screener these plans use
# what the Screener networks see and are: must be identical for a dataset that uses another dataset's Screener
SAME_INPUT_PLANS_KEYS = ('transpose_forward', 'foreground_intensity_properties_per_channel')
SAME_INPUT_CONFIGURATION_KEYS = ('spacing', 'patch_size', 'architecture', 'normalization_schemes',
                                 'use_mask_for_norm', 'resampling_fn_data', 'resampling_fn_data_kwargs')


def screener_plans_file(name: str) -> str:
    """<nnUNet_preprocessed>/<dataset>/nnScreenerPlans.json"""
    return join(preprocessed_dataset_folder(name), SCREENER_PLANS_NAME + '.json')


def check_same_screener_input(plans: dict, source_plans: dict, source_file: str) -> None:
    """Plans that use the Screener of `source_plans` (from `source_file`) must give its networks the same input
    (spacing, patch, resampling, CT intensities) and build the same network; otherwise one line naming the keys."""
    plans_cfg, source_cfg = plans['configurations'][CONFIGURATION], source_plans['configurations'][CONFIGURATION]
    differ = [k for k in SAME_INPUT_PLANS_KEYS if plans.get(k) != source_plans.get(k)] + \
        [k for k in SAME_INPUT_CONFIGURATION_KEYS if plans_cfg.get(k) != source_cfg.get(k)]
    if differ:
        raise ScreenerInputError(
            f'{plans["dataset_name"]} ({plans["screener"]["preset"]}) cannot use the Screener of {source_file} '
            f'({source_plans["screener"]["preset"]}): {", ".join(differ)} differ; plan it with the same preset '
            f'(--preset {source_plans["screener"]["preset"]}, or leave --preset out)')


def ct_intensity_properties() -> dict:
    """Intensity properties that make nnU-Net's CTNormalization compute clip([-1000, 300]) -> [0, 1].

    CTNormalization does clip(x, p00_5, p99_5), then (x - mean) / std; with mean = -1000 and std = 1300 that is
    exactly the paper's clip-and-rescale.
    """
    low, high = CT_CLIP_RANGE
    return {'mean': low, 'std': high - low, 'percentile_00_5': low, 'percentile_99_5': high,
            'min': low, 'max': high, 'median': (low + high) / 2}


def screener_settings(preset: str, unet: str = DEFAULT_UNET, gpu_memory_target: float = None,
                      num_labels: int = 2) -> dict:
    """What the plans' `screener` block records besides the preset's name: the preset's values, the UNet when it is
    not nnU-Net's default (`unet`), and batch sizes fitted to `gpu_memory_target` GB when given (`gpu_memory`);
    num_labels: the dataset's labels, background included (the fine-tuning network's outputs)."""
    settings = get_preset(preset)
    unet_spec(unet)  # an unknown name is a one-line error
    if unet != DEFAULT_UNET:  # plans of the default UNet stay as they were before the choice existed
        settings['unet'] = unet
    if gpu_memory_target is not None:
        settings = fit_to_gpu_memory(settings, unet, gpu_memory_target, num_labels)
    return settings


def planned_unet(screener: dict) -> str:
    return screener.get('unet', DEFAULT_UNET)


class nnScreenerPlanner(ExperimentPlanner):
    def __init__(self, dataset_name_or_id: Union[str, int], preset: str = 'default',
                 plans_name: str = SCREENER_PLANS_NAME, screener_from: str = None, unet: str = DEFAULT_UNET,
                 gpu_memory_target: float = None):
        """screener_from: name of the dataset whose pretrained Screener these plans use (checked to fit);
        unet: a name of nnscreener.planners.unets.UNETS; gpu_memory_target: GB the batch sizes are fitted to."""
        # Screener works in (z, y, x) at a fixed spacing: nnU-Net's axis transpose would only confuse the crop maths
        super().__init__(dataset_name_or_id, plans_name=plans_name, suppress_transpose=True,
                         overwrite_target_spacing=[float(s) for s in SCREENER_SPACING])
        self.preset_name = preset
        self.preset = screener_settings(preset, unet, gpu_memory_target, len(self.dataset_json['labels']))
        self.screener_from = screener_from
        self.unet = unet
        self.UNet_base_num_features = self.preset['base_num_features']
        self.UNet_max_features_3d = self.preset['max_num_features']

    def determine_fullres_target_spacing(self) -> np.ndarray:
        return np.array(SCREENER_SPACING, dtype=float)

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache) -> dict:
        patch_size = self.preset['patch_size']
        resampling_data, resampling_data_kwargs, resampling_seg, resampling_seg_kwargs = self.determine_resampling()
        resampling_softmax, resampling_softmax_kwargs = self.determine_segmentation_softmax_export_fn()
        return {
            'data_identifier': data_identifier,
            'preprocessor_name': self.preprocessor_name,
            'batch_size': self.preset['finetune_batch_size'],
            'patch_size': list(patch_size),
            'median_image_size_in_voxels': [float(i) for i in median_shape],
            'spacing': [float(i) for i in spacing],
            'normalization_schemes': ['CTNormalization'],
            'use_mask_for_norm': [False],
            'resampling_fn_data': resampling_data.__name__,
            'resampling_fn_seg': resampling_seg.__name__,
            'resampling_fn_data_kwargs': resampling_data_kwargs,
            'resampling_fn_seg_kwargs': resampling_seg_kwargs,
            'resampling_fn_probabilities': resampling_softmax.__name__,
            'resampling_fn_probabilities_kwargs': resampling_softmax_kwargs,
            'architecture': plans_architecture(self.unet, spacing, patch_size, self.UNet_base_num_features,
                                               self.UNet_max_features_3d),
            'batch_dice': self.batch_dice(patch_size, median_shape),
        }

    def batch_dice(self, patch_size, median_shape) -> bool:
        """nnU-Net's rule: its 3d_fullres uses batch Dice exactly when a patch holds less than lowres_creation_threshold
        (a quarter) of the median image, where it also plans a 3d_lowres. Why it matters for small patches: per-patch
        Dice averages the one patch around a lesion with patches without any, which divides the lesion's Dice gradient
        by the batch size and leaves false positives in lesion-free patches to the cross-entropy alone."""
        return bool(np.prod(patch_size, dtype=np.float64) <
                    self.lowres_creation_threshold * np.prod(median_shape, dtype=np.float64))

    def plan_experiment(self) -> dict:
        spacing = self.determine_fullres_target_spacing()
        new_shapes = [np.array(shape) * np.array(sp) / spacing for sp, shape in
                      zip(self.dataset_fingerprint['spacings'], self.dataset_fingerprint['shapes_after_crop'])]
        median_shape = np.median(new_shapes, 0)
        fullres = self.get_plans_for_configuration(spacing, median_shape, self.generate_data_identifier(CONFIGURATION),
                                                   0.0, {})
        plans = {
            'dataset_name': self.dataset_name,
            'plans_name': self.plans_identifier,
            'original_median_spacing_after_transp': [float(i) for i in np.median(self.dataset_fingerprint['spacings'], 0)],
            'original_median_shape_after_transp': [int(round(i)) for i in np.median(self.dataset_fingerprint['shapes_after_crop'], 0)],
            'image_reader_writer': self.determine_reader_writer().__name__,
            'transpose_forward': [0, 1, 2],
            'transpose_backward': [0, 1, 2],
            'configurations': {CONFIGURATION: fullres},
            'experiment_planner_used': self.__class__.__name__,
            'label_manager': 'LabelManager',
            'foreground_intensity_properties_per_channel': {'0': ct_intensity_properties()},
            'screener': {'preset': self.preset_name, **self.preset},
        }
        if self.screener_from is not None:  # refused before anything is written
            source_file = join(nnUNet_preprocessed, self.screener_from, self.plans_identifier + '.json')
            recursive_fix_for_json_export(plans)  # then compared as JSON holds them (tuples as lists)
            check_same_screener_input(json.loads(json.dumps(plans)), load_json(source_file), source_file)
            plans['screener'][SCREENER_FROM] = self.screener_from
        # trainers read dataset.json from the preprocessed folder, as with nnU-Net's own planner
        shutil.copy(join(self.raw_dataset_folder, 'dataset.json'),
                    join(nnUNet_preprocessed, self.dataset_name, 'dataset.json'))
        self.plans = plans
        self.save_plans(plans)
        return plans
