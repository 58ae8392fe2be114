"""Transparent substrates: MoS2 on quartz is brighter than its dark substrate, and is read
mirrored onto the oxide's contrast (model/unet/reference.py `substrate_reference`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.segmenter import Segmenter
from model.unet import UNetConfig, build_unet
from model.unet.reference import (
    TRANSPARENT_CONTRAST,
    contrast_against,
    reference_colours,
    substrate_reference,
)

# The colours of a real dark-background image (0..1): the substrate, and a monolayer film
# 13 % brighter in red and 30 % in blue (the thin-film model on quartz: 12.5 % and 24.5 %).
QUARTZ = [0.26, 0.25, 0.27]
FILM_ON_QUARTZ = [0.26 * 1.13, 0.25 * 1.15, 0.27 * 1.30]
# A real oxide image that a greener monolayer film darker in red covers 33 % of: its oxide is
# brighter in red and bluer than the film, as a film on quartz is than its substrate, but
# less so in blue (the image is train-image_87_4's look).
OXIDE = [0.59, 0.57, 0.72]
FILM_ON_OXIDE = [0.46, 0.51, 0.53]


def _field(substrate: list[float], flake: list[float], flake_rows: int, size: int = 40):
    """size×size of `substrate` whose first `flake_rows` rows are `flake`, with camera noise."""
    torch.manual_seed(0)
    x = torch.tensor(substrate).view(3, 1, 1).expand(3, size, size).clone()
    x[:, :flake_rows] = torch.tensor(flake).view(3, 1, 1)
    return (x + 0.002 * torch.randn_like(x))[None]


def test_transparent_contrast_is_the_optics_ratio() -> None:
    """The factor mapping contrast on quartz onto contrast on oxide is the thin-film model's:
    a layer's contrast on 285-335 nm SiO2/Si over its contrast on quartz, 1 and 2 layers."""
    from drivers.simulated.optics import optical_contrast

    ratios = [
        optical_contrast(layers, oxide) / optical_contrast(layers, 300, substrate="quartz")
        for layers in (1, 2)
        for oxide in (285, 300, 315, 335)
    ]
    np.testing.assert_allclose(np.mean(ratios, axis=0), TRANSPARENT_CONTRAST, atol=0.01)


@pytest.mark.parametrize("film_rows", [22, 34])  # 55 % and 85 % of the field
def test_auto_finds_a_dark_substrate_under_brighter_films_and_mirrors_their_contrast(
    film_rows,
) -> None:
    x = _field(QUARTZ, FILM_ON_QUARTZ, film_rows)
    ref, scale = substrate_reference(x, "hue", "auto")
    torch.testing.assert_close(ref.flatten(), torch.tensor(QUARTZ), atol=0.003, rtol=0)
    assert scale is not None
    torch.testing.assert_close(scale.flatten(), torch.tensor(TRANSPARENT_CONTRAST))
    film = contrast_against(x, ref, scale)[0, :, :film_rows].mean(dim=(-2, -1))
    # read as on oxide: darker in red, as much as a monolayer there (~ -0.11 x 10)
    assert -1.3 < film[0] < -1.0, film
    # `hue` alone takes the film over half the field as the substrate: it would read as bare
    assert reference_colours(x, "hue").flatten()[0] > QUARTZ[0] * 1.1


@pytest.mark.parametrize("film_rows", [4, 13, 30])
def test_auto_leaves_oxide_images_to_the_reference_rule(film_rows) -> None:
    """Films darker and greener than the oxide, on 10 %, 33 % or 75 % of the field: read as
    on oxide, against `hue`'s colours to the bit, with no factor."""
    x = _field(OXIDE, FILM_ON_OXIDE, film_rows)
    ref, scale = substrate_reference(x, "hue", "auto")
    assert torch.equal(ref, reference_colours(x, "hue"))
    assert scale is not None and torch.equal(scale, torch.ones_like(scale))
    plain, none = substrate_reference(x, "hue", "oxide")
    assert torch.equal(plain, ref) and none is None


