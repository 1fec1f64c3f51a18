"""Presets of nnscreener: network size, patch and the Screener hyper-parameters, recorded in the plans.

`default` is the paper's scale (its appendix; documentation/method.md); `tiny` keeps every code path but runs on a
CPU in seconds (tests, the phantom demo). The `screener` block of `nnScreenerPlans.json` holds the chosen preset's
values so every later stage (pretraining, inference) reads its settings from the plans and not from the CLI.
"""
from copy import deepcopy

SCREENER_SPACING = (2.25, 1.5, 1.5)  # (z, y, x) mm, the paper's 1.5 x 1.5 x 2.25 mm (x, y, z)
CT_CLIP_RANGE = (-1000.0, 300.0)  # HU, clipped then rescaled to [0, 1]
BODY_THRESHOLD_HU = -500.0  # "dense foreground" of the paper

PRESETS = {
    'default': {
        'patch_size': (64, 96, 96),
        'base_num_features': 32,
        'max_num_features': 320,
        'finetune_batch_size': 2,
        'descriptor_dim': 32,
        'condition_dim': 32,
        'clahe_clip_limit': 0.05,  # the authors' Screener configuration (vox2vec); the paper gives none
        'ssl': {
            'batch_size': 8,  # m CTs per step, two crops each
            'positive_pairs': 8192,  # N = n * m
            'num_steps': 300_000,
            'warmup_steps': 10_000,
            'lr': 3e-4,
            'weight_decay': 1e-6,
            'grad_clip': 1.0,
            'loss': 'vicreg',
            'expander_dims': (8192, 8192, 8192),
            'mask_ratio': 0.6,
            'mask_block_size': (16, 24, 24),
        },
        'density': {
            'model': 'conditional_flow',  # the paper's headline Screener; measured best at `cpu` (below)
            'condition': 'learned',
            'batch_size': 4,
            'num_steps': 500_000,
            'warmup_steps': 10_000,
            'lr': 3e-4,
            'pool_stride': (2, 3, 3),
            'noise_sd': 0.1,
        },
        'distillation': {
            'batch_size': 4,
            'num_steps': 100_000,
            'warmup_steps': 5_000,
            'lr': 3e-4,
        },
        'checkpoint_every': 1000,
    },
    'tiny': {
        'patch_size': (16, 24, 24),  # divisible by the pooling stride (2, 3, 3)
        'base_num_features': 4,
        'max_num_features': 32,
        'finetune_batch_size': 2,
        'descriptor_dim': 8,
        'condition_dim': 8,
        'clahe_clip_limit': 0.05,
        'ssl': {
            'batch_size': 2,
            'positive_pairs': 512,
            'num_steps': 200,
            'warmup_steps': 4,
            'lr': 3e-3,
            'weight_decay': 1e-6,
            'grad_clip': 1.0,
            'loss': 'vicreg',
            'expander_dims': (64, 64),
            'mask_ratio': 0.6,
            'mask_block_size': (4, 8, 8),
        },
        'density': {
            'model': 'conditional_gaussian',
            'condition': 'learned',
            'batch_size': 2,
            'num_steps': 300,
            'warmup_steps': 4,
            'lr': 3e-3,
            'pool_stride': (2, 3, 3),
            'noise_sd': 0.1,
        },
        'distillation': {
            'batch_size': 4,
            'num_steps': 300,
            'warmup_steps': 4,
            'lr': 3e-3,
        },
        'checkpoint_every': 10,
    },
}


def _longer(preset: dict, steps: int, warmup: int, checkpoint_every: int) -> dict:
    """The same preset trained for `steps` steps in every stage."""
    preset = deepcopy(preset)
    for stage in ('ssl', 'density', 'distillation'):
        preset[stage].update(num_steps=steps, warmup_steps=warmup)
    preset['checkpoint_every'] = checkpoint_every
    return preset


# CPU quality benchmarks (benchmarks/quality): the tiny networks, trained 3x longer (about a minute per stage, 2 cores)
PRESETS['tiny_long'] = _longer(PRESETS['tiny'], steps=600, warmup=20, checkpoint_every=100)
# nnScreener_demo: the tiny networks trained 900 steps per stage, the distillation 3600, maps smoothed by 4 mm inside
# the body. Phantom benchmark, 3 training seeds, body AUROC against `tiny`: 0.628 -> 0.721 modular, 0.509 -> 0.676
# distilled (the smoothing alone 0.676 / 0.535, up in every seed; 3600 distillation steps +0.06 distilled against
# 900); about 4 minutes more on 2 cores. `tiny` stays unsmoothed and short: the tests' maps
PRESETS['demo'] = _longer(PRESETS['tiny'], steps=900, warmup=4, checkpoint_every=90)
PRESETS['demo']['distillation']['num_steps'] = 3600
PRESETS['demo']['map_smoothing_mm'] = 4.0


