"""Voxel-wise density models of Screener: q(y[p] | c[p]) over descriptor maps, with sin-cos baseline conditions."""
from nnscreener.density.base import DensityModel
from nnscreener.density.conditions import sincos_condition_map, sincos_conditions
from nnscreener.density.factory import DENSITY_MODEL_NAMES, build_density_model
from nnscreener.density.flow import GlowDensity
from nnscreener.density.gaussian import ConditionalGaussianDensity, GaussianDensity
from nnscreener.density.pooling import pool_and_noise

__all__ = ['DensityModel', 'GaussianDensity', 'ConditionalGaussianDensity', 'GlowDensity', 'DENSITY_MODEL_NAMES',
           'build_density_model', 'sincos_conditions', 'sincos_condition_map', 'pool_and_noise']
