"""Segmenter: probabilities and labels for tiles and for images of any size, seam-free."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from model.checkpoint import save_checkpoint
from model.inference_net import fold_batch_norm, fold_for_inference
from model.segmenter import Segmenter
from model.unet import UNet, UNetConfig, build_unet

RNG = np.random.default_rng(0)


class Pointwise(nn.Module):
    """A stand-in for the U-Net whose logits depend on each pixel's colour alone, so any correct
    tiling and blending must reproduce the whole-image result exactly: a seam or a border
    artefact shows up as a difference."""

    def __init__(self, depth: int = 4, constant: bool = False) -> None:
        super().__init__()
        self.config = UNetConfig(width=4, depth=depth)
        self.conv = nn.Conv2d(3, 3, 1)
        torch.manual_seed(0)
        nn.init.normal_(self.conv.weight, std=0.0 if constant else 3.0)
        nn.init.normal_(self.conv.bias, std=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def reference(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return torch.softmax(self(x), dim=1).numpy()


def _images(n: int, h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _tiny_bn() -> UNet:
    torch.manual_seed(2)
    model = build_unet(UNetConfig(width=4, depth=2, batch_norm=True)).train()
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32) * 2)  # running statistics away from their defaults
    return model.eval()


@pytest.mark.parametrize(
    ("h", "w", "window", "overlap"),
    [
        (772, 688, 512, 64),  # the real data set's size: 2×2 windows
        (300, 200, 512, 64),  # smaller than the window: reflect-padded
        (1100, 513, 512, 64),  # an interior row of windows, a 1-pixel sliver of overlap
        (300, 200, 64, 16),  # many windows with ramps on all four sides
        (1, 1, 64, 16),
        (1, 700, 64, 16),
    ],
)
def test_sliding_windows_leave_no_seams(h: int, w: int, window: int, overlap: int) -> None:
    stub = Pointwise()
    images = _images(2, h, w)
    probs, labels = Segmenter(stub, window=window, overlap=overlap, batch_size=3).predict(images)
    assert probs.shape == (2, 3, h, w) and probs.dtype == np.float32
    assert labels.shape == (2, h, w) and labels.dtype == np.uint8
    np.testing.assert_allclose(probs, stub.reference(images), atol=1e-6)
    np.testing.assert_array_equal(labels, probs.argmax(axis=1))


def test_constant_logits_give_constant_probabilities() -> None:
    stub = Pointwise(constant=True)
    probs, labels = Segmenter(stub, window=64, overlap=16).predict(_images(1, 150, 130))
    expected = torch.softmax(stub.conv.bias.detach(), 0).numpy()
    np.testing.assert_allclose(
        probs[0], np.broadcast_to(expected[:, None, None], probs[0].shape), atol=1e-6
    )
    assert (labels == expected.argmax()).all()


def test_tiles_match_the_model_and_probabilities_sum_to_one() -> None:
    model = _tiny_bn()
    tiles = _images(3, 512, 512)
    probs, labels = Segmenter(model, batch_size=2).predict(tiles)
    assert probs.shape == (3, 3, 512, 512)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(labels, probs.argmax(axis=1))
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)  # batch norm folded: rounding only


def test_real_image_blends_the_model_windows() -> None:
    """772×688 -> windows at rows 0, 260 and columns 0, 176. Where one window alone covers a pixel
    the result is that window's output; where windows overlap it lies between theirs."""
    model = _tiny_bn()
    image = _images(1, 772, 688)
    probs, labels = Segmenter(model, window=512, overlap=64).predict(image[0])
    assert probs.shape == (3, 772, 688) and labels.shape == (772, 688)

    windows = {}
    for y in (0, 260):
        for x in (0, 176):
            crop = torch.from_numpy(image[:, y : y + 512, x : x + 512]).permute(0, 3, 1, 2)
            with torch.no_grad():
                windows[y, x] = torch.softmax(model(crop.float() / 255), 1)[0].numpy()
    np.testing.assert_allclose(probs[:, :260, :176], windows[0, 0][:, :260, :176], atol=1e-5)
    np.testing.assert_allclose(probs[:, 512:, 512:], windows[260, 176][:, 252:, 336:], atol=1e-5)
    stacked = np.full((4, 3, 772, 688), np.nan, np.float32)
    for k, ((y, x), p) in enumerate(windows.items()):
        stacked[k, :, y : y + 512, x : x + 512] = p
    assert (probs >= np.nanmin(stacked, axis=0) - 1e-5).all()
    assert (probs <= np.nanmax(stacked, axis=0) + 1e-5).all()


