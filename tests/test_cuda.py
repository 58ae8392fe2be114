"""The CUDA paths: autocast inference, torch.compile, mixed-precision training, checkpoints that
cross between GPU and CPU. Skipped where there is no GPU (CI); run them on a GPU machine with
``pytest tests/test_cuda.py``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from model import inference_net
from model.checkpoint import load_checkpoint, save_checkpoint
from model.inference_net import ConvReLU, conv2d_relu
from model.segmenter import Segmenter
from model.train import TrainConfig, train
from model.unet import PRESETS, build_unet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RNG = np.random.default_rng(4)
GPU_TRAINING = TrainConfig(
    preset="tiny",
    epochs=3,
    samples_per_epoch=16,
    crop=64,
    batch_size=4,
    lr=1e-2,
    augment="none",
    seed=1,
    device="cuda",
)


def _toy_pairs(n: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """Substrate with a 'monolayer' square and a 'bilayer' bar of distinct colours."""
    pairs = []
    for _ in range(n):
        mask = np.zeros((96, 96), np.uint8)
        r, c = RNG.integers(5, 40, size=2)
        mask[r : r + 30, c : c + 30] = 1
        mask[r + 30 : r + 40, c : c + 30] = 2
        img = np.full((96, 96, 3), (182, 175, 226), np.uint8)
        img[mask == 1] = (90, 170, 120)
        img[mask == 2] = (30, 60, 250)
        noise = RNG.normal(0, 4, img.shape)
        pairs.append((np.clip(img + noise, 0, 255).astype(np.uint8), mask))
    return pairs


def _agree(cpu: tuple[np.ndarray, np.ndarray], gpu: tuple[np.ndarray, np.ndarray], tol: float):
    """GPU probabilities within ``tol`` of the reference's but for a rare pixel (rounding in a
    deep net compounds at a few) and never off by 0.2, so the label is the same wherever the
    reference's top two classes are 0.4 apart (closer calls may flip under bf16 rounding)."""
    (p_ref, l_ref), (p_gpu, l_gpu) = cpu, gpu
    diff = np.abs(p_ref - p_gpu)
    assert diff.mean() < tol / 10
    assert np.quantile(diff, 0.999) < tol
    assert diff.max() < 0.2
    top2 = np.sort(p_ref, axis=-3)[..., -2:, :, :]
    clear = (top2[..., 1, :, :] - top2[..., 0, :, :]) > 0.4
    assert clear.mean() > 0.5  # the comparison is not vacuous
    assert (l_ref[clear] == l_gpu[clear]).all()
    assert (l_ref == l_gpu).mean() > 0.99  # a random net has many near-ties


@pytest.fixture(scope="module")
def small_lab() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet(PRESETS["small-lab"]).eval()


@pytest.mark.parametrize("amp", [False, True])
def test_gpu_inference_matches_the_cpu(small_lab, monkeypatch, amp: bool) -> None:
    # Tiles in batches, and a real-set-sized image through the blended sliding windows.
    tiles = RNG.integers(0, 256, (3, 512, 512, 3), dtype=np.uint8)
    image = RNG.integers(0, 256, (772, 688, 3), dtype=np.uint8)
    cpu = Segmenter(small_lab, device="cpu", batch_size=2)
    gpu = Segmenter(small_lab, device="cuda", batch_size=2, amp=amp)
    bf16 = torch.cuda.is_bf16_supported()
    assert gpu.amp_dtype == ((torch.bfloat16 if bf16 else torch.float16) if amp else None)
    # Without autocast the GPU must give the CPU's numbers to float rounding: TF32 off.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", amp)
    tol = 0.1 if amp else 1e-3
    _agree(cpu.predict(tiles), gpu.predict(tiles), tol)
    _agree(cpu.predict(image), gpu.predict(image), tol)


