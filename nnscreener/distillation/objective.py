"""The distillation stage's objective (pure torch; nnScreenerDistillationTrainer builds the student and the teacher,
calibrates the target and feeds batches of Screener-cache crops), and the distilled student as inference's patch
model."""
import torch
import torch.distributed as dist
from torch import nn

from nnscreener.density.modular_screener import ModularScreener
from nnscreener.density.pooling import body_mean
from nnscreener.utilities.cache_channels import crop_channels


class DistillationObjective(nn.Module):
    """MSE between the student's output and the teacher's map over the body, both in standardised units.

    NLL maps have an arbitrary offset and scale: the target is standardised with the mean and sd of the teacher's
    maps over the body voxels of many pretraining crops (`calibrate`, when the trainer initialises; buffers, so
    distilled inference maps back to the NLL scale), then regressed with plain MSE as in the paper, without a
    clamp, so the most anomalous voxels keep their order. Outside the body the map is the body minimum at inference
    whatever the student says there, so those voxels are not regressed.

    The student reads the stock nnU-Net input (what it will see when fine-tuned), the teacher its own input
    (`select_input`: CLAHE for Screener). batch: data (B, 3, *patch) crops [stock, CLAHE, body]
    (utilities/cache_channels.py); crop_start (B, 3).
    """

    def __init__(self, student: nn.Module, teacher: ModularScreener):
        super().__init__()
        self.network, self.teacher = student, teacher
        self.register_buffer('target_mean', torch.tensor(0.0))
        self.register_buffer('target_sd', torch.tensor(0.0))

    @torch.no_grad()
    def teacher_map(self, data: torch.Tensor, crop_start: torch.Tensor) -> torch.Tensor:
        stock, clahe, _ = crop_channels(data)
        return self.teacher(self.teacher.select_input(stock, clahe), crop_start, upsample=True).float()

    @torch.no_grad()
    def calibrate(self, batches) -> None:
        """Sets target_mean / target_sd from teacher maps of `batches` (tensors on the device); under DDP the sums of
        all ranks are pooled, so every rank standardises alike."""
        sums = torch.zeros(3, dtype=torch.float64, device=self.target_mean.device)
        for batch in batches:
            values = self.teacher_map(batch['data'], batch['crop_start'])[crop_channels(batch['data'])[2] > 0.5]
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
        stock, _, body = crop_channels(data)
        target = (self.teacher_map(data, batch['crop_start']) - self.target_mean) / self.target_sd
        prediction = self.network(stock).float()
        return body_mean((prediction - target).square(), body > 0.5), {}


class DistilledPatchModel:
    """The distilled UNet as inference's patch model (`PatchAnomalyModel`): its output on the stock input, mapped back
    to the teacher's NLL scale with the target's calibration (`DistillationObjective.target_mean / target_sd`)."""
    uses_clahe = False

    def __init__(self, network: nn.Module, target_mean: float, target_sd: float, patch_size, device: torch.device):
        self.network, self.patch_size, self.device = network.eval(), tuple(patch_size), device
        self.target_mean, self.target_sd = target_mean, target_sd

    def __call__(self, stock: torch.Tensor, clahe: torch.Tensor, crop_start: torch.Tensor) -> torch.Tensor:
        return self.network(stock) * self.target_sd + self.target_mean
