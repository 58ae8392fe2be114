"""Whole scans of small simulated chips, end to end, with the shipped model.

Each test drives the simulated rig through the same `Scan` the `flakescan scan` command runs:
plan, focus map, acquisition, inference, flake extraction and merge, zarr, journal, pictures.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
import zarr
from conftest import small_rig_config
from shapely.geometry import Polygon

from drivers.simulated import SimulatedRigConfig
from model.segmenter import Segmenter
from scanner.acquisition import StageLimits
from scanner.flakemap import read_flake_map
from scanner.flat_field import read_flat_field, write_flat_field
from scanner.focus import edge_blur_px
from scanner.journal import JournalError, read_journal
from scanner.plan import ChipOutline
from scanner.scan import Scan, ScanError, ScanProgress
from scanner.scan_command import load_segmenter
from scanner.scan_config import FlatFieldConfig, FocusConfig, ModelConfig, ScanConfig
from scanner.scan_store import DONE, FAILED, ScanStore
from scanner.truth import simulated_truth

FOV_UM = 76.8


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return load_segmenter(ModelConfig())  # the shipped model, as a scan loads it


def _limits(cfg: SimulatedRigConfig) -> StageLimits:
    return StageLimits(
        cfg.xy_stage.x_limits_um,
        cfg.xy_stage.y_limits_um,
        cfg.focus_drive.safe_z_um,
        cfg.focus_drive.lower_limit_um,
    )


def _scan(core, scan_cfg: ScanConfig, out: Path, segmenter, **kwargs):
    cfg = core.simulation.cfg
    assert scan_cfg.chip is not None
    scan = Scan(
        core,
        scan_cfg,
        out,
        segmenter=segmenter,
        limits=_limits(cfg),
        truth=simulated_truth(core, scan_cfg.chip, scan_cfg.chip.bounds[:2]),
        **kwargs,
    )
    return scan, asyncio.run(scan.run())


def _journal_lines(out: Path) -> list[dict]:
    """Every line of a scan folder's journal, as written."""
    return [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines()]


def _region(x0: float, y0: float, x1: float, y1: float, **kw) -> ScanConfig:
    return ScanConfig(chip=ChipOutline(corners_um=((x0, y0), (x1, y1))), **kw)


# Focus at the true surface is found by the survey; tests that are not about focus skip it
# and start at the surface's height in the middle of the region.
_FIXED = FocusConfig(strategy="none", refocus_max_edge_blur_px=None)


#: a chip with nothing on it: no flakes, debris, residue or dust
_BARE = {
    "thin_flakes_per_mm2": 0,
    "bulk_pieces_per_mm2": 0,
    "residue_per_mm2": 0,
    "dust_per_mm2": 0,
}


def _assert_no_flake_twice(records: list[dict]) -> None:
    """No two records of one class cover the same place (a bilayer in a monolayer's hole is
    two flakes, and the monolayer's polygon has the hole)."""
    shapes = [
        (r["layer_class"], Polygon(r["polygon_stage_um"], r.get("holes_stage_um") or []))
        for r in records
    ]
    for i, (c, p) in enumerate(shapes):
        for c2, q in shapes[i + 1 :]:
            assert c != c2 or p.intersection(q).area < 0.05 * min(p.area, q.area)


def _flat(**kw) -> SimulatedRigConfig:
    return small_rig_config(
        focus_surface={"tilt_x_um_per_mm": 0.0, "tilt_y_um_per_mm": 0.0, "warp_um": 0.0}, **kw
    )


