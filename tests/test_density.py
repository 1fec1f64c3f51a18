"""Tests of nnscreener.density: Screener's voxel-wise density models, sin-cos conditions and feature pooling."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from nnscreener.density import (ConditionalGaussianDensity, GaussianDensity, GlowDensity, build_density_model,
                                pool_and_noise, sincos_condition_map, sincos_conditions)
from nnscreener.density.conditions import median_aggregated_conditions
from nnscreener.density.modular_screener import ModularScreener
from nnscreener.density.factory import DENSITY_MODEL_NAMES
from nnscreener.density.flow import ActNorm
from nnscreener.utilities.errors import ScreenerInputError

D_Y, D_C = 4, 3


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: thread start-up costs more than it saves (and the test machine's cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb_(model, scale, seed=0):
    """Adds noise to every parameter, so the zero-initialised output layers (identity maps) become non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p += scale * torch.randn(p.shape, generator=generator, dtype=p.dtype)
    return model


def _flow(conditional, d_y=D_Y, dtype=torch.float64, scale=0.3):
    torch.manual_seed(0)
    model = GlowDensity(d_y, D_C if conditional else 0, num_steps=3, hidden_channels=8)
    return _perturb_(model.to(dtype), scale)


def _maps(shape, conditional, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=generator, dtype=dtype)
    c = torch.randn((shape[0], D_C, *shape[2:]), generator=generator, dtype=dtype) if conditional else None
    return y, c


def _closed_form_nll(y, mu, log_var):
    """-log N(y; mu, diag(exp(log_var))) per voxel with scipy; inputs (B, d, z, y, x) broadcastable."""
    y, mu, sd = np.broadcast_arrays(y.numpy(), mu.detach().numpy(), np.exp(0.5 * log_var.detach().numpy()))
    return -stats.norm.logpdf(y, mu, sd).sum(1)


