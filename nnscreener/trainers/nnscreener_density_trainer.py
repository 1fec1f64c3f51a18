"""Stage 3 of Screener: the voxel-wise density model q(y | c) on frozen descriptor and condition maps."""
from copy import deepcopy

from nnscreener.baselines.intensity import INTENSITY_DIM
from nnscreener.density.objective import DensityObjective
from nnscreener.training.stage_trainer import nnScreenerStageTrainer
from nnscreener.training.stages import HISTOGRAM_MODEL, density_from_block, modular_screener


# Screener's noise sd 0.1 is relative to descriptors of unit scale; on [0, 1] intensities (1300 HU) it would blur
# 130 HU, more than most lesions differ by. 0.01 (13 HU, the phantoms' noise level) just dequantises the histogram.
INTENSITY_NOISE_SD = 0.01


class nnScreenerDensityTrainer(nnScreenerStageTrainer):
    """Density model and conditions from the plans' `screener` block (default: learned conditions, conditional
    Gaussian). Variants below fix them for the paper's ablations; each writes its own result folder."""
    stage = 'density'
    density_model = None  # None: as planned
    condition_kind = None
    intensity_descriptor = False  # the intensity baseline: the HU input in place of the learned descriptor

    @classmethod
    def training_screener(cls, screener: dict) -> dict:
        screener = deepcopy(screener)
        density = screener['density']
        density['model'] = cls.density_model or density['model']
        density['condition'] = cls.condition_kind or density['condition']
        if cls.intensity_descriptor:
            screener.update(descriptor='intensity', descriptor_dim=INTENSITY_DIM)
            density['noise_sd'] = INTENSITY_NOISE_SD
        return screener

    def build_objective(self):
        kind = self.hparams['condition']
        density = density_from_block(self.screener, kind)
        screener = modular_screener(self.plans_manager.dataset_name, self.configuration_manager, self.screener,
                                    self.device, density=density)
        return DensityObjective(screener, self.hparams['noise_sd'])


class nnScreenerDensityTrainer_flow(nnScreenerDensityTrainer):
    """Learned conditions + conditional Glow flow."""
    density_model, condition_kind = 'conditional_flow', 'learned'


class nnScreenerDensityTrainer_marginalGaussian(nnScreenerDensityTrainer):
    """No conditions: one Gaussian for every voxel."""
    density_model, condition_kind = 'gaussian', 'none'


class nnScreenerDensityTrainer_marginalFlow(nnScreenerDensityTrainer):
    density_model, condition_kind = 'flow', 'none'


class nnScreenerDensityTrainer_sincosGaussian(nnScreenerDensityTrainer):
    """The paper's positional baseline: sin-cos encodings of the voxel position + conditional Gaussian."""
    density_model, condition_kind = 'conditional_gaussian', 'sincos'


class nnScreenerDensityTrainer_intensity(nnScreenerDensityTrainer):
    """Non-Screener baseline: q(HU | position), a histogram of the pooled HU value given its sin-cos position."""
    density_model, condition_kind, intensity_descriptor = HISTOGRAM_MODEL, 'sincos', True
