"""The U-Net of Saito et al.: a plain encoder-decoder with concatenated skips, no pretrained parts.

Two choices the paper leaves open, made as the widely used Keras U-Net (zhixuhao/unet) makes them:
- the "2×2 upsampling convolution" is nearest-neighbour ×2 upsampling, then a 2×2 convolution
  padded by one pixel on the bottom and right only (Keras ``padding="same"``), so the size doubles
  exactly and the weights have the same shape as a 2×2 transposed convolution's; a ReLU follows it;
- dropout is element-wise (``nn.Dropout``), after the first ``dropout_layers`` of those
  up-convolutions, counted from the bottleneck.

The paper lists five downsampled shapes (256² × 64 … 16² × 1024) but also "4 repeated layers";
we follow the four poolings, which give the 64 → 1024 progression of the original U-Net.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .reference import (  # noqa: F401  (optical_contrast: part of this module's API)
    CONTRAST_GAIN,
    ContrastReference,
    contrast_against,
    is_mirrored,
    optical_contrast,
    reference_colours,
)


class UNetConfig(BaseModel):
    """Everything needed to rebuild the network; saved beside the weights in a checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_channels: int = Field(3, ge=1)
    classes: int = Field(3, ge=2)
    width: int = Field(64, ge=1, description="feature maps at full resolution; doubled per level")
    depth: int = Field(4, ge=1, description="number of 2×2 poolings")
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    dropout_layers: int = Field(
        3, ge=0, description="up-convolutions followed by dropout (all of them if depth is less)"
    )
    batch_norm: bool = False
    input_contrast: bool = Field(
        False,
        description="feed the optical contrast x / ref(x) - 1 of each image and channel "
        "(×CONTRAST_GAIN) instead of the raw 0..1 pixels",
    )
    contrast_reference: ContrastReference = Field(
        "mean",
        description="ref(x) for input_contrast: the image's mean or median per channel; "
        "`bright`, the median of the pixels at or above the median in red; or `hue`, `bright` "
        "unless a brighter surface of the least green hue shows the substrate under a film "
        "(model/unet/reference.py)",
    )
    input_raw: bool = Field(
        False,
        description="also feed the raw pixels (centred) beside the contrast (needs "
        "input_contrast): one lab's own camera and oxide make absolute colour worth learning",
    )
    oxide_colour: list[float] | None = Field(
        None,
        description="with input_raw: the raw colour of a typical substrate in training (its "
        "contrast reference, median over the oxide images); an image read mirrored (a "
        "transparent substrate) shows the net its raw planes as that oxide would look under its "
        "mirrored contrast, not its own dark colours (TrainConfig.substrate)",
    )

    other_outputs: int = Field(
        1,
        ge=1,
        description="outputs the net learns for `other`, one per raw mask value a dataset maps "
        "to it (substrate, thick flakes, ...); the Segmenter sums their probabilities",
    )

    @model_validator(mode="after")
    def _raw_needs_contrast(self) -> UNetConfig:
        if self.input_raw and not self.input_contrast:
            raise ValueError("input_raw adds raw pixels beside the contrast: set input_contrast")
        if self.oxide_colour is not None and (
            not self.input_raw or len(self.oxide_colour) != self.in_channels
        ):
            raise ValueError(
                f"oxide_colour {self.oxide_colour} is the raw planes' colour: it needs input_raw "
                f"and one value per input channel ({self.in_channels})"
            )
        return self

    @property
    def input_planes(self) -> int:
        """Planes the first convolution sees: contrast and raw pixels side by side, or one."""
        return self.in_channels * (2 if self.input_contrast and self.input_raw else 1)

    @property
    def reads_rgb_contrast(self) -> bool:
        """Whether the net takes the optical contrast of RGB images: what reading a
        transparent substrate mirrored needs (`substrate_reference`)."""
        return self.input_contrast and self.in_channels == 3

    @property
    def outputs(self) -> int:
        """Channels of the last convolution: the classes, with `other` split in other_outputs.
        Output 0 is the first part of `other`, 1.. the other classes, then the rest of `other`."""
        return self.classes + self.other_outputs - 1

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2**self.depth

    @property
    def channels(self) -> list[int]:
        return [self.width * 2**level for level in range(self.depth + 1)]