@pytest.mark.parametrize("shape", [(3, 512, 512), (2, 772, 688)])
def test_batch_size_does_not_change_results(shape: tuple[int, int, int]) -> None:
    model = _tiny_bn()
    images = _images(*shape)
    p1, l1 = Segmenter(model, batch_size=1).predict(images)
    p4, l4 = Segmenter(model, batch_size=4).predict(images)
    np.testing.assert_allclose(p1, p4, atol=1e-6)
    assert (l1 != l4).mean() < 1e-5  # only exact near-ties could flip


def test_channels_first_memory_gives_the_same_result() -> None:
    model = _tiny_bn()
    images = _images(2, 128, 96)
    a, _ = Segmenter(model, window=64, overlap=16).predict(images)
    b, _ = Segmenter(model, window=64, overlap=16, channels_last=False).predict(images)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_input_validation() -> None:
    seg = Segmenter(Pointwise(depth=2), window=64, overlap=16)
    with pytest.raises(TypeError, match="uint8"):
        seg.predict(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(TypeError, match="numpy"):
        seg.predict([[0, 0, 0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"N×H×W×3 or H×W×3 \(channels last\), got shape"):
        seg.predict(np.zeros((1, 64, 64, 4), np.uint8))
    with pytest.raises(ValueError, match="channels last"):
        seg.predict(np.zeros((3, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="zero size"):
        seg.predict(np.zeros((1, 0, 64, 3), np.uint8))
    probs, labels = seg.predict(np.zeros((0, 10, 20, 3), np.uint8))
    assert probs.shape == (0, 3, 10, 20) and labels.shape == (0, 10, 20)


def test_constructor_validation() -> None:
    stub = Pointwise(depth=4)
    with pytest.raises(ValueError, match="multiple of 2\\*\\*depth = 16"):
        Segmenter(stub, window=100)
    with pytest.raises(ValueError, match="overlap"):
        Segmenter(stub, window=64, overlap=64)
    with pytest.raises(ValueError, match="batch_size"):
        Segmenter(stub, batch_size=0)
    with pytest.raises(ValueError, match="CUDA"):
        Segmenter(stub, amp=True)
    assert Segmenter(stub).amp_dtype is None


def test_from_checkpoint(tmp_path) -> None:
    model = _tiny_bn()
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, model, model.config, training={"seed": 1})
    images = _images(2, 64, 80)
    seg = Segmenter.from_checkpoint(path, window=64, overlap=16, batch_size=2)
    assert seg.checkpoint is not None and seg.checkpoint.training == {"seed": 1}
    assert seg.class_names == ("other", "monolayer", "bilayer")
    expected, _ = Segmenter(model, window=64, overlap=16).predict(images)
    np.testing.assert_array_equal(seg.predict(images)[0], expected)


def test_compile_failure_falls_back_to_eager(monkeypatch) -> None:
    def broken(_model: nn.Module) -> object:
        def call(_x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no compiler here")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    stub = Pointwise(depth=2)
    seg = Segmenter(stub, window=64, overlap=16, compile=True)
    images = _images(1, 64, 64)
    with pytest.warns(UserWarning, match="running eagerly"):
        probs, _ = seg.predict(images)
    np.testing.assert_allclose(probs, stub.reference(images), atol=1e-6)


def test_fold_batch_norm_leaves_the_model_alone() -> None:
    model = _tiny_bn()
    folded = fold_batch_norm(model)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_fold_for_inference_rewrites_up_convolutions_exactly(batch_norm: bool) -> None:
    torch.manual_seed(3)
    model = build_unet(UNetConfig(width=6, depth=3, batch_norm=batch_norm)).train()
    with torch.no_grad():
        model(torch.rand(2, 3, 48, 40) * 2)  # batch-norm statistics away from their defaults
    model.eval()
    folded = fold_for_inference(model)
    assert sum(isinstance(m, nn.Upsample) for m in model.modules()) == 3
    assert not any(isinstance(m, nn.Upsample | nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in folded.modules()) == 3
    # Odd sizes at every level but the input's (48×40 -> 6×5 at the bottleneck): the
    # bottom/right zero pad of the original up-convolution must land on the same pixels.
    x = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_split_other_outputs_are_summed_into_other() -> None:
    torch.manual_seed(0)
    model = build_unet(UNetConfig(width=4, depth=2, other_outputs=3)).eval()
    assert model.head.out_channels == 5 and model.config.classes == 3
    tiles = _images(2, 512, 512)  # whole windows: the net sees exactly these pixels
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        raw = torch.softmax(model(x) * 20, 1).numpy()  # sharpened: well-separated classes
    model.head.weight.data *= 20
    model.head.bias.data *= 20

    def merged(p: np.ndarray) -> np.ndarray:
        return np.stack([p[:, 0] + p[:, 3] + p[:, 4], p[:, 1], p[:, 2]], 1)

    probs, labels = Segmenter(model).predict(tiles)
    np.testing.assert_allclose(probs, merged(raw), atol=1e-4)
    assert (labels == merged(raw).argmax(1)).mean() > 0.999
    assert (labels == 0).any() and (raw.argmax(1) >= 3).any()  # the sum decides some pixels
    # The plain posterior divides one weight per output out before the parts are summed.
    w = np.array([0.5, 1.0, 4.0, 2.0, 3.0])
    plain, _ = Segmenter(model, class_weights=w).predict(tiles)
    q = raw / w[None, :, None, None]
    np.testing.assert_allclose(plain, merged(q / q.sum(1, keepdims=True)), atol=1e-4)
    # 0: an output absent from the training masks, never weighted: nothing to divide out.
    absent, _ = Segmenter(model, class_weights=[0.5, 1.0, 4.0, 0.0, 3.0]).predict(tiles)
    q = raw / np.array([0.5, 1.0, 4.0, 1.0, 3.0])[None, :, None, None]
    np.testing.assert_allclose(absent, merged(q / q.sum(1, keepdims=True)), atol=1e-4)
    for bad in ([1.0, 1.0, 1.0], [0.0] * 5, [1.0, -1.0, 1.0, 1.0, 1.0]):
        with pytest.raises(ValueError, match="5 non-negative numbers"):
            Segmenter(model, class_weights=bad)


def test_model_package_imports_no_hardware_code() -> None:
    code = (
        "import sys, model.unet, model.checkpoint, model.segmenter\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('drivers', 'scanner'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plain_posterior_divides_out_the_training_class_weights(tmp_path) -> None:
    """Bayes: a net trained with weights w outputs p·w (normalised); dividing w back out gives
    p. Rare classes lose the pixels they only won through their weight, and only those."""
    model = _tiny_bn()
    weights = [0.2, 1.0, 2.0]
    path = tmp_path / "weighted.pt"
    save_checkpoint(path, model, model.config, training={"class_weights": weights})
    images = _images(2, 64, 64)
    trained, trained_labels = Segmenter(model, window=64, overlap=16).predict(images)
    plain, plain_labels = Segmenter.from_checkpoint(
        path, window=64, overlap=16, plain_posterior=True
    ).predict(images)
    expected = trained / np.array(weights, np.float32)[None, :, None, None]
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(plain, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(plain_labels, expected.argmax(axis=1))
    # `other` (weight 0.2) can only gain pixels, and here it does
    assert (plain_labels == 0).sum() > (trained_labels == 0).sum()
    assert np.all(plain_labels[trained_labels == 0] == 0)
    # a checkpoint trained without class weights is left as it is
    save_checkpoint(tmp_path / "plain.pt", model, model.config, training={})
    same = Segmenter.from_checkpoint(
        tmp_path / "plain.pt", window=64, overlap=16, plain_posterior=True
    )
    np.testing.assert_array_equal(same.predict(images)[0], trained)
    with pytest.raises(ValueError, match="class_weights must be 3 non-negative"):
        Segmenter(model, class_weights=[1.0, -1.0, 1.0])


def test_windows_take_their_contrast_against_the_whole_image() -> None:
    """A window that a flake fills has no oxide of its own to measure against: each window of
    a larger image is read against the whole image's reference, and a single tile (the
    scanner's case) against its own, as in training."""
    from model.unet.model import reference_colours

    torch.manual_seed(0)
    config = UNetConfig(width=4, depth=2, input_contrast=True, contrast_reference="bright")
    net = build_unet(config).eval()
    rng = np.random.default_rng(0)
    oxide, monolayer = np.array([150, 140, 200]), np.array([130, 133, 185])
    image = np.empty((32, 64, 3), dtype=np.uint8)
    image[:, :32] = monolayer  # the left window: all monolayer
    image[:, 32:] = oxide
    image[:8, 40:56] = monolayer
    image = np.clip(image + rng.normal(0, 1.5, image.shape), 0, 255).astype(np.uint8)
    seg = Segmenter(net, window=32, overlap=0, batch_size=1)
    probs, _ = seg.predict(image)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    left = x[..., :32]
    with torch.inference_mode():
        against_image = torch.softmax(net(left, reference_colours(x, "bright")), 1)[0]
        against_itself = torch.softmax(net(left), 1)[0]
    np.testing.assert_allclose(probs[:, :, :32], against_image.numpy(), atol=1e-5)
    assert np.abs(probs[:, :, :32] - against_itself.numpy()).max() > 1e-3
    tile_probs, _ = seg.predict(np.ascontiguousarray(image[:, :32]))
    np.testing.assert_allclose(tile_probs, against_itself.numpy(), atol=1e-5)


def test_image_reference_is_on_for_bright_and_hue_only_unless_asked() -> None:
    torch.manual_seed(0)
    image = np.random.default_rng(1).integers(60, 200, (32, 64, 3), dtype=np.uint8)
    image[:, :32] //= 2  # the left window much darker than the image
    for reference, default in (("bright", True), ("hue", True), ("median", False), ("mean", False)):
        config = UNetConfig(width=4, depth=2, input_contrast=True, contrast_reference=reference)
        net = build_unet(config).eval()
        assert Segmenter(net, window=32, overlap=0).image_reference is default
        own = Segmenter(net, window=32, overlap=0, image_reference=False).predict(image)[0]
        whole = Segmenter(net, window=32, overlap=0, image_reference=True).predict(image)[0]
        assert np.abs(own - whole).max() > 1e-3  # the choice matters on this image
        chosen = Segmenter(net, window=32, overlap=0).predict(image)[0]
        np.testing.assert_allclose(chosen, whole if default else own, atol=1e-6)
    plain = build_unet(UNetConfig(width=4, depth=2)).eval()
    assert Segmenter(plain, window=32, overlap=0, image_reference=True).image_reference is False


def test_bright_nets_are_read_with_hue_which_finds_the_substrate_under_a_film() -> None:
    """A window-sized tile a monolayer film covers but for a strip of oxide: a `bright` net is
    read against `hue`'s reference (the oxide), not its own (the film); `reference="bright"`
    reads it exactly as trained, and on a tile that is mostly oxide the two agree."""
    from model.unet.model import reference_colours

    torch.manual_seed(0)
    net = build_unet(
        UNetConfig(width=4, depth=2, input_contrast=True, contrast_reference="bright")
    ).eval()
    oxide, film = np.array([196, 192, 246]), np.array([166, 180, 210])  # a real CVD image's
    rng = np.random.default_rng(0)
    tile = np.broadcast_to(film, (32, 32, 3)).copy()
    tile[:2] = oxide  # 6 % oxide
    tile = np.clip(tile + rng.normal(0, 1, tile.shape), 0, 255).astype(np.uint8)
    read = Segmenter(net, window=32, overlap=0)
    assert read.reference == "hue" and read.image_reference
    x = torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        as_hue = torch.softmax(net(x, reference_colours(x, "hue")), 1)[0].numpy()
        as_trained = torch.softmax(net(x), 1)[0].numpy()
    assert np.abs(as_hue - as_trained).max() > 1e-3
    np.testing.assert_allclose(read.predict(tile)[0], as_hue, atol=1e-5)
    np.testing.assert_allclose(
        Segmenter(net, window=32, overlap=0, reference="bright").predict(tile)[0],
        as_trained,
        atol=1e-5,
    )
    mostly_oxide = tile.copy()
    mostly_oxide[4:] = np.clip(oxide + rng.normal(0, 1, (28, 32, 3)), 0, 255)
    np.testing.assert_array_equal(
        read.predict(mostly_oxide)[0],
        Segmenter(net, window=32, overlap=0, reference="bright").predict(mostly_oxide)[0],
    )
    median_net = build_unet(
        UNetConfig(width=4, depth=2, input_contrast=True, contrast_reference="median")
    )
    assert Segmenter(median_net).reference == "median"  # other nets keep their own rule
    assert not Segmenter(median_net).reference_overridden and Segmenter(net).reference_overridden
    with pytest.raises(ValueError, match="'brightest' is not a contrast reference; choose from"):
        Segmenter(net, reference="brightest")  # type: ignore[arg-type]


def test_given_references_replace_each_images_own() -> None:
    """predict(references=...) reads each image against the colours given: its own ones give
    its own result bit for bit, tiles and larger images alike; the oxide's colour turns a tile
    a film fills from contrast ~0 into the film's contrast (what the scanner passes)."""
    from model.unet.model import reference_colours

    torch.manual_seed(0)
    net = build_unet(
        UNetConfig(width=4, depth=2, input_contrast=True, contrast_reference="bright")
    ).eval()
    seg = Segmenter(net, window=32, overlap=8, batch_size=2)
    tiles, large = _images(3, 32, 32), _images(2, 40, 56)
    for images in (tiles, large):
        own = seg.references(images)
        assert own.shape == (len(images), 3) and own.dtype == np.float32
        given, plain = seg.predict(images, references=own), seg.predict(images)
        for got, want in zip(given, plain, strict=True):
            np.testing.assert_array_equal(got, want)
    oxide, film = np.array([0.77, 0.75, 0.96], np.float32), np.array([166, 180, 210], np.uint8)
    tile = np.broadcast_to(film, (32, 32, 3)).copy()
    probs, _ = seg.predict(tile, references=oxide)
    x = torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        against_oxide = torch.softmax(net(x, torch.from_numpy(oxide)[None, :, None, None]), 1)
        against_itself = torch.softmax(net(x, reference_colours(x, "hue")), 1)
    np.testing.assert_allclose(probs, against_oxide[0].numpy(), atol=1e-6)
    assert np.abs(probs - against_itself[0].numpy()).max() > 1e-3


@pytest.mark.parametrize(
    ("references", "message"),
    [
        (np.ones((2, 3), np.float32), "expected 3×3"),
        (np.ones((3, 4), np.float32), "expected 3×3"),
        (np.full((3, 3), -0.1, np.float32), "0 or more"),
        (np.full((3, 3), np.inf, np.float32), "finite"),
    ],
)
def test_bad_references_are_refused_naming_the_problem(references, message) -> None:
    net = build_unet(UNetConfig(width=4, depth=2, input_contrast=True)).eval()
    with pytest.raises(ValueError, match=message):
        Segmenter(net, window=32, overlap=0).predict(_images(3, 32, 32), references=references)


def test_a_raw_pixel_net_has_no_references() -> None:
    seg = Segmenter(build_unet(UNetConfig(width=4, depth=2)).eval(), window=32, overlap=0)
    with pytest.raises(ValueError, match="raw pixels"):
        seg.references(_images(1, 32, 32))
    with pytest.raises(ValueError, match="raw pixels"):
        seg.predict(_images(1, 32, 32), references=np.ones((1, 3), np.float32))