def test_a_scan_finds_the_monolayers_and_writes_everything(make_core, segmenter, tmp_path):
    cfg = _flat(flakes={"thin_flakes_per_mm2": 150, "monolayer_size_um": [6, 20]})
    core = make_core(cfg)
    scan_cfg = _region(100, 100, 330, 330, focus=_FIXED)
    progress: list[ScanProgress] = []
    _, result = _scan(core, scan_cfg, tmp_path / "s", segmenter, on_progress=progress.append)
    out = tmp_path / "s"

    # the flake map, schema-shaped, and every record inside the chip outline
    doc = read_flake_map(out / "flakes.json")
    assert doc["schema_version"] == "1.0" and doc["flakes"] == result.flakes
    chip = Polygon(doc["scan"]["chip_outline_stage_um"])
    for r in doc["flakes"]:
        assert chip.buffer(1).contains(shapely.Point(r["centroid_stage_um"]))
        assert (out / r["patch"]).is_file()
        cx, cy = r["centroid_stage_um"]
        assert r["centroid_chip_um"] == pytest.approx([cx - 100, cy - 100], abs=1e-3)

    # scored against the world's truth (truth.json) in the summary
    truth = read_flake_map(out / "truth.json")["flakes"]
    mono = result.score.classes["monolayer"]
    assert (
        mono.truth
        == sum(t["layer_class"] == "monolayer" and t["area_um2"] >= 10 for t in truth)
        >= 3
    )
    # The product's target is recall >= 0.95 at precision >= 0.9 on configs/simulated-small;
    # the shipped model does not reach that precision yet (README, issue 5): this guards
    # the pipeline, which must not lose what the model sees.
    assert mono.recall >= 0.8 and mono.precision >= 0.6
    assert mono.centroid_error_median_um < 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["score"]["classes"]["monolayer"]["recall"] == mono.recall

    # scan.zarr: every tile, its labels and position; the overview pyramid with NGFF metadata
    store = zarr.open_group(out / "scan.zarr", mode="r")
    n = result.progress.fields_total
    assert store["tiles"].shape == (n, 512, 512, 3)
    assert (store["field_status"][:] == DONE).all()
    assert not np.isnan(store["positions"][:]).any()
    assert set(np.unique(store["labels"][:])) <= {0, 1, 2}
    ome = store["overview"].attrs["ome"]
    levels = ome["multiscales"][0]["datasets"]
    assert [d["path"] for d in levels] == [str(i) for i in range(len(levels))]
    assert (out / "overview.png").stat().st_size > 1000

    # progress went through the phases and counted every field
    assert [p for p in dict.fromkeys(q.phase for q in progress)] == [
        "planning",
        "scanning",
        "finishing",
        "done",
    ] or progress[-1].phase == "done"
    assert progress[-1].fields_done == n


def test_the_overview_places_a_tile_where_the_stage_was(make_core, segmenter, tmp_path):
    # A dark dust-free, flake-free chip edge: the overview must show the chip's corner at the
    # stage coordinates of the chip's corner.
    cfg = _flat(flakes=_BARE)
    core = make_core(cfg)
    scan_cfg = _region(-60, -60, 60, 60, focus=_FIXED, overview_um_per_px=1.0)
    _scan(core, scan_cfg, tmp_path / "s", segmenter)
    store = ScanStore.open(tmp_path / "s" / "scan.zarr")
    image = np.moveaxis(store.overview[:], 0, -1).astype(float).mean(axis=2)
    m = store.mosaic

    def at(x: float, y: float) -> float:
        return image[int((y - m.y0_um) / m.um_per_px), int((x - m.x0_um) / m.um_per_px)]

    # oxide (bright) for x, y > 0; the stage insert beyond the chip (dark) elsewhere
    assert at(20, 20) > 100 and at(-20, -20) < 60 and at(-20, 20) < 60 and at(20, -20) < 60


