"""scripts/draw_predictions.py, finetune_experiment.py and bench_training.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from model.checkpoint import save_checkpoint
from model.data import load_dataset
from model.unet import build_unet

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _folder(root: Path, source: str | None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in ("a-1_1", "a-1_2", "b-2_1", "c-3_1"):
        mask = np.zeros((64, 64), np.uint8)
        mask[10:40, 10:40] = 1
        img = np.full((64, 64, 3), (182, 175, 226), np.uint8)
        img[mask == 1] = (90, 170, 120)
        Image.fromarray(img).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    meta = {"label_values": {0: "other", 1: "monolayer", 2: "bilayer"}}
    if source:
        meta["source"] = source
    (root / "dataset.yaml").write_text(yaml.safe_dump(meta))
    return root


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    net = build_unet("tiny")
    return save_checkpoint(tmp_path / "tiny.pt", net, net.config) and tmp_path / "tiny.pt"


def test_draw_predictions_keeps_real_images_out_of_the_repo(tmp_path, tiny_checkpoint) -> None:
    draw = _script("draw_predictions")
    real = _folder(tmp_path / "real", source=None)
    inside = draw.REPO_ROOT / "docs" / "should_not_exist.png"
    argv = ["--data", str(real), "--checkpoint", str(tiny_checkpoint), "-n", "2"]
    assert draw.main([*argv, "--out", str(inside)]) == 2
    assert not inside.exists()
    out = tmp_path / "figs" / "real.png"
    assert draw.main([*argv, "--out", str(out)]) == 0
    assert out.stat().st_size > 1000


def test_draw_predictions_may_draw_synthetic_data_anywhere(tmp_path, tiny_checkpoint) -> None:
    draw = _script("draw_predictions")
    synth = _folder(tmp_path / "synth", source="flakescan synth")
    assert draw.inside_repo(draw.REPO_ROOT / "docs" / "x.png")
    assert not draw.inside_repo(tmp_path / "x.png")
    out = tmp_path / "s.png"
    argv = ["--data", str(synth), "--checkpoint", str(tiny_checkpoint), "-n", "1"]
    assert draw.main([*argv, "--out", str(out)]) == 0


def test_finetune_split_links_whole_samples_outside_the_repo(tmp_path) -> None:
    ft = _script("finetune_experiment")
    ds = load_dataset(_folder(tmp_path / "real", source=None))
    out = ft.link_folder(ds, [0, 1], tmp_path / "work" / "train")
    linked = sorted(p.name for p in (out / "images").iterdir())
    assert linked == ["a-1_1.png", "a-1_2.png"]
    assert all(p.is_symlink() for p in (out / "images").iterdir())
    assert len(load_dataset(out)) == 2
    inside = ft.REPO_ROOT / "runs" / "ft-should-not-exist"
    assert ft.main(["--data", str(ds.root), "--work", str(inside)]) == 2
    assert not inside.exists()


def test_finetune_train_extra_lands_after_the_recipe(tmp_path, monkeypatch) -> None:
    ft = _script("finetune_experiment")
    calls: list[tuple[str, ...]] = []

    def record(*args: str) -> float:  # the real commands are tested in test_evaluate_cv.py
        calls.append(args)
        if args[0] == "evaluate":
            Path(args[args.index("--json") + 1]).write_text('{"mean_pixel_accuracy": 0.5}')
        return 0.0

    monkeypatch.setattr(ft, "flakescan", record)
    ds = load_dataset(_folder(tmp_path / "real", source=None))
    work = tmp_path / "work"
    extra = "--lr 1e-4 --lr-schedule cosine"
    args = ["--data", str(ds.root), "--work", str(work), "-n", "2", "--train-extra", extra]
    assert ft.main(args) == 0
    assert ft.main(["--data", str(ds.root), "--work", str(work), "-n", "2"]) == 2  # work exists
    (train,) = [c for c in calls if c[0] == "train"]
    # typer takes the last value of a repeated option: the variant's rate, not the recipe's
    assert train[train.index("--lr", train.index("--lr") + 1) + 1] == "1e-4"
    assert train[-4:-2] == ("--lr-schedule", "cosine") and train[-2] == "--init"
    summary = json.loads((work / "summary.json").read_text())
    assert summary["train_args"][-4:] == ["--lr", "1e-4", "--lr-schedule", "cosine"]


def test_bench_training_projects_a_recipe_from_its_measured_rate(monkeypatch, capsys) -> None:
    bench = _script("bench_training")
    monkeypatch.setattr("sys.argv", ["bench_training", "--recipes", "cpu", "--steps", "2"])
    monkeypatch.setattr(bench, "resolve_device", lambda name: torch.device("cpu"))
    bench.main()
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cpu "))
    _, preset, crop, batch, precision, rate, samples, run, unit = row.split()[:9]
    assert (preset, crop, batch, precision) == ("small", "256", "4", "fp32")
    rate = float(rate)
    assert rate > 0 and float(samples) == pytest.approx(4 * rate, abs=4 * 0.005 + 0.005)
    # 30 epochs of 48 steps at the measured rate. The rate is printed to ±0.005 steps/s and the
    # run to ±0.05: on a slow (loaded) machine the first moves the projection the most.
    minutes = 30 * 48 / 60
    scale = 1.0 if unit == "min" else 1 / 60
    slack = minutes * scale * 0.005 / (rate * (rate - 0.005)) + 0.05 + 1e-9
    assert abs(float(run) - minutes * scale / rate) <= slack
