"""The stage objectives beside their models (density/objective.py, distillation/objective.py,
baselines/autoencoder.py): each loss is what its docstring says, on tiny CPU tensors, read from the right channels
of a Screener-cache crop [stock, CLAHE, body]."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnscreener.baselines.autoencoder import AutoencoderObjective
from nnscreener.density.gaussian import GaussianDensity
from nnscreener.density.modular_screener import ModularScreener
from nnscreener.density.objective import DensityObjective
from nnscreener.distillation.objective import DistillationObjective

PATCH, STRIDE = (4, 6, 6), (2, 3, 3)


def crops(seed: int) -> dict:
    """Two crops whose stock and CLAHE channels differ (a wrong channel changes the loss), the body about half."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.rand(2, 3, *PATCH, generator=generator)
    data[:, 0] = 3 * data[:, 0] - 1
    data[:, 2] = (torch.rand(2, *PATCH, generator=generator) > 0.5).float()
    return {'data': data, 'crop_start': torch.zeros(2, 3, dtype=torch.long)}


def tiny_screener() -> ModularScreener:
    torch.manual_seed(0)
    return ModularScreener(nn.Conv3d(1, 2, 1), GaussianDensity(2), condition_kind='none', pool_stride=STRIDE)


def test_density_loss_is_the_body_mean_nll_of_the_pooled_clahe_descriptors_after_a_data_initialisation():
    objective = DensityObjective(tiny_screener(), noise_sd=0.0)
    batch = crops(0)
    loss, logs = objective(batch)
    with torch.no_grad():
        y = F.avg_pool3d(objective.screener.descriptor(batch['data'][:, 1:2]), STRIDE, STRIDE)
    density = objective.network
    assert objective.initialized and logs == {}
    # initialised from the first batch: the maximum-likelihood mean of its pooled descriptors, not N(0, I)
    assert torch.allclose(density.mu, y.mean((0, 2, 3, 4)), atol=1e-6)
    body = F.avg_pool3d(batch['data'][:, 2:3], STRIDE, STRIDE)[:, 0] > 0.5
    assert 0 < body.sum() < body.numel()
    with torch.no_grad():
        expected = density.nll(y)[body].mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert loss.requires_grad and objective.screener.descriptor.weight.grad is None  # only the density trains
    # a later batch does not initialise again (nor does a resumed run: `initialized` is in the checkpoint)
    with torch.no_grad():
        density.mu.add_(5.0)
    objective(crops(1))
    assert torch.allclose(density.mu, y.mean((0, 2, 3, 4)) + 5.0, atol=1e-6)
    screener_keys = {f'screener.{k}' for k in objective.screener.state_dict()}
    assert set(objective.state_dict()) == {'initialized'} | screener_keys | {f'network.{k}' for k in density.state_dict()}


def test_distillation_loss_is_the_body_mse_of_the_stock_student_to_the_standardised_clahe_teacher_map():
    teacher = tiny_screener()
    with torch.no_grad():
        teacher.density.mu.fill_(0.3)
    torch.manual_seed(1)
    objective = DistillationObjective(nn.Conv3d(1, 1, 1), teacher)
    calibration = [crops(s) for s in range(3)]
    objective.calibrate(calibration)
    with torch.no_grad():
        maps = [teacher(b['data'][:, 1:2], b['crop_start'], upsample=True) for b in calibration]
        values = torch.cat([m[b['data'][:, 2:3] > 0.5] for m, b in zip(maps, calibration)]).double()
    assert float(objective.target_mean) == pytest.approx(float(values.mean()), rel=1e-5)
    assert float(objective.target_sd) == pytest.approx(float(values.std(unbiased=False)), rel=1e-4)
    batch = crops(5)
    loss, _ = objective(batch)
    with torch.no_grad():
        target = (teacher(batch['data'][:, 1:2], batch['crop_start'], upsample=True) - objective.target_mean) \
            / objective.target_sd
        error = (objective.network(batch['data'][:, 0:1]) - target).square()
    assert float(loss.detach()) == pytest.approx(float(error[batch['data'][:, 2:3] > 0.5].mean()), rel=1e-5)
    assert set(objective.state_dict()) == {'target_mean', 'target_sd'} | \
        {f'network.{k}' for k in objective.network.state_dict()} | {f'teacher.{k}' for k in teacher.state_dict()}