def test_a_flake_on_a_four_field_corner_is_reported_once(make_core, segmenter, tmp_path):
    cfg = _flat(flakes={"thin_flakes_per_mm2": 40, "monolayer_size_um": [8, 14]})
    core = make_core(cfg)
    world = core.simulation.world
    big = [
        f
        for f in world.flakes
        if f.layer_class == "monolayer"
        and 40 < f.polygon.area < 200
        and 150 < f.polygon.centroid.x < 850
        and 150 < f.polygon.centroid.y < 850
    ]
    assert big, "the test chip needs a mid-sized monolayer"
    target = big[0].polygon
    cx, cy = target.centroid.x, target.centroid.y
    # No overlap: the corner of four fields sits on the flake's centre, so four tiles each
    # see a quarter of it, and the merge must join them into one record.
    scan_cfg = _region(
        cx - FOV_UM, cy - FOV_UM, cx + FOV_UM, cy + FOV_UM, focus=_FIXED, overlap=0.0
    )
    _, result = _scan(core, scan_cfg, tmp_path / "s", segmenter)
    assert result.progress.fields_total == 4
    on_target = [
        r
        for r in result.flakes
        if r["layer_class"] == "monolayer"
        and Polygon(r["polygon_stage_um"]).intersection(target).area > 0.2 * target.area
    ]
    assert len(on_target) == 1
    record = on_target[0]
    assert len(record["tiles"]) == 4
    found = Polygon(record["polygon_stage_um"])
    assert found.intersection(target).area / found.union(target).area > 0.6
    assert math.dist(record["centroid_stage_um"], (cx, cy)) < 1.0


def test_the_map_keeps_only_flakes_the_model_is_sure_of(make_core, segmenter, tmp_path):
    cfg = _flat(flakes={"thin_flakes_per_mm2": 150, "monolayer_size_um": [6, 20]})
    region = {"x0": 100, "y0": 100, "x1": 250, "y1": 250}
    runs = {}
    for least in (0.0, 0.7):
        scan_cfg = _region(**region, focus=_FIXED, min_flake_confidence=least)
        _, runs[least] = _scan(make_core(cfg), scan_cfg, tmp_path / f"s{least}", segmenter)
    every, sure = runs[0.0].flakes, runs[0.7].flakes
    unsure = [r for r in every if r["confidence"] < 0.7]
    assert unsure, "the test chip needs a flake the model is unsure of"
    assert sure and all(r["confidence"] >= 0.7 for r in sure)
    key = [(r["layer_class"], round(r["area_um2"], 1)) for r in sure]
    assert key == [(r["layer_class"], round(r["area_um2"], 1)) for r in every if r not in unsure]
    # what the summary scores is the map as written
    assert read_flake_map(tmp_path / "s0.7" / "flakes.json")["flakes"] == sure


def test_a_chip_without_flakes_gives_an_empty_map(make_core, segmenter, tmp_path):
    cfg = _flat(flakes=_BARE)
    core = make_core(cfg)
    _, result = _scan(core, _region(200, 200, 400, 400, focus=_FIXED), tmp_path / "s", segmenter)
    assert result.flakes == [] and result.failed_fields == []
    assert read_flake_map(tmp_path / "s" / "flakes.json")["flakes"] == []
    assert read_flake_map(tmp_path / "s" / "truth.json")["flakes"] == []
    assert result.score.classes["monolayer"].recall is None
    assert list((tmp_path / "s" / "flakes").iterdir()) == []

    # The overview is flat-field corrected (the stored tiles are not): bare oxide shows no
    # grid of dark field corners.
    def spread(store: ScanStore) -> float:
        green = store.overview[1, 20:-20, 20:-20].astype(float)  # inside the scanned area
        return float(np.percentile(green, 95) - np.percentile(green, 5))

    store = ScanStore.open(tmp_path / "s" / "scan.zarr")
    raw = _region(200, 200, 400, 400, focus=_FIXED, flat_field=FlatFieldConfig(source="none"))
    _scan(make_core(cfg), raw, tmp_path / "raw", segmenter)
    uncorrected = ScanStore.open(tmp_path / "raw" / "scan.zarr")
    assert spread(store) < 0.5 * spread(uncorrected)

    def corner_to_centre(tiles: np.ndarray) -> float:
        green = tiles[..., 1].mean(axis=0)
        return float(green[:32, :32].mean() / green[240:272, 240:272].mean())

    kept, taken = corner_to_centre(store.tiles[:]), corner_to_centre(uncorrected.tiles[:])
    assert kept < 0.95 and kept == pytest.approx(taken, abs=0.005)


