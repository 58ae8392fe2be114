"""The paper's U-Net (Saito et al.), its config and presets."""

from model.unet.model import (
    PRESETS,
    DecoderBlock,
    DoubleConv,
    UNet,
    UNetConfig,
    UpConv,
    build_unet,
    check_input_size,
    count_gflops,
    gflops_per_tile,
)

__all__ = [
    "PRESETS",
    "DecoderBlock",
    "DoubleConv",
    "UNet",
    "UNetConfig",
    "UpConv",
    "build_unet",
    "check_input_size",
    "count_gflops",
    "gflops_per_tile",
]
