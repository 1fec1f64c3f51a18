"""Batch sizes that fit a GPU memory target (`nnScreener_plan_and_preprocess -gpu_memory_target`), estimated as
nnU-Net's planners estimate theirs.

Estimated, for one training step of each network:
- a UNet crop: nnU-Net's estimate, `compute_conv_feature_map_size` of the plans' network at the patch (the elements of
  its conv, norm and nonlinearity outputs), in bytes by the calibration of the nnU-Net planner of that UNet
  (`reference_val_3d` elements of a batch of 2 fill `reference_gb` in nnU-Net's mixed-precision trainings, weights,
  optimiser and CUDA's own memory included). tests/test_unets_and_memory.py runs the network forward and backward on
  the CPU and compares the bytes autograd saves for the backward with it;
- the SSL head (VICReg expander or InfoNCE projector, and its loss, over the step's positive pairs): not estimated but
  counted, by running it on PyTorch's `meta` device (shapes only: no memory, no compute) and adding the bytes of the
  tensors its forward saves for the backward in fp32 (bf16 autocast keeps part of them in half: an upper bound), plus
  16 bytes per parameter (fp32 weights, gradients and two AdamW moments). At the paper's scale it is 8 GB.

Scaled: the batch sizes. The fine-tuning batch follows nnU-Net's rule, round(target / crop), at least 2, so it grows
with the target as nnU-Net's does (nnU-Net's cap of the default planner, 5 % of the dataset's voxels per batch, is not
applied). The Screener stages keep the preset's batches (the paper's) as their ceiling and take the largest batch up
to it that fits; the SSL stage keeps its positive pairs per CT. Patch and widths stay the preset's: the patch is part
of the method (the context of the conditions), so a target that cannot hold the smallest batches is a one-line error.
"""
import dataclasses
from typing import Callable, Tuple

import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnscreener.planners.presets import SCREENER_SPACING
from nnscreener.planners.settings import ScreenerSettings, SSLSettings
from nnscreener.planners.unets import REFERENCE_BATCH_SIZE, plans_architecture, unet_spec
from nnscreener.ssl.losses import ssl_loss_of_block
from nnscreener.utilities.errors import ScreenerInputError

GIB = 2 ** 30
MIN_FINETUNE_BATCH = 2  # nnU-Net's UNet_min_batch_size
ADAMW_BYTES_PER_PARAMETER = 16


def unet_crop_bytes(architecture: dict, patch_size, output_channels: int, unet: str) -> float:
    """nnU-Net's memory estimate of one training crop of the plans' network, in bytes (module docstring)."""
    with torch.device('meta'):  # the count needs the modules only, not their weights
        network = get_network_from_plans(architecture['network_class_name'], architecture['arch_kwargs'],
                                         architecture['_kw_requires_import'], 1, output_channels, allow_init=False)
    spec = unet_spec(unet)
    elements = float(network.compute_conv_feature_map_size(list(patch_size)))
    return elements * spec.reference_gb * GIB / (REFERENCE_BATCH_SIZE * spec.reference_val_3d)


def saved_tensor_bytes(forward: Callable) -> Tuple[int, object]:
    """(bytes of the distinct storages autograd keeps for the backward while `forward()` runs, its result)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage._cdata] = storage.nbytes()  # a storage saved by several ops counts once
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = forward()
    return sum(storages.values()), result


def ssl_head_bytes(ssl: SSLSettings, features: int, positive_pairs: int) -> int:
    """Training memory of the SSL head over `positive_pairs` pairs of `features`-dim descriptors (module docstring)."""
    with torch.device('meta'):
        head = ssl_loss_of_block(ssl, features)
        y1, y2 = (torch.empty(positive_pairs, features, requires_grad=True) for _ in range(2))
    saved, _ = saved_tensor_bytes(lambda: head(y1, y2))
    return saved + ADAMW_BYTES_PER_PARAMETER * sum(p.numel() for p in head.parameters())


def fit_to_gpu_memory(settings: dict, unet: str, target_gb: float, num_labels: int) -> dict:
    """`settings` (a preset) with the batch sizes that fit `target_gb` and a `gpu_memory` record of the estimates;
    num_labels: output channels of the fine-tuning network (the dataset's labels, background included)."""
    if not target_gb > 0:
        raise ScreenerInputError(f'-gpu_memory_target must be a positive number of GB, not {target_gb}')
    budget = target_gb * GIB
    typed = ScreenerSettings.from_dict(settings)
    architecture = plans_architecture(unet, SCREENER_SPACING, typed.patch_size, typed.base_num_features,
                                      typed.max_num_features)
    features = max(typed.descriptor_dim, typed.condition_dim)
    crop = {name: unet_crop_bytes(architecture, typed.patch_size, channels, unet)
            for name, channels in (('ssl', features), ('distillation', 1), ('finetune', num_labels))}
    ssl = typed.ssl
    pairs_per_ct = ssl.positive_pairs // ssl.batch_size

    def ssl_step(m: int) -> float:  # m CTs, two crops each, and the head over their pairs
        return 2 * m * crop['ssl'] + ssl_head_bytes(ssl, features, m * pairs_per_ct)

    needed = max(ssl_step(1), crop['ssl'], crop['distillation'], (MIN_FINETUNE_BATCH - 0.5) * crop['finetune'])
    if budget < needed:
        raise ScreenerInputError(
            f'-gpu_memory_target {target_gb} GB is too small for the patch {typed.patch_size} with the '
            f'{unet} UNet: one SSL step of one CT and a fine-tuning batch of {MIN_FINETUNE_BATCH} need about '
            f'{needed / GIB:.3g} GB by nnU-Net\'s estimate; give at least that, or a smaller preset')
    m = _largest(ssl.batch_size, lambda b: ssl_step(b) <= budget)
    fitted = typed.with_stage('ssl', batch_size=m, positive_pairs=m * pairs_per_ct)
    for stage, per_crop in (('density', crop['ssl']), ('distillation', crop['distillation'])):
        fitted = fitted.with_stage(stage, batch_size=_largest(typed.stage(stage).batch_size,
                                                              lambda b: b * per_crop <= budget))
    record = {'target_gb': target_gb, 'calibration': unet_spec(unet).planner,
              'gb_per_crop': {name: round(value / GIB, 6) for name, value in crop.items()},
              'ssl_step_gb': round(ssl_step(m) / GIB, 6)}
    fitted = dataclasses.replace(fitted, gpu_memory=record,
                                 finetune_batch_size=max(MIN_FINETUNE_BATCH, round(budget / crop['finetune'])))
    return fitted.to_dict()


def _largest(upper: int, fits: Callable[[int], bool]) -> int:
    """The largest batch in 1..upper that fits (the smallest always does: checked before)."""
    return next(b for b in range(upper, 0, -1) if fits(b))