def test_gaussian_nll_matches_closed_form():
    model = GaussianDensity(D_Y).double()
    with torch.no_grad():
        model.mu[:] = torch.tensor([0.5, -1., 2., 0.])
        model.log_var[:] = torch.tensor([0., 1., -2., 0.7])
    y, _ = _maps((2, D_Y, 3, 4, 5), False)
    expected = -stats.multivariate_normal(model.mu.detach().numpy(), np.diag(model.log_var.detach().exp().numpy())
                                          ).logpdf(y.permute(0, 2, 3, 4, 1).numpy())
    np.testing.assert_allclose(model.nll(y).detach().numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize('kernel_size', [1, 3])
def test_conditional_gaussian_nll_matches_closed_form_and_uses_the_kernel_neighbourhood(kernel_size):
    torch.manual_seed(0)
    model = _perturb_(ConditionalGaussianDensity(D_Y, D_C, hidden_channels=8, kernel_size=kernel_size).double(), 0.3)
    y, c = _maps((2, D_Y, 4, 4, 4), True)
    mu, log_var = model.mean_and_log_var(c)
    assert mu.shape == log_var.shape == y.shape and mu.std(dim=(2, 3, 4)).min() > 1e-3  # really depends on c
    nll = model.nll(y, c)
    np.testing.assert_allclose(nll.detach().numpy(), _closed_form_nll(y, mu, log_var), rtol=1e-10)
    # a change of the condition at a neighbouring voxel reaches voxel (1, 1, 1) only through a 3x3x3 kernel
    c_moved = c.clone()
    c_moved[:, :, 1, 1, 2] += 1.
    changed = (model.nll(y, c_moved) - nll)[:, 1, 1, 1].abs().max().item()
    assert changed > 1e-6 if kernel_size == 3 else changed == 0.


@pytest.mark.parametrize('conditional', [False, True])
def test_flow_inverts_exactly(conditional):
    model = _flow(conditional)
    y, c = _maps((2, D_Y, 3, 4, 5), conditional)
    z, _ = model(y, c)
    assert (z - y).abs().max() > 0.1  # the flow is far from the identity
    torch.testing.assert_close(model.inverse(z, c), y, atol=1e-10, rtol=0)
    # float32 too
    model32 = _flow(conditional, dtype=torch.float32)
    y32, c32 = y.float(), None if c is None else c.float()
    torch.testing.assert_close(model32.inverse(model32(y32, c32)[0], c32), y32, atol=1e-4, rtol=0)


@pytest.mark.parametrize('conditional', [False, True])
def test_flow_logdet_equals_autograd_jacobian_and_voxels_are_independent(conditional):
    model = _flow(conditional)
    y, c = _maps((1, D_Y, 1, 1, 2), conditional)
    jacobian = torch.autograd.functional.jacobian(lambda v: model(v, c)[0], y).reshape(2 * D_Y, 2 * D_Y)
    jacobian = jacobian.reshape(D_Y, 2, D_Y, 2)  # (out channel, out voxel, in channel, in voxel)
    _, logdet = model(y, c)
    for voxel in range(2):
        torch.testing.assert_close(torch.linalg.slogdet(jacobian[:, voxel, :, voxel])[1], logdet[0, 0, 0, voxel])
        assert jacobian[:, voxel, :, 1 - voxel].abs().max() == 0  # no voxel sees another voxel's descriptor


@pytest.mark.parametrize('conditional', [False, True])
def test_flow_density_integrates_to_one(conditional):
    model = _flow(conditional, d_y=2, scale=0.2)
    step = 0.1
    grid = torch.arange(-30., 30., step, dtype=torch.float64)
    y = torch.stack(torch.meshgrid(grid, grid, indexing='ij'))[None, :, None]  # (1, 2, 1, n, n)
    c = torch.tensor([0.7, -1.2, 0.3], dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, *y.shape[2:]) \
        if conditional else None
    with torch.no_grad():
        nll = model.nll(y, c)
        z, logdet = model(y, c)
    torch.testing.assert_close(nll, 0.5 * z.square().sum(1) + math.log(2 * math.pi) - logdet)
    assert abs(torch.exp(-nll).sum().item() * step ** 2 - 1) < 0.01


def test_marginal_gaussian_training_approaches_true_entropy():
    torch.manual_seed(0)
    mean, sd = torch.tensor([3., -2., 0.5, 1.]), torch.tensor([0.5, 2., 1., 0.2])
    entropy = 0.5 * torch.log(2 * math.pi * math.e * sd ** 2).sum().item()
    sample = lambda n: mean.view(1, -1, 1, 1, 1) + sd.view(1, -1, 1, 1, 1) * torch.randn(n, D_Y, 6, 6, 6)
    model = GaussianDensity(D_Y)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 250)  # decay: Adam's end noise stays small
    initial = model.nll(sample(8)).mean().item()
    for _ in range(250):
        optimizer.zero_grad()
        model.nll(sample(4)).mean().backward()
        optimizer.step()
        schedule.step()
    final = model.nll(sample(32)).mean().item()
    assert initial > entropy + 5 and abs(final - entropy) < 0.05


@pytest.mark.parametrize('conditional_name, marginal_name', [('conditional_gaussian', 'gaussian'),
                                                             ('conditional_flow', 'flow')])
def test_conditional_model_learns_a_dependence_on_c_the_marginal_cannot(conditional_name, marginal_name):
    torch.manual_seed(0)
    weight = torch.randn(2, D_C)

    def sample(n):  # y[p] = W c[p] + small noise: easy given c, broad without it
        c = torch.randn(n, D_C, 4, 4, 4)
        return torch.einsum('ij,bj...->bi...', weight, c) + 0.1 * torch.randn(n, 2, 4, 4, 4), c

    losses = {}
    for name in (conditional_name, marginal_name):
        kwargs = {'gaussian': {}, 'conditional_gaussian': {'hidden_channels': 16},
                  'flow': {'num_steps': 2, 'hidden_channels': 16}}
        model = build_density_model(name, 2, D_C, **kwargs[name.removeprefix('conditional_')])
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(150):
            y, c = sample(4)
            optimizer.zero_grad()
            model.nll(y, c if model.conditional else None).mean().backward()
            optimizer.step()
        y, c = sample(16)
        losses[name] = model.nll(y, c if model.conditional else None).mean().item()
    assert losses[conditional_name] < losses[marginal_name] - 2