def _tile_blur(out: Path) -> list[float]:
    store = ScanStore.open(out / "scan.zarr")
    widths = [edge_blur_px(store.tiles[t]) for t in range(store.tiles.shape[0])]
    return [w for w in widths if w is not None]


def test_only_a_focus_surface_keeps_a_tilted_chip_sharp(make_core, segmenter, tmp_path):
    # 6 µm/mm tilt: 1.4 µm from one side of a 230 µm region to the other, three depths of field
    cfg = small_rig_config(
        flakes={"thin_flakes_per_mm2": 40, "bulk_pieces_per_mm2": 40},
        focus_surface={"tilt_x_um_per_mm": 6.0, "tilt_y_um_per_mm": -3.0, "warp_um": 0.0},
    )
    world_z = make_core(cfg).simulation.world.focus_z_um
    region = (300, 300, 530, 530)

    core = make_core(cfg)
    core.setPosition(world_z(300, 530))  # focused on the first field by hand, then left
    fixed = _region(*region, focus=_FIXED)
    _scan(core, fixed, tmp_path / "fixed", segmenter)

    core = make_core(cfg)
    mapped = _region(*region, focus=FocusConfig(points=5, refocus_max_edge_blur_px=None))
    _, result = _scan(core, mapped, tmp_path / "map", segmenter)
    state = read_journal(tmp_path / "map" / "journal.jsonl")
    errors = [line["z_um"] - world_z(*line["stage_xy_um"]) for line in state.fields.values()]
    assert np.abs(errors).max() < 0.2  # a plane through the autofocus points
    assert len(result.focus_points) >= 3

    sharp, blurred = _tile_blur(tmp_path / "map"), _tile_blur(tmp_path / "fixed")
    assert max(sharp) < 2.8
    assert sum(w > 2.8 for w in blurred) >= len(blurred) // 3


def test_a_blurred_field_is_refocused_before_the_stage_moves_on(make_core, segmenter, tmp_path):
    # The chip has a bump the flat focus "surface" cannot know: start 1 µm off focus.
    cfg = _flat(flakes={"thin_flakes_per_mm2": 40, "bulk_pieces_per_mm2": 60})
    core = make_core(cfg)
    z_true = core.simulation.world.focus_z_um(500, 500)
    core.setPosition(z_true + 0.8)
    focus = FocusConfig(strategy="none", refocus_max_edge_blur_px=2.8)
    _scan(core, _region(400, 400, 600, 600, focus=focus), tmp_path / "s", segmenter)
    lines = read_journal(tmp_path / "s" / "journal.jsonl").fields.values()
    refocused = [line for line in lines if line["refocused_from_um"] is not None]
    assert refocused, "fields with edges should have been refocused"
    for line in refocused:
        assert line["refocused_from_um"] == pytest.approx(z_true + 0.8, abs=1e-6)
        assert abs(line["z_um"] - z_true) < 0.25
    assert max(_tile_blur(tmp_path / "s")) < 2.8


