"""The body in the training objectives and the maps: the density NLL and the distillation MSE average over the body
only, the distillation target is standardised with body statistics of many crops, and whole-CT maps hold the body
minimum outside the body (table and room air never score), smoothed or not."""
import types

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from nnscreener.density.pooling import body_mean, pooled_body
from nnscreener.distillation.objective import DistillationObjective
from nnscreener.inference.anomaly_maps import body_anomaly_map, map_smoothing_sigma
from nnscreener.planners.presets import get_preset
from nnscreener.preprocessing.screener_cache import ScreenerView
from nnscreener.utilities.errors import ScreenerInputError

PATCH = (4, 6, 6)


def test_body_mean_ignores_values_outside_the_body():
    values = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    body = values % 2 == 0
    assert body_mean(values, body) == values[body].mean()
    changed = torch.where(body, values, torch.full_like(values, 1e6))
    assert body_mean(changed, body) == body_mean(values, body)
    assert body_mean(values, torch.zeros_like(body)) == values.mean()  # no body: plain mean, not 0 / 0
    mask = torch.zeros(1, 1, 4, 6, 6)
    mask[..., :2, :3, :3] = 1  # exactly one pooled cell of (2, 3, 3)
    assert pooled_body(mask, (2, 3, 3)).tolist() == [[[[True, False], [False, False]], [[False, False], [False, False]]]]


class FixedTeacher(nn.Module):
    """A 'modular Screener' whose map is channel 0 of its input (the stock channel is passed through)."""

    def select_input(self, stock, clahe):
        return stock

    def forward(self, x, crop_start, upsample=False):
        return x


def _batch(seed, outside_value=None):
    generator = torch.Generator().manual_seed(seed)
    data = torch.rand(2, 3, *PATCH, generator=generator)
    data[:, 2] = (torch.rand(2, *PATCH, generator=generator) > 0.5).float()  # body channel
    if outside_value is not None:
        data[:, 0] = torch.where(data[:, 2] > 0, data[:, 0], torch.full_like(data[:, 0], outside_value))
    return {'data': data, 'crop_start': torch.zeros(2, 3, dtype=torch.long)}


def test_distillation_target_is_standardised_with_body_statistics_of_all_calibration_crops():
    objective = DistillationObjective(nn.Conv3d(1, 1, 1), FixedTeacher())
    with pytest.raises(RuntimeError, match='calibrate'):
        objective(_batch(0))
    batches = [_batch(s, outside_value=50.0) for s in range(5)]  # huge values outside the body must not count
    objective.calibrate(batches)
    body_values = torch.cat([b['data'][:, 0][b['data'][:, 2] > 0] for b in batches]).double()
    assert float(objective.target_mean) == pytest.approx(float(body_values.mean()), rel=1e-5)
    assert float(objective.target_sd) == pytest.approx(float(body_values.std(unbiased=False)), rel=1e-4)
    # the loss is a body mean: what the teacher says outside the body does not change it
    batch = _batch(7)
    other = {k: v.clone() for k, v in batch.items()}
    other['data'][:, 0] = torch.where(batch['data'][:, 2] > 0, batch['data'][:, 0], torch.tensor(1e3))
    with torch.no_grad():
        assert objective(batch)[0] == pytest.approx(float(objective(other)[0]), rel=1e-6)
    # no clamp: the most anomalous voxel keeps its distance (a clamped target would tie it with the next ones)
    loss_far = objective({'data': _with_peak(batch['data'], 100.0), 'crop_start': batch['crop_start']})[0]
    loss_near = objective({'data': _with_peak(batch['data'], 10.0), 'crop_start': batch['crop_start']})[0]
    assert loss_far > loss_near * 5


def _with_peak(data, value):
    data = data.clone()
    data[0, 0, 1, 2, 2], data[0, 2, 1, 2, 2] = value, 1.0
    return data


class ConstantPatchModel:
    """Map = the stock input: the table (bright) and the room (dark) would score if they were not masked."""
    patch_size, device = (8, 12, 12), torch.device('cpu')

    def __call__(self, stock, clahe, crop_start):
        return stock


