"""The UNets the Screener plans can hold: nnU-Net's PlainConvUNet (its default planner) or its ResidualEncoderUNet
(its residual-encoder planners nnUNetPlannerResEncM / L / XL), with those planners' block counts and the GPU-memory
calibration each planner sizes its networks with.

Every Screener network (descriptor, condition, distilled UNet) and the fine-tuning network are built from the plans'
architecture block by nnU-Net's own `get_network_from_plans`, so choosing the UNet here chooses it for all of them.
The numbers below are those nnU-Net's planners set in their `__init__` (tests/test_unets_and_memory.py compares them
with planners instantiated on a dataset, so a new nnU-Net that changes them fails a test instead of drifting).
"""
from typing import NamedTuple, Sequence, Tuple

from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.helper import convert_dim_to_conv_op, get_matching_instancenorm
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

from nnscreener.utilities.errors import ScreenerInputError

DEFAULT_UNET = 'plain'
FEATUREMAP_MIN_EDGE_LENGTH = 4  # nnU-Net's UNet_featuremap_min_edge_length
REFERENCE_BATCH_SIZE = 2  # nnU-Net's UNet_reference_val_corresp_bs_3d: the batch its reference values hold


class UNetSpec(NamedTuple):
    network_class: type
    blocks_key: str  # the arch_kwargs key of the encoder's per-stage count (convs, or residual blocks)
    blocks_per_stage_encoder: Tuple[int, ...]
    blocks_per_stage_decoder: Tuple[int, ...]
    reference_val_3d: float  # conv feature-map elements (compute_conv_feature_map_size) of a batch of 2 that ...
    reference_gb: float  # ... fit this much GPU memory when nnU-Net trains (its calibration)
    planner: str  # the nnU-Net planner these values come from


_RESENC_ENCODER, _RESENC_DECODER = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6), (1,) * 12
UNETS = {
    'plain': UNetSpec(PlainConvUNet, 'n_conv_per_stage', (2,) * 14, (2,) * 13, 560e6, 8, 'ExperimentPlanner'),
    'ResEncM': UNetSpec(ResidualEncoderUNet, 'n_blocks_per_stage', _RESENC_ENCODER, _RESENC_DECODER, 680e6, 8,
                        'nnUNetPlannerResEncM'),
    'ResEncL': UNetSpec(ResidualEncoderUNet, 'n_blocks_per_stage', _RESENC_ENCODER, _RESENC_DECODER, 2100e6, 24,
                        'nnUNetPlannerResEncL'),
    'ResEncXL': UNetSpec(ResidualEncoderUNet, 'n_blocks_per_stage', _RESENC_ENCODER, _RESENC_DECODER, 3600e6, 40,
                         'nnUNetPlannerResEncXL'),
}


def unet_spec(name: str) -> UNetSpec:
    if name not in UNETS:
        raise ScreenerInputError(f"unknown UNet '{name}'; choose one of {', '.join(UNETS)}")
    return UNETS[name]


def plans_architecture(unet: str, spacing: Sequence[float], patch_size: Sequence[int], base_num_features: int,
                       max_num_features: int) -> dict:
    """The plans' `architecture` block, as nnU-Net's planner of that UNet writes it, for the fixed Screener patch.

    The topology (stages, strides, kernels) is nnU-Net's `get_pool_and_conv_props` for the patch; a patch it would
    change (not divisible by its strides) is refused, since the patch is the Screener's, not nnU-Net's choice.
    """
    spec = unet_spec(unet)
    _, strides, kernels, topology_patch, _ = get_pool_and_conv_props(
        list(spacing), list(patch_size), FEATUREMAP_MIN_EDGE_LENGTH, 999999)
    assert tuple(topology_patch) == tuple(patch_size), (patch_size, topology_patch)
    n_stages = len(strides)
    conv_op = convert_dim_to_conv_op(len(patch_size))
    norm = get_matching_instancenorm(conv_op)
    return {
        'network_class_name': spec.network_class.__module__ + '.' + spec.network_class.__name__,
        'arch_kwargs': {
            'n_stages': n_stages,
            'features_per_stage': [min(max_num_features, base_num_features * 2 ** i) for i in range(n_stages)],
            'conv_op': conv_op.__module__ + '.' + conv_op.__name__,
            'kernel_sizes': kernels,
            'strides': strides,
            spec.blocks_key: list(spec.blocks_per_stage_encoder[:n_stages]),
            'n_conv_per_stage_decoder': list(spec.blocks_per_stage_decoder[:n_stages - 1]),
            'conv_bias': True,
            'norm_op': norm.__module__ + '.' + norm.__name__,
            'norm_op_kwargs': {'eps': 1e-5, 'affine': True},
            'dropout_op': None,
            'dropout_op_kwargs': None,
            'nonlin': 'torch.nn.LeakyReLU',
            'nonlin_kwargs': {'inplace': True},
        },
        '_kw_requires_import': ['conv_op', 'norm_op', 'dropout_op', 'nonlin'],
    }
