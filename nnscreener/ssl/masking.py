"""Random block masking: the extra augmentation that makes Screener's condition model masking-invariant.

Defaults are Screener's (vox2vec pretrain_screener config): blocks of 16 x 24 x 24 voxels (z, y, x), 60 % of the
blocks masked, a sample masked at all with probability 0.9.
"""
import torch
from torch import nn

DEFAULT_BLOCK_SIZE = (16, 24, 24)
DEFAULT_RATIO = 0.6
DEFAULT_P = 0.9


def random_block_mask(batch: int, patch_size, block_size=DEFAULT_BLOCK_SIZE, ratio: float = DEFAULT_RATIO,
                      p: float = 1.0, generator: torch.Generator = None, device=None) -> torch.Tensor:
    """Bool mask (B, 1, z, y, x), True = masked, from blocks on a grid with a random offset per sample.

    Each sample's grid of `block_size` cells is shifted by a uniform offset in [0, block) per axis (so block
    borders do not always fall on the same voxels), and k = round(ratio * n_cells) of its cells are masked: every
    voxel is masked with probability k / n_cells ~ ratio. A sample is masked at all with probability p.
    `generator` must live on `device`.
    """
    if not 0 <= ratio <= 1 or not 0 <= p <= 1:
        raise ValueError(f'ratio and p must be in [0, 1], got ratio={ratio}, p={p}')
    patch = torch.as_tensor(tuple(patch_size))
    block = torch.as_tensor(tuple(block_size))
    offsets = (torch.rand(batch, 3, generator=generator, device=device)
               * torch.as_tensor(tuple(block_size), dtype=torch.float32, device=device)).long()  # (B, 3)
    n_cells = (patch + block - 1) // block + 1  # one more cell per axis to cover the shifted grid
    cells_total = int(n_cells.prod())
    # per sample, a uniformly random subset of round(ratio * cells_total) cells
    ranks = torch.rand(batch, cells_total, generator=generator, device=device).argsort(dim=1).argsort(dim=1)
    cells = (ranks < round(ratio * cells_total)).view(batch, *n_cells.tolist())
    # voxel i of a sample lies in cell (i + offset) // block on each axis
    idx = [(torch.arange(int(patch[ax]), device=device)[None] + offsets[:, ax:ax + 1]) // int(block[ax])
           for ax in range(3)]  # each (B, P_ax)
    b = torch.arange(batch, device=device)
    mask = cells[b[:, None, None, None], idx[0][:, :, None, None], idx[1][:, None, :, None], idx[2][:, None, None, :]]
    keep = torch.rand(batch, generator=generator, device=device) < p
    return (mask & keep[:, None, None, None]).unsqueeze(1)


class BlockMasking(nn.Module):
    """Replaces randomly masked blocks of the input (B, 1, z, y, x) by a learned scalar `mask_token`.

    Why a scalar token in image space: the distilled / fine-tuned networks reuse nnU-Net's plans UNet, whose input
    has 1 channel. Appending the mask as a second channel would change the first conv's weight shape and break
    loading the weights into a 1-channel nnU-Net network; a token inserted in the image keeps the architecture
    unchanged (Screener's own backbone inserts a learned token after its stem instead). Use it on the input of the
    condition model during SSL training only (after colour jitter, so the token is not jittered); save
    `mask_token` with the trainer state if training is resumed.
    """

    def __init__(self, block_size=DEFAULT_BLOCK_SIZE, ratio: float = DEFAULT_RATIO, p: float = DEFAULT_P,
                 token_init: float = 0.0):
        super().__init__()
        self.block_size = tuple(block_size)
        self.ratio = ratio
        self.p = p
        self.mask_token = nn.Parameter(torch.tensor(float(token_init)))

    def forward(self, x: torch.Tensor, generator: torch.Generator = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (masked x, mask (B, 1, z, y, x) bool, True = replaced by the token)."""
        mask = random_block_mask(x.shape[0], x.shape[2:], self.block_size, self.ratio, self.p, generator, x.device)
        return torch.where(mask, self.mask_token.to(x.dtype), x), mask