def test_hardware_faults_become_failed_fields_and_the_scan_completes(
    make_core, segmenter, tmp_path
):
    cfg = _flat(
        faults={
            # moves 2, 3, 4: field 2 fails three times and is given up; move 7 once: retried
            "stage_timeout": {"at": [2, 3, 4, 7]},
            # snaps 10..12 fail on one field (whichever takes them); snap 14 once
            "camera_error": {"at": [10, 11, 12, 14]},
        }
    )
    core = make_core(cfg)
    # No flat-field pass: its frames would take the first moves and snaps counted above.
    region = _region(200, 200, 500, 430, focus=_FIXED, flat_field=FlatFieldConfig(source="none"))
    _, result = _scan(core, region, tmp_path / "s", segmenter)
    p = result.progress
    assert not (tmp_path / "s" / "flat_field.tif").exists()
    assert p.fields_failed == 2 and p.fields_done == p.fields_total - 2
    errors = sorted(f["error"] for f in result.failed_fields)
    assert "camera" in errors[0].lower() and "stage" in errors[1].lower()
    store = ScanStore.open(tmp_path / "s" / "scan.zarr")
    status = store.field_status[:]
    assert (status == FAILED).sum() == 2 and (status == DONE).sum() == p.fields_done
    failed_tiles = [store.tile_index(i, 0) for i in np.flatnonzero(status == FAILED)]
    assert all(np.isnan(store.positions[t]).all() for t in failed_tiles)
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert len(summary["failed_fields"]) == 2
    # the flake map is whole: written at the end with everything the good fields saw
    assert read_flake_map(tmp_path / "s" / "flakes.json")["flakes"] == result.flakes


def test_a_stopped_scan_resumes_without_losing_or_duplicating(make_core, segmenter, tmp_path):
    cfg = _flat(flakes={"thin_flakes_per_mm2": 40, "monolayer_size_um": [6, 20]})
    # queues of one field: the stop comes while much of the chip is still to do
    region = _region(
        100, 100, 330, 330, focus=_FIXED, queue_size=1, model=ModelConfig(batch_size=1)
    )
    out = tmp_path / "s"

    core = make_core(cfg)
    holder: dict[str, Scan] = {}

    def stop_after_three(p: ScanProgress) -> None:
        if p.fields_done >= 3:
            holder["scan"].stop()

    scan = Scan(
        core,
        region,
        out,
        segmenter=segmenter,
        limits=_limits(cfg),
        truth=simulated_truth(core, region.chip, (100, 100)),
        on_progress=stop_after_three,
    )
    holder["scan"] = scan
    first = asyncio.run(scan.run())
    assert first.progress.phase == "stopped"
    done_first = read_journal(out / "journal.jsonl").done()
    assert 3 <= len(done_first) < first.progress.fields_total
    assert not (out / "overview.png").exists()
    read_flake_map(out / "flakes.json")  # a valid partial map

    with pytest.raises(ScanError, match="--resume"):
        _scan(make_core(cfg), region, out, segmenter)  # a new scan never overwrites it

    core = make_core(cfg)
    _, resumed = _scan(core, region, out, segmenter, resume=True)
    state = read_journal(out / "journal.jsonl")
    assert state.finished and len(state.done()) == resumed.progress.fields_total
    assert resumed.progress.fields_resumed == len(done_first)
    lines = _journal_lines(out)
    scanned = [x["index"] for x in lines if x["kind"] == "field"]
    assert len(scanned) == len(set(scanned)), "a finished field was scanned again"
    # one flat field for the whole chip: the resume corrects its tiles as the first run did
    assert [x["kind"] for x in lines].count("flat_field") == 1

    # the same flakes as one uninterrupted scan (the camera noise differs after a restart,
    # so compare what was found, not bit for bit)
    _, whole = _scan(make_core(cfg), region, tmp_path / "whole", segmenter)
    big = [r for r in resumed.flakes if r["area_um2"] >= 10]
    assert len(big) == len([r for r in whole.flakes if r["area_um2"] >= 10])
    _assert_no_flake_twice(resumed.flakes)