def test_whole_ct_map_holds_the_body_minimum_outside_the_body():
    stock = np.zeros((10, 30, 30), np.float32)
    stock[:, 5:20, 5:25] = 0.8  # body
    stock[:, 24:27, :] = 1.0  # a bright table below it: brighter than any body voxel
    stock[3, 10, 10] = 0.95  # a bright spot in the body
    body = np.zeros_like(stock, bool)
    body[:, 5:20, 5:25] = True
    view = ScreenerView(bbox=[(0, 10), (0, 30), (0, 30)], body=body, clahe=None)
    anomaly_map = body_anomaly_map(stock, view, ConstantPatchModel(), step_size=0.5)
    floor = anomaly_map[body].min()
    assert np.all(anomaly_map[~body] == floor)
    assert np.unravel_index(anomaly_map.argmax(), stock.shape) == (3, 10, 10)  # not the table


def test_smoothed_map_ranks_a_noisy_lesion_higher_and_never_lets_the_table_in():
    """Lesions of 4 voxels' radius, 0.8 sd above noisy tissue: smoothing over ~2 voxels averages the noise away and
    ranks them above the rest of the body far more often, the one cut by the scan's first slice too (the body goes
    on beyond it); the table beside the body (100 sd) stays out."""
    rng = np.random.default_rng(0)
    stock = np.zeros((24, 40, 40), np.float32)
    body = np.zeros_like(stock, bool)
    body[:, 4:30, 4:36] = True  # the scan ends inside the patient: the body fills the first and last slices
    stock[body] = 5 + rng.standard_normal(int(body.sum()))
    zz, yy, xx = np.ogrid[:24, :40, :40]
    lesions = [(zz - z) ** 2 + (yy - 16) ** 2 + (xx - x) ** 2 <= 16 for z, x in ((12, 12), (0, 26))]
    for lesion in lesions:
        stock[lesion] += 0.8
    stock[:, 31:34, :] = 100.0  # the table, one voxel below the body
    view = ScreenerView(bbox=[(0, 24), (0, 40), (0, 40)], body=body, clahe=None)
    model = ConstantPatchModel()
    plain = body_anomaly_map(stock, view, model, step_size=0.5)
    smoothed = body_anomaly_map(stock, view, model, step_size=0.5, smoothing=(2.0, 2.0, 2.0))
    healthy = body & ~lesions[0] & ~lesions[1]
    for lesion in lesions:
        labels = np.concatenate([np.ones(lesion.sum()), np.zeros(healthy.sum())])
        aurocs = [roc_auc_score(labels, np.concatenate([m[lesion], m[healthy]])) for m in (plain, smoothed)]
        assert aurocs[0] < 0.8 < 0.97 < aurocs[1]
    floor = smoothed[body].min()
    assert np.all(smoothed[~body] == floor) and smoothed[body].max() < 7  # no table in the body's rim
    assert np.array_equal(body_anomaly_map(stock, view, model, step_size=0.5, smoothing=None), plain)


def test_map_smoothing_is_given_in_mm_of_the_plans_spacing():
    configuration_manager = types.SimpleNamespace(spacing=[2.5, 2.0, 2.0])
    assert map_smoothing_sigma(4.0, configuration_manager) == (1.6, 2.0, 2.0)
    assert map_smoothing_sigma(0.0, configuration_manager) is None  # the map as the model gives it
    with pytest.raises(ScreenerInputError, match='>= 0 mm'):
        map_smoothing_sigma(-1.0, configuration_manager)