PRESETS: dict[str, UNetConfig] = {
    "paper": UNetConfig(width=64, depth=4),
    # For CPUs: ~7 GFLOP/tile, 10-17 tiles/s on a 2-core CI machine (scripts/bench_inference.py).
    # No batch norm: trained on batches of 4 mostly-substrate crops, its first layers' batch
    # variance is tiny and swings with each batch's flakes and look, so the net learned to lean
    # on per-batch statistics that its running averages (used at inference) do not reproduce.
    # A width-8 net with batch norm reached 0.64 monolayer pixel accuracy on its own training
    # tiles in train mode and 0.01 in eval mode; without it, 0.95 in both.
    # Its input is each tile's optical contrast, which is what tells the layers apart: the
    # same for any lamp, white balance or exposure, and ~1 for a monolayer instead of a 0.03
    # difference on a 0.65 level that a net without normalisation takes epochs to amplify.
    "small": UNetConfig(
        width=8, depth=4, batch_norm=False, input_contrast=True, contrast_reference="bright"
    ),
    # The small net for a lab's own labelled images: their camera and oxide are fixed, so raw
    # colour rides beside contrast and rescues fields a flake mostly covers (the median
    # reference is then the flake). Not for the shipped model, whose colours are randomised.
    "small-lab": UNetConfig(
        width=8,
        depth=4,
        batch_norm=False,
        input_contrast=True,
        contrast_reference="median",
        input_raw=True,
    ),
    "tiny": UNetConfig(width=4, depth=2, batch_norm=False),
}
# small-lab four times as wide, for a lab with a GPU (16× the arithmetic, 110 GFLOP a tile): in
# 3-fold CV on the real set +0.02-0.03 mean per-class accuracy on seeds 0 and 1 (README,
# "Cross-validated results"); on a 2-core CPU a training run would take hours.
PRESETS["lab-wide"] = PRESETS["small-lab"].model_copy(update={"width": 32})


def _conv_act(c_in: int, c_out: int, kernel: int, batch_norm: bool) -> list[nn.Module]:
    # Bias is redundant under batch norm, which has its own shift.
    # 3×3 pads by one to keep the size; the 2×2 up-conv is padded by UpConv (asymmetrically).
    conv = nn.Conv2d(c_in, c_out, kernel, padding=1 if kernel == 3 else 0, bias=not batch_norm)
    layers: list[nn.Module] = [conv]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU(inplace=True))
    return layers


class DoubleConv(nn.Sequential):
    """Two 3×3 convolutions with ReLU; padding 1 keeps the size."""

    def __init__(self, c_in: int, c_out: int, batch_norm: bool) -> None:
        super().__init__(
            *_conv_act(c_in, c_out, 3, batch_norm), *_conv_act(c_out, c_out, 3, batch_norm)
        )


class UpConv(nn.Sequential):
    """Nearest ×2 upsampling, then a 2×2 convolution that halves the channels (see module doc)."""

    def __init__(self, c_in: int, c_out: int, batch_norm: bool) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.ZeroPad2d((0, 1, 0, 1)),
            *_conv_act(c_in, c_out, 2, batch_norm),
        )


class DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, batch_norm: bool, dropout: float | None) -> None:
        super().__init__()
        self.up = UpConv(c_in, c_out, batch_norm)
        self.dropout = nn.Dropout(dropout) if dropout is not None else nn.Identity()
        self.conv = DoubleConv(2 * c_out, c_out, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.dropout(self.up(x))], dim=1))


