"""The shipped default model: where it lives, that `flakescan evaluate` uses it, and its size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import model.checkpoint as checkpoint_module
from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint
from model.unet import build_unet
from scanner.cli import app

#: Floors for the shipped model on fresh tiles in the simulated rig's own look, read the way a
#: scan reads them (flat-field corrected, the scan's default posterior). The shipped weights:
#: recall other / monolayer / bilayer 0.994 / 0.992 / 0.958, monolayer precision 0.915
#: (docs/model_card.md). Earlier weights: 0.994 / 0.978 / 0.945 and 0.908 (plain posterior);
#: 0.958 / 0.978 / 0.567; a model with broken batch-norm statistics 0.01 on monolayer.
RIG_LOOK_MIN_RECALL = (0.95, 0.95, 0.85)
RIG_LOOK_MIN_MONOLAYER_PRECISION = 0.85


def _tiny_folder(root):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    mask = np.zeros((64, 64), np.uint8)
    mask[10:40, 10:40] = 1
    img = np.full((64, 64, 3), (182, 175, 226), np.uint8)
    img[mask == 1] = (90, 170, 120)
    Image.fromarray(img).save(root / "images" / "a-1_1.png")
    Image.fromarray(mask).save(root / "masks" / "a-1_1.png")
    (root / "dataset.yaml").write_text(
        yaml.safe_dump({"label_values": {0: "other", 1: "monolayer", 2: "bilayer"}})
    )
    return root


def test_default_checkpoint_is_inside_the_model_package() -> None:
    assert DEFAULT_CHECKPOINT.name == "default.pt"
    assert DEFAULT_CHECKPOINT.parent.name == "weights"
    assert (
        DEFAULT_CHECKPOINT.parent.parent
        == checkpoint_module.Path(checkpoint_module.__file__).resolve().parent
    )


def test_evaluate_without_checkpoint_uses_the_default(tmp_path, monkeypatch) -> None:
    folder = _tiny_folder(tmp_path / "ds")
    torch.manual_seed(0)
    net = build_unet("tiny")
    fake_default = tmp_path / "weights" / "default.pt"
    save_checkpoint(fake_default, net, net.config)
    monkeypatch.setattr(checkpoint_module, "DEFAULT_CHECKPOINT", fake_default)
    result = CliRunner().invoke(
        app, ["evaluate", "--data", str(folder), "--json", str(tmp_path / "s.json")]
    )
    assert result.exit_code == 0, result.output
    assert "default" in result.output
    assert (tmp_path / "s.json").is_file()
    # and a missing default is a clear failure, not a traceback
    monkeypatch.setattr(checkpoint_module, "DEFAULT_CHECKPOINT", tmp_path / "none.pt")
    result = CliRunner().invoke(app, ["evaluate", "--data", str(folder)])
    assert result.exit_code != 0
    assert "none.pt" in result.output


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no shipped weights in this tree")
def test_shipped_weights_are_small_and_load() -> None:
    assert DEFAULT_CHECKPOINT.stat().st_size <= 10 * 1024 * 1024
    net, meta = load_checkpoint(DEFAULT_CHECKPOINT)
    assert meta.class_names == ("other", "monolayer", "bilayer")
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 3, 64, 64)


def test_shipped_model_reads_the_simulated_rigs_tiles(tmp_path) -> None:
    """Fresh tiles (a seed training never used) in the rig's own look, through the segmenter
    and flat-field correction the scanner uses: the shipped model must tell the layers apart
    there, or every simulated scan is wrong."""
    from conftest import fresh_tiles

    from model.metrics import confusion_matrix
    from scanner.flat_field import apply_flat_field, estimate_flat_field
    from scanner.scan_command import load_segmenter
    from scanner.scan_config import ModelConfig

    out = fresh_tiles(tmp_path / "rig", 12, 4242, tiles_per_chip=4, randomise=False)
    segmenter = load_segmenter(ModelConfig(batch_size=4))
    images = sorted((out / "images").glob("*.jpg"))
    frames = [np.asarray(Image.open(image)) for image in images]
    gain = estimate_flat_field(frames)  # as a scan estimates it from its own fields
    cm = np.zeros((3, 3), np.int64)
    for image, frame in zip(images, frames, strict=True):
        mask = np.asarray(Image.open(out / "masks" / f"{image.stem}.png"))
        _, labels = segmenter.predict(apply_flat_field(frame, gain))
        cm += confusion_matrix(mask, labels)
    recall = np.diag(cm) / cm.sum(axis=1)
    assert cm[1].sum() > 10_000 and cm[2].sum() > 5_000  # the tiles do hold both layers
    assert all(recall >= RIG_LOOK_MIN_RECALL), recall
    assert cm[1, 1] / cm[:, 1].sum() >= RIG_LOOK_MIN_MONOLAYER_PRECISION
