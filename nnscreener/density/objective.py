"""The density stage's objective (pure torch; nnScreenerDensityTrainer feeds it batches of Screener-cache crops)."""
import torch
import torch.distributed as dist
from torch import nn

from nnscreener.density.modular_screener import DensityAnomalyModel
from nnscreener.density.pooling import body_mean, pooled_body
from nnscreener.utilities.cache_channels import crop_channels


class DensityObjective(nn.Module):
    """Mean voxel-wise NLL of pooled, noised (sd 0.1) descriptors given conditions over the body's cells (the table
    and the room are not part of the data the density describes); only the density model trains.

    The density model is initialised from the first batch (maximum-likelihood Gaussian / act-norm statistics): it
    starts near the data instead of at N(0, I), which saves many steps. `initialized` is a buffer, so a resumed run
    does not redo it.

    batch: data (B, 3, *patch) crops [stock, CLAHE, body] (utilities/cache_channels.py); crop_start (B, 3).
    """

    def __init__(self, screener: DensityAnomalyModel, noise_sd: float):
        super().__init__()
        self.screener, self.noise_sd = screener, noise_sd
        self.network = screener.density
        self.register_buffer('initialized', torch.tensor(False))

    def forward(self, batch: dict):
        stock, clahe, body = crop_channels(batch['data'])
        with torch.no_grad():
            x = self.screener.select_input(stock, clahe)
            y, c = self.screener.features(x, batch['crop_start'], self.noise_sd)
        y, c = y.float(), (c.float() if c is not None else None)
        body = pooled_body(body, self.screener.pool_stride)
        if not self.initialized:
            self._initialize(y, c)
        return body_mean(self.network.nll(y, c), body), {}

    @torch.no_grad()
    def _initialize(self, y, c):
        self.network.initialize_from_data(y, c)
        if dist.is_available() and dist.is_initialized():  # every rank starts from rank 0's initialisation
            for p in self.network.parameters():
                dist.broadcast(p.data, 0)
        self.initialized.fill_(True)
