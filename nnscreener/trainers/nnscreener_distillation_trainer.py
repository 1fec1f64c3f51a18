"""Stage 4 of Screener: distil the modular anomaly map into the plans' UNet (one regression output channel).

The student is the very network stock `nnUNetv2_train` builds from nnScreenerPlans (same class, keys and shapes),
so its checkpoint loads through `-pretrained_weights` with nothing missing. It sees the stock nnU-Net input (what it
will see when fine-tuned); the teacher sees its own CLAHE input. Deep supervision is off: only the full-resolution
output is regressed, and the lower-resolution heads are `seg_layers`, which nnU-Net's loader skips anyway.
"""
import torch
import torch.distributed as dist
from torch import nn

from nnscreener.density.modular_screener import ModularScreener
from nnscreener.density.pooling import body_mean
from nnscreener.training.data_loaders import BODY, CLAHE, STOCK
from nnscreener.training.networks import build_plans_unet
from nnscreener.training.stage_trainer import nnScreenerStageTrainer, shutdown_loader
from nnscreener.training.stages import modular_screener


CALIBRATION_CROPS = 64  # pretraining crops whose teacher maps set the target's mean and sd


class DistillationObjective(nn.Module):
    """MSE between the student's output and the teacher's map over the body, both in standardised units.

    NLL maps have an arbitrary offset and scale: the target is standardised with the mean and sd of the teacher's
    maps over the body voxels of CALIBRATION_CROPS pretraining crops (`calibrate`, when the trainer initialises; buffers,
    so distilled inference maps back to the NLL scale), then regressed with plain MSE as in the paper, without a
    clamp, so the most anomalous voxels keep their order. Outside the body the map is the body minimum at inference
    whatever the student says there, so those voxels are not regressed.
    """

    def __init__(self, student: nn.Module, teacher: ModularScreener):
        super().__init__()
        self.network, self.teacher = student, teacher
        self.register_buffer('target_mean', torch.tensor(0.0))
        self.register_buffer('target_sd', torch.tensor(0.0))

    @torch.no_grad()
    def teacher_map(self, data: torch.Tensor, crop_start: torch.Tensor) -> torch.Tensor:
        return self.teacher(self.teacher.select_input(data[:, STOCK:STOCK + 1], data[:, CLAHE:CLAHE + 1]),
                            crop_start, upsample=True).float()

    @torch.no_grad()
    def calibrate(self, batches) -> None:
        """Sets target_mean / target_sd from teacher maps of `batches` (tensors on the device); under DDP the sums of
        all ranks are pooled, so every rank standardises alike."""
        sums = torch.zeros(3, dtype=torch.float64, device=self.target_mean.device)
        for batch in batches:
            values = self.teacher_map(batch['data'], batch['crop_start'])[batch['data'][:, BODY:BODY + 1] > 0.5]
            sums += torch.stack([torch.tensor(values.numel(), dtype=torch.float64, device=sums.device),
                                 values.double().sum(), values.double().square().sum()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        n, total, squares = sums.tolist()
        if n == 0:
            raise RuntimeError('no body voxels in the calibration crops of the distillation target')
        mean = total / n
        self.target_mean.fill_(mean)
        self.target_sd.fill_(max((squares / n - mean ** 2) ** 0.5, 1e-6))

    def forward(self, batch: dict):
        if self.target_sd == 0:
            raise RuntimeError('DistillationObjective.calibrate must run before training')
        data = batch['data']
        target = (self.teacher_map(data, batch['crop_start']) - self.target_mean) / self.target_sd
        prediction = self.network(data[:, STOCK:STOCK + 1]).float()
        return body_mean((prediction - target).square(), data[:, BODY:BODY + 1] > 0.5), {}


class nnScreenerDistillationTrainer(nnScreenerStageTrainer):
    stage = 'distillation'

    def build_objective(self):
        teacher = modular_screener(self.plans_manager.dataset_name, self.configuration_manager, self.screener,
                                   self.device)
        return DistillationObjective(build_plans_unet(self.configuration_manager, 1), teacher)

    def initialize(self):
        super().initialize()
        self._calibrate_target()  # a resumed run then restores the buffers of its checkpoint instead

    def _calibrate_target(self) -> None:
        batch_size = self.per_rank_batch_size(self.hparams['batch_size'])
        world = dist.get_world_size() if self.is_ddp else 1
        loader = self.build_loader(seed=self.seed - 1 - self.local_rank)  # not the training crops
        batches = [{k: torch.as_tensor(v).to(self.device) for k, v in next(loader).items()}
                   for _ in range(max(1, CALIBRATION_CROPS // (batch_size * world)))]
        shutdown_loader(loader)
        self.objective.calibrate(batches)
        self.print_to_log_file(f'distillation target: mean {float(self.objective.target_mean):.4g}, sd '
                               f'{float(self.objective.target_sd):.4g} over the body voxels of {CALIBRATION_CROPS} '
                               f'pretraining crops')