def _cpu_wide_preset() -> dict:
    """Between tiny and default: twice tiny's patch on every axis (48 x 72 x 72 mm of context for the conditions),
    twice its widths and feature dimensions. Measured against `cpu` in benchmarks/quality: less quality per CPU-hour."""
    preset = deepcopy(PRESETS['tiny'])
    preset.update(patch_size=(32, 48, 48), base_num_features=8, max_num_features=64, descriptor_dim=16,
                  condition_dim=16, checkpoint_every=100)
    preset['ssl'].update(positive_pairs=1024, expander_dims=(128, 128), mask_block_size=(8, 12, 12))
    for stage in ('ssl', 'density', 'distillation'):
        preset[stage].update(num_steps=1200, warmup_steps=20)
    return preset


PRESETS['cpu_wide'] = _cpu_wide_preset()
# The most map quality per CPU-hour of the measured sweep (benchmarks/quality/quality_vs_compute.py, 2 cores): the tiny
# networks trained 2700 steps per stage (9 minutes of compute) beat the wider cpu_wide networks at 1200 steps (22 min)
PRESETS['cpu'] = _longer(PRESETS['tiny'], steps=2700, warmup=20, checkpoint_every=270)
# the conditional flow: above the conditional Gaussian in each of 6 training seeds (body AUROC +0.008 to +0.038), the
# UNet distilled from its maps level with the Gaussian's (0.633 against 0.639). `tiny` keeps the cheaper Gaussian,
# under which the test world's planted sphere scores above its soft tissue
PRESETS['cpu']['density']['model'] = 'conditional_flow'
# the distillation 8x longer: the UNet's regression loss still fell at 2700 steps; 10800 took the distilled maps from
# 0.044 below the modular flow maps to 0.009 below (3 seeds, each +0.026 to +0.050); with the maps smoothed the gap
# was 0.022, and 21600 brought it to 0.018 (a closer copy in each of 3 seeds: Pearson r +0.004 to +0.011, AUROC@FPR0.3
# +0.005 to +0.013) for ~10 minutes more
PRESETS['cpu']['distillation']['num_steps'] = 21_600
# the exported maps smoothed by a Gaussian of 4 mm inside the body (inference only: nothing retrains): phantom body
# AUROC 0.677 -> 0.762 modular, 0.667 -> 0.740 distilled, up in each of 3 training seeds; on the real sarcomas it
# sharpens what the map says: 0.60 -> 0.64 where the tumour ranked high, 0.27 -> 0.16 where it ranked low already
PRESETS['cpu']['map_smoothing_mm'] = 4.0


# "<preset>:steps=N,clahe=X,median=K,leaveout=L,centred=1,maskblock=ZxYxX,condsteps=M,diststeps=D,density=NAME,
# smooth=S,jitter=J,pairs=P,dims=K": a preset with every stage trained N steps, another CLAHE clip limit, another
# condition median window, leave-out conditions (with centred cells), other mask blocks of the condition model's
# training, a condition model trained M steps, a distillation trained D steps, another default density model (whose
# maps the distillation learns), maps smoothed by S mm, the SSL colour jitter's ranges scaled by J, P positive pairs
# per SSL step and/or descriptors and conditions of K dimensions, for the quality-vs-compute, CLAHE, condition,
# distillation, density, smoothing, augmentation and SSL measurements (benchmarks/quality); the plans record the
# full name


def _mask_block(value: str) -> tuple:
    block = tuple(int(v) for v in value.split('x'))
    if len(block) != 3 or min(block) < 1:
        raise ValueError(value)
    return block


def _density_model(value: str) -> str:
    from nnscreener.density.factory import DENSITY_MODEL_NAMES
    if value not in DENSITY_MODEL_NAMES:
        raise ValueError(value)
    return value


def _millimetres(value: str) -> float:
    if float(value) < 0:
        raise ValueError(value)
    return float(value)


def _positive(value: str) -> int:
    if int(value) < 1:
        raise ValueError(value)
    return int(value)


def _fraction(value: str) -> float:
    if not 0 <= float(value) <= 1:
        raise ValueError(value)
    return float(value)


PRESET_OVERRIDES = {'steps': int, 'clahe': float, 'median': int, 'leaveout': int, 'centred': int,
                    'maskblock': _mask_block, 'condsteps': int, 'diststeps': int, 'density': _density_model,
                    'smooth': _millimetres, 'jitter': _fraction, 'pairs': _positive, 'dims': _positive}


