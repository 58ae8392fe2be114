"""The paper's U-Net: shapes, dropout placement, the paper preset's size, learning, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from model.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from model.unet import PRESETS, UNet, UNetConfig, UpConv, build_unet, gflops_per_tile

# Exact trainable parameters of PRESETS["paper"] (3 input channels, 3 classes, no batch norm):
# the classic U-Net's ~31.0 M, as the 2×2 up-convolution has a transposed convolution's weights.
PAPER_PARAMETERS = 31_031_875
# 2 × multiply-adds of its convolutions on one 512×512 tile.
PAPER_GFLOP_512 = 436.946


def _leaves(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if not list(m.children())]


@pytest.mark.parametrize(
    "config",
    [
        UNetConfig(width=4, depth=2),
        UNetConfig(width=4, depth=4, batch_norm=True),
        UNetConfig(width=2, depth=1, classes=5, in_channels=1),
    ],
    ids=str,
)
@pytest.mark.parametrize("size", [(32, 48), (64, 64)])
def test_output_is_logits_of_input_size(config: UNetConfig, size: tuple[int, int]) -> None:
    model = build_unet(config).eval()
    x = torch.rand(2, config.in_channels, *size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, config.classes, *size)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_at_reduced_width(name: str) -> None:
    config = PRESETS[name].model_copy(update={"width": 2})
    model = build_unet(config).eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, 2 * config.multiple, config.multiple))
    assert y.shape == (1, 3, 2 * config.multiple, config.multiple)


def test_presets_are_as_documented() -> None:
    assert (PRESETS["paper"].width, PRESETS["paper"].depth) == (64, 4)
    assert not PRESETS["paper"].batch_norm
    assert PRESETS["paper"].dropout == 0.5 and PRESETS["paper"].dropout_layers == 3
    assert PRESETS["tiny"].width == 4 and PRESETS["tiny"].depth == 2
    assert not PRESETS["small"].batch_norm  # see PRESETS: batch statistics misled it
    # lab-wide is small-lab, four times as wide
    assert PRESETS["lab-wide"] == PRESETS["small-lab"].model_copy(update={"width": 32})


@pytest.mark.parametrize("size", [(30, 32), (32, 34), (17, 17)])
def test_size_not_divisible_is_rejected_naming_it(size: tuple[int, int]) -> None:
    model = build_unet(UNetConfig(width=4, depth=2))
    with pytest.raises(ValueError, match=f"{size[0]}×{size[1]}.*2\\*\\*depth = 4"):
        model(torch.rand(1, 3, *size))


def test_config_is_strict() -> None:
    with pytest.raises(ValidationError):
        UNetConfig(widht=4)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        UNetConfig(dropout=1.0)
    with pytest.raises(ValueError, match="unknown U-Net preset"):
        build_unet("huge")


def test_dropout_follows_the_first_three_up_convolutions_in_forward_order() -> None:
    model = build_unet(UNetConfig(width=2, depth=4)).eval()
    calls: list[nn.Module] = []
    for leaf in _leaves(model):
        leaf.register_forward_hook(lambda m, i, o: calls.append(m))
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))

    up_convs = [m for m in calls if isinstance(m, nn.Conv2d) and m.kernel_size == (2, 2)]
    dropouts = [k for k, m in enumerate(calls) if isinstance(m, nn.Dropout)]
    assert len(up_convs) == 4
    assert len(dropouts) == 3
    assert not any(isinstance(m, nn.Dropout) for m in model.encoder.modules())
    for n, k in enumerate(dropouts):
        # conv 2×2 -> ReLU -> dropout, and it is the n-th up-convolution
        assert isinstance(calls[k - 1], nn.ReLU)
        assert calls[k - 2] is up_convs[n]
        assert calls[k].p == 0.5
    # the last up-convolution is followed by the skip concatenation and 3×3 convs, no dropout
    last = calls.index(up_convs[3])
    assert not any(isinstance(m, nn.Dropout) for m in calls[last:])


def test_up_convolution_doubles_size_and_halves_channels() -> None:
    up = UpConv(8, 4, batch_norm=False)
    assert up(torch.rand(1, 8, 5, 7)).shape == (1, 4, 10, 14)


@pytest.mark.parametrize(("layers", "depth", "expected"), [(3, 2, 2), (0, 4, 0), (4, 4, 4)])
def test_dropout_layers_count(layers: int, depth: int, expected: int) -> None:
    model = build_unet(UNetConfig(width=2, depth=depth, dropout_layers=layers))
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == expected


def test_dropout_is_active_in_train_mode_only() -> None:
    torch.manual_seed(0)
    model = build_unet(UNetConfig(width=4, depth=2))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


def test_paper_preset_channels_and_parameter_count() -> None:
    with torch.device("meta"):  # shapes only: no 124 MB of weights
        model = build_unet("paper")
    encoder_out = [
        [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        for block in model.encoder
    ]
    assert encoder_out == [64, 128, 256, 512, 1024]
    ups = [block.up[2] for block in model.decoder]
    assert [(c.in_channels, c.out_channels) for c in ups] == [
        (1024, 512),
        (512, 256),
        (256, 128),
        (128, 64),
    ]
    assert model.head.out_channels == 3
    assert sum(p.numel() for p in model.parameters()) == PAPER_PARAMETERS


def test_gflops_match_a_hand_count() -> None:
    config = UNetConfig(width=4, depth=2, batch_norm=True)
    model = build_unet(config).eval()
    macs = 0

    def count(m: nn.Conv2d, i: tuple[torch.Tensor], o: torch.Tensor) -> None:
        nonlocal macs
        kh, kw = m.kernel_size
        macs += m.in_channels * m.out_channels * kh * kw * o.shape[-2] * o.shape[-1]

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(count)
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    assert gflops_per_tile(config, size=64) == pytest.approx(2 * macs / 1e9, rel=1e-9)
    assert gflops_per_tile("paper") == pytest.approx(PAPER_GFLOP_512, abs=1e-3)


def test_a_few_steps_reduce_cross_entropy() -> None:
    torch.manual_seed(0)
    model = build_unet(UNetConfig(width=4, depth=2, batch_norm=True, dropout=0.0))
    x = torch.rand(4, 3, 32, 32)
    y = x.argmax(dim=1)  # the class is the brightest channel: learnable pointwise
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(x), y).item()

    before = eval_loss()
    model.train()
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert eval_loss() < 0.8 * before


# --- checkpoints -------------------------------------------------------------------------------


def _trained_tiny() -> UNet:
    """A tiny batch-norm model whose running statistics are not the defaults."""
    torch.manual_seed(1)
    model = build_unet(UNetConfig(width=4, depth=2, batch_norm=True)).train()
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32) * 3)
    return model.eval()


TRAINING = {
    "datasets": ["/data/mos2-2dtlk", "runs/synth-1"],
    "sources": ["2DTLK", "flakescan synth"],
    "counts": {"train": 24, "val": 11},
    "seed": 3,
    "epochs": 2,
    "metrics": {"val_accuracy": 0.79},
}


def test_checkpoint_round_trip(tmp_path) -> None:
    model = _trained_tiny()
    path = tmp_path / "sub" / "tiny.pt"
    saved = save_checkpoint(path, model, model.config, training=TRAINING)
    loaded, meta = load_checkpoint(path)

    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    assert meta == saved
    assert meta.format_version == FORMAT_VERSION
    assert meta.config == model.config
    assert meta.class_names == ("other", "monolayer", "bilayer")
    assert meta.normalisation == {"scale": pytest.approx(1 / 255)}
    assert meta.training == TRAINING
    assert meta.torch_version == torch.__version__
    assert meta.created.tzinfo is not None
    assert not list(tmp_path.glob("sub/.*.tmp"))


def test_checkpoint_error_cases(tmp_path) -> None:
    model = _trained_tiny()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="not a flakescan checkpoint"):
        load_checkpoint(junk)

    other = tmp_path / "other.pt"
    torch.save(model.state_dict(), other)  # a bare state dict, as many projects save
    with pytest.raises(CheckpointError, match="not a flakescan checkpoint"):
        load_checkpoint(other)

    good = tmp_path / "good.pt"
    save_checkpoint(good, model, model.config)
    payload = torch.load(good, weights_only=True)

    future = tmp_path / "future.pt"
    torch.save({**payload, "format_version": 99}, future)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(future)

    wider = tmp_path / "wider.pt"
    meta = {**payload["meta"], "config": {**payload["meta"]["config"], "width": 8}}
    torch.save({**payload, "meta": meta}, wider)
    with pytest.raises(
        CheckpointError, match=r"wrong shapes encoder\.0\.0\.weight: \(4, 3, 3, 3\)"
    ):
        load_checkpoint(wider)

    partial = tmp_path / "partial.pt"
    state = {k: v for k, v in payload["state_dict"].items() if k != "head.bias"}
    torch.save({**payload, "state_dict": state}, partial)
    with pytest.raises(CheckpointError, match=r"missing head\.bias"):
        load_checkpoint(partial)


def test_save_refuses_inconsistent_inputs(tmp_path) -> None:
    model = _trained_tiny()
    with pytest.raises(ValueError, match="model was built from"):
        save_checkpoint(tmp_path / "a.pt", model, PRESETS["tiny"].model_copy(update={"width": 8}))
    with pytest.raises(ValueError, match="class names"):
        save_checkpoint(tmp_path / "b.pt", model, model.config, class_names=("a", "b"))
    with pytest.raises(ValueError, match="not JSON-able"):
        save_checkpoint(tmp_path / "c.pt", model, model.config, training={"w": torch.ones(2)})
    assert not list(tmp_path.iterdir())


def test_input_contrast_makes_the_net_blind_to_lamp_and_exposure() -> None:
    """With input_contrast a tile under another lamp colour or exposure gives the same logits:
    only the flake-to-substrate contrast reaches the convolutions."""
    from model.unet.model import optical_contrast

    torch.manual_seed(0)
    model = build_unet(UNetConfig(width=4, depth=2, input_contrast=True)).eval()
    x = 0.3 + 0.4 * torch.rand(2, 3, 16, 16)
    gains = torch.tensor([0.7, 1.1, 1.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x * gains), atol=1e-4)
        plain = build_unet(UNetConfig(width=4, depth=2)).eval()
        assert not torch.allclose(plain(x), plain(x * gains), atol=1e-4)
    flat = torch.full((1, 3, 8, 8), 0.6)
    flat[..., :4, :] = 0.54  # half the image 10 % darker
    c = optical_contrast(flat)
    assert torch.allclose(c[..., :4, :], torch.tensor(10 * (0.54 / 0.57 - 1)))
    assert torch.isfinite(optical_contrast(torch.zeros(1, 3, 8, 8))).all()  # a black frame


def test_bright_reference_stays_on_the_oxide_when_flakes_cover_most_of_the_field() -> None:
    """70 % of the field a monolayer (10 % darker in red, 5 % in green and blue), 30 % oxide:
    the median is the monolayer's colour, the `bright` reference the oxide's."""
    from model.unet.model import optical_contrast

    oxide = torch.tensor([0.60, 0.55, 0.80]).view(1, 3, 1, 1)
    field = oxide * torch.tensor([0.90, 0.95, 0.95]).view(1, 3, 1, 1)
    x = field.expand(2, 3, 20, 20).clone()
    x[0, :, :6, :] = oxide[0]  # first image: 30 % oxide
    x[1, :, :16, :] = oxide[0]  # second: 80 % oxide, the usual tile
    x += 0.002 * torch.randn_like(x)  # camera noise: the reference is a median, not a value
    bright = optical_contrast(x, "bright")
    median = optical_contrast(x, "median")
    monolayer = 10 * torch.tensor([-0.10, -0.05, -0.05])
    for i, rows in ((0, slice(6, None)), (1, slice(16, None))):
        flake = bright[i, :, rows].mean(dim=(-2, -1))
        assert torch.allclose(flake, monolayer, atol=0.05), flake
    assert median[0, 0, 6:].abs().mean() < 0.05  # the median mistakes the monolayer for oxide
    assert UNetConfig(width=4, depth=2, input_contrast=True, contrast_reference="bright")


def _field(substrate: list[float], flake: list[float], flake_rows: int, size: int = 40):
    """A size×size image of `substrate` whose first `flake_rows` rows are `flake`, with camera
    noise (the references are medians, not values)."""
    x = torch.tensor(substrate).view(3, 1, 1).expand(3, size, size).clone()
    x[:, :flake_rows] = torch.tensor(flake).view(3, 1, 1)
    return x + 0.002 * torch.randn_like(x)


def test_hue_reference_finds_a_few_percent_of_substrate_beside_a_film() -> None:
    """Colours of a real CVD image: a monolayer film over 95 % of the field (darker in red,
    greener), 5 % oxide. `bright` lands on the film; `hue` finds the oxide by its hue."""
    from model.unet.reference import reference_colours

    torch.manual_seed(0)
    oxide, film = [0.77, 0.75, 0.96], [0.65, 0.71, 0.82]
    x = _field(oxide, film, flake_rows=38)  # 2 of 40 rows oxide
    assert torch.allclose(reference_colours(x, "hue").flatten(), torch.tensor(oxide), atol=0.005)
    assert torch.allclose(reference_colours(x, "bright").flatten(), torch.tensor(film), atol=0.01)


def test_hue_reference_leaves_thick_flakes_stage_and_glare_to_bright() -> None:
    """Pixels that are less green than the oxide but no thin film's substrate: a pink thick
    flake far brighter in red, the black stage, clipped white glare. The oxide stands."""
    from model.unet.reference import reference_colours

    torch.manual_seed(0)
    oxide = [0.38, 0.38, 0.45]
    for other in ([0.74, 0.62, 0.66], [0.01, 0.0, 0.02], [1.0, 1.0, 1.0]):
        x = _field(oxide, other, flake_rows=6).clamp(0, 1)  # 15 % of the field
        ref = reference_colours(x, "hue").flatten()
        assert torch.allclose(ref, torch.tensor(oxide), atol=0.005), (other, ref)


def test_hue_reference_is_bright_where_the_monolayer_keeps_the_substrates_hue() -> None:
    """On some oxides a monolayer only darkens the field (the simulated rig's): by hue it is
    substrate, and the median of both would be read as the oxide. Not brighter in red than
    `bright`'s pick, so `bright` stands, to the last bit."""
    from model.unet.reference import reference_colours

    torch.manual_seed(0)
    oxide = [0.65, 0.57, 0.73]
    x = _field(oxide, [0.9 * c for c in oxide], flake_rows=16)  # 40 % monolayer
    assert torch.equal(reference_colours(x, "hue"), reference_colours(x, "bright"))
    assert torch.allclose(reference_colours(x, "hue").flatten(), torch.tensor(oxide), atol=0.005)


def test_hue_reference_is_per_image_for_any_leading_dims() -> None:
    from model.unet.reference import reference_colours

    torch.manual_seed(0)
    x = torch.stack([_field([0.6, 0.55, 0.8], [0.5, 0.54, 0.7], r) for r in (5, 20, 36)])
    batch = reference_colours(x.view(3, 1, 3, 40, 40), "hue")
    assert batch.shape == (3, 1, 3, 1, 1)
    for i in range(3):
        assert torch.equal(batch[i, 0], reference_colours(x[i], "hue"))
    with pytest.raises(ValueError, match="unknown contrast reference 'brightest'"):
        reference_colours(x, "brightest")  # type: ignore[arg-type]


def test_input_raw_lets_the_net_see_absolute_colour_beside_contrast() -> None:
    """A field mostly covered by one flake has the flake as its median, so contrast alone maps
    it like bare substrate; with input_raw the net sees six planes and tells them apart."""
    config = UNetConfig(width=4, depth=2, input_contrast=True, input_raw=True)
    assert config.input_planes == 6
    assert UNetConfig(width=4, depth=2, input_contrast=True).input_planes == 3
    with pytest.raises(ValueError, match="input_contrast"):
        UNetConfig(width=4, depth=2, input_raw=True)  # raw pixels are already the plain input
    torch.manual_seed(0)
    model = build_unet(config).eval()
    assert model.encoder[0][0].in_channels == 6
    substrate = torch.full((1, 3, 16, 16), 0.7)
    flake = torch.full((1, 3, 16, 16), 0.6)  # uniform: the same zero contrast as substrate
    with torch.no_grad():
        blind = build_unet(UNetConfig(width=4, depth=2, input_contrast=True)).eval()
        assert torch.allclose(blind(substrate), blind(flake), atol=1e-5)
        assert not torch.allclose(model(substrate), model(flake), atol=1e-3)


def test_fresh_weights_keep_the_signal_through_relu_layers() -> None:
    """He initialisation: the output of a fresh small net still varies with its input (the
    default init left a narrow net without batch norm with a near-constant output)."""
    torch.manual_seed(0)
    model = build_unet(PRESETS["small"]).eval()
    x = torch.rand(1, 3, 64, 64) * 0.2 + 0.5
    with torch.no_grad():
        y = model(x)
    assert y.std() > 0.1