LESION = (slice(None), slice(None), slice(2, 5), slice(2, 5), slice(2, 5))  # a 3^3 cube of a 8^3 volume
SMALL_MODELS = {'gaussian': {}, 'conditional_gaussian': {'hidden_channels': 16},
                'flow': {'num_steps': 2, 'hidden_channels': 16}, 'conditional_flow': {'num_steps': 2, 'hidden_channels': 16}}


def _volume_with_lesion(n, weight, generator):
    """y = W c + noise everywhere, and in a cube (5 % of the voxels) y shifted 6 marginal sds away (out of the marginal support too): a rare lesion in
    the training data, as in Screener's unlabeled pretraining sets."""
    c = torch.randn(n, D_C, 8, 8, 8, generator=generator)
    y = torch.einsum('ij,bj...->bi...', weight, c) + 0.1 * torch.randn(n, 2, 8, 8, 8, generator=generator)
    y[LESION] += 6 * y.std(dim=(0, 2, 3, 4)).view(1, 2, 1, 1, 1)
    return y, c


@pytest.mark.parametrize('name', DENSITY_MODEL_NAMES)
def test_each_density_model_fitted_on_volumes_with_a_rare_lesion_scores_the_lesion_above_healthy_tissue(name):
    """The anomaly score -log q(y | c) after a short fit by the density trainers' recipe (initialise from the first
    batch, then Adam on the mean NLL): every lesion voxel of a held-out volume scores above the healthy voxels' 95th
    percentile, and the lesion mean above the mean of the healthy shell around it."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(2, D_C, generator=generator)
    model = build_density_model(name, 2, D_C, **SMALL_MODELS[name])
    context = (lambda c: c) if model.conditional else (lambda c: None)
    y, c = _volume_with_lesion(4, weight, generator)
    model.initialize_from_data(y, context(c))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        y, c = _volume_with_lesion(4, weight, generator)
        optimizer.zero_grad()
        model.nll(y, context(c)).mean().backward()
        optimizer.step()
    y, c = _volume_with_lesion(1, weight, generator)
    with torch.no_grad():
        score = model.nll(y, context(c))[0]
    lesion = torch.zeros(8, 8, 8, dtype=torch.bool)
    lesion[LESION[2:]] = True
    shell = torch.zeros_like(lesion)
    shell[1:6, 1:6, 1:6] = True
    shell &= ~lesion
    assert score[lesion].min() > torch.quantile(score[~lesion], 0.95), name
    assert score[lesion].mean() > score[shell].mean() + 3, name


def test_initialize_from_data():
    torch.manual_seed(0)
    y = 5 + 3 * torch.randn(4, D_Y, 4, 4, 4)
    c = torch.randn(4, D_C, 4, 4, 4)
    gaussian = GaussianDensity(D_Y)
    gaussian.initialize_from_data(y)
    torch.testing.assert_close(gaussian.mu, y.mean(dim=(0, 2, 3, 4)))
    torch.testing.assert_close(gaussian.log_var.exp(), y.var(dim=(0, 2, 3, 4), unbiased=False))
    # the conditional Gaussian becomes that same marginal fit, for any c (even after its nets were trained)
    conditional = _perturb_(ConditionalGaussianDensity(D_Y, D_C, hidden_channels=8), 0.3)
    conditional.initialize_from_data(y, c)
    torch.testing.assert_close(conditional.nll(y, c), gaussian.nll(y))
    # Glow: every act-norm standardises its input batch; the NLL of unnormalised data drops a lot
    for d_c in (0, D_C):
        flow = _perturb_(GlowDensity(D_Y, d_c, num_steps=3, hidden_channels=8), 0.1)
        c_flow = c if d_c else None
        before = flow.nll(y, c_flow).mean().item()
        flow.initialize_from_data(y, c_flow)
        h = y
        for layer in flow.layers:
            h_next, _ = layer(h, c_flow)
            if isinstance(layer, ActNorm):
                torch.testing.assert_close(h_next.mean(dim=(0, 2, 3, 4)), torch.zeros(D_Y), atol=1e-5, rtol=0)
                torch.testing.assert_close(h_next.std(dim=(0, 2, 3, 4), unbiased=False), torch.ones(D_Y))
            h = h_next
        assert flow.nll(y, c_flow).mean().item() < before - 5


@pytest.mark.parametrize('name', ['gaussian', 'conditional_gaussian', 'flow', 'conditional_flow'])
def test_bfloat16_autocast_keeps_nll_in_float32(name):
    torch.manual_seed(0)
    model = _perturb_(build_density_model(name, 8, D_C, **({} if name == 'gaussian' else {'hidden_channels': 16})),
                      0.02)
    y, c = _maps((2, 8, 4, 4, 4), model.conditional, dtype=torch.float32)
    reference = model.nll(y, c)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        nll = model.nll(y.bfloat16(), None if c is None else c.bfloat16())
        nll.mean().backward()
    assert nll.dtype == torch.float32 and nll.shape == (2, 4, 4, 4)
    # bf16 inputs lose ~3 significant digits; the reductions must not lose more
    torch.testing.assert_close(nll, reference, rtol=2e-2, atol=0.1)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_factory_and_condition_checks():
    for name, cls, conditional in [('gaussian', GaussianDensity, False),
                                   ('conditional_gaussian', ConditionalGaussianDensity, True),
                                   ('flow', GlowDensity, False), ('conditional_flow', GlowDensity, True)]:
        model = build_density_model(name, D_Y, D_C)
        assert isinstance(model, cls) and model.conditional == conditional
        y, c = _maps((1, D_Y, 2, 2, 2), True, dtype=torch.float32)
        with pytest.raises(ValueError, match='conditional' if conditional else 'marginal'):
            model.nll(y, None if conditional else c)
        assert model.nll(y, c if conditional else None).shape == (1, 2, 2, 2)
    with pytest.raises(ScreenerInputError, match='unknown density model'):
        build_density_model('mixture', D_Y, D_C)
    with pytest.raises(ScreenerInputError, match='d_c >= 1'):
        build_density_model('conditional_flow', D_Y, 0)


def test_sincos_conditions_layout():
    # d_c = 32: 16 sin-cos pairs, 6 for z, 5 for y, 5 for x; the first frequency of every axis is 1
    encoding = sincos_conditions(torch.tensor([0.3, 1.1, -2.]), 32)
    assert encoding.shape == (32,)
    torch.testing.assert_close(encoding[[0, 6, 12, 17, 22, 27]],
                               torch.tensor([math.sin(0.3), math.cos(0.3), math.sin(1.1), math.cos(1.1),
                                             math.sin(-2.), math.cos(-2.)]))
    torch.testing.assert_close(encoding[5], torch.tensor(math.sin(0.3 * 10000 ** (-5 / 6))))
    with pytest.raises(ScreenerInputError):
        sincos_conditions(torch.zeros(3), 7)


@pytest.mark.parametrize('stride', [(1, 1, 1), (2, 3, 3)])
def test_sincos_condition_map_of_a_crop_equals_the_whole_volume_map(stride):
    whole_shape, d_c = (12, 15, 18), 18
    whole = sincos_condition_map((0, 0, 0), whole_shape, d_c, stride)
    assert whole.shape == (d_c, *[n // s for n, s in zip(whole_shape, stride)])
    # a crop starting on the pooling grid sees exactly the whole volume's cells
    start, crop_shape = (4, 6, 3), (6, 6, 9)
    cells = [slice(a // s, (a + n) // s) for a, n, s in zip(start, crop_shape, stride)]
    torch.testing.assert_close(sincos_condition_map(start, crop_shape, d_c, stride), whole[(slice(None), *cells)],
                               rtol=0, atol=0)
    # convention: each pooled cell is encoded at the mean absolute position of the voxels it averages
    start = (-1, 5, 2)  # anywhere, even partly outside the volume
    positions = torch.stack(torch.meshgrid(*[torch.arange(a, a + n, dtype=torch.float64)
                                             for a, n in zip(start, crop_shape)], indexing='ij'))
    centres = F.avg_pool3d(positions[None], stride, stride)[0].permute(1, 2, 3, 0)
    torch.testing.assert_close(sincos_condition_map(start, crop_shape, d_c, stride),
                               sincos_conditions(centres, d_c).permute(3, 0, 1, 2))


def test_pool_and_noise():
    features = torch.randn(2, 3, 4, 6, 10)
    pooled = pool_and_noise(features, noise_sd=0)
    assert pooled.shape == (2, 3, 2, 2, 3)
    torch.testing.assert_close(pooled[:, :, 1, 0, 2], features[:, :, 2:4, 0:3, 6:9].mean(dim=(2, 3, 4)))
    noisy = pool_and_noise(features, noise_sd=0.1, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(noisy, pool_and_noise(features, generator=torch.Generator().manual_seed(3)))
    big = torch.zeros(1, 4, 40, 60, 60)
    assert abs(pool_and_noise(big).std().item() - 0.1) < 0.005


def test_median_aggregated_conditions_ignore_a_small_lesion_and_keep_an_organ_boundary():
    """Conditions of two organs (a step along x) with a lesion-like blob of 2^3 density voxels inside one organ: the
    5^3 median gives every blob voxel its organ's condition, keeps the step where it is, and is a true median (the
    window's middle value, edges replicated); a 3^3 mean, for comparison, would smear both."""
    c = torch.zeros(1, 2, 10, 10, 10)
    c[:, 0, :, :, 5:] = 1.0  # organ boundary between x = 4 and x = 5
    c[:, 1] = torch.linspace(0, 1, 10).view(1, 1, 10)  # a smooth gradient stays as it is
    healthy = c.clone()
    c[:, :, 4:6, 4:6, 1:3] = 5.0  # the "lesion" moves both channels
    aggregated = median_aggregated_conditions(c, 5)
    torch.testing.assert_close(aggregated[:, 0], healthy[:, 0])
    torch.testing.assert_close(aggregated[:, 1, 4:6, 4:6, 1:3], healthy[:, 1, 4:6, 4:6, 1:3])
    assert torch.equal(median_aggregated_conditions(c, 1), c)
    x = torch.randn(1, 1, 6, 6, 6)
    window = F.pad(x, (2,) * 6, mode='replicate')[0, 0, 1:6, 2:7, 0:5]  # the 5^3 window of voxel (1, 2, 0)
    assert median_aggregated_conditions(x, 5)[0, 0, 1, 2, 0] == window.flatten().median()
    with pytest.raises(ScreenerInputError):
        median_aggregated_conditions(c, 4)