def _parse_overrides(name: str, overrides: str) -> dict:
    from nnscreener.density.factory import DENSITY_MODEL_NAMES
    from nnscreener.utilities.errors import ScreenerInputError
    parsed = {}
    for item in filter(None, overrides.split(',')):
        key, _, value = item.partition('=')
        try:
            parsed[key] = PRESET_OVERRIDES[key](value)
        except (KeyError, ValueError):
            raise ScreenerInputError(f"preset override '{item}' of '{name}': use steps=<int>, clahe=<float>, "
                                     f"median=<odd int>, leaveout=<int>, centred=1 (with leaveout) or "
                                     f"maskblock=<z>x<y>x<x> or condsteps=<int> or diststeps=<int> or "
                                     f"density=<{'|'.join(DENSITY_MODEL_NAMES)}> or smooth=<mm >= 0> or "
                                     f"jitter=<0..1> or pairs=<int >= 1> or dims=<int >= 1>")
    if parsed.get('centred') and not parsed.get('leaveout'):
        raise ScreenerInputError(f"preset '{name}': centred=1 shifts the cells of leave-out conditions; "
                                 f"add leaveout=<int>")
    return parsed


def get_preset(name: str) -> dict:
    from nnscreener.utilities.errors import ScreenerInputError
    base, _, overrides = name.partition(':')
    if base not in PRESETS:
        raise ScreenerInputError(f"unknown preset '{base}'; choose one of {sorted(PRESETS)}")
    preset = deepcopy(PRESETS[base])
    overrides = _parse_overrides(name, overrides)
    if 'steps' in overrides:
        steps = overrides['steps']
        preset = _longer(preset, steps, min(steps // 10, preset['ssl']['warmup_steps']), max(10, steps // 10))
    if 'clahe' in overrides:
        preset['clahe_clip_limit'] = overrides['clahe']
    if 'maskblock' in overrides:
        # before leaveout, whose cell is counted in these blocks. Why: masking invariance can only hide a lesion
        # from the conditions when a block covers it, and tiny's blocks (4 x 8 x 8 voxels, 9 x 12 x 12 mm) are
        # smaller than most phantom lesions (5-28 mm); the paper's are 36 mm cubes
        preset['ssl']['mask_block_size'] = overrides['maskblock']
    if 'condsteps' in overrides:
        # masking invariance is learned: the paper trains its condition model 300k steps, `cpu` 2700
        preset['ssl']['condition_num_steps'] = overrides['condsteps']
    if 'diststeps' in overrides:
        # how long the student regresses the map decides how close the distilled UNet comes to it
        preset['distillation']['num_steps'] = overrides['diststeps']
    if 'density' in overrides:
        preset['density']['model'] = overrides['density']
    if 'smooth' in overrides:
        preset['map_smoothing_mm'] = overrides['smooth']
    if overrides.get('jitter', 1) != 1:
        # no key = 1, the jitter of Screener's code. Why measure less: the phantoms' liver and kidney tumours differ
        # from their organ by 20-45 HU (~0.02-0.035 of the [0, 1] input), the brightness jitter alone by +-20 %.
        # Measured at cpu: halved 0.746 (3 seeds; headline 0.762), none 0.731 (seed 0; 0.774); benchmarks.md
        preset['ssl']['colour_jitter_scale'] = overrides['jitter']
    if 'pairs' in overrides:
        # SSL signal per step at little cost: the UNets run once per view whatever the number of pairs; the paper
        # samples 1024 per CT (8192 over 8), tiny and cpu 256 (512 over 2). cpu:pairs=2048, modular maps: 0.782 against
        # 0.762 (3 seeds, up in each); distilled 0.790 against 0.783 at seed 0; seeds 1-2 distilled and real CT open
        preset['ssl']['positive_pairs'] = overrides['pairs']
    if 'dims' in overrides:
        # d_desc = d_cond: the paper's 32, tiny and cpu 8. cpu:dims=16 (seed 0): 0.687 against 0.774
        preset.update(descriptor_dim=overrides['dims'], condition_dim=overrides['dims'])
    if overrides.get('median', 1) != 1:
        # no key = 1, the paper's conditions, so plans stay as they were before the option existed. 5 (22 mm)
        # finds the phantoms' small lesions better but the real sarcomas and the distilled UNet worse
        # (benchmarks/quality, documentation/benchmarks.md)
        preset['density']['condition_median'] = overrides['median']
    if overrides.get('leaveout'):
        # conditions with each voxel's cell masked (LeaveOutConditions); the cell is `leaveout` mask blocks of the
        # condition model's training; 0 = none (no key), the paper's conditions
        preset['density']['condition_leave_out'] = [overrides['leaveout'] * b for b in preset['ssl']['mask_block_size']]
    if overrides.get('centred'):
        preset['density']['condition_leave_out_centred'] = True
    return preset
