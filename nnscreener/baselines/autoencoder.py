"""3D convolutional autoencoder baseline: anomaly = local reconstruction error.

The encoder is the plans UNet's encoder (same stages, kernels, strides, features; nnU-Net's conv-norm-LeakyReLU
blocks, or its residual blocks for a residual-encoder UNet) without skip connections, squeezed by a 1x1x1 conv to
`code_channels` per bottleneck voxel; the decoder mirrors it with transposed convolutions and the plans' decoder convs
per stage. Without skips, the bottleneck is the only path, so what the model has not
learned to encode (rare structures, lesions) is reconstructed worse.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnscreener.utilities.cache_channels import crop_channels

BLOCK = dict(conv_op=nn.Conv3d, conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={'eps': 1e-5, 'affine': True},
             dropout_op=None, dropout_op_kwargs=None, nonlin=nn.LeakyReLU, nonlin_kwargs={'inplace': True})


class ConvAutoencoder(nn.Module):
    def __init__(self, features_per_stage: Sequence[int], kernel_sizes, strides, encoder_blocks: Sequence[int],
                 decoder_convs: Sequence[int], code_channels: int, residual: bool = False):
        """encoder_blocks: convs per encoder stage, or residual blocks if `residual`; decoder_convs: per decoder stage."""
        super().__init__()
        encoder, blocks_key = (ResidualEncoder, 'n_blocks_per_stage') if residual else \
            (PlainConvEncoder, 'n_conv_per_stage')
        self.encoder = encoder(1, len(features_per_stage), features_per_stage, kernel_sizes=kernel_sizes,
                               strides=strides, return_skips=False, **{blocks_key: encoder_blocks}, **BLOCK)
        self.to_code = nn.Conv3d(features_per_stage[-1], code_channels, 1)
        self.from_code = nn.Conv3d(code_channels, features_per_stage[-1], 1)
        up = []
        for s in range(len(features_per_stage) - 1, 0, -1):  # undo stage s's stride, reaching stage s-1's features
            up += [nn.ConvTranspose3d(features_per_stage[s], features_per_stage[s - 1], strides[s], strides[s]),
                   StackedConvBlocks(decoder_convs[s - 1], input_channels=features_per_stage[s - 1],
                                     output_channels=features_per_stage[s - 1], kernel_size=kernel_sizes[s - 1],
                                     initial_stride=1, **BLOCK)]
        self.decoder = nn.Sequential(*up)
        self.output = nn.Conv3d(features_per_stage[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of x (B, 1, *patch); the patch must be divisible by the product of the strides."""
        return self.output(self.decoder(self.from_code(self.to_code(self.encoder(x)))))


def build_autoencoder(configuration_manager: ConfigurationManager, code_channels: int) -> ConvAutoencoder:
    """The autoencoder of the plans' UNet encoder (see module docstring)."""
    kwargs = configuration_manager.network_arch_init_kwargs
    residual = 'n_blocks_per_stage' in kwargs  # nnU-Net's ResidualEncoderUNet; PlainConvUNet has n_conv_per_stage
    return ConvAutoencoder(kwargs['features_per_stage'], kwargs['kernel_sizes'], kwargs['strides'],
                           kwargs['n_blocks_per_stage' if residual else 'n_conv_per_stage'],
                           kwargs['n_conv_per_stage_decoder'], code_channels, residual)


def reconstruction_error_map(autoencoder: nn.Module, x: torch.Tensor, pool_stride: Sequence[int]) -> torch.Tensor:
    """Squared reconstruction error averaged over `pool_stride` cells (Screener's map resolution), (B, 1, z', y', x').

    Per-voxel errors are dominated by noise; averaging over the same cells Screener's density sees makes the two
    maps comparable in resolution.
    """
    error = (autoencoder(x).float() - x.float()) ** 2
    return F.avg_pool3d(error, tuple(pool_stride), tuple(pool_stride))


class AutoencoderObjective(nn.Module):
    """Training loss of the autoencoder baseline: mean squared reconstruction error of the stock nnU-Net input
    (the HU channel the error maps are made of). batch: data (B, 3, *patch) Screener-cache crops."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.network = autoencoder

    def forward(self, batch: dict):
        x = crop_channels(batch['data'])[0]
        return F.mse_loss(self.network(x).float(), x.float()), {}


class AutoencoderPatchModel:
    """The autoencoder baseline as inference's patch model (`PatchAnomalyModel`): squared reconstruction error of the
    stock input, averaged over the density's pooling cells."""
    uses_clahe = False

    def __init__(self, autoencoder: nn.Module, pool_stride, patch_size, device: torch.device):
        self.autoencoder, self.pool_stride = autoencoder.eval(), tuple(pool_stride)
        self.patch_size, self.device = tuple(patch_size), device

    def __call__(self, stock: torch.Tensor, clahe: torch.Tensor, crop_start: torch.Tensor) -> torch.Tensor:
        return reconstruction_error_map(self.autoencoder, stock, self.pool_stride)
