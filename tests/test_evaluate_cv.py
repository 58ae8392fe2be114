"""Evaluation output anyone can re-score, cross-validation by sample, and the model commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from structlog.testing import capture_logs
from typer.testing import CliRunner

from model.cv import cross_validate, subset_by_sample
from model.data import load_dataset
from model.evaluate import evaluate
from model.metrics import confusion_matrix, mean_pixel_accuracy
from model.segmenter import Segmenter
from model.train import TrainConfig
from model.unet import build_unet
from scanner.cli import app


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six images of three 'samples', of two sizes, with raw mask value 3 meaning 'other'."""
    root = tmp_path_factory.mktemp("ds")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for k, stem in enumerate(
        ["train-1_1", "train-1_2", "train-2_1", "train-2_2", "test-3_1", "test-3_2"]
    ):
        h, w = (70, 90) if k % 2 else (64, 64)
        mask = np.zeros((h, w), np.uint8)
        mask[10:40, 10:40] = 1
        mask[40:55, 10:30] = 2
        mask[0:5, :] = 3
        img = np.full((h, w, 3), (182, 175, 226), np.uint8)
        img[mask == 1] = (90, 170, 120)
        img[mask == 2] = (30, 60, 250)
        img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    (root / "dataset.yaml").write_text(
        yaml.safe_dump({"label_values": {0: "other", 1: "monolayer", 2: "bilayer", 3: "other"}})
    )
    return root


def test_predicted_masks_are_pngs_at_image_size_and_rescore_the_same(folder, tmp_path) -> None:
    ds = load_dataset(folder)
    torch.manual_seed(0)
    seg = Segmenter(build_unet("tiny"), batch_size=2, window=64, overlap=16)
    scores = evaluate(seg, ds, pred_out=tmp_path / "pred", plots=tmp_path / "plots")
    cm = np.zeros((3, 3), np.int64)
    for sample in ds.samples:
        pred = np.asarray(Image.open(tmp_path / "pred" / f"{sample.stem}.png"))
        truth = ds.read_mask(sample)
        assert pred.shape == truth.shape and pred.dtype == np.uint8
        assert set(np.unique(pred)) <= {0, 1, 2}
        cm += confusion_matrix(truth, pred)
    # an independent re-scoring of the written masks gives the reported number
    assert mean_pixel_accuracy(cm) == pytest.approx(scores.mean_pixel_accuracy)
    assert (tmp_path / "plots" / "roc.png").is_file()


def test_subset_takes_whole_samples(folder) -> None:
    ds = load_dataset(folder)
    chosen = subset_by_sample(ds, 4, seed=1)
    ids = [ds.samples[i].sample_id for i in chosen]
    assert len(chosen) == 4
    assert all(ids.count(i) == 2 for i in set(ids))
    # an odd count rounds up to whole samples rather than cutting one in two
    odd = subset_by_sample(ds, 3, seed=1)
    odd_ids = [ds.samples[i].sample_id for i in odd]
    assert len(odd) == 4 and all(odd_ids.count(i) == 2 for i in set(odd_ids))


@pytest.mark.parametrize("split_other", [False, True])
def test_cross_validation_scores_every_fold(folder, split_other: bool) -> None:
    """With split_other the nets learn raw 3 apart and are still scored on the three classes."""
    ds = load_dataset(folder)
    cfg = TrainConfig(
        preset="tiny",
        epochs=1,
        samples_per_epoch=4,
        crop=32,
        batch_size=2,
        augment="none",
        split_other=split_other,
    )
    with capture_logs() as logs:
        results = cross_validate(ds, cfg, augments=("none", "contrast"), folds=3)
    weighted = [e for e in logs if e["event"] == "train.class_weights"]
    assert len(weighted) == 6 and all(("other_2" in e) == split_other for e in weighted)
    assert [(r.augment, r.loss) for r in results] == [
        ("none", "weighted"),
        ("contrast", "weighted"),
    ]
    for r in results:
        assert len(r.folds) == 3
        assert sum(s.n_images for s in r.folds) == 6  # every image validated exactly once
        mean, std = r.mean("mean_pixel_accuracy")
        assert 0 <= mean <= 1 and std >= 0