def test_preset_overrides_set_steps_clahe_and_the_conditions():
    preset = get_preset('tiny:steps=900,clahe=0.01,median=5')
    assert [preset[s]['num_steps'] for s in ('ssl', 'density', 'distillation')] == [900] * 3
    assert preset['clahe_clip_limit'] == 0.01 and get_preset('tiny')['clahe_clip_limit'] == 0.05
    assert preset['density']['condition_median'] == 5
    assert get_preset('cpu:leaveout=2')['density']['condition_leave_out'] == [8, 16, 16]  # 2 training mask blocks
    # leave-out cells count the preset's own mask blocks, whatever order the overrides come in
    blocks = get_preset('cpu:leaveout=1,maskblock=8x12x12')
    assert blocks['ssl']['mask_block_size'] == (8, 12, 12) and blocks['density']['condition_leave_out'] == [8, 12, 12]
    assert get_preset('cpu:leaveout=2,centred=1')['density']['condition_leave_out_centred'] is True
    with pytest.raises(ScreenerInputError, match='add leaveout'):
        get_preset('cpu:centred=1')
    # condsteps trains the condition model longer and nothing else
    from nnscreener.planners.settings import ScreenerSettings
    from nnscreener.trainers.nnscreener_ssl_trainers import nnScreenerConditionTrainer, nnScreenerDescriptorTrainer
    longer = ScreenerSettings.from_dict(get_preset('cpu:condsteps=10800'))
    assert nnScreenerConditionTrainer.training_settings(longer).ssl.num_steps == 10800
    assert nnScreenerDescriptorTrainer.training_settings(longer).ssl.num_steps == 2700
    assert ScreenerSettings.from_dict(get_preset('cpu')).ssl.condition_num_steps is None
    # diststeps trains the distillation longer and nothing else
    distilled_longer = get_preset('tiny:diststeps=900')
    assert [distilled_longer[s]['num_steps'] for s in ('ssl', 'density', 'distillation')] == [200, 300, 900]
    assert [get_preset('cpu')[s]['num_steps'] for s in ('ssl', 'density', 'distillation')] == [2700, 2700, 21600]
    # density= sets the planned density model, the one the distillation learns from; a wrong name is refused
    assert get_preset('cpu:density=conditional_gaussian')['density']['model'] == 'conditional_gaussian'
    assert get_preset('cpu')['density']['model'] == 'conditional_flow'  # measured best (documentation/benchmarks.md)
    assert get_preset('tiny')['density']['model'] == 'conditional_gaussian'
    with pytest.raises(ScreenerInputError, match=r'density=<gaussian\|conditional_gaussian\|'):
        get_preset('cpu:density=glow')
    # smooth= sets the smoothing of the exported maps; cpu plans 4 mm, the others the paper's map (no key)
    assert get_preset('cpu')['map_smoothing_mm'] == 4.0 and get_preset('cpu:smooth=0')['map_smoothing_mm'] == 0.0
    assert not any('map_smoothing_mm' in get_preset(p) for p in ('tiny', 'default', 'cpu_wide'))
    with pytest.raises(ScreenerInputError, match='smooth=<mm >= 0>'):
        get_preset('cpu:smooth=-2')
    # jitter= scales the SSL colour jitter towards none; 1 (no key) is the jitter of Screener's code
    assert get_preset('cpu:jitter=0.5')['ssl']['colour_jitter_scale'] == 0.5
    assert 'colour_jitter_scale' not in get_preset('cpu:jitter=1')['ssl']
    with pytest.raises(ScreenerInputError, match='jitter=<0..1>'):
        get_preset('cpu:jitter=2')
    # pairs= and dims= set the SSL positive pairs per step and d_desc = d_cond
    wider = get_preset('cpu:pairs=2048,dims=16')
    assert (wider['ssl']['positive_pairs'], wider['descriptor_dim'], wider['condition_dim']) == (2048, 16, 16)
    with pytest.raises(ScreenerInputError, match='dims=<int >= 1>'):
        get_preset('cpu:dims=0')
    from nnscreener.training.stage_runs import stage_settings  # inference only: --c retrains no stage for it
    assert all(stage_settings(get_preset('cpu'), b) == stage_settings(get_preset('cpu:smooth=0'), b)
               for b in ('ssl', 'density', 'distillation'))
    # the paper's conditions by default, with plans as they were before the option existed (no key)
    assert not any(key in get_preset(p)['density'] for p in ('tiny', 'cpu', 'default', 'cpu:median=1,leaveout=0')
                   for key in ('condition_median', 'condition_leave_out', 'condition_leave_out_centred'))
    assert get_preset('cpu_wide')['patch_size'] == (32, 48, 48) and get_preset('cpu')['ssl']['num_steps'] == 2700
    with pytest.raises(ScreenerInputError, match='steps=<int>'):
        get_preset('tiny:steps=many')
    with pytest.raises(ScreenerInputError, match='unknown preset'):
        get_preset('huge')


class _Payload:
    """Unpickling this runs code: what a crafted checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_a_checkpoint_that_needs_arbitrary_unpickling_is_refused_and_runs_nothing(tmp_path):
    from nnscreener.training.stage_trainer import load_plain_checkpoint
    marker = tmp_path / 'payload_ran'
    crafted = tmp_path / 'checkpoint_final.pth'
    torch.save({'network_weights': {'w': torch.zeros(1)}, 'screener': {'x': _Payload(str(marker))}}, crafted)
    with pytest.raises(ScreenerInputError, match='refusing to unpickle'):
        load_plain_checkpoint(str(crafted), 'cpu')
    assert not marker.exists()
    plain = tmp_path / 'plain.pth'
    torch.save({'network_weights': {'w': torch.ones(2)}, 'screener': {'rng': {'python': (3, (1, 2), None)}}}, plain)
    assert load_plain_checkpoint(str(plain), 'cpu')['network_weights']['w'].sum() == 2
