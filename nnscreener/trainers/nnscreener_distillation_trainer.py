"""Stage 4 of Screener: distil the modular anomaly map into the plans' UNet (one regression output channel).

The student is the very network stock `nnUNetv2_train` builds from nnScreenerPlans (same class, keys and shapes),
so its checkpoint loads through `-pretrained_weights` with nothing missing. It sees the stock nnU-Net input (what it
will see when fine-tuned); the teacher sees its own CLAHE input. Deep supervision is off: only the full-resolution
output is regressed, and the lower-resolution heads are `seg_layers`, which nnU-Net's loader skips anyway.
"""
import torch
import torch.distributed as dist

from nnscreener.distillation.objective import DistillationObjective
from nnscreener.training.networks import build_plans_unet
from nnscreener.training.stage_trainer import nnScreenerStageTrainer, shutdown_loader
from nnscreener.training.stages import load_modular_screener


CALIBRATION_CROPS = 64  # pretraining crops whose teacher maps set the target's mean and sd


class nnScreenerDistillationTrainer(nnScreenerStageTrainer):
    settings_block = 'distillation'

    def build_objective(self):
        teacher = load_modular_screener(self.plans_manager.dataset_name, self.configuration_manager, self.device)
        return DistillationObjective(build_plans_unet(self.configuration_manager, 1), teacher)

    def initialize(self):
        super().initialize()
        self._calibrate_target()  # a resumed run then restores the buffers of its checkpoint instead

    def _calibrate_target(self) -> None:
        batch_size = self.per_rank_batch_size(self.stage_settings.batch_size)
        world = dist.get_world_size() if self.is_ddp else 1
        loader = self.build_loader(seed=self.seed - 1 - self.local_rank)  # not the training crops
        batches = [{k: torch.as_tensor(v).to(self.device) for k, v in next(loader).items()}
                   for _ in range(max(1, CALIBRATION_CROPS // (batch_size * world)))]
        shutdown_loader(loader)
        self.objective.calibrate(batches)
        self.print_to_log_file(f'distillation target: mean {float(self.objective.target_mean):.4g}, sd '
                               f'{float(self.objective.target_sd):.4g} over the body voxels of {CALIBRATION_CROPS} '
                               f'pretraining crops')