def test_a_reference_flat_field_is_used_and_a_bad_one_stops_the_scan_first(
    make_core, segmenter, tmp_path
):
    cfg = _flat(optics={"vignetting": 0.25})
    core = make_core(cfg)
    _scan(core, _region(300, 300, 450, 450, focus=_FIXED), tmp_path / "auto", segmenter)
    estimated = read_flat_field(tmp_path / "auto" / "flat_field.tif")
    # The estimate from the scan's own fields is the camera's vignetting.
    true = core.simulation.renderer._vignette ** (1 / cfg.optics.gamma)
    assert np.abs(estimated / (true / true.mean(axis=(0, 1))) - 1).max() < 0.02

    reference = tmp_path / "bare-wafer.tif"
    write_flat_field(reference, estimated)
    region = _region(300, 300, 450, 450, focus=_FIXED, flat_field=FlatFieldConfig(source=reference))
    _scan(core, region, tmp_path / "ref", segmenter)
    journal = _journal_lines(tmp_path / "ref")
    assert [x["source"] for x in journal if x["kind"] == "flat_field"] == [str(reference)]

    tifffile.imwrite(tmp_path / "small.tif", np.ones((64, 64), np.float32))
    bad = _region(
        300, 300, 450, 450, focus=_FIXED, flat_field=FlatFieldConfig(source=tmp_path / "small.tif")
    )
    with pytest.raises(ScanError, match=r"scan\.flat_field.*64×64 px but frames are 512×512"):
        _scan(core, bad, tmp_path / "bad", segmenter)
    assert not read_journal(tmp_path / "bad" / "journal.jsonl").done()  # refused up front


def test_a_camera_fault_in_the_flat_field_pass_loses_one_frame_not_the_scan(
    make_core, segmenter, tmp_path
):
    # snaps 0..2: the first flat-field field fails all three attempts
    cfg = _flat(faults={"camera_error": {"at": [0, 1, 2]}})
    _, result = _scan(
        make_core(cfg), _region(300, 300, 450, 450, focus=_FIXED), tmp_path / "s", segmenter
    )
    assert result.progress.fields_failed == 0
    assert result.progress.fields_done == result.progress.fields_total
    journal = _journal_lines(tmp_path / "s")
    [flat] = [x for x in journal if x["kind"] == "flat_field"]
    assert flat["source"] == f"{result.progress.fields_total - 1} frames"


def test_resuming_with_a_different_plan_is_refused(make_core, segmenter, tmp_path):
    cfg = _flat()
    _scan(make_core(cfg), _region(0, 0, 100, 100, focus=_FIXED), tmp_path / "s", segmenter)
    before = (tmp_path / "s" / "flakes.json").read_bytes()
    with pytest.raises(JournalError, match="different plan"):
        _scan(
            make_core(cfg),
            _region(0, 0, 200, 100, focus=_FIXED),
            tmp_path / "s",
            segmenter,
            resume=True,
        )
    assert (tmp_path / "s" / "flakes.json").read_bytes() == before
    with pytest.raises(JournalError, match="no journal"):
        _scan(
            make_core(cfg),
            _region(0, 0, 100, 100, focus=_FIXED),
            tmp_path / "new",
            segmenter,
            resume=True,
        )


def test_autofocus_that_finds_nothing_stops_the_scan_with_a_clear_error(
    make_core, segmenter, tmp_path
):
    cfg = _flat(flakes=_BARE)
    core = make_core(cfg)
    focus = FocusConfig(points=5, tries_per_point=2)
    with pytest.raises(ScanError, match="autofocus found the chip at only 0 of 5"):
        _scan(core, _region(100, 100, 900, 900, focus=focus), tmp_path / "s", segmenter)


def test_a_rotated_camera_still_puts_flakes_where_they_are(make_core, segmenter, tmp_path):
    # The camera is mounted a quarter turn round: image columns run along stage y. The
    # core's pixel-size affine says so, and flakes must land at their stage place all the same.
    cfg = _flat(
        flakes={"thin_flakes_per_mm2": 40, "monolayer_size_um": [8, 14]},
        camera={"rotation_deg": 90.0},
    )
    core = make_core(cfg)
    world = core.simulation.world
    target = next(
        f.polygon
        for f in world.flakes
        if f.layer_class == "monolayer"
        and 40 < f.polygon.area < 200
        and 150 < f.polygon.centroid.x < 850
        and 150 < f.polygon.centroid.y < 850
    )
    cx, cy = target.centroid.x, target.centroid.y
    scan_cfg = _region(cx - 60, cy - 60, cx + 60, cy + 60, focus=_FIXED)
    _, result = _scan(core, scan_cfg, tmp_path / "s", segmenter)
    hits = [
        r
        for r in result.flakes
        if r["layer_class"] == "monolayer"
        and Polygon(r["polygon_stage_um"]).intersection(target).area > 0.5 * target.area
    ]
    assert len(hits) == 1
    assert math.dist(hits[0]["centroid_stage_um"], (cx, cy)) < 1.0


