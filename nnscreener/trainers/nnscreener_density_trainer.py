"""Stage 3 of Screener: the voxel-wise density model q(y | c) on frozen descriptor and condition maps."""

from nnscreener.density.objective import DensityObjective
from nnscreener.planners.settings import ScreenerSettings
from nnscreener.training.stage_trainer import nnScreenerStageTrainer
from nnscreener.training.stages import assemble_modular_screener, density_from_block


class nnScreenerDensityTrainer(nnScreenerStageTrainer):
    """Density model and conditions from the plans' `screener` block (learned conditions; the conditional flow at
    the `default` and `cpu` presets, the conditional Gaussian at `tiny`). Variants below fix them for the paper's
    ablations; each writes its own result folder."""
    settings_block = 'density'
    density_model = None  # None: as planned
    condition_kind = None

    @classmethod
    def training_settings(cls, settings: ScreenerSettings) -> ScreenerSettings:
        return settings.with_stage('density', model=cls.density_model or settings.density.model,
                                   condition=cls.condition_kind or settings.density.condition)

    def build_objective(self):
        density = density_from_block(self.settings)
        screener = assemble_modular_screener(self.plans_manager.dataset_name, self.configuration_manager, self.settings,
                                             density, self.device)
        return DensityObjective(screener, self.stage_settings.noise_sd)


class nnScreenerDensityTrainer_flow(nnScreenerDensityTrainer):
    """Learned conditions + conditional Glow flow."""
    density_model, condition_kind = 'conditional_flow', 'learned'


class nnScreenerDensityTrainer_gaussian(nnScreenerDensityTrainer):
    """Learned conditions + conditional Gaussian (beside a preset that plans the flow)."""
    density_model, condition_kind = 'conditional_gaussian', 'learned'


class nnScreenerDensityTrainer_marginalGaussian(nnScreenerDensityTrainer):
    """No conditions: one Gaussian for every voxel."""
    density_model, condition_kind = 'gaussian', 'none'


class nnScreenerDensityTrainer_marginalFlow(nnScreenerDensityTrainer):
    density_model, condition_kind = 'flow', 'none'


class nnScreenerDensityTrainer_sincosGaussian(nnScreenerDensityTrainer):
    """The paper's positional baseline: sin-cos encodings of the voxel position + conditional Gaussian."""
    density_model, condition_kind = 'conditional_gaussian', 'sincos'