def test_forced_transparent_reads_a_field_of_bare_quartz_against_it() -> None:
    """Most of a quartz chip's tiles are bare substrate, where `auto` cannot tell: forced, the
    reference is the substrate's colour and a small film still reads as on oxide."""
    x = _field(QUARTZ, FILM_ON_QUARTZ, flake_rows=4)
    ref, scale = substrate_reference(x, "hue", "auto")
    assert scale is not None and torch.equal(scale, torch.ones_like(scale))  # not seen
    ref, scale = substrate_reference(x, "hue", "transparent")
    torch.testing.assert_close(ref.flatten(), torch.tensor(QUARTZ), atol=0.003, rtol=0)
    assert scale is not None
    assert contrast_against(x, ref, scale)[0, 0, :4].mean() < -1.0


def test_substrate_reference_is_per_image_and_needs_rgb() -> None:
    images = torch.cat([_field(QUARTZ, FILM_ON_QUARTZ, 30), _field(OXIDE, FILM_ON_OXIDE, 13)])
    ref, scale = substrate_reference(images.view(2, 1, 3, 40, 40), "hue", "auto")
    assert ref.shape == scale.shape == (2, 1, 3, 1, 1)
    assert scale[0, 0, 0].item() < 0 < scale[1, 0, 0].item()
    with pytest.raises(ValueError, match="needs RGB images, got 4 channels"):
        substrate_reference(torch.rand(1, 4, 8, 8), "hue", "auto")


def _bright_net():
    torch.manual_seed(0)
    return build_unet(
        UNetConfig(width=4, depth=2, input_contrast=True, contrast_reference="bright")
    ).eval()


