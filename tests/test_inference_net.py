"""The convolution + ReLU fusion the Segmenter uses on CUDA: same function, one op per pair, and
an op torch.compile can trace. On the CPU the op runs the separate convolution and ReLU, so
these tests check the rewrite and the op's contract; tests/test_cuda.py checks cuDNN's kernel
(test_cudnn_fuses_convolution_and_relu)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.inference_net import ConvReLU, conv2d_relu, fold_for_inference
from model.segmenter import Segmenter
from model.unet import UNetConfig, build_unet


def _trained_like(config: UNetConfig) -> nn.Module:
    torch.manual_seed(5)
    model = build_unet(config).train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 0.2)  # biases that move ReLUs: a dropped bias would show
        model(torch.rand(2, 3, 48, 40) * 2)  # batch-norm statistics away from their defaults
    return model.eval()


@pytest.mark.parametrize("batch_norm", [False, True])
def test_fused_net_equals_the_model(batch_norm: bool) -> None:
    config = UNetConfig(width=6, depth=3, batch_norm=batch_norm)
    model = _trained_like(config)
    fused = fold_for_inference(model, fuse_relu=True)
    # Every 3×3 convolution (two per encoder level and per decoder block) takes its ReLU; the
    # transposed up-convolutions and the 1×1 head stay as they are.
    assert sum(isinstance(m, ConvReLU) for m in fused.modules()) == 2 * (2 * 3 + 1)
    assert not any(type(m) is nn.Conv2d and m.kernel_size == (3, 3) for m in fused.modules())
    assert sum(isinstance(m, nn.ReLU) for m in fused.modules()) == 3  # after each up-convolution
    x = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_fused_net_in_bfloat16_stays_close() -> None:
    model = _trained_like(UNetConfig(width=6, depth=2))
    fused = fold_for_inference(model, fuse_relu=True, dtype=torch.bfloat16)
    assert {m.weight.dtype for m in fused.modules() if isinstance(m, ConvReLU)} == {torch.bfloat16}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(x).float()
        want = model(x)
    assert ((got - want).norm() / want.norm()).item() < 2e-2


def test_op_traces_whole_under_torch_compile() -> None:
    # The op's fake kernel must give the shape and layout the real one returns, or compile
    # breaks the graph (fullgraph raises) or mis-reads the output.
    model = _trained_like(UNetConfig(width=4, depth=2))
    fused = fold_for_inference(model, fuse_relu=True)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.rand(2, 3, 32, 48).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), fused(x))


def test_op_output_is_channels_last_like_its_fake() -> None:
    x, w, b = torch.rand(1, 4, 9, 7), torch.rand(5, 4, 3, 3), torch.rand(5)
    real = conv2d_relu(x, w, b, 1)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = conv2d_relu(mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b), 1)
    assert fake.shape == real.shape == (1, 5, 9, 7)
    assert fake.stride() == real.stride()
    torch.testing.assert_close(real, torch.relu(nn.functional.conv2d(x, w, b, padding=1)))


def test_conv_relu_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="stride-1"):
        ConvReLU(nn.Conv2d(3, 4, 3, stride=2))
    with pytest.raises(ValueError, match="equal padding"):
        ConvReLU(nn.Conv2d(3, 4, 3, padding=(1, 0)))
    with pytest.raises(ValueError, match="zeros only"):
        ConvReLU(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))


def test_the_cpu_segmenter_keeps_separate_convolutions() -> None:
    # The fusion is for cuDNN; on the CPU it would only add a layer of indirection.
    seg = Segmenter(build_unet(UNetConfig(width=4, depth=2)), device="cpu")
    assert not any(isinstance(m, ConvReLU) for m in seg._eager.modules())
