"""Baseline of the quality benchmark: a 3D convolutional autoencoder trained to reconstruct the HU input.

It takes the density stage's place and budget (steps, batch, lr, crops of the pretraining cache), so it competes
with the modular Screener on equal terms; `nnScreener_predict --model autoencoder` serves its error maps.
"""
from nnscreener.baselines.autoencoder import AutoencoderObjective, build_autoencoder
from nnscreener.training.stage_trainer import nnScreenerStageTrainer


class nnScreenerAutoencoderTrainer(nnScreenerStageTrainer):
    """Code channels per bottleneck voxel = the plans' descriptor_dim (Screener's per-voxel feature budget)."""
    settings_block = 'density'

    def build_objective(self):
        return AutoencoderObjective(build_autoencoder(self.configuration_manager, self.settings.descriptor_dim))
