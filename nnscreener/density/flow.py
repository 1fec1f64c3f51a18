"""Glow normalizing flow of Screener (paper, appendix "Density models", eqs. 8-9; Kingma & Dhariwal 2018).

-log q(y | c) = 0.5 ||f(y, c)||^2 - log|det df(y, c)/dy| + const, with f a stack of K Glow steps
(act-norm -> invertible 1x1 linear -> affine coupling) applied to every voxel on its own (1x1x1 convs over the
channel dim), so one fully convolutional pass gives the dense NLL map. In the conditional flow the condition
enters every coupling net (concatenated to the passive half, as in CFlow-AD) and every act-norm (its log-scale
and shift get a c-dependent term predicted by a 1x1x1 conv MLP), as the paper describes.

Precision: the flow state (y, z, log-det) is kept in at least float32 even under autocast; only the coupling and
act-norm MLPs run in the autocast dtype, and the 1x1 linear runs with autocast off so the inverse stays exact.
"""
import torch
from torch import nn

from nnscreener.density.base import DensityModel, conv_mlp, zero_output_layer_
from nnscreener.utilities.tensors import at_least_float32


def _per_voxel(logdet: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Broadcasts a log-det of shape (1 or B, 1 or z, ...) to one value per voxel of y: (B, z, y, x)."""
    return logdet.expand(y.shape[0], *y.shape[2:])


class ActNorm(nn.Module):
    """Per-channel affine z = (y + b) * exp(s); conditional: s and b get a c-dependent term s(c), b(c).

    Starts as the identity (s = b = 0, c-terms zero). `initialize_` is Glow's data-dependent initialisation.
    """

    def __init__(self, d_y: int, d_c: int, hidden_channels: int, hidden_layers: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(1, d_y, 1, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, d_y, 1, 1, 1))
        self.condition_net = conv_mlp(d_c, 2 * d_y, hidden_channels, hidden_layers) if d_c else None

    def _log_scale_and_bias(self, c: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.condition_net is None:
            return self.log_scale, self.bias
        log_scale_c, bias_c = at_least_float32(self.condition_net(c)).chunk(2, 1)
        return self.log_scale + log_scale_c, self.bias + bias_c

    def forward(self, y: torch.Tensor, c: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale, bias = self._log_scale_and_bias(c)
        return (y + bias) * torch.exp(log_scale), _per_voxel(log_scale.sum(1), y)

    def inverse(self, z: torch.Tensor, c: torch.Tensor = None) -> torch.Tensor:
        log_scale, bias = self._log_scale_and_bias(c)
        return z * torch.exp(-log_scale) - bias

    @torch.no_grad()
    def initialize_(self, y: torch.Tensor) -> None:
        """Zeros the c-term and sets s, b so that this layer's output on y has per-channel zero mean, unit variance."""
        if self.condition_net is not None:
            zero_output_layer_(self.condition_net[-1])
        y = y.transpose(0, 1).flatten(1)
        self.bias[:] = -y.mean(1).view_as(self.bias)
        self.log_scale[:] = -y.std(1, unbiased=False).clamp_min(1e-6).log().view_as(self.log_scale)


class InvertibleLinear(nn.Module):
    """Glow's invertible 1x1 conv z = W y, LU-parametrised: W = P L (U + diag(sign(s) exp(log|s|))).

    P (permutation) and sign(s) are fixed; log|det W| = sum log|s| is then exact and O(d). Initialised from a
    random rotation (det = +-1), as in Glow.
    """

    def __init__(self, d_y: int):
        super().__init__()
        rotation = torch.linalg.qr(torch.randn(d_y, d_y))[0]
        permutation, lower, upper = torch.linalg.lu(rotation)
        s = upper.diagonal()
        self.register_buffer('permutation', permutation)
        self.register_buffer('sign_s', s.sign())
        self.register_buffer('lower_mask', torch.tril(torch.ones(d_y, d_y), -1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_abs_s = nn.Parameter(s.abs().log())

    def weight(self) -> torch.Tensor:
        """W (d_y, d_y)."""
        eye = torch.eye(len(self.log_abs_s), dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_abs_s.exp())
        return self.permutation @ lower @ upper

    def _transform(self, y: torch.Tensor, inverse: bool) -> torch.Tensor:
        # autocast would run W (and W y) in bf16 and break exact invertibility; d x d per voxel costs nothing in fp32
        with torch.autocast(device_type=y.device.type, enabled=False):
            weight = self.weight()
            if inverse:
                weight = torch.linalg.inv(weight)
            return torch.einsum('ij,bj...->bi...', weight.to(y.dtype), y)

    def forward(self, y: torch.Tensor, c: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._transform(y, inverse=False), _per_voxel(self.log_abs_s.sum().view(1, 1, 1, 1), y)

    def inverse(self, z: torch.Tensor, c: torch.Tensor = None) -> torch.Tensor:
        return self._transform(z, inverse=True)


class AffineCoupling(nn.Module):
    """Affine coupling: y = (y_a, y_b), z_b = y_b * exp(s) + t with (s, t) = NN(y_a [, c]), z_a = y_a.

    s is soft-clamped, s = clamp * tanh(s_raw / clamp), so scales stay in [exp(-clamp), exp(clamp)] (stable
    training, identity at initialisation where the net's output conv is zero).
    """

    def __init__(self, d_y: int, d_c: int, hidden_channels: int, hidden_layers: int, scale_clamp: float):
        super().__init__()
        self.d_a = d_y // 2
        self.scale_clamp = scale_clamp
        self.net = conv_mlp(self.d_a + d_c, 2 * (d_y - self.d_a), hidden_channels, hidden_layers)

    def _log_scale_and_shift(self, y_a: torch.Tensor, c: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = y_a if c is None else torch.cat([y_a, c.to(y_a.dtype)], 1)
        s_raw, t = at_least_float32(self.net(h)).chunk(2, 1)
        return self.scale_clamp * torch.tanh(s_raw / self.scale_clamp), t

    def forward(self, y: torch.Tensor, c: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
        y_a, y_b = y[:, :self.d_a], y[:, self.d_a:]
        log_scale, shift = self._log_scale_and_shift(y_a, c)
        return torch.cat([y_a, y_b * torch.exp(log_scale) + shift], 1), log_scale.sum(1)

    def inverse(self, z: torch.Tensor, c: torch.Tensor = None) -> torch.Tensor:
        z_a, z_b = z[:, :self.d_a], z[:, self.d_a:]
        log_scale, shift = self._log_scale_and_shift(z_a, c)
        return torch.cat([z_a, (z_b - shift) * torch.exp(-log_scale)], 1)


class GlowDensity(DensityModel):
    """Glow flow over each voxel's descriptor, marginal (d_c = 0) or conditional on c (d_c > 0).

    num_steps Glow steps (act-norm -> invertible 1x1 linear -> affine coupling); the coupling and act-norm MLPs
    have `hidden_layers` 1x1x1 conv+LeakyReLU blocks of width `hidden_channels`. Base distribution N(0, I).
    """

    def __init__(self, d_y: int, d_c: int = 0, num_steps: int = 8, hidden_channels: int = 128,
                 hidden_layers: int = 2, scale_clamp: float = 2.0):
        if d_y < 2:
            raise ValueError(f'a coupling flow needs d_y >= 2 descriptor channels, got {d_y}')
        super().__init__(d_y, d_c)
        layers = []
        for _ in range(num_steps):
            layers += [ActNorm(d_y, d_c, hidden_channels, hidden_layers), InvertibleLinear(d_y),
                       AffineCoupling(d_y, d_c, hidden_channels, hidden_layers, scale_clamp)]
        self.layers = nn.ModuleList(layers)

    def forward(self, y: torch.Tensor, c: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z = f(y, c) (B, d_y, z, y, x) and log|det df/dy| per voxel (B, z, y, x), at least float32."""
        self.check_inputs(y, c)
        y = at_least_float32(y)
        logdet = y.new_zeros(y.shape[0], *y.shape[2:])
        for layer in self.layers:
            y, layer_logdet = layer(y, c)
            logdet = logdet + layer_logdet
        return y, logdet

    def inverse(self, z: torch.Tensor, c: torch.Tensor = None) -> torch.Tensor:
        """y = f^-1(z, c)."""
        self.check_inputs(z, c)
        z = at_least_float32(z)
        for layer in reversed(self.layers):
            z = layer.inverse(z, c)
        return z

    @torch.no_grad()
    def initialize_from_data(self, y: torch.Tensor, c: torch.Tensor = None) -> None:
        """Glow's data-dependent act-norm initialisation on one batch.

        Passes y through the flow; each act-norm's c-term is zeroed and its s, b set so that its output on this
        batch has zero mean and unit variance per channel. The model output z is then roughly standardised from
        the first step, which avoids huge initial losses on unnormalised descriptors.
        """
        self.check_inputs(y, c)
        y = at_least_float32(y)
        for layer in self.layers:
            if isinstance(layer, ActNorm):
                layer.initialize_(y)
            y, _ = layer(y, c)
