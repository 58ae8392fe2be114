"""Levelling a single image's illumination (model/illumination.py, `flakescan evaluate`)."""

from __future__ import annotations

import numpy as np
import pytest

from model.illumination import level_illumination

OXIDE = np.array([0.70, 0.62, 0.80])
MONOLAYER = OXIDE * np.array([0.88, 0.93, 0.97])  # ~12 % darker in red, as on 300 nm oxide


def _tilted(tilt: float, size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An oxide field with a monolayer square in its darker half; the light falls by `tilt`
    from left to right. Returns the uint8 image and the flake's mask."""
    rng = np.random.default_rng(seed)
    field = np.broadcast_to(OXIDE, (size, size, 3)).copy()
    flake = np.zeros((size, size), bool)
    flake[40:80, 80:110] = True
    field[flake] = MONOLAYER
    light = 1 + tilt * (0.5 - np.arange(size) / (size - 1))  # brighter on the left
    image = field * light[None, :, None] * 255 + rng.normal(0, 1.0, field.shape)
    return np.clip(image, 0, 255).astype(np.uint8), flake


def test_a_tilted_field_is_levelled_and_its_flake_keeps_its_contrast() -> None:
    image, flake = _tilted(0.16)
    substrate = ~flake
    red = image[..., 0].astype(float)
    assert red[substrate][:, None].std() > 0.03 * red[substrate].mean()  # 16 % across the field
    levelled = level_illumination(image, np.median(image[substrate], axis=0) / 255)
    assert levelled is not None and levelled.dtype == np.uint8
    red = levelled[..., 0].astype(float)
    left, right = red[:, :20][substrate[:, :20]].mean(), red[:, -20:][substrate[:, -20:]].mean()
    assert abs(left / right - 1) < 0.01  # was 16 %
    contrast = red[flake].mean() / red[substrate].mean() - 1
    assert contrast == pytest.approx(-0.12, abs=0.01)  # the monolayer's own, wherever it lies


def test_an_even_field_is_left_as_it_is() -> None:
    image, _ = _tilted(0.0)
    levelled = level_illumination(image, OXIDE)
    assert levelled is not None
    assert np.abs(levelled.astype(int) - image).max() <= 1


def test_without_substrate_near_the_reference_nothing_is_levelled() -> None:
    image, _ = _tilted(0.1)
    assert level_illumination(image, OXIDE * 0.5) is None  # no pixel is that colour
    # oxide in a strip down one side only, a film over the rest: a plane through the strip
    # would be extrapolated over the whole film
    strip = image.copy()
    strip[:, 30:] = (MONOLAYER * 255).astype(np.uint8)
    assert level_illumination(strip, np.median(image[:, :30], axis=(0, 1)) / 255) is None
    with pytest.raises(ValueError, match="uint8"):
        level_illumination(image.astype(np.float32), OXIDE)
    with pytest.raises(ValueError, match="expected 3 colours"):
        level_illumination(image, OXIDE[:2])


def test_the_shipped_model_reads_tilted_light_as_oxide_once_levelled(tmp_path) -> None:
    """Fresh rig-look tiles lit 24 % brighter on one side than the other (real micrographs:
    9 % median, 19 % at the 90th percentile): read as they are, the dark side's oxide turns
    monolayer; levelled, it stays oxide and the layers are still found."""
    from conftest import fresh_tiles
    from PIL import Image

    from model.evaluate import Reading, read_image
    from model.metrics import confusion_matrix
    from scanner.scan_command import load_segmenter
    from scanner.scan_config import ModelConfig

    out = fresh_tiles(tmp_path / "rig", 6, 4244, tiles_per_chip=3, randomise=False)
    segmenter = load_segmenter(ModelConfig(batch_size=4))
    light = 1 + 0.24 * (0.5 - np.arange(512) / 511)
    reading = Reading()
    cms = {False: np.zeros((3, 3), np.int64), True: np.zeros((3, 3), np.int64)}
    for path in sorted((out / "images").glob("*.jpg")):
        image = np.asarray(Image.open(path)).astype(float) * light[None, :, None]
        image = np.clip(image, 0, 255).astype(np.uint8)
        truth = np.asarray(Image.open(out / "masks" / f"{path.stem}.png"))
        for level in cms:
            _, labels = read_image(segmenter, image, path.stem, level=level, reading=reading)
            cms[level] += confusion_matrix(truth, labels)
    recall = {k: np.diag(cm) / cm.sum(axis=1) for k, cm in cms.items()}
    # measured: other / monolayer / bilayer 0.63 / 0.89 / 0.78 as they are, 0.91 / 0.995 / 0.97
    assert len(reading.levelled) >= 5
    assert recall[True][0] > recall[False][0] + 0.15, recall
    assert recall[True][1:].min() > 0.9, recall


def test_evaluate_levels_images_for_nets_read_with_hue_unless_told_not_to(tmp_path) -> None:
    import json

    import torch
    import yaml
    from PIL import Image
    from typer.testing import CliRunner

    from model.checkpoint import save_checkpoint
    from model.unet import UNetConfig, build_unet
    from scanner.cli import app

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(2):
        image, flake = _tilted(0.16, seed=i)
        Image.fromarray(image).save(root / "images" / f"tilt-{i}_1.png")
        Image.fromarray(flake.astype(np.uint8)).save(root / "masks" / f"tilt-{i}_1.png")
    (root / "dataset.yaml").write_text(
        yaml.safe_dump({"image_glob": "images/*.png", "label_values": {0: "other", 1: "monolayer"}})
    )
    torch.manual_seed(0)
    for name, config in {
        "bright": UNetConfig(width=4, depth=2, input_contrast=True, contrast_reference="bright"),
        "raw": UNetConfig(width=4, depth=2),
    }.items():
        net = build_unet(config)
        save_checkpoint(tmp_path / f"{name}.pt", net, net.config)

    def run(net: str, *extra: str):
        args = ["evaluate", "--data", str(root), "--checkpoint", str(tmp_path / f"{net}.pt")]
        return CliRunner().invoke(app, [*args, "--json", str(tmp_path / "s.json"), *extra])

    result = run("bright")
    assert result.exit_code == 0, result.output
    assert "levelled 2 of 2 image(s)" in result.output
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["illumination"] == "plane" and doc["levelled"] == ["tilt-0_1", "tilt-1_1"]
    result = run("bright", "--illumination", "none")
    assert result.exit_code == 0 and "levelled" not in result.output
    assert json.loads((tmp_path / "s.json").read_text())["levelled"] == []
    result = run("raw")  # a net of raw pixels is not levelled by default ...
    assert result.exit_code == 0 and "levelled" not in result.output
    result = run("raw", "--illumination", "plane")  # ... but can be: the rule is the image's
    assert result.exit_code == 0 and "levelled 2 of 2 image(s)" in result.output, result.output
    result = run("bright", "--illumination", "tilt")
    assert result.exit_code != 0 and "choose plane or none" in " ".join(result.output.split())


def _tilted_folder(root, count: int = 2):
    import yaml
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        image, flake = _tilted(0.16, seed=i)
        Image.fromarray(image).save(root / "images" / f"tilt-{i}_1.png")
        Image.fromarray(flake.astype(np.uint8)).save(root / "masks" / f"tilt-{i}_1.png")
    (root / "dataset.yaml").write_text(
        yaml.safe_dump({"image_glob": "images/*.png", "label_values": {0: "other", 1: "monolayer"}})
    )
    return root


def test_training_data_is_levelled_as_evaluate_levels_it(tmp_path) -> None:
    from model.data import load_dataset, preload
    from model.illumination import level_image

    dataset = load_dataset(_tilted_folder(tmp_path / "ds"))
    (raw, mask), (levelled, same_mask) = preload(dataset, [0]) + preload(dataset, [0], level=True)
    np.testing.assert_array_equal(mask, same_mask)
    np.testing.assert_array_equal(levelled, level_image(raw))
    oxide = ~mask.astype(bool)
    # the red of the bare oxide, left third against right third: 16 % apart, then even
    left, right = slice(0, 40), slice(88, 128)

    def sides(image: np.ndarray) -> float:
        red = image[..., 0].astype(float)
        return red[:, left][oxide[:, left]].mean() / red[:, right][oxide[:, right]].mean()

    assert sides(raw) > 1.10 and abs(sides(levelled) - 1) < 0.02, (sides(raw), sides(levelled))


def test_a_net_trained_levelled_is_scored_levelled_and_bad_options_are_named(tmp_path) -> None:
    """`train --illumination plane` records it; `evaluate` then levels by default. A recipe's
    mirror falls back for a raw-pixel net; asked for by name, it is refused."""
    import torch
    from typer.testing import CliRunner

    from scanner.cli import app

    root = _tilted_folder(tmp_path / "ds")
    runner = CliRunner()
    short = ["--epochs", "1", "--samples-per-epoch", "2", "--crop", "32", "--augment", "none"]
    ckpt = tmp_path / "lab.pt"
    base = ["train", "--data", str(root), "--recipe", "lab", *short]
    result = runner.invoke(app, [*base, "--out", str(ckpt), "--illumination", "plane"])
    assert result.exit_code == 0, result.output
    training = torch.load(ckpt, weights_only=True)["meta"]["training"]["config"]
    assert training["illumination"] == "plane" and training["substrate"] == "auto"
    scored = runner.invoke(app, ["evaluate", "--data", str(root), "--checkpoint", str(ckpt)])
    assert scored.exit_code == 0 and "levelled 2 of 2 image(s)" in scored.output, scored.output

    # Fine-tuned with the default recipe, it keeps how it read its images.
    tuned = tmp_path / "tuned.pt"
    args = ["train", "--data", str(root), "--init", str(ckpt), "--out", str(tuned), *short]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    training = torch.load(tuned, weights_only=True)["meta"]["training"]["config"]
    assert training["illumination"] == "plane" and training["substrate"] == "auto"

    raw = tmp_path / "raw.pt"
    result = runner.invoke(app, [*base, "--out", str(raw), "--preset", "tiny"])
    assert result.exit_code == 0 and "no image is trained mirrored" in " ".join(
        result.output.split()
    )
    assert torch.load(raw, weights_only=True)["meta"]["training"]["config"]["substrate"] == "oxide"
    refused = tmp_path / "refused.pt"
    args = [*base, "--out", str(refused), "--preset", "tiny", "--substrate", "auto"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--substrate auto" in result.output and not refused.exists()
    result = runner.invoke(app, [*base, "--out", str(refused), "--illumination", "tilt"])
    assert result.exit_code == 2 and "illumination" in result.output and not refused.exists()
