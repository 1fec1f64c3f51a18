"""Baseline of the quality benchmark: q(HU | position), the intensity baseline (nnscreener/baselines/intensity.py).

It takes the density stage's place and budget (steps, batch, lr, crops of the pretraining cache) with the density
objective of the Screener; `nnScreener_predict --model intensity` serves its maps.
"""
from nnscreener.baselines.intensity import INTENSITY_NOISE_SD, IntensityBaseline
from nnscreener.density.objective import DensityObjective
from nnscreener.training.stage_trainer import nnScreenerStageTrainer


class nnScreenerIntensityTrainer(nnScreenerStageTrainer):
    """Its sin-cos conditions have the plans' condition_dim channels."""
    settings_block = 'density'

    def build_objective(self):
        model = IntensityBaseline(self.settings.condition_dim, self.stage_settings.pool_stride)
        return DensityObjective(model, INTENSITY_NOISE_SD)