class Zeros(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_autoencoder_loss_is_the_mean_squared_reconstruction_error_of_the_stock_input():
    batch = crops(2)
    perfect, _ = AutoencoderObjective(nn.Identity())(batch)
    assert float(perfect) == 0
    nothing, _ = AutoencoderObjective(Zeros())(batch)
    assert float(nothing) == pytest.approx(float(batch['data'][:, 0].square().mean()), rel=1e-6)


class StandardisedTeacher(nn.Module):
    """A student that learned its target exactly: the teacher's CLAHE map, standardised as the objective does."""

    def __init__(self, objective: DistillationObjective, clahe: torch.Tensor):
        super().__init__()
        self.objective, self.clahe = objective, clahe

    def forward(self, stock):
        teacher = self.objective.teacher(self.clahe, None, upsample=True)
        return (teacher - self.objective.target_mean) / self.objective.target_sd


def test_each_patch_model_serves_its_model_on_the_input_it_was_trained_on():
    """The inference adapters beside their models: the distilled UNet's output goes back to the teacher's NLL scale
    with the objective's own calibration (a student that learned its target reproduces the teacher's map); the
    modular Screener reads the CLAHE channel; the autoencoder scores the stock input's reconstruction error."""
    from nnscreener.baselines.autoencoder import AutoencoderPatchModel, reconstruction_error_map
    from nnscreener.density.modular_screener import DensityPatchModel
    from nnscreener.distillation.objective import DistilledPatchModel
    teacher = tiny_screener()
    objective = DistillationObjective(nn.Conv3d(1, 1, 1), teacher)
    objective.calibrate([crops(s) for s in range(3)])
    stock, clahe = crops(4)['data'][:, 0:1], crops(4)['data'][:, 1:2]
    student = DistilledPatchModel(StandardisedTeacher(objective, clahe), float(objective.target_mean),
                                  float(objective.target_sd), PATCH, torch.device('cpu'))
    with torch.no_grad():
        torch.testing.assert_close(student(stock, None, None), teacher(clahe, None, upsample=True))
        modular = DensityPatchModel(teacher, PATCH, torch.device('cpu'))
        torch.testing.assert_close(modular(stock, clahe, None), teacher(clahe, None))
        assert not torch.allclose(modular(stock, clahe, None), teacher(stock, None))
    autoencoder = AutoencoderPatchModel(Zeros(), STRIDE, PATCH, torch.device('cpu'))
    torch.testing.assert_close(autoencoder(stock, clahe, None), reconstruction_error_map(Zeros(), stock, STRIDE))
    assert student.uses_clahe is False and autoencoder.uses_clahe is False


def test_the_intensity_baseline_is_a_density_model_of_the_stock_input_given_its_position():
    """q(HU | position): the density objective trains it on the pooled stock channel (CLAHE ignored) with sin-cos
    conditions of where each crop lies, and its patch model skips CLAHE."""
    from nnscreener.baselines.intensity import IntensityBaseline
    from nnscreener.density.conditions import sincos_condition_map
    from nnscreener.density.modular_screener import DensityPatchModel
    torch.manual_seed(0)
    baseline = IntensityBaseline(condition_dim=6, pool_stride=STRIDE)
    objective = DensityObjective(baseline, noise_sd=0.0)
    batch = crops(3)
    batch['crop_start'] = torch.tensor([[0, 0, 0], [5, 7, 9]])
    loss, _ = objective(batch)
    stock, body = batch['data'][:, 0:1], batch['data'][:, 2:3]
    c = torch.stack([sincos_condition_map(tuple(s.tolist()), PATCH, 6, STRIDE) for s in batch['crop_start']])
    nll = baseline.density.nll(F.avg_pool3d(stock, STRIDE, STRIDE), c)
    pooled_body = F.avg_pool3d(body, STRIDE, STRIDE)[:, 0] > 0.5
    assert loss.item() == pytest.approx(nll[pooled_body].mean().item(), rel=1e-5)
    other_clahe = batch['data'].clone()
    other_clahe[:, 1] = 0
    assert objective({**batch, 'data': other_clahe})[0].item() == pytest.approx(loss.item(), rel=1e-6)
    served = DensityPatchModel(baseline, PATCH, torch.device('cpu'))
    assert served.uses_clahe is False
    with torch.no_grad():
        torch.testing.assert_close(served(stock, None, batch['crop_start']), nll.unsqueeze(1))
