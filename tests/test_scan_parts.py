"""The scan's parts on their own: blur judgement, config, journal, store, and the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import yaml
from conftest import small_rig_config
from typer.testing import CliRunner

from drivers.configfile import ConfigError
from drivers.rigs import open_rig
from scanner.cli import app
from scanner.flakes import PixelToStage, extract_flakes
from scanner.focus import edge_blur_px
from scanner.journal import (
    Journal,
    JournalError,
    read_journal,
    tile_flake_from_json,
    tile_flake_to_json,
)
from scanner.scan_config import load_scan_config
from scanner.scan_store import MosaicGrid, ScanStore

REPO = Path(__file__).resolve().parents[1]


def test_edge_blur_grows_with_defocus_and_is_silent_on_bare_oxide(make_core) -> None:
    core = make_core(small_rig_config(flakes={"thin_flakes_per_mm2": 40}))
    world = core.simulation.world
    flake = max(
        (f for f in world.flakes if f.layer_class == "monolayer"), key=lambda f: f.polygon.area
    )
    c = flake.polygon.centroid
    core.setXYPosition(c.x, c.y)
    z0 = world.focus_z_um(c.x, c.y)
    widths = []
    for dz in (0.0, 0.25, 0.5, 1.0):
        core.setPosition(z0 + dz)
        core.snapImage()
        widths.append(edge_blur_px(core.getImage()))
    assert widths[0] < 2.0 < 2.8 < widths[2]
    assert widths == sorted(widths)
    # bare oxide: noise only, nothing to judge
    core.setXYPosition(-500, -500)  # off the chip: the flat stage insert
    core.snapImage()
    assert edge_blur_px(core.getImage()) is None
    with pytest.raises(ValueError, match="too small"):
        edge_blur_px(np.zeros((40, 40, 3), np.uint8))


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_scan_section_errors_name_the_field_and_the_rig_ignores_it(tmp_path) -> None:
    bad = _write(tmp_path / "bad.yaml", {"rig": "simulated", "scan": {"overlap": 0.9}})
    with pytest.raises(ConfigError, match=r"scan\.overlap"):
        load_scan_config(bad)
    typo = _write(tmp_path / "typo.yaml", {"scan": {"focus": {"point": 5}}})
    with pytest.raises(ConfigError, match=r"scan\.focus\.point"):
        load_scan_config(typo)
    rel = _write(tmp_path / "rel.yaml", {"scan": {"model": {"checkpoint": "m/x.pt"}}})
    assert load_scan_config(rel).model.checkpoint == tmp_path / "m" / "x.pt"
    # the rig side reads the same file without tripping over the scan section
    good = _write(tmp_path / "good.yaml", {"rig": "simulated", "scan": {"overlap": 0.2}})
    with open_rig(good) as core:
        assert core.getXYStageDevice()
    assert load_scan_config(REPO / "configs" / "simulated-small.yaml").focus.points == 9


def test_journal_round_trips_pieces_and_ignores_a_torn_last_line(tmp_path) -> None:
    labels = np.zeros((64, 64), np.uint8)
    labels[10:30, 20:50] = 1
    probs = np.stack([1.0 - labels, labels.astype(float), np.zeros_like(labels, float)])
    to_stage = PixelToStage.from_calibration((100.0, 200.0), (64, 64), 0.15)
    (piece,) = extract_flakes(labels, probs, to_stage, tile=3)
    path = tmp_path / "journal.jsonl"
    with Journal(path) as j:
        j.write("start", version=1, plan_digest="abc")
        j.write(
            "field",
            index=0,
            name="r000c000",
            ok=True,
            views={"3": to_stage.footprint().wkb_hex},
            flakes=[tile_flake_to_json(piece)],
        )
        j.write("field", index=1, name="r000c001", ok=False, error="stage did not arrive")
    with open(path, "a") as f:
        f.write('{"kind": "field", "index": 2, "na')  # killed mid-write
    state = read_journal(path)
    assert state.done() == {0} and set(state.fields) == {0, 1}
    (back,) = state.tile_flakes()
    assert back.polygon.equals_exact(piece.polygon, 0) and back.tile == 3
    assert tile_flake_from_json(tile_flake_to_json(piece), {3: piece.field_of_view}) == back
    # resuming appends after the torn line is cut, so the next resume reads it cleanly
    with Journal(path) as j:
        j.write("resumed", at="now")
    assert read_journal(path).done() == {0}
    assert path.read_text().splitlines()[-1] == '{"kind":"resumed","at":"now"}'
    # damage before the last line is not a torn write: refuse rather than guess
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(JournalError, match="damaged"):
        read_journal(path)


def test_store_pastes_tiles_into_the_overview_at_their_stage_place(tmp_path) -> None:
    grid = MosaicGrid.covering((0.0, 0.0, 200.0, 100.0), 1.0)
    store = ScanStore.create(
        tmp_path / "s.zarr",
        n_fields=2,
        tiles_per_field=1,
        tile_shape=(64, 64),
        mosaic=grid,
        attrs={},
    )
    tile = np.zeros((64, 64, 3), np.uint8)
    tile[:32] = 200  # rows 0..31: the low-y half of the tile (rows run along +y)
    to_stage = PixelToStage.from_calibration((50.0, 50.0), (64, 64), 0.5)  # 32 µm square
    store.write_field(0, [(tile, np.ones((64, 64), np.uint8), to_stage)])
    over = store.overview[0]
    assert over[40, 50] == 200 and over[60, 50] == 0  # y 40 lit, y 60 dark
    assert over[50, 30] == 0  # left of the tile: never written
    assert store.field_status[:].tolist() == [1, 0]
    assert store.finish_overview() == 1  # 200 px wide: one level is enough
    assert store.group["overview"].attrs["ome"]["multiscales"][0]["datasets"][0]["path"] == "0"
    with pytest.raises(FileExistsError):
        ScanStore.create(
            tmp_path / "s.zarr",
            n_fields=1,
            tiles_per_field=1,
            tile_shape=(64, 64),
            mosaic=grid,
            attrs={},
        )


def test_the_scan_command_scans_and_prints_the_score(tmp_path) -> None:
    rig = yaml.safe_load((REPO / "configs" / "simulated-small.yaml").read_text())
    rig["scan"]["chip"] = {"corners_um": [[300, 300], [440, 440]]}
    rig["scan"]["focus"] = {"strategy": "none"}
    config = _write(tmp_path / "demo.yaml", rig)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["scan", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "score against the simulated world" in result.output
    assert "4 done, 0 failed of 4" in result.output
    for name in ("flakes.json", "truth.json", "overview.png", "summary.json", "scan.zarr"):
        assert (out / name).exists(), name
    assert json.loads((out / "summary.json").read_text())["fields_done"] == 4
    # a second run into the same folder is refused and leaves it as it was
    before = (out / "flakes.json").read_bytes()
    again = CliRunner().invoke(app, ["scan", str(config), "--out", str(out)])
    assert again.exit_code != 0 and "--resume" in again.output
    assert (out / "flakes.json").read_bytes() == before


def test_a_real_rig_scan_needs_a_chip_outline_and_the_rig_limits(core, tmp_path) -> None:
    from model.segmenter import Segmenter
    from model.unet import build_unet
    from scanner.acquisition import StageLimits
    from scanner.scan import Scan, ScanError
    from scanner.scan_command import rig_limits
    from scanner.scan_config import ScanConfig

    segmenter = Segmenter(build_unet("tiny"))
    limits = StageLimits((0, 1), (0, 1), 2000)
    with pytest.raises(ScanError, match="no chip outline"):
        Scan(core, ScanConfig(), tmp_path / "s", segmenter=segmenter, limits=limits)
    # a Micro-Manager rig's limits come from its YAML
    (tmp_path / "rig.cfg").write_text("# empty\n")
    rig = _write(
        tmp_path / "rig.yaml",
        {
            "rig": "micromanager",
            "mm_config": "rig.cfg",
            "safe_z_um": 4200,
            "x_limits_um": [-100, 100],
            "y_limits_um": [-50, 50],
            "scan": {"chip": {"corners_um": [[0, 0], [10, 10]]}},
        },
    )

    class _RealCore:  # a core without a simulation: what open_rig gives for a real rig
        pass

    got = rig_limits(rig, _RealCore())  # type: ignore[arg-type]
    assert got == StageLimits((-100, 100), (-50, 50), 4200)


def test_the_field_of_view_of_a_turned_camera_is_the_rectangle_it_sees_whole() -> None:
    from scanner.scan import field_of_view_um

    for deg, flip in ((0, False), (90, False), (180, True), (-90, True)):
        frame = PixelToStage.from_calibration((0, 0), (400, 600), 0.1, deg, flip)
        w, h = field_of_view_um(frame)
        assert (w, h) == pytest.approx((40, 60) if deg % 180 else (60, 40))
    square = PixelToStage.from_calibration((0, 0), (512, 512), 0.15, 30.0)
    w, h = field_of_view_um(square)
    assert w == pytest.approx(76.8 / (np.cos(np.radians(30)) + np.sin(np.radians(30))))
    assert square.footprint().contains(shapely.box(-w / 2, -h / 2, w / 2, h / 2).buffer(-1e-9))


def test_a_cfg_with_only_a_pixel_size_is_planned_from_the_pixel_size(core, tmp_path) -> None:
    from model.segmenter import Segmenter
    from model.unet import build_unet
    from scanner.acquisition import StageLimits
    from scanner.plan import ChipOutline
    from scanner.scan import Scan
    from scanner.scan_config import ScanConfig

    # what a .cfg with PixelSize_um but no PixelSizeAffine gives: the identity affine
    core.setPixelSizeAffine(core.getCurrentPixelSizeConfig(), [1.0, 0, 0, 0, 1.0, 0])
    cfg = ScanConfig(chip=ChipOutline(corners_um=((0, 0), (300, 300))))
    scan = Scan(
        core,
        cfg,
        tmp_path / "s",
        segmenter=Segmenter(build_unet("tiny")),
        limits=StageLimits((-1e4, 1e4), (-1e4, 1e4), 2000),
    )
    fields, frame = scan.plan()
    assert frame.pixel_size_um == pytest.approx(0.15)
    assert len(fields) == 25  # 77 µm fields at 10 % overlap over 300 µm, not 512 µm ones
