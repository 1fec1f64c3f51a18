"""Stage 4 of Screener: distil the modular anomaly map into the plans' UNet (one regression output channel).

The student is the very network stock `nnUNetv2_train` builds from nnScreenerPlans (same class, keys and shapes),
so its checkpoint loads through `-pretrained_weights` with nothing missing. It sees the stock nnU-Net input (what it
will see when fine-tuned); the teacher sees its own CLAHE input. Deep supervision is off: only the full-resolution
output is regressed, and the lower-resolution heads are `seg_layers`, which nnU-Net's loader skips anyway.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nnscreener.density.modular_screener import ModularScreener
from nnscreener.training.data_loaders import CLAHE, STOCK
from nnscreener.training.networks import build_plans_unet
from nnscreener.training.stage_trainer import nnScreenerStageTrainer
from nnscreener.training.stages import modular_screener


TARGET_CLAMP = 10.0


class DistillationObjective(nn.Module):
    """MSE between the student's output and the teacher's map, both in standardised units.

    NLL maps have an arbitrary offset and scale and heavy tails (single voxels of thousands of nats, which would
    dominate an MSE): the target is standardised robustly with the median and MAD-based sd of the teacher's first
    batch (buffers, so distilled inference can undo it) and clamped to +-TARGET_CLAMP sd. The ranking of all but
    the most extreme voxels is kept.
    """

    def __init__(self, student: nn.Module, teacher: ModularScreener):
        super().__init__()
        self.network, self.teacher = student, teacher
        self.register_buffer('target_mean', torch.tensor(0.0))
        self.register_buffer('target_sd', torch.tensor(0.0))

    def forward(self, batch: dict):
        with torch.no_grad():
            data = batch['data']
            target = self.teacher(self.teacher.select_input(data[:, STOCK:STOCK + 1], data[:, CLAHE:CLAHE + 1]),
                                  batch['crop_start'], upsample=True).float()
            if self.target_sd == 0:
                median = target.median()
                self.target_mean.fill_(median)
                self.target_sd.fill_((1.4826 * (target - median).abs().median()).clamp_min(1e-6))
            target = ((target - self.target_mean) / self.target_sd).clamp(-TARGET_CLAMP, TARGET_CLAMP)
        prediction = self.network(data[:, STOCK:STOCK + 1]).float()
        loss = F.mse_loss(prediction, target)
        return loss, {}


class nnScreenerDistillationTrainer(nnScreenerStageTrainer):
    stage = 'distillation'

    def build_objective(self):
        teacher = modular_screener(self.plans_manager.dataset_name, self.configuration_manager, self.screener,
                                   self.device)
        return DistillationObjective(build_plans_unet(self.configuration_manager, 1), teacher)