def test_model_commands(folder, tmp_path) -> None:
    runner = CliRunner()
    ckpt = tmp_path / "m.pt"
    args = [
        "train",
        "--data",
        str(folder),
        "--out",
        str(ckpt),
        "--preset",
        "tiny",
        "--epochs",
        "1",
        "--samples-per-epoch",
        "4",
        "--crop",
        "32",
        "--augment",
        "none",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = torch.load(ckpt, weights_only=True)["meta"]
    assert meta["training"]["datasets"][0]["images"] == 6
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "exists" in again.output
    scored = runner.invoke(
        app,
        [
            "evaluate",
            "--data",
            str(folder),
            "--checkpoint",
            str(ckpt),
            "--json",
            str(tmp_path / "s.json"),
        ],
    )
    assert scored.exit_code == 0, scored.output
    written = json.loads((tmp_path / "s.json").read_text())
    assert "mean_pixel_accuracy" in written
    assert len(written["per_image"]) == 6  # every image's own confusion matrix, by stem
    worst = scored.output.split("worst images")[1].strip().splitlines()[2:]
    assert len(worst) == 5 and all(line.split()[0] in written["per_image"] for line in worst)
    quiet = runner.invoke(
        app, ["evaluate", "--data", str(folder), "--checkpoint", str(ckpt), "--worst", "0"]
    )
    assert quiet.exit_code == 0 and "worst images" not in quiet.output
    missing = runner.invoke(
        app, ["evaluate", "--data", str(folder), "--checkpoint", str(tmp_path / "nope.pt")]
    )
    assert missing.exit_code == 2 and "nope.pt" in missing.output
    unknown = runner.invoke(
        app, ["evaluate", "--data", str(folder), "--checkpoint", str(ckpt), "--reference", "x"]
    )
    assert unknown.exit_code == 2 and "'x'" in unknown.output and "hue" in unknown.output
    bad_data = runner.invoke(
        app, ["evaluate", "--data", str(tmp_path / "none"), "--checkpoint", str(ckpt)]
    )
    assert bad_data.exit_code == 2


def test_lab_gpu_recipe_trains_the_wide_lab_net(folder, tmp_path) -> None:
    ckpt = tmp_path / "wide.pt"
    args = ["train", "--data", str(folder), "--out", str(ckpt), "--recipe", "lab-gpu"]
    args += ["--epochs", "1", "--samples-per-epoch", "2", "--crop", "32", "--augment", "none"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "expect hours" in result.output  # a net meant for a GPU, on the CPU
    meta = torch.load(ckpt, weights_only=True)["meta"]
    assert meta["config"]["width"] == 32
    assert meta["config"]["input_raw"] and meta["config"]["contrast_reference"] == "median"
    assert meta["training"]["config"]["lr_schedule"] == "cosine"
    assert meta["training"]["config"]["epochs"] == 1  # the command line over the recipe


def test_lab_recipe_trains_a_colour_aware_net_on_a_cosine_schedule(folder, tmp_path) -> None:
    """`--recipe lab` is the recipe for a lab's own images: the checkpoint records the raw-colour
    net and the cosine rate, and it segments at any image size like any other checkpoint."""
    runner = CliRunner()
    ckpt = tmp_path / "lab.pt"
    args = ["train", "--data", str(folder), "--out", str(ckpt), "--recipe", "lab"]
    args += ["--epochs", "1", "--samples-per-epoch", "4", "--crop", "32", "--augment", "none"]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "expect hours" not in result.output  # the CPU recipe
    meta = torch.load(ckpt, weights_only=True)["meta"]
    assert meta["config"]["input_raw"] and meta["config"]["input_contrast"]
    assert meta["training"]["config"]["lr_schedule"] == "cosine"
    # split other is opt-in: raw 3 ("other": thick) is learnt with the substrate
    assert meta["config"]["other_outputs"] == 1
    assert len(meta["training"]["class_weights"]) == 3
    segmenter = Segmenter.from_checkpoint(ckpt, device="cpu")
    probs, labels = segmenter.predict(np.zeros((1, 70, 90, 3), np.uint8))
    assert probs.shape == (1, 3, 70, 90) and labels.shape == (1, 70, 90)
    # Fine-tuning it keeps its net, and the checkpoint says so, whatever the recipe's preset.
    tuned = tmp_path / "tuned.pt"
    short = ["--epochs", "1", "--samples-per-epoch", "4", "--crop", "32"]
    result = runner.invoke(
        app, ["train", "--data", str(folder), "--out", str(tuned), "--init", str(ckpt), *short]
    )
    assert result.exit_code == 0, result.output
    assert torch.load(tuned, weights_only=True)["meta"]["training"]["config"]["preset"] == (
        "small-lab"
    )
    clash_args = ["train", "--data", str(folder), "--out", str(tmp_path / "x.pt")]
    clash = runner.invoke(app, [*clash_args, "--init", str(ckpt), "--preset", "tiny", *short])
    assert clash.exit_code == 2 and "does not match" in clash.output, clash.output
    # With --split-other raw 3 gets an output and a weight of its own; fine-tuning keeps them
    # and refuses to drop them.
    split = tmp_path / "split.pt"
    result = runner.invoke(app, [*args[:4], str(split), *args[5:], "--split-other"])
    assert result.exit_code == 0, result.output
    split_meta = torch.load(split, weights_only=True)["meta"]
    assert split_meta["config"]["other_outputs"] == 2
    assert len(split_meta["training"]["class_weights"]) == 4
    tuned_split = tmp_path / "tuned-split.pt"
    init_split = ["train", "--data", str(folder), "--init", str(split), *short]
    result = runner.invoke(app, [*init_split, "--out", str(tuned_split)])
    assert result.exit_code == 0, result.output
    assert torch.load(tuned_split, weights_only=True)["meta"]["config"]["other_outputs"] == 2
    clash = runner.invoke(app, [*clash_args, "--init", str(split), "--no-split-other", *short])
    assert clash.exit_code == 2 and "output(s) for `other`" in clash.output, clash.output
    assert not (tmp_path / "x.pt").exists()


def test_fine_tuning_a_bright_net_trains_it_against_the_reference_it_is_read_with(
    folder, tmp_path
) -> None:
    """The Segmenter reads `bright` nets against `hue`; `--init` fine-tunes them against it too,
    says so, and the checkpoint records `hue`. Other nets keep their rule."""
    from model.checkpoint import save_checkpoint
    from model.unet.model import UNetConfig, build_unet

    runner = CliRunner()
    short = ["--epochs", "1", "--samples-per-epoch", "4", "--crop", "32", "--augment", "none"]
    for rule, after in (("bright", "hue"), ("median", "median")):
        config = UNetConfig(width=4, depth=2, input_contrast=True, contrast_reference=rule)
        start, tuned = tmp_path / f"{rule}.pt", tmp_path / f"{rule}-tuned.pt"
        save_checkpoint(start, build_unet(config), config)
        args = ["train", "--data", str(folder), "--init", str(start), "--out", str(tuned)]
        result = runner.invoke(app, [*args, *short])
        assert result.exit_code == 0, result.output
        assert ("against the `hue` contrast reference" in result.output) is (rule == "bright")
        assert torch.load(tuned, weights_only=True)["meta"]["config"]["contrast_reference"] == after
        assert Segmenter.from_checkpoint(tuned).reference == after


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--recipe", "fast"], "unknown recipe 'fast'"), (["--lr-schedule", "linear"], "lr_schedule")],
)
def test_cv_refuses_an_unknown_recipe_or_schedule(folder, extra, message) -> None:
    result = CliRunner().invoke(app, ["cv", "--data", str(folder), *extra])
    assert result.exit_code == 2 and message in result.output, result.output


def _relabelled(folder, out, raw_other: int | None):
    """A copy of `folder` whose thick label (raw 3) becomes `raw_other`, or substrate if None."""
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    labels = {0: "other", 1: "monolayer", 2: "bilayer"}
    if raw_other is not None:
        labels[raw_other] = "other"
    for image in (folder / "images").iterdir():
        (out / "images" / image.name).write_bytes(image.read_bytes())
        mask = np.array(Image.open(folder / "masks" / image.name))
        mask[mask == 3] = 0 if raw_other is None else raw_other
        Image.fromarray(mask).save(out / "masks" / image.name)
    (out / "dataset.yaml").write_text(yaml.safe_dump({"label_values": labels}))
    return out


def test_split_other_needs_data_labelled_alike_and_fine_tunes_on_plain_labels(
    folder, tmp_path
) -> None:
    runner = CliRunner()
    short = ["--epochs", "1", "--samples-per-epoch", "4", "--crop", "32", "--augment", "none"]
    four = _relabelled(folder, tmp_path / "four", 4)
    lab = ["--recipe", "lab", "--split-other", *short]
    mixed = ["train", "--data", str(folder), "--data", str(four), *lab]
    result = runner.invoke(app, [*mixed, "--out", str(tmp_path / "mixed.pt")])
    assert result.exit_code == 2 and "different raw values" in result.output, result.output
    assert not (tmp_path / "mixed.pt").exists()

    split = tmp_path / "split.pt"
    args = ["train", "--data", str(folder), "--out", str(split), *lab]
    assert runner.invoke(app, args).exit_code == 0
    assert torch.load(split, weights_only=True)["meta"]["training"]["other_values"] == [0, 3]
    # The split net learnt raw 3 apart; data calling thick material 4 would teach it otherwise.
    relabel = ["train", "--data", str(four), "--init", str(split), *short]
    result = runner.invoke(app, [*relabel, "--out", str(tmp_path / "four.pt")])
    assert result.exit_code == 2 and "raw values [0, 3]" in result.output, result.output
    # A lab's labels without thick: the thick output gets no targets (weight 0), and the
    # plain posterior, which scans use, still divides the weights out.
    plain = _relabelled(folder, tmp_path / "plain", None)
    tuned = tmp_path / "tuned.pt"
    args = ["train", "--data", str(plain), "--init", str(split), "--out", str(tuned), *short]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    weights = torch.load(tuned, weights_only=True)["meta"]["training"]["class_weights"]
    assert len(weights) == 4 and weights[3] == 0
    segmenter = Segmenter.from_checkpoint(tuned, device="cpu", plain_posterior=True)
    probs, _ = segmenter.predict(np.zeros((64, 64, 3), np.uint8))
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
