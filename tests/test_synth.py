"""`flakescan synth`: a dataset folder of simulated tiles with masks that match them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import small_rig_config
from PIL import Image
from typer.testing import CliRunner

from drivers.simulated.synth import write_synthetic_dataset
from scanner.cli import app


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "set"
    return write_synthetic_dataset(small_rig_config(), out, count=10, seed=3, tiles_per_chip=5)


def test_dataset_folder_layout(dataset) -> None:
    images = sorted(p.stem for p in (dataset / "images").glob("*.jpg"))
    masks = sorted(p.stem for p in (dataset / "masks").glob("*.png"))
    assert images == masks and len(images) == 10
    meta = yaml.safe_load((dataset / "dataset.yaml").read_text())
    assert meta["label_values"] == {0: "other", 1: "monolayer", 2: "bilayer"}
    recipes = [json.loads(line) for line in (dataset / "metadata.jsonl").read_text().splitlines()]
    assert [r["stem"] for r in recipes] == images
    assert len({r["chip_seed"] for r in recipes}) == 2  # a new randomised chip every 5 tiles
    img = np.asarray(Image.open(dataset / "images" / f"{images[0]}.jpg"))
    mask = np.asarray(Image.open(dataset / "masks" / f"{images[0]}.png"))
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    assert mask.shape == (512, 512) and set(np.unique(mask)) <= {0, 1, 2}


def _colour_gap(img: np.ndarray, region: np.ndarray) -> float:
    return float(np.abs(img[region].mean(0) - img[~region].mean(0)).sum())


def test_masks_show_flakes_and_line_up_with_the_image(dataset) -> None:
    thin_pixels, aligned, shifted = 0, [], []
    for mask_path in sorted((dataset / "masks").glob("*.png")):
        mask = np.asarray(Image.open(mask_path))
        img = np.asarray(Image.open(dataset / "images" / f"{mask_path.stem}.jpg")).astype(float)
        thin = mask > 0
        thin_pixels += int(thin.sum())
        if thin.sum() < 500 or (~thin).sum() < 500:
            continue
        aligned.append(_colour_gap(img, thin))
        shifted.append(_colour_gap(img, np.roll(thin, 40, axis=1) & ~thin))
    assert thin_pixels > 10_000
    assert aligned and np.mean(aligned) > np.mean(shifted) + 3


def test_same_seed_same_dataset(tmp_path, dataset) -> None:
    again = write_synthetic_dataset(
        small_rig_config(), tmp_path / "again", count=10, seed=3, tiles_per_chip=5
    )
    for name in ("synth-00000.png", "synth-00007.png"):
        assert np.array_equal(
            np.asarray(Image.open(again / "masks" / name)),
            np.asarray(Image.open(dataset / "masks" / name)),
        )


def test_refuses_a_folder_with_files_and_leaves_them(tmp_path) -> None:
    keep = tmp_path / "mine.txt"
    keep.write_text("a week of labels")
    with pytest.raises(FileExistsError, match="not empty"):
        write_synthetic_dataset(small_rig_config(), tmp_path, count=2)
    assert keep.read_text() == "a week of labels"
    assert not (tmp_path / "images").exists()


def test_cli_synth_and_check(tmp_path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli-set"
    result = runner.invoke(
        app,
        [
            "synth",
            "--config",
            "configs/simulated.yaml",
            "--out",
            str(out),
            "--count",
            "3",
            "--seed",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(list((out / "images").glob("*.jpg"))) == 3
    again = runner.invoke(
        app, ["synth", "--config", "configs/simulated.yaml", "--out", str(out), "--count", "3"]
    )
    assert again.exit_code == 2 and "not empty" in again.output
    checked = runner.invoke(app, ["check", "configs/simulated.yaml"])
    assert checked.exit_code == 0 and "rig ready" in checked.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("camera: {exposure_ms: 0}\n")
    failed = runner.invoke(app, ["check", str(bad)])
    assert failed.exit_code == 2 and "camera.exposure_ms" in failed.output


def test_tiles_seek_out_residue_and_debris_as_well_as_flakes(tmp_path) -> None:
    from drivers.simulated.optics import RESIDUE_CODE
    from drivers.simulated.rig import simulated_rig
    from drivers.simulated.synth import randomised_chip

    out = write_synthetic_dataset(
        small_rig_config(), tmp_path / "s", count=40, seed=5, tiles_per_chip=40
    )
    recipes = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    targets = {r["target"] for r in recipes}
    assert {"flake", "debris", "residue"} <= targets
    # a residue tile is centred near residue on its chip
    r = next(r for r in recipes if r["target"] == "residue")
    rng = np.random.default_rng(5)  # replay synth's draws for its first chip
    assert int(rng.integers(2**31)) == r["chip_seed"]
    cfg = randomised_chip(small_rig_config(), rng, r["chip_seed"])

    with simulated_rig(cfg) as core:
        film = [p.polygon for p in core.simulation.world.pieces if p.code == RESIDUE_CODE]
    import shapely

    assert min(shapely.Point(r["x_um"], r["y_um"]).distance(p) for p in film) < 40


def test_cli_synth_rig_look_keeps_the_configs_lamp_and_camera(tmp_path) -> None:
    from drivers.simulated.config import load_simulated_config

    base = load_simulated_config("configs/simulated.yaml")
    runner = CliRunner()
    sets = {}
    for flag in ([], ["--rig-look"]):
        out = tmp_path / ("rig" if flag else "rand")
        args = ["synth", "--config", "configs/simulated.yaml", "--out", str(out), "--count", "4"]
        result = runner.invoke(app, [*args, "--tiles-per-chip", "2", *flag])
        assert result.exit_code == 0, result.output
        lines = (out / "metadata.jsonl").read_text().splitlines()
        sets[bool(flag)] = [json.loads(line) for line in lines]
    assert "rig's own look" in result.output
    for r in sets[True]:
        assert r["lamp_kelvin"] == pytest.approx(base.optics.lamp_kelvin, abs=0.1)
        assert r["gamma"] == pytest.approx(base.optics.gamma, abs=1e-3)
        assert r["exposure_ms"] == pytest.approx(base.camera.exposure_ms, abs=0.01)
    assert any(abs(r["lamp_kelvin"] - base.optics.lamp_kelvin) > 1 for r in sets[False])


def test_cvd_share_grows_films_that_fill_the_field(tmp_path) -> None:
    def substrate_share(out) -> float:
        masks = sorted((out / "masks").glob("*.png"))
        return float(np.mean([(np.asarray(Image.open(m)) == 0).mean() for m in masks]))

    cfg = small_rig_config()
    kw = {"count": 16, "seed": 3, "tiles_per_chip": 4}
    cvd = write_synthetic_dataset(cfg, tmp_path / "cvd", cvd_share=1.0, **kw)
    plain = write_synthetic_dataset(cfg, tmp_path / "exf", **kw)
    growth = [json.loads(line)["growth"] for line in (cvd / "metadata.jsonl").open()]
    assert growth == ["cvd"] * 16
    assert "CVD" in (cvd / "dataset.yaml").read_text()
    assert "CVD" not in (plain / "dataset.yaml").read_text()
    # dense grown triangles cover far more of a field than exfoliated terraces
    assert substrate_share(cvd) < substrate_share(plain) - 0.15


def test_cvd_share_outside_0_1_or_with_the_rig_look_is_refused_before_writing(tmp_path) -> None:
    with pytest.raises(ValueError, match="cvd_share"):
        write_synthetic_dataset(small_rig_config(), tmp_path / "s", count=2, cvd_share=1.5)
    with pytest.raises(ValueError, match="cvd_share"):
        write_synthetic_dataset(
            small_rig_config(), tmp_path / "s", count=2, cvd_share=0.5, randomise=False
        )
    assert not (tmp_path / "s" / "images").exists()


def test_cli_synth_cvd_share(tmp_path) -> None:
    runner = CliRunner()
    base = ["synth", "--config", "configs/simulated.yaml", "--count", "2", "--tiles-per-chip", "1"]
    out = tmp_path / "cvd"
    result = runner.invoke(app, [*base, "--out", str(out), "--cvd-share", "1"])
    assert result.exit_code == 0, result.output
    growth = {json.loads(line)["growth"] for line in (out / "metadata.jsonl").open()}
    assert growth == {"cvd"}
    refused = runner.invoke(app, [*base, "--out", str(tmp_path / "x"), "--cvd-share", "2"])
    assert refused.exit_code == 2 and "cvd-share" in refused.output
    assert not (tmp_path / "x").exists()
    both = runner.invoke(
        app, [*base, "--out", str(tmp_path / "y"), "--cvd-share", "0.5", "--rig-look"]
    )
    assert both.exit_code == 2 and "--rig-look" in both.output
    assert not (tmp_path / "y").exists()


def test_transparent_share_grows_cvd_on_quartz_or_sapphire_brighter_than_the_ground(
    tmp_path,
) -> None:
    kw = {"count": 16, "seed": 3, "tiles_per_chip": 2}
    out = write_synthetic_dataset(small_rig_config(), tmp_path / "t", transparent_share=1.0, **kw)
    meta = [json.loads(line) for line in (out / "metadata.jsonl").open()]
    assert {m["growth"] for m in meta} == {"cvd"}
    assert {m["substrate"] for m in meta} == {"quartz", "sapphire"}
    card = (out / "dataset.yaml").read_text()
    assert "quartz" in card and "SiO2/Si" not in card and "transparent_share: 1.0" in card
    brighter = 0
    for m in meta:
        image = np.asarray(Image.open(out / "images" / f"{m['stem']}.jpg"), dtype=float)
        mask = np.asarray(Image.open(out / "masks" / f"{m['stem']}.png"))
        if (mask == 0).mean() > 0.1 and (mask == 1).mean() > 0.05:
            brighter += np.median(image[mask == 1], 0)[0] > np.median(image[mask == 0], 0)[0]
    assert brighter >= 8  # the monolayer outshines the substrate in red, unlike on SiO2/Si
    plain = write_synthetic_dataset(small_rig_config(), tmp_path / "p", **kw)
    assert {json.loads(line)["substrate"] for line in (plain / "metadata.jsonl").open()} == {
        "sio2_si"
    }


def test_transparent_share_is_refused_outside_0_1_or_with_the_rig_look(tmp_path) -> None:
    with pytest.raises(ValueError, match="transparent_share"):
        write_synthetic_dataset(small_rig_config(), tmp_path / "s", count=2, transparent_share=-1)
    with pytest.raises(ValueError, match="transparent_share"):
        write_synthetic_dataset(
            small_rig_config(), tmp_path / "s", count=2, transparent_share=0.5, randomise=False
        )
    assert not (tmp_path / "s" / "images").exists()
    runner = CliRunner()
    base = ["synth", "--config", "configs/simulated.yaml", "--count", "2", "--tiles-per-chip", "1"]
    out = tmp_path / "q"
    assert runner.invoke(app, [*base, "--out", str(out), "--transparent-share", "1"]).exit_code == 0
    assert {json.loads(line)["substrate"] for line in (out / "metadata.jsonl").open()} <= {
        "quartz",
        "sapphire",
    }
    both = runner.invoke(
        app, [*base, "--out", str(tmp_path / "y"), "--transparent-share", "0.5", "--rig-look"]
    )
    assert both.exit_code == 2 and "--rig-look" in both.output
    assert not (tmp_path / "y").exists()


def test_glare_max_adds_veiling_glare_per_chip_and_zero_keeps_none(tmp_path) -> None:
    kw = {"count": 8, "seed": 3, "tiles_per_chip": 2}
    glary = write_synthetic_dataset(small_rig_config(), tmp_path / "g", glare_max=0.4, **kw)
    plain = write_synthetic_dataset(small_rig_config(), tmp_path / "p", **kw)

    def glare(out) -> list[float]:
        return [json.loads(line)["veiling_glare"] for line in (out / "metadata.jsonl").open()]

    assert all(0 <= g <= 0.4 for g in glare(glary)) and len(set(glare(glary))) == 4
    assert set(glare(plain)) == {0.0}
    with pytest.raises(ValueError, match="glare_max"):
        write_synthetic_dataset(small_rig_config(), tmp_path / "x", count=1, glare_max=1.5)
    with pytest.raises(ValueError, match="glare_max needs randomised chips"):
        write_synthetic_dataset(
            small_rig_config(), tmp_path / "x", count=1, glare_max=0.4, randomise=False
        )
    assert not (tmp_path / "x").exists()
    both = CliRunner().invoke(
        app,
        [
            "synth",
            "--config",
            "configs/simulated.yaml",
            "--count",
            "1",
            "--out",
            str(tmp_path / "y"),
            "--glare-max",
            "0.4",
            "--rig-look",
        ],
    )
    assert both.exit_code == 2 and "--glare-max" in both.output and "--rig-look" in both.output
    assert not (tmp_path / "y").exists()