@pytest.mark.parametrize(("size", "pinned"), [(512, True), (300, True), (512, False)])
def test_pipelined_batches_come_back_in_place(small_lab, monkeypatch, size, pinned) -> None:
    # Five batches, more than predict keeps in flight, each tile different: every result must
    # land where its tile was, whole, as the CPU reads it. 300 px: padded tiles; unpinned:
    # results in ordinary memory; then with references given.
    from model import segmenter as segmenter_module

    if not pinned:
        monkeypatch.setattr(segmenter_module, "PINNED_MAX_BYTES", 0)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    tiles = RNG.integers(0, 256, (9, size, size, 3), dtype=np.uint8)
    cpu = Segmenter(small_lab, device="cpu", batch_size=9)
    gpu = Segmenter(small_lab, device="cuda", batch_size=2, amp=False)
    _agree(cpu.predict(tiles), gpu.predict(tiles), 1e-3)
    references = np.linspace(0.3, 0.7, 27, dtype=np.float32).reshape(9, 3)
    _agree(cpu.predict(tiles, references), gpu.predict(tiles, references), 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("planes", [3, 6, 64])  # the paper net's input, small-lab's, a middle layer
def test_cudnn_fuses_convolution_and_relu(monkeypatch, dtype: torch.dtype, planes: int) -> None:
    # A refusal would only warn and fall back, which the Segmenter tests cannot tell apart.
    monkeypatch.setattr(inference_net, "_cudnn_refused", set())
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x = torch.rand(2, planes, 40, 56, device="cuda", dtype=dtype)
    if dtype == torch.bfloat16:  # the Segmenter's layout; fp32 comes in ordinary layout
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, planes, 3, 3, device="cuda", dtype=dtype) / planes**0.5
    b = torch.randn(16, device="cuda", dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = conv2d_relu(x, w, b, 1)
    assert not inference_net._cudnn_refused
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == dtype
    want = torch.relu(torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4  # fp32: no TF32 either
    assert ((got.double() - want).norm() / want.norm()).item() < tol


def test_gpu_segmenter_runs_the_fused_net(small_lab) -> None:
    seg = Segmenter(small_lab, device="cuda")
    fused = [m for m in seg._eager.modules() if isinstance(m, ConvReLU)]
    assert len(fused) == 18  # every 3×3 convolution of a depth-4 net
    assert {m.weight.dtype for m in fused} == {seg.amp_dtype}


def test_compiled_segmenter_matches_eager(small_lab) -> None:
    tiles = RNG.integers(0, 256, (4, 512, 512, 3), dtype=np.uint8)
    eager = Segmenter(small_lab, device="cuda", batch_size=4)
    compiled = Segmenter(small_lab, device="cuda", batch_size=4, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent fall-back to eager would hide a broken compile
        got = compiled.predict(tiles)
    assert compiled._compiled is not None
    _agree(eager.predict(tiles), got, 0.1)


@pytest.mark.parametrize("bf16", [True, False])
def test_mixed_precision_training_learns(monkeypatch, bf16: bool) -> None:
    # Without bf16 (pre-Ampere GPUs) training autocasts to fp16 behind a gradient scaler.
    if not bf16:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cfg = GPU_TRAINING.model_copy(update={"epochs": 8, "samples_per_epoch": 32, "batch_size": 8})
    model, reports, _ = train(_toy_pairs(), cfg)
    assert next(model.parameters()).device.type == "cuda"
    assert all(np.isfinite(r.train_loss) for r in reports)
    assert reports[-1].train_loss < 0.6 * reports[0].train_loss


def test_checkpoint_trained_on_the_gpu_loads_on_the_cpu(tmp_path, monkeypatch) -> None:
    model, _, _ = train(_toy_pairs(), GPU_TRAINING)
    path = tmp_path / "gpu.pt"
    save_checkpoint(path, model, PRESETS["tiny"])
    on_cpu, _ = load_checkpoint(path)
    assert next(on_cpu.parameters()).device.type == "cpu"
    for name, trained in model.state_dict().items():
        assert torch.equal(on_cpu.state_dict()[name], trained.cpu()), name
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    image = _toy_pairs(1)[0][0]
    p_cpu, l_cpu = Segmenter.from_checkpoint(path, device="cpu").predict(image)
    p_gpu, l_gpu = Segmenter.from_checkpoint(path, device="cuda", amp=False).predict(image)
    np.testing.assert_allclose(p_gpu, p_cpu, atol=1e-4)
    assert (l_gpu == l_cpu).mean() > 0.999
