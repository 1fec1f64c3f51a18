"""Builds a density model by name (the names the trainers and the CLI use)."""
from nnscreener.density.base import DensityModel
from nnscreener.density.flow import GlowDensity
from nnscreener.density.gaussian import ConditionalGaussianDensity, GaussianDensity
from nnscreener.utilities.errors import ScreenerInputError

DENSITY_MODEL_NAMES = ('gaussian', 'conditional_gaussian', 'flow', 'conditional_flow')


def build_density_model(name: str, d_y: int, d_c: int, **kwargs) -> DensityModel:
    """A fresh density model over d_y descriptor channels.

    name: 'gaussian' | 'flow' (marginal: d_c is ignored, the model takes c=None) or 'conditional_gaussian' |
    'conditional_flow' (conditioned on d_c condition channels). kwargs go to the model class:
    ConditionalGaussianDensity(hidden_channels=128, hidden_layers=1, kernel_size=3),
    GlowDensity(num_steps=8, hidden_channels=128, hidden_layers=2, scale_clamp=2.0); GaussianDensity takes none.
    The model's `.conditional` says whether it needs c.
    """
    if name not in DENSITY_MODEL_NAMES:
        raise ScreenerInputError(f'unknown density model {name!r}; choose one of {", ".join(DENSITY_MODEL_NAMES)}')
    conditional = name.startswith('conditional_')
    if d_y < 1 or (conditional and d_c < 1):
        raise ScreenerInputError(f'{name} needs d_y >= 1 descriptor channels'
                                 + (' and d_c >= 1 condition channels' if conditional else '')
                                 + f', got d_y={d_y}, d_c={d_c}')
    if name == 'gaussian':
        return GaussianDensity(d_y, **kwargs)
    if name == 'conditional_gaussian':
        return ConditionalGaussianDensity(d_y, d_c, **kwargs)
    if d_y < 2:
        raise ScreenerInputError(f'{name} needs d_y >= 2 descriptor channels (coupling layers split them), got {d_y}')
    return GlowDensity(d_y, d_c if conditional else 0, **kwargs)
