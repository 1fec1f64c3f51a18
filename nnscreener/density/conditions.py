"""Conditions of the density model beside the learned ones: sin-cos positional encodings of absolute CT positions (the
paper's baseline condition model), and two ways of keeping learned conditions ignorant of local pathology
(`median_aggregated_conditions`, `LeaveOutConditions`).

Sin-cos encodings:
The paper (appendix "Baseline condition models") encodes the absolute position of each voxel w.r.t. the whole CT,
not w.r.t. the crop the models see, with standard (transformer) sin-cos encodings. Here the d_c channels are split
across the axes (z, y, x): the n = d_c / 2 frequency pairs go n // 3 to each axis and the remaining n % 3 one each
to z, then y. Axis a with n_a pairs uses the standard geometric frequencies
    omega_k = max_period ** (-k / n_a),  k = 0 .. n_a - 1   (wavelengths 2 pi .. ~2 pi max_period position units)
and contributes the channels [sin(omega_0 p_a) .. sin(omega_{n_a-1} p_a), cos(omega_0 p_a) .. cos(omega_{n_a-1} p_a)];
channel blocks are ordered z, y, x. Positions may be in voxels or mm; the frequencies are per position unit.
"""
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnscreener.utilities.errors import ScreenerInputError


def _axis_frequencies(d_c: int, max_period: float) -> list[torch.Tensor]:
    """The float64 frequencies of the z, y and x axes."""
    if d_c < 6 or d_c % 2:
        raise ScreenerInputError(f'sin-cos conditions need an even number of channels d_c >= 6 (a sin-cos pair '
                                 f'per axis at least), got d_c={d_c}')
    pairs = d_c // 2
    counts = [pairs // 3 + (axis < pairs % 3) for axis in range(3)]
    return [max_period ** (-torch.arange(n, dtype=torch.float64) / n) for n in counts]


def _encode(coordinates: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """Sin-cos encoding of float64 coordinates (...,) -> (..., 2 len(frequencies))."""
    angles = coordinates[..., None] * frequencies
    return torch.cat([torch.sin(angles), torch.cos(angles)], -1)


def sincos_conditions(positions, d_c: int, max_period: float = 10000.) -> torch.Tensor:
    """Sin-cos conditions of absolute positions (..., 3) ordered (z, y, x), in voxels or mm -> float32 (..., d_c)."""
    positions = torch.as_tensor(positions, dtype=torch.float64)
    if positions.shape[-1:] != (3,):
        raise ScreenerInputError(f'positions must be (..., 3) (z, y, x) coordinates, '
                                 f'got shape {tuple(positions.shape)}')
    frequencies = _axis_frequencies(d_c, max_period)
    return torch.cat([_encode(positions[..., a], frequencies[a]) for a in range(3)], -1).float()


def sincos_condition_map(crop_start: Sequence[int], crop_shape: Sequence[int], d_c: int,
                         stride: Sequence[int] = (1, 1, 1), max_period: float = 10000.,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Condition map (d_c, z', y', x') of a crop of the whole volume, matching an average-pooled feature map.

    crop_start: (z, y, x) voxel index in the whole (preprocessed) volume of the crop's first voxel (may be negative
    where the crop was padded beyond the volume). crop_shape: the crop's (z, y, x) size in voxels.
    stride: the average-pooling kernel = stride the feature maps went through (`pool_and_noise`); (1, 1, 1) for
    full-resolution maps. Pooled cell j along an axis with stride s averages crop voxels j*s .. j*s + s - 1, so it is
    encoded at its centre, the absolute position crop_start + j*s + (s - 1) / 2, in full-resolution voxel units.
    z' = crop_shape // stride (floor), as torch's avg_pool3d without padding.
    """
    if not len(crop_start) == len(crop_shape) == len(stride) == 3:
        raise ScreenerInputError(f'crop_start, crop_shape and stride must be (z, y, x) triples, got {crop_start}, '
                                 f'{crop_shape}, {stride}')
    frequencies = _axis_frequencies(d_c, max_period)
    blocks = []
    for axis, (start, size, s) in enumerate(zip(crop_start, crop_shape, stride)):
        centres = start + s * torch.arange(size // s, dtype=torch.float64) + (s - 1) / 2
        view = [1, 1, 1]
        view[axis] = len(centres)
        blocks.append(_encode(centres, frequencies[axis]).T.reshape(-1, *view))
    shape = [n // s for n, s in zip(crop_shape, stride)]
    return torch.cat([b.expand(-1, *shape) for b in blocks], 0).to(device=device, dtype=torch.float32)


def sincos_conditions_of_crops(crop_start: torch.Tensor, crop_shape: Sequence[int], d_c: int,
                               stride: Sequence[int], device=None) -> torch.Tensor:
    """`sincos_condition_map` of each crop of a batch: crop_start (B, 3) -> (B, d_c, z', y', x')."""
    if crop_start is None:
        raise ScreenerInputError('sin-cos conditions need the crop positions (crop_start)')
    return torch.stack([sincos_condition_map(tuple(s.tolist()), crop_shape, d_c, stride, device=device)
                        for s in crop_start])


def median_aggregated_conditions(c: torch.Tensor, size: int) -> torch.Tensor:
    """Per-channel median of condition maps (B, C, z, y, x) over a size^3 window of density voxels (edges
    replicated); size 1 returns c itself.

    Why: the condition model should encode anatomy and be ignorant of local pathology, which the paper gets from
    masking invariance learned over 300k steps. At CPU scale the learned conditions still follow a lesion, so
    mu(c) follows it too and its NLL stays low. The median of a window ignores whatever covers less than half of
    it (a lesion a few density voxels across) and, unlike a mean, keeps organ boundaries sharp. It extends the
    paper's "locally aggregated conditions" (the 3x3x3 kernel of the density nets); benchmarks/ has the measurement.
    """
    if size == 1:
        return c
    if size < 1 or size % 2 == 0:
        raise ScreenerInputError(f'the condition median window must be an odd number of voxels >= 1, got {size}')
    half = size // 2
    channels = []
    for channel in c.split(1, dim=1):  # one channel at a time: the unfolded windows are size^3 times the map
        windows = F.pad(channel, (half,) * 6, mode='replicate').unfold(2, size, 1).unfold(3, size, 1).unfold(
            4, size, 1)
        channels.append(windows.reshape(*windows.shape[:5], -1).median(dim=-1).values)
    return torch.cat(channels, dim=1)


def checkerboard_cells(shape: Sequence[int], cell: Sequence[int], device=None,
                       offset: Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """Bool (z, y, x): True in the cells of a `cell`-sized grid (from the patch origin, shifted back by `offset`
    voxels) whose index sum is even."""
    index = [(torch.arange(n, device=device) + o) // c for n, c, o in zip(shape, cell, offset)]
    return (index[0][:, None, None] + index[1][None, :, None] + index[2][None, None, :]) % 2 == 0


class LeaveOutConditions(nn.Module):
    """Each voxel's condition computed from the input with the voxel's own cell masked by the condition model's mask
    token: the cells of a checkerboard are masked in one pass and the others in a second (one batched call).

    Why: the paper's conditions are the condition model's output on the unmasked image, which is ignorant of local
    pathology only as far as its masking invariance goes. At CPU scale that invariance is weak: conditions computed
    from a CT with the lesions in-painted raise body AUROC 0.61 -> 0.91 (benchmarks/quality/condition_oracle.py).
    Masking the voxel's neighbourhood is the same in-painting without knowing where the lesion is, and stays within
    what the condition model was trained on (half of the input replaced by the token, as its training masks do).

    centred: a voxel near the border of its cell still lets the condition model see the part of a lesion across
    that border. With centred cells each voxel takes its condition from one of 8 checkerboards, shifted by half a
    cell along any of the axes, the one whose masked cell has the voxel in its middle half along every axis, so at
    least a quarter of a cell of masked input surrounds it (8 times the condition model's work). Measured on the
    phantoms it ranks worse than one unshifted checkerboard (body AUROC 0.702 against 0.744, benchmarks/), so it is
    an option for that measurement, off by default.
    """

    def __init__(self, condition: nn.Module, mask_token: float, cell: Sequence[int], centred: bool = False):
        super().__init__()
        if len(cell) != 3 or min(cell) < 1:
            raise ScreenerInputError(f'the leave-out cell must be 3 positive voxel counts (z, y, x), got {cell}')
        self.condition, self.cell, self.centred = condition, tuple(int(c) for c in cell), centred
        self.register_buffer('mask_token', torch.tensor(float(mask_token)))

    def _left_out(self, x: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
        """Conditions of every voxel with its cell of the checkerboard shifted by `offset` masked."""
        even = checkerboard_cells(x.shape[2:], self.cell, x.device, offset)
        token = self.mask_token.to(x.dtype)
        c_even, c_odd = self.condition(torch.cat([torch.where(even, token, x), torch.where(even, x, token)])).chunk(2)
        return torch.where(even, c_even, c_odd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.centred:
            return self._left_out(x, (0, 0, 0))
        # per axis: unshifted where the voxel lies in the middle half of its cell, shifted by half a cell elsewhere
        board = torch.zeros((1, 1, 1), dtype=torch.long, device=x.device)  # per voxel: which of the 8 boards
        for axis, (n, c) in enumerate(zip(x.shape[2:], self.cell)):
            q = torch.arange(n, device=x.device) % c
            view = [1, 1, 1]
            view[axis] = n
            board = 2 * board + ((4 * q < c) | (4 * q >= 3 * c)).view(view)
        conditions = None
        for number, c_board in enumerate(self.shifted_boards(x)):
            conditions = c_board if conditions is None else torch.where(board == number, c_board, conditions)
        return conditions

    def shifted_boards(self, x: torch.Tensor):
        """The conditions of every voxel under each of the 8 checkerboards shifted by half a cell along any of the
        axes, in the order of the binary number (z, y, x shifted)."""
        for choice in itertools.product((False, True), repeat=3):
            yield self._left_out(x, [c // 2 if s else 0 for c, s in zip(self.cell, choice)])
