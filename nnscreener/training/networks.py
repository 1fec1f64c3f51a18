"""The plans' UNet, built exactly as stock nnU-Net builds it, with a chosen number of output channels."""
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn


def build_plans_unet(configuration_manager: ConfigurationManager, output_channels: int,
                     deep_supervision: bool = False) -> nn.Module:
    """Same class, keys and shapes as `nnUNetv2_train` builds, so weights move between Screener and nnU-Net.

    Without deep supervision the lower-resolution heads (`decoder.seg_layers[:-1]`) never see a gradient; they are
    frozen so DDP does not wait for them (nnU-Net's loader skips all `seg_layers` when fine-tuning anyway).
    """
    network = get_network_from_plans(configuration_manager.network_arch_class_name,
                                  configuration_manager.network_arch_init_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import,
                                  input_channels=1, output_channels=output_channels, allow_init=True,
                                  deep_supervision=deep_supervision)
    if not deep_supervision:
        for head in network.decoder.seg_layers[:-1]:
            head.requires_grad_(False)
    return network
