"""The typed view of the plans' `screener` block (nnscreener/planners/settings.py): it round-trips the JSON exactly,
reads absent keys of older plans as their defaults without writing them back, refuses unknown keys, and is frozen."""
import dataclasses
import json

import pytest

from nnscreener.planners.presets import PRESETS, get_preset
from nnscreener.planners.screener_planner import screener_settings
from nnscreener.planners.settings import ScreenerSettings
from nnscreener.utilities.errors import ScreenerInputError


def as_json(block: dict) -> str:
    return json.dumps(json.loads(json.dumps(block)))  # tuples as lists, as the plans file holds them


@pytest.mark.parametrize('preset', sorted(PRESETS) + ['cpu:steps=90,clahe=0.01,median=5,leaveout=2'])
def test_every_preset_round_trips_to_the_same_json_in_the_same_order(preset):
    block = json.loads(as_json({'preset': preset, **get_preset(preset)}))
    assert json.dumps(ScreenerSettings.from_dict(block).to_dict()) == json.dumps(block)


def test_fitted_and_residual_encoder_plans_round_trip():
    block = json.loads(as_json(screener_settings('tiny', 'ResEncM', 0.02, num_labels=2)))
    assert 'gpu_memory' in block and block['unet'] == 'ResEncM'
    settings = ScreenerSettings.from_dict(block)
    assert settings.unet == 'ResEncM' and settings.gpu_memory['target_gb'] == 0.02
    assert json.dumps(settings.to_dict()) == json.dumps(block)


def test_keys_older_plans_lack_read_as_defaults_and_are_not_written_back():
    block = json.loads(as_json(get_preset('tiny')))
    del block['clahe_clip_limit'], block['ssl']['weight_decay'], block['ssl']['grad_clip']
    settings = ScreenerSettings.from_dict(block)
    assert settings.clahe_clip_limit == 0.01  # what plans made before the limit was recorded used
    assert (settings.ssl.weight_decay, settings.ssl.grad_clip, settings.density.grad_clip) == (0.0, 1.0, 1.0)
    assert (settings.density.condition_median, settings.density.condition_leave_out) == (1, None)
    assert (settings.unet, settings.screener_from, settings.gpu_memory) == ('plain', None, None)
    assert settings.to_dict() == block
    # a changed default-less key is written; a variant set back to the default is as if absent
    median = settings.with_stage('density', condition_median=5)
    assert median.to_dict()['density']['condition_median'] == 5 and settings.density.condition_median == 1
    assert median.with_stage('density', condition_median=1).to_dict() == block
    assert settings.stage('density') is settings.density and settings.density.pool_stride == (2, 3, 3)


def test_unknown_or_missing_keys_are_one_line_errors_and_the_view_is_frozen():
    block = json.loads(as_json(get_preset('tiny')))
    with pytest.raises(ScreenerInputError, match=r'screener\.density\.condition_medain') as info:
        ScreenerSettings.from_dict({**block, 'density': {**block['density'], 'condition_medain': 5}})
    assert '\n' not in str(info.value)
    del block['ssl']['lr']
    with pytest.raises(ScreenerInputError, match=r'lacks screener\.ssl\.lr'):
        ScreenerSettings.from_dict(block)
    settings = ScreenerSettings.from_dict(json.loads(as_json(get_preset('tiny'))))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.density.condition_median = 5
