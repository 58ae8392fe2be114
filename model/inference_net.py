"""The network as the Segmenter runs it: the same function as the trained U-Net, rearranged to do
less work on the way.

- Batch norm folds into the convolution before it.
- Each up-convolution (nearest ×2 upsampling, bottom/right pad, 2×2 conv) becomes the stride-2
  transposed convolution it equals: the upsampled map is never built.
- On CUDA each 3×3 convolution and the ReLU after it run as one cuDNN kernel
  (``torch.cudnn_convolution_relu``), which adds the bias and clips in its epilogue instead of
  writing the feature map out and reading it back for a separate bias-and-ReLU pass. On an H100
  that pass was a third of the paper net's GPU time even compiled (the profile in README.md).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from model.unet import UpConv

# The (dtype, input channels, kernel) of convolutions cuDNN refused to fuse (an old cuDNN or
# GPU): those run as a separate convolution and ReLU from then on, after one warning.
_cudnn_refused: set[tuple[torch.dtype, int, int]] = set()


@torch.library.custom_op("flakescan::conv2d_relu", mutates_args=())
def conv2d_relu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int
) -> torch.Tensor:
    """relu(conv2d(x, weight, bias, padding)), stride 1, in channels-last memory.

    A custom op so that torch.compile keeps it as one call (it has no meta kernel of its own).
    """
    key = (x.dtype, int(weight.shape[1]), int(weight.shape[-1]))
    # cudnn_convolution_relu does not look at this switch itself; a user who turned cuDNN off
    # gets no cuDNN here either.
    if x.is_cuda and torch.backends.cudnn.enabled and key not in _cudnn_refused:
        try:
            y = torch.cudnn_convolution_relu(x, weight, bias, (1, 1), (padding, padding), (1, 1), 1)
            return y.contiguous(memory_format=torch.channels_last)
        except torch.OutOfMemoryError:
            raise  # the batch is too large; running apart would need more memory, not less
        except RuntimeError as exc:
            _cudnn_refused.add(key)
            warnings.warn(
                f"cuDNN's fused convolution + ReLU is unavailable for {key} ({exc}); running "
                "those apart",
                stacklevel=2,
            )
    y = F.relu(F.conv2d(x, weight, bias, padding=padding))
    return y.contiguous(memory_format=torch.channels_last)


@conv2d_relu.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    n, _, h, w = x.shape
    k_h, k_w = weight.shape[-2:]
    shape = (n, weight.shape[0], h + 2 * padding - k_h + 1, w + 2 * padding - k_w + 1)
    return x.new_empty(shape).contiguous(memory_format=torch.channels_last)


class ConvReLU(nn.Module):
    """A stride-1 Conv2d and the ReLU after it as one ``conv2d_relu`` call.

    ``dtype``: the precision it computes in (the Segmenter's autocast dtype). Autocast does not
    reach into a custom op, so the input is cast here and the weights once, up front; its
    output is in that dtype, so a net with bf16 ConvReLUs runs under autocast, which casts for
    the layers between them. Output is channels-last, whatever the input's layout.
    """

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ValueError(f"ConvReLU takes stride-1 ungrouped convolutions, got {conv}")
        if isinstance(conv.padding, str) or conv.padding[0] != conv.padding[1]:
            raise ValueError(f"ConvReLU takes equal padding on both axes, got {conv.padding}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"ConvReLU pads with zeros only, got {conv.padding_mode!r}")
        dtype = dtype or conv.weight.dtype
        weight = conv.weight.detach().to(dtype, memory_format=torch.channels_last)
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias.detach().to(weight.device, dtype), requires_grad=False)
        self.padding = int(conv.padding[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_relu(x.to(self.weight.dtype), self.weight, self.bias, self.padding)


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every Conv2d→BatchNorm2d pair in a Sequential folded into one conv.

    On the CPU batch norm is a separate pass over each feature map and costs as much as the
    narrow presets' convolutions; folded, the output is the same to float rounding.
    """
    model = copy.deepcopy(model).eval()
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            for k in range(len(seq) - 1):
                conv, bn = seq[k], seq[k + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    seq[k] = fuse_conv_bn_eval(conv, bn)
                    seq[k + 1] = nn.Identity()
    return model


def fold_for_inference(
    model: nn.Module, *, fuse_relu: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """An eval-mode copy with batch norm folded (``fold_batch_norm``) and every up-convolution
    (nearest ×2 upsampling, bottom/right pad, 2×2 conv) rewritten as the one stride-2 3×3
    transposed convolution it equals, to float rounding.

    The upsampled map is never built: on an H100 writing and re-reading it took a fifth of the
    paper net's time, and the transposed form needs 9/16 of the up-convolutions' arithmetic.

    ``fuse_relu``: also run each convolution and its ReLU as one ``ConvReLU`` (for CUDA, where
    cuDNN fuses them), computing in ``dtype`` (None: the weights' own).
    """
    model = fold_batch_norm(model)
    for up in model.modules():
        if isinstance(up, UpConv) and isinstance(up[2], nn.Conv2d):
            up[2] = _as_transposed(up[2])
            up[0] = nn.Identity()  # the upsampling and the pad, now inside the transposed conv
            up[1] = nn.Identity()
    if fuse_relu:
        for seq in model.modules():
            if isinstance(seq, nn.Sequential):
                layers = list(seq)
                for k, conv in enumerate(layers):
                    # The ReLU may sit after a folded batch norm's Identity.
                    rest = (j for j in range(k + 1, len(layers)))
                    j = next((j for j in rest if not isinstance(layers[j], nn.Identity)), None)
                    if type(conv) is nn.Conv2d and j is not None and isinstance(seq[j], nn.ReLU):
                        seq[k] = ConvReLU(conv, dtype)
                        seq[j] = nn.Identity()
    return model


def _as_transposed(conv: nn.Conv2d) -> nn.ConvTranspose2d:
    """The stride-2 transposed convolution equal to ``conv`` (2×2) on a nearest-×2-upsampled
    input padded by one at the bottom and right.

    Output row 2a sees source row a through both kernel rows; row 2a+1 sees row a through
    kernel row 0 and row a+1 through row 1; columns alike. So transposed tap k (output
    o = 2a + k - 1) sums the 2×2 taps in TAPS[k], per axis.
    """
    taps = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]], dtype=conv.weight.dtype)
    taps = taps.to(conv.weight.device)
    out = nn.ConvTranspose2d(
        conv.in_channels,
        conv.out_channels,
        3,
        stride=2,
        padding=1,
        output_padding=1,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        out.weight.copy_(torch.einsum("yd,xe,oide->ioyx", taps, taps, conv.weight))
        if conv.bias is not None:
            out.bias.copy_(conv.bias)
    return out


__all__ = ["ConvReLU", "conv2d_relu", "fold_batch_norm", "fold_for_inference"]