def test_a_frame_larger_than_a_tile_is_cut_into_overlapping_tiles(make_core, segmenter, tmp_path):
    cfg = _flat(
        flakes={"thin_flakes_per_mm2": 150, "monolayer_size_um": [6, 20]},
        camera={"sensor_shape": (600, 700)},
    )
    core = make_core(cfg)
    _, result = _scan(core, _region(100, 100, 280, 260, focus=_FIXED), tmp_path / "s", segmenter)
    store = ScanStore.open(tmp_path / "s" / "scan.zarr")
    n = result.progress.fields_total
    assert store.tiles_per_field == 4 and store.tiles.shape[0] == 4 * n
    assert not np.isnan(store.positions[:]).any()
    # a flake seen by two overlapping tiles of one frame is one record
    _assert_no_flake_twice(result.flakes)
    assert result.score.classes["monolayer"].recall >= 0.75


def test_a_failing_model_stops_the_scan_with_its_own_error_and_it_resumes(
    make_core, segmenter, tmp_path
):
    class BrokenSegmenter:
        calls = 0

        def __getattr__(self, name: str):  # config, references: the real segmenter's
            return getattr(segmenter, name)

        def predict(self, tiles, references=None, transparent=None):
            BrokenSegmenter.calls += 1
            if BrokenSegmenter.calls == 3:
                raise MemoryError("CUDA out of memory (simulated)")
            return segmenter.predict(tiles, references, transparent)

    cfg = _flat()
    region = _region(100, 100, 330, 330, focus=_FIXED, model=ModelConfig(batch_size=1))
    core = make_core(cfg)
    scan = Scan(core, region, tmp_path / "s", segmenter=BrokenSegmenter(), limits=_limits(cfg))
    with pytest.raises(MemoryError, match="out of memory"):
        asyncio.run(scan.run())
    done = read_journal(tmp_path / "s" / "journal.jsonl").done()
    # The two fields segmented before the failure are kept, or one of them if the failure
    # cancelled the recording stage before it took the second from its queue.
    assert 1 <= len(done) <= 2
    _, result = _scan(make_core(cfg), region, tmp_path / "s", segmenter, resume=True)
    assert result.progress.fields_done == result.progress.fields_total == 16


def test_a_focus_surface_that_would_pass_the_safe_z_is_refused(make_core, segmenter, tmp_path):
    cfg = small_rig_config(
        flakes={"thin_flakes_per_mm2": 40, "bulk_pieces_per_mm2": 60},
        focus_surface={"tilt_x_um_per_mm": 20.0, "tilt_y_um_per_mm": 0.0, "warp_um": 0.0},
        focus_drive={"safe_z_um": 1003.0},
    )
    core = make_core(cfg)
    # the survey finds focus below the safe Z, but the plane through it climbs past it
    region = _region(0, 300, 1000, 700, focus=FocusConfig(points=5))
    with pytest.raises(ScanError, match="safe"):
        _scan(core, region, tmp_path / "s", segmenter)
    lines = (tmp_path / "s" / "journal.jsonl").read_text()
    assert '"kind":"focus"' not in lines and '"kind":"field"' not in lines