def test_modular_screener_aggregates_learned_conditions_before_the_noise():
    """features(): the learned conditions are pooled, median-aggregated with the screener's window, then noised; the
    descriptors are not aggregated."""
    torch.manual_seed(0)
    descriptor, condition = torch.nn.Conv3d(1, D_Y, 3, padding=1), torch.nn.Conv3d(1, D_C, 3, padding=1)
    x = torch.rand(2, 1, 12, 18, 18)
    screener = ModularScreener(descriptor, ConditionalGaussianDensity(D_Y, D_C), 'learned', condition, D_C,
                               condition_median=3)
    y, c = screener.features(x)
    torch.testing.assert_close(y, pool_and_noise(descriptor(x), noise_sd=0))
    torch.testing.assert_close(c, median_aggregated_conditions(pool_and_noise(condition(x), noise_sd=0), 3))
    _, noisy = screener.features(x, noise_sd=0.1)
    assert 0.05 < (noisy - c).std().item() < 0.15


def test_leave_out_conditions_ignore_what_lies_in_the_voxels_own_cell():
    """LeaveOutConditions: a voxel's condition is the network's output with its own checkerboard cell masked, so
    whatever the cell holds (a lesion) cannot change the conditions inside it, while it does change the conditions of
    the cells around it, whose pass sees it."""
    from nnscreener.density.conditions import LeaveOutConditions, checkerboard_cells
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, D_C, 5, padding=2), torch.nn.Tanh(),
                                  torch.nn.Conv3d(D_C, D_C, 5, padding=2))
    conditions = LeaveOutConditions(network, mask_token=-0.5, cell=(4, 4, 4))
    x = torch.rand(2, 1, 12, 12, 12)
    lesion = x.clone()
    lesion[:, :, 4:8, 4:8, 4:8] += 3.0  # cell (1, 1, 1): odd index sum, masked in the second pass
    with torch.no_grad():
        healthy_c, lesion_c = conditions(x), conditions(lesion)
        masked = torch.where(checkerboard_cells((12, 12, 12), (4, 4, 4)), x, torch.tensor(-0.5))
        torch.testing.assert_close(healthy_c[..., 4:8, 4:8, 4:8], network(masked)[..., 4:8, 4:8, 4:8])
    torch.testing.assert_close(lesion_c[..., 4:8, 4:8, 4:8], healthy_c[..., 4:8, 4:8, 4:8])
    assert (lesion_c - healthy_c)[..., 4:8, 4:8, 8:10].abs().mean() > 1e-2  # the neighbouring cell sees the lesion
    assert not torch.allclose(network(lesion)[..., 4:8, 4:8, 4:8], network(x)[..., 4:8, 4:8, 4:8])  # unlike plain c
    with pytest.raises(ScreenerInputError):
        LeaveOutConditions(network, 0.0, (4, 4))


