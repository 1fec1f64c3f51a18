"""Typed, frozen view of the plans' `screener` block (compare nnU-Net's `ConfigurationManager` over a plans
configuration): every stage reads its settings from here, never from the raw dict.

`ScreenerSettings.from_dict(plans['screener'])` and `.to_dict()` round-trip the JSON exactly: a key the plans do not
hold (plans from before an option existed) reads as the option's default and is not written back, so plans, stage
checkpoints and `--c` comparisons stay as they were. Variants are made with `dataclasses.replace`. An unknown key is a
one-line error, so a typo in hand-edited plans is not silently ignored.
"""
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Optional, Tuple

from nnscreener.planners.unets import DEFAULT_UNET
from nnscreener.preprocessing.clahe import LEGACY_CLAHE_CLIP_LIMIT  # plans from before the clip limit was recorded
from nnscreener.utilities.errors import ScreenerInputError


@dataclass(frozen=True, kw_only=True)
class _Block:
    """A settings block; `_given` names the keys the plans held (the others read as their defaults)."""
    _given: tuple = field(default=(), repr=False, compare=False)

    @classmethod
    def from_dict(cls, block: dict, where: str = 'screener'):
        names = {f.name: f for f in fields(cls) if f.name != '_given'}
        unknown = sorted(set(block) - set(names))
        if unknown:
            raise ScreenerInputError(f"unknown setting(s) {', '.join(f'{where}.{k}' for k in unknown)} in the plans' "
                                     f"screener block: fix the plans or re-run nnScreener_plan_and_preprocess")
        values = {k: _typed(names[k], v, f'{where}.{k}') for k, v in block.items()}
        missing = [k for k, f in names.items() if k not in values and _required(f)]
        if missing:
            raise ScreenerInputError(f"the plans' screener block lacks {', '.join(f'{where}.{k}' for k in missing)}: "
                                     f"re-run nnScreener_plan_and_preprocess")
        return cls(**values, _given=tuple(block))

    def to_dict(self) -> dict:
        """The JSON block: the keys the plans held, in their order, then any other whose value is not its default."""
        own = [f for f in fields(self) if f.name != '_given']
        written = list(self._given) + [f.name for f in own if f.name not in self._given
                                       and (_required(f) or getattr(self, f.name) != f.default)]
        return {k: _plain(getattr(self, k)) for k in written}


def _required(f) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _typed(f, value, where: str):
    if isinstance(f.type, type) and issubclass(f.type, _Block):
        return f.type.from_dict(value, where)
    if isinstance(value, list):
        return tuple(value)
    return value


def _plain(value):
    if isinstance(value, _Block):
        return value.to_dict()
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True, kw_only=True)
class StageSettings(_Block):
    """What every training stage has: its batch, steps and optimiser."""
    batch_size: int
    num_steps: int
    warmup_steps: int
    lr: float
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass(frozen=True, kw_only=True)
class SSLSettings(StageSettings):
    """The descriptor and condition stages (dense SSL; block masking for the condition model)."""
    positive_pairs: int  # N = n * m per step
    loss: str = 'vicreg'
    expander_dims: Tuple[int, ...] = ()
    mask_ratio: float = 0.6
    mask_block_size: Tuple[int, int, int] = (16, 24, 24)
    condition_num_steps: Optional[int] = None  # the condition model's steps; None = num_steps, as in the paper
    colour_jitter_scale: float = 1.0  # ColourJitterConfig.scaled: 1 = the ranges of Screener's code


@dataclass(frozen=True, kw_only=True)
class DensitySettings(StageSettings):
    model: str = 'conditional_gaussian'
    condition: str = 'learned'  # 'learned', 'none' or 'sincos'
    pool_stride: Tuple[int, int, int] = (2, 3, 3)
    noise_sd: float = 0.1
    condition_median: int = 1  # median window of the learned conditions; 1 = the paper's conditions
    condition_leave_out: Optional[Tuple[int, int, int]] = None  # LeaveOutConditions' cell; None = the paper's
    condition_leave_out_centred: bool = False  # LeaveOutConditions' centred cells (8 shifted checkerboards)


@dataclass(frozen=True, kw_only=True)
class DistillationSettings(StageSettings):
    pass


@dataclass(frozen=True, kw_only=True)
class ScreenerSettings(_Block):
    """The plans' `screener` block: preset, networks, input and the three stage blocks."""
    patch_size: Tuple[int, int, int]
    base_num_features: int
    max_num_features: int
    descriptor_dim: int
    condition_dim: int
    ssl: SSLSettings
    density: DensitySettings
    distillation: DistillationSettings
    checkpoint_every: int
    preset: Optional[str] = None
    finetune_batch_size: int = 2
    clahe_clip_limit: float = LEGACY_CLAHE_CLIP_LIMIT
    map_smoothing_mm: float = 0.0  # Gaussian sigma (mm) of the body-only anomaly map at export; 0 = the paper's map
    unet: str = DEFAULT_UNET
    screener_from: Optional[str] = None  # the dataset whose pretrained Screener these plans use
    gpu_memory: Optional[dict] = None  # the record of -gpu_memory_target's estimates

    @classmethod
    def from_plans(cls, plans: dict) -> 'ScreenerSettings':
        return cls.from_dict(plans['screener'])

    def stage(self, block: str) -> StageSettings:
        """The settings block of a training stage: 'ssl', 'density' or 'distillation'."""
        return getattr(self, block)

    def with_stage(self, block: str, **changes) -> 'ScreenerSettings':
        return dataclasses.replace(self, **{block: dataclasses.replace(self.stage(block), **changes)})