class UNet(nn.Module):
    """N×in_channels×H×W floats in 0..1 -> N×outputs×H×W logits (outputs = classes unless
    `other` is split; see UNetConfig.outputs).

    The output is logits, not the paper's softmax: the loss (cross-entropy on logits) and the
    Segmenter apply softmax themselves, which is numerically safer and lets autocast stay off it.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch, bn = config.channels, config.batch_norm
        self.encoder = nn.ModuleList([DoubleConv(config.input_planes, ch[0], bn)])
        self.encoder.extend(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(ch[i - 1], ch[i], bn))
            for i in range(1, config.depth + 1)
        )
        # decoder[0] sits on the bottleneck; the paper's "first" up-convolutions are those.
        self.decoder = nn.ModuleList(
            DecoderBlock(
                ch[i + 1], ch[i], bn, config.dropout if k < config.dropout_layers else None
            )
            for k, i in enumerate(reversed(range(config.depth)))
        )
        self.head = nn.Conv2d(ch[0], config.outputs, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        # Ronneberger et al.: Gaussian weights with std sqrt(2 / fan-in), so each ReLU layer
        # keeps its signal. Torch's default shrinks it ~3x a layer; without batch norm a narrow
        # net then starts with a constant output and sat at ln 3 loss for 7+ epochs.
        for m in self.modules():
            # A net built on the meta device (checkpoint shape checks) has no values to draw,
            # and torch's meta path for normal_ takes over a second on first use.
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d) and not m.weight.is_meta:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(
        self,
        x: torch.Tensor,
        reference: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``reference``: the colours to take the contrast against (``reference_colours`` of
        the whole image this crop comes from), instead of the crop's own; ``scale``: the
        contrast's per-channel factor with it (``substrate_reference``), if any."""
        check_input_size(self.config, x.shape[-2], x.shape[-1])
        if self.config.input_contrast:
            if reference is None:
                reference = reference_colours(x, self.config.contrast_reference)
            contrast = contrast_against(x, reference, scale)
            # The median reference fails where a flake fills most of the field; the raw
            # colour then still tells substrate from monolayer under one lab's lighting.
            if self.config.input_raw:
                raw = self._raw_as_on_oxide(x, contrast, scale)
                x = torch.cat([contrast, (raw - 0.5) * 2], 1)
            else:
                x = contrast
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for block in self.decoder:
            x = block(x, skips.pop())
        return self.head(x)

    def _raw_as_on_oxide(
        self, x: torch.Tensor, contrast: torch.Tensor, scale: torch.Tensor | None
    ) -> torch.Tensor:
        """The raw planes: ``x``, but for images read mirrored (a negative red factor in
        ``scale``), the oxide colour under their mirrored contrast, where the net knows one."""
        oxide = self.config.oxide_colour
        if scale is None or oxide is None:
            return x
        colour = torch.tensor(oxide, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        rendered = (colour * (1 + contrast / CONTRAST_GAIN)).clamp(0, 1)
        return torch.where(is_mirrored(scale).view(-1, 1, 1, 1), rendered, x)


def check_input_size(config: UNetConfig, height: int, width: int) -> None:
    m = config.multiple
    if height % m or width % m:
        raise ValueError(
            f"U-Net input {height}×{width} is not divisible by 2**depth = {m} in both height and "
            f"width; pad or tile it (the Segmenter does this for any size)"
        )


def build_unet(config: UNetConfig | str) -> UNet:
    """A freshly initialised U-Net from a config or a preset name."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown U-Net preset {config!r}; choose from {sorted(PRESETS)}")
        config = PRESETS[config]
    return UNet(config)


def gflops_per_tile(config: UNetConfig | str, size: int = 512) -> float:
    """GFLOP (2 × multiply-adds, convolutions only) for one size×size tile in inference."""
    # Counting on the meta device costs no memory and no arithmetic, even for the paper net.
    with torch.device("meta"):
        model = build_unet(config).eval()
    return count_gflops(model, size)


def count_gflops(model: UNet | nn.Module, size: int = 512) -> float:
    """GFLOP of one forward pass of ``model`` (any net with a UNetConfig, e.g. an inference
    copy) on one size×size tile, on the device its weights are on (meta: free)."""
    device = next(model.parameters()).device
    x = torch.empty(1, model.config.in_channels, size, size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


__all__ = [
    "PRESETS",
    "UNet",
    "UNetConfig",
    "build_unet",
    "check_input_size",
    "count_gflops",
    "gflops_per_tile",
]
