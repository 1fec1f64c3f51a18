"""Baseline of the quality benchmark: a 3D convolutional autoencoder trained to reconstruct the HU input.

It takes the density stage's place and budget (steps, batch, lr, crops of the pretraining cache), so it competes
with the modular Screener on equal terms; `nnScreener_predict --model autoencoder` serves its error maps.
"""
import torch.nn.functional as F
from torch import nn

from nnscreener.baselines.autoencoder import build_autoencoder
from nnscreener.training.data_loaders import STOCK
from nnscreener.training.stage_trainer import nnScreenerStageTrainer


class AutoencoderObjective(nn.Module):
    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.network = autoencoder

    def forward(self, batch: dict):
        x = batch['data'][:, STOCK:STOCK + 1]
        return F.mse_loss(self.network(x).float(), x.float()), {}


class nnScreenerAutoencoderTrainer(nnScreenerStageTrainer):
    """Code channels per bottleneck voxel = the plans' descriptor_dim (Screener's per-voxel feature budget)."""
    stage = 'density'

    def build_objective(self):
        return AutoencoderObjective(build_autoencoder(self.configuration_manager, self.screener['descriptor_dim']))