def _film_chip_scan(make_core, segmenter, out: Path, chip_reference: bool):
    """A CVD chip with monolayer films larger than a field, scanned around the largest."""
    cfg = _flat(
        flakes={
            "growth": "cvd",
            "thin_flakes_per_mm2": 2,
            "bulk_pieces_per_mm2": 0,
            "residue_per_mm2": 0,
            "monolayer_size_um": [280, 300],
        }
    )
    core = make_core(cfg)
    films = [f for f in core.simulation.world.flakes if f.layer_class == "monolayer"]
    film = max(films, key=lambda f: f.polygon.area).polygon
    x0, y0, x1, y1 = film.bounds
    assert x0 > 40 and y0 > 40 and x1 < 960 and y1 < 960, "the test film must lie on the chip"
    model = ModelConfig(chip_reference=chip_reference)
    scan_cfg = _region(x0 - 30, y0 - 30, x1 + 30, y1 + 30, focus=_FIXED, model=model)
    _, result = _scan(core, scan_cfg, out, segmenter)
    return film, result


def test_a_film_larger_than_a_field_is_read_against_the_chips_oxide(make_core, segmenter, tmp_path):
    # The fields a film fills have no oxide in view: against their own colour the film reads as
    # bare substrate, and the flake in the map has holes the size of a field.
    film, holed = _film_chip_scan(make_core, segmenter, tmp_path / "own", chip_reference=False)
    film, whole = _film_chip_scan(make_core, segmenter, tmp_path / "chip", chip_reference=True)

    def largest_monolayer(result) -> Polygon:
        rec = max(
            (r for r in result.flakes if r["layer_class"] == "monolayer"),
            key=lambda r: r["area_um2"],
        )
        return Polygon(rec["polygon_stage_um"], rec.get("holes_stage_um") or [])

    assert holed.progress.tiles_chip_reference == 0
    assert largest_monolayer(holed).area < 0.85 * film.area  # what the chip reference fixes
    assert whole.progress.tiles_chip_reference >= 1
    found = largest_monolayer(whole)
    assert found.intersection(film).area > 0.95 * film.area
    assert found.area < 1.05 * film.area
    summary = json.loads((tmp_path / "chip" / "summary.json").read_text())
    assert summary["tiles_read_against_chip_oxide"] == whole.progress.tiles_chip_reference
    # the seeded colour is journalled, for a resume to start from
    colour = read_journal(tmp_path / "chip" / "journal.jsonl").chip_colour
    assert colour is not None and len(colour) == 3 and min(colour) > 0.3


def test_a_quartz_chip_is_read_as_a_transparent_substrate(make_core, tmp_path):
    """CVD MoS2 on quartz is brighter than its substrate: read as on oxide the shipped model
    finds next to none of its monolayers; with scan.model.substrate `transparent` every tile is
    read mirrored onto the oxide's contrast, and it finds them."""
    cfg = _flat(
        chip={"substrate": "quartz"},
        flakes={
            "growth": "cvd",
            "thin_flakes_per_mm2": 150,
            "monolayer_size_um": [10, 30],
            "residue_per_mm2": 0,
        },
    )
    scores = {}
    for substrate in ("oxide", "transparent"):
        model = ModelConfig(substrate=substrate)
        scan_cfg = _region(100, 100, 330, 330, focus=_FIXED, model=model)
        out = tmp_path / substrate
        _, result = _scan(make_core(cfg), scan_cfg, out, load_segmenter(model))
        scores[substrate] = result.score.classes["monolayer"]
        summary = json.loads((out / "summary.json").read_text())
        read = summary["tiles_read_as_transparent_substrate"]
        assert read == (result.progress.fields_total if substrate == "transparent" else 0)
    mono = scores["transparent"]
    assert mono.truth >= 3
    # measured: 0 of 8 read as on oxide, 8 of 8 at precision 1.000 read as transparent
    assert scores["oxide"].recall <= 0.25, scores
    assert mono.recall >= 0.8 and mono.precision >= 0.8, scores