def test_centred_leave_out_cells_hide_a_lesion_that_crosses_a_cell_border():
    """Centred cells: a lesion across the border of the unshifted checkerboard's cells leaks into the plain leave-out
    conditions of its own voxels (each sees the part in the neighbouring cell), and not into the centred ones, where
    every voxel of it lies in the middle half of its masked cell. Away from borders both are the same pass."""
    from nnscreener.density.conditions import LeaveOutConditions
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, D_C, 5, padding=2), torch.nn.Tanh(),
                                  torch.nn.Conv3d(D_C, D_C, 5, padding=2))
    plain, centred = (LeaveOutConditions(network, -0.5, (8, 8, 8), centred=c) for c in (False, True))
    x = torch.rand(1, 1, 16, 16, 16)
    lesion = x.clone()
    lesion[..., 7:10, 7:10, 7:10] += 3.0  # across the border at 8 of the unshifted cells, in the middle of [4, 12)
    inside = (..., slice(7, 10), slice(7, 10), slice(7, 10))
    with torch.no_grad():
        assert (plain(lesion) - plain(x))[inside].abs().mean() > 1e-2
        torch.testing.assert_close(centred(lesion)[inside], centred(x)[inside])
        middle = (..., slice(2, 6), slice(2, 6), slice(10, 14))  # the middle halves of unshifted cells
        torch.testing.assert_close(centred(x)[middle], plain(x)[middle])


