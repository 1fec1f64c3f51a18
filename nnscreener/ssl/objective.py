"""The dense SSL objective of the descriptor and condition models (pure torch; the trainer feeds it batches)."""
import torch
from torch import nn

from nnscreener.ssl.augment import ColourJitter, ColourJitterConfig
from nnscreener.ssl.crop_pairs import sample_features
from nnscreener.ssl.masking import BlockMasking


class DenseSSLObjective(nn.Module):
    """Colour-jitter (and, for the condition model, block-mask) each view, run the network, sample the descriptors
    at the positive-pair coordinates and apply the SSL loss (VICReg or InfoNCE).

    batch: view1, view2 (B, 1, *patch) CLAHE crops; coords1, coords2 (B, n, 3) view coordinates of the same
    source voxels.
    """

    def __init__(self, network: nn.Module, loss: nn.Module, masking: BlockMasking = None,
                 jitter: ColourJitterConfig = ColourJitterConfig()):
        super().__init__()
        self.network, self.loss, self.masking = network, loss, masking
        self.jitter = ColourJitter(jitter)

    def embed(self, view: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        x = self.jitter(view)
        if self.masking is not None:
            x, _ = self.masking(x)
        return sample_features(self.network(x), coords)

    def forward(self, batch: dict):
        y1 = self.embed(batch['view1'], batch['coords1'])
        y2 = self.embed(batch['view2'], batch['coords2'])
        return self.loss(y1, y2)