def _uint8(x: torch.Tensor) -> np.ndarray:
    return (x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().numpy().astype(np.uint8)


def test_segmenter_reads_bright_nets_with_auto_and_lab_nets_on_oxide() -> None:
    assert Segmenter(_bright_net()).substrate == "auto"
    lab = build_unet(
        UNetConfig(
            width=4, depth=2, input_contrast=True, input_raw=True, contrast_reference="median"
        )
    )
    assert Segmenter(lab).substrate == "oxide"
    raw = build_unet(UNetConfig(width=4, depth=2))
    assert Segmenter(raw, reference="hue").substrate == "oxide"  # nothing to mirror
    with pytest.raises(ValueError, match="read from the optical contrast"):
        Segmenter(raw, substrate="transparent")
    with pytest.raises(ValueError, match="'glass' is not a substrate; choose from auto"):
        Segmenter(_bright_net(), substrate="glass")  # type: ignore[arg-type]


def test_segmenter_predicts_a_quartz_tile_mirrored_and_its_references_say_so() -> None:
    """A tile and a larger image on quartz: predict reads them mirrored; the references and
    flags `substrate_references` gives, passed back in, give the same result; `oxide` does
    not mirror; flags on a Segmenter read on oxide are refused."""
    net = _bright_net()
    tile = _uint8(_field(QUARTZ, FILM_ON_QUARTZ, 22, size=32))
    large = _uint8(_field(QUARTZ, FILM_ON_QUARTZ, 30, size=56))
    auto = Segmenter(net, window=32, overlap=8)
    oxide = Segmenter(net, window=32, overlap=8, substrate="oxide")
    for image in (tile, large):
        refs, transparent = auto.substrate_references(image)
        assert transparent.dtype == bool and bool(transparent)
        probs = auto.predict(image)[0]
        np.testing.assert_array_equal(
            auto.predict(image[None], refs[None], transparent[None])[0][0], probs
        )
        assert np.abs(probs - oxide.predict(image)[0]).max() > 1e-3
        assert not oxide.substrate_references(image)[1]
    x = torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255
    ref, scale = substrate_reference(x, "hue", "transparent")
    with torch.no_grad():
        want = torch.softmax(net(x, ref, scale), 1)[0].numpy()
    np.testing.assert_allclose(auto.predict(tile)[0], want, atol=1e-6)
    # own references without the flags: each image's own decision, as predict makes it
    own = auto.references(tile)
    np.testing.assert_array_equal(auto.predict(tile, references=own)[0], auto.predict(tile)[0])
    with pytest.raises(ValueError, match="read on oxide"):
        oxide.predict(tile[None], refs[None], np.array([True]))
    with pytest.raises(ValueError, match="give references with it"):
        auto.predict(tile, transparent=np.array(True))
    with pytest.raises(ValueError, match="expected 2 booleans"):
        auto.predict(np.stack([tile, tile]), np.stack([refs, refs]), np.array([1, 0]))


def test_shipped_model_reads_synthetic_quartz_tiles_when_told_the_substrate(tmp_path) -> None:
    """Fresh CVD tiles on quartz or sapphire (flakescan synth --transparent-share 1), which the
    shipped model never trained on: read as on oxide it finds almost none of their layers;
    read mirrored it finds most (held-out set of 64: mean per-class accuracy 0.195 -> 0.641)."""
    from conftest import fresh_tiles

    from model.checkpoint import DEFAULT_CHECKPOINT
    from model.data import load_dataset
    from model.metrics import confusion_matrix

    out = fresh_tiles(tmp_path / "quartz", 8, 4243, tiles_per_chip=4, transparent_share=1.0)
    data = load_dataset(out)
    recall = {}
    for substrate in ("oxide", "transparent"):
        seg = Segmenter.from_checkpoint(DEFAULT_CHECKPOINT, batch_size=4, substrate=substrate)
        cm = np.zeros((3, 3), np.int64)
        for sample in data.samples:
            image, truth = data.read_pair(sample)
            cm += confusion_matrix(truth, seg.predict(image)[1])
        recall[substrate] = np.diag(cm) / cm.sum(axis=1)
    assert cm[1].sum() > 10_000  # the tiles hold monolayer
    assert recall["oxide"][1] < 0.3 and recall["transparent"][1] > 0.5, recall
    assert recall["transparent"].mean() > recall["oxide"].mean() + 0.2, recall


def test_evaluate_reports_the_images_read_as_transparent(tmp_path) -> None:
    import json

    import yaml
    from PIL import Image
    from typer.testing import CliRunner

    from model.checkpoint import save_checkpoint
    from scanner.cli import app

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    mask = np.zeros((40, 40), np.uint8)
    mask[:22] = 1
    for stem, (substrate, film) in {
        "quartz-1_1": (QUARTZ, FILM_ON_QUARTZ),
        "oxide-2_1": (OXIDE, FILM_ON_OXIDE),
    }.items():
        Image.fromarray(_uint8(_field(substrate, film, 22))).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    (root / "dataset.yaml").write_text(
        yaml.safe_dump({"image_glob": "images/*.png", "label_values": {0: "other", 1: "monolayer"}})
    )
    net = _bright_net()
    save_checkpoint(tmp_path / "net.pt", net, net.config)
    args = ["evaluate", "--data", str(root), "--checkpoint", str(tmp_path / "net.pt")]
    result = CliRunner().invoke(app, [*args, "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert "1 of 2 image(s) read as on a transparent substrate (quartz-1_1)" in result.output
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["read_as_transparent_substrate"] == ["quartz-1_1"]
    result = CliRunner().invoke(app, [*args, "--substrate", "oxide"])
    assert result.exit_code == 0 and "transparent substrate" not in result.output
    result = CliRunner().invoke(app, [*args, "--substrate", "glass"])
    assert result.exit_code != 0 and "'glass' is not a substrate" in result.output


def _pairs_with_one_quartz_image(size: int = 40) -> list[tuple[np.ndarray, np.ndarray]]:
    """Three oxide images with a darker film over their top 30 % and one quartz image with a
    brighter film over 70 %, as uint8 training pairs (film labelled monolayer)."""
    pairs = []
    for substrate, film, rows in [(OXIDE, FILM_ON_OXIDE, 12)] * 3 + [(QUARTZ, FILM_ON_QUARTZ, 28)]:
        x = _field(substrate, film, rows, size)[0]
        mask = np.zeros((size, size), np.uint8)
        mask[:rows] = 1
        pairs.append(((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), mask))
    return pairs


def _lab_net() -> torch.nn.Module:
    return build_unet(
        UNetConfig(
            width=4, depth=2, input_contrast=True, input_raw=True, contrast_reference="median"
        )
    )


@pytest.mark.parametrize("substrate", ["oxide", "auto"])
def test_training_with_auto_mirrors_the_quartz_images_crops_only(substrate) -> None:
    """`TrainConfig.substrate` auto: crops of the image `auto` finds on quartz reach the net
    with mirrored contrast factors, the oxide images' crops with their own reading; the net
    records the oxide's colour for the raw planes. `oxide` mirrors nothing."""
    from structlog.testing import capture_logs

    from model.train import TrainConfig, train

    pairs = _pairs_with_one_quartz_image()
    calls: list[tuple] = []
    model = _lab_net()
    model.register_forward_pre_hook(lambda _m, args: calls.append(args[1:]))
    cfg = TrainConfig(
        preset="tiny", epochs=2, samples_per_epoch=16, crop=32, batch_size=4, augment="none",
        device="cpu", substrate=substrate,
    )  # fmt: skip
    with capture_logs() as logs:
        trained, _, _ = train(pairs, cfg, model=model)
    mirrored = sum(int((extra[1][:, 0, 0, 0] < 0).sum()) for extra in calls if extra)
    if substrate == "oxide":
        assert not any(calls) and trained.config.oxide_colour is None
        return
    # a quarter of 32 crops come from the quartz image: some, not all, are mirrored
    assert 2 <= mirrored <= 16
    found = [e for e in logs if e["event"] == "train.transparent_substrate"]
    assert len(found) == 1 and found[0]["images"] == 1 and found[0]["of"] == 4
    # the oxide images' median colour (70 % of each is oxide)
    np.testing.assert_allclose(trained.config.oxide_colour, OXIDE, atol=0.01)


def test_a_mirrored_image_shows_the_net_the_oxide_under_its_contrast() -> None:
    """Raw planes of an image read mirrored: the oxide colour times 1 + its mirrored contrast,
    not the image's own dark colours; images read as they are keep theirs."""
    net = _lab_net()
    net.config = net.config.model_copy(update={"oxide_colour": OXIDE})
    seen: list[torch.Tensor] = []
    net.encoder[0][0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x = torch.cat([_field(QUARTZ, FILM_ON_QUARTZ, 28), _field(OXIDE, FILM_ON_OXIDE, 12)])
    ref, scale = substrate_reference(x, "median", "auto")
    assert scale is not None and scale[0, 0] < 0 < scale[1, 0]  # only the first is mirrored
    net(x, ref, scale)
    contrast, raw = seen[0][:, :3], seen[0][:, 3:] / 2 + 0.5
    oxide = torch.tensor(OXIDE).view(3, 1, 1)
    torch.testing.assert_close(raw[0], (oxide * (1 + contrast[0] / 10)).clamp(0, 1))
    torch.testing.assert_close(raw[1], x[1])
    # the quartz image's bare substrate looks like bare oxide, its film darker in red
    assert abs(float(raw[0, 0, -1].mean()) - OXIDE[0]) < 0.01
    assert float(raw[0, 0, 0].mean()) < OXIDE[0] - 0.05


def test_a_net_trained_mirrored_is_read_with_auto(tmp_path) -> None:
    from model.checkpoint import save_checkpoint

    net = _lab_net()
    for substrate, read in (("auto", "auto"), ("oxide", "oxide"), (None, "oxide")):
        path = tmp_path / f"{substrate}.pt"
        config = {} if substrate is None else {"substrate": substrate}
        save_checkpoint(path, net, net.config, training={"config": config})
        assert Segmenter.from_checkpoint(path).substrate == read
        assert Segmenter.from_checkpoint(path, substrate="oxide").substrate == "oxide"


def test_every_window_of_a_quartz_image_is_read_mirrored_as_the_whole_image_is_decided() -> None:
    """A lab net reads each window against its own colours, but whether it is mirrored is
    decided on the whole image, as training decides it: a window of bare quartz alone looks
    like oxide, and would otherwise be read so."""
    image = _field(QUARTZ, FILM_ON_QUARTZ, 64, size=192)[0, :, :64]  # 64 × 192, all film
    image[:, :, 128:] = torch.tensor(QUARTZ).view(3, 1, 1)  # the last third bare quartz
    pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    segmenter = Segmenter(_lab_net(), substrate="auto", window=64, overlap=16)
    scales: list[torch.Tensor] = []
    segmenter._eager.register_forward_pre_hook(lambda _m, args: scales.append(args[2]))
    assert segmenter.substrate_references(pixels)[1]  # the whole image: transparent
    bare = torch.from_numpy(pixels[:, 128:]).permute(2, 0, 1)[None].float() / 255
    assert float(substrate_reference(bare, "median", "auto")[1][0, 0]) > 0  # alone: oxide
    segmenter.predict(pixels)
    windows = torch.cat(scales)
    assert len(windows) == 4 and bool((windows[:, 0] < 0).all())