def test_intensity_histogram_density_is_multimodal_and_conditional():
    """The intensity baseline's density: intensities are two-moded at a position (lung or muscle), and a value
    between the modes must score as anomalous, which a Gaussian (mode in the middle) gets backwards. The condition
    tells the positions apart."""
    from nnscreener.baselines.intensity import ConditionalHistogramDensity
    torch.manual_seed(0)
    c = torch.zeros(8, 2, 4, 4, 4)
    c[:4, 0] = 1  # position kind A: lung (0.1) or muscle (0.8) at random; kind B: always muscle
    c[4:, 1] = 1

    def sample():
        y = torch.where(torch.rand(8, 1, 4, 4, 4) < 0.5, 0.1, 0.8)
        y[4:] = 0.8
        return y + 0.01 * torch.randn_like(y)

    model = ConditionalHistogramDensity(d_c=2, n_bins=16, hidden_channels=16, kernel_size=1)
    model.initialize_from_data(sample(), c)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        loss = model.nll(sample(), c).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        score = {v: model.nll(torch.full((8, 1, 4, 4, 4), v), c) for v in (0.1, 0.45, 0.8)}
    assert score[0.45][:4].mean() > score[0.1][:4].mean() + 2 and score[0.45][:4].mean() > score[0.8][:4].mean() + 2
    assert score[0.1][4:].mean() > score[0.1][:4].mean() + 2  # lung where only muscle was seen
    gaussian = torch.distributions.Normal(0.45, 0.35)  # the ML Gaussian of kind A's values
    assert -gaussian.log_prob(torch.tensor(0.45)) < -gaussian.log_prob(torch.tensor(0.1))  # what it gets wrong
