"""flakes.json: round trip, atomic rewrite, the shipped JSON Schema, read errors, and scoring."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import small_rig_config
from shapely.geometry import box

from drivers.simulated.world import ChipWorld
from scanner.flakemap import (
    SCAN_REQUIRED,
    SCHEMA_PATH,
    SCHEMA_VERSION,
    FlakeMapError,
    read_flake_map,
    score_against_truth,
    write_flake_map,
)
from scanner.flakes import Flake

SCAN_META = {
    "started": "2026-01-05T09:30:00+00:00",
    "chip_outline_stage_um": [[0, 0], [1000, 0], [1000, 1000], [0, 1000], [0, 0]],
    "pixel_size_um": 0.15,
    "objective": "100x",
}


def flake(x: float, y: float, side: float = 5.0, layer_class: str = "monolayer", **kw) -> Flake:
    polygon = box(x - side / 2, y - side / 2, x + side / 2, y + side / 2)
    return Flake(
        layer_class=layer_class,
        confidence=kw.pop("confidence", 0.9),
        tiles=kw.pop("tiles", (3, 1)),
        **Flake.geometry_fields(polygon),
        **kw,
    )


FLAKES = [flake(50, 20), flake(10, 20, layer_class="bilayer"), flake(30, 5, patch="p/7.png")]


# ------------------------------------------------------------------ the schema, checked by hand
# jsonschema is not installed and the project does not depend on it, so this walks the subset
# of draft 2020-12 the schema file uses; test_checker_bites shows it is not a rubber stamp.
_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
}


def check(value: Any, schema: dict, root: dict, where: str = "$") -> list[str]:
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    errors = []
    kind = schema.get("type")
    if kind and (not isinstance(value, _TYPES[kind]) or isinstance(value, bool)):
        return [f"{where}: expected {kind}, got {type(value).__name__}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: must be {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: below {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{where}: above {schema['maximum']}")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        errors.append(f"{where}: not above {schema['exclusiveMinimum']}")
    if isinstance(value, dict):
        errors += [f"{where}: lacks {k!r}" for k in schema.get("required", []) if k not in value]
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += check(value[key], sub, root, f"{where}.{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1e9):
            errors.append(f"{where}: {len(value)} items")
        prefix = schema.get("prefixItems", [])
        for k, item in enumerate(value):
            sub = prefix[k] if k < len(prefix) else schema.get("items", {})
            if sub is False:
                errors.append(f"{where}[{k}]: no item allowed here")
            elif sub:
                errors += check(item, sub, root, f"{where}[{k}]")
    return errors


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def test_written_file_matches_the_schema(tmp_path: Path, schema: dict) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    assert tuple(schema["properties"]["scan"]["required"]) == SCAN_REQUIRED
    write_flake_map(
        tmp_path / "flakes.json", FLAKES, scan_meta=SCAN_META, chip_origin_stage_um=(0, 0)
    )
    doc = json.loads((tmp_path / "flakes.json").read_text())
    assert check(doc, schema, schema) == []


def test_checker_bites(tmp_path: Path, schema: dict) -> None:
    doc = write_flake_map(
        tmp_path / "f.json", FLAKES, scan_meta=SCAN_META, chip_origin_stage_um=(0, 0)
    )
    doc["flakes"][0]["layer_class"] = "trilayer"
    doc["flakes"][1]["confidence"] = 1.5
    doc["flakes"][2]["centroid_chip_um"] = [1.0, 2.0, 3.0]
    del doc["flakes"][2]["area_um2"]
    assert len(check(doc, schema, schema)) == 4


# ------------------------------------------------------------------ writing and reading
def test_round_trip_ids_and_frames(tmp_path: Path) -> None:
    path = tmp_path / "flakes.json"
    written = write_flake_map(
        path, FLAKES, scan_meta=SCAN_META, chip_origin_stage_um=(100, 0), rotation_deg=90
    )
    doc = read_flake_map(path)
    assert doc == written
    assert doc["schema_version"] == SCHEMA_VERSION and doc["scan"] == SCAN_META
    assert doc["frames"] == {"chip_origin_stage_um": [100.0, 0.0], "rotation_deg": 90.0}
    # chip = R(−90°)(stage − origin): (x, y) -> (y, −(x − 100)); ids in chip y, then x
    chip = [r["centroid_chip_um"] for r in doc["flakes"]]
    assert chip == [[20.0, 50.0], [5.0, 70.0], [20.0, 90.0]]
    assert [r["id"] for r in doc["flakes"]] == [0, 1, 2]
    second = doc["flakes"][1]
    assert second["centroid_stage_um"] == [30.0, 5.0] and second["patch"] == "p/7.png"
    assert second["area_um2"] == 25.0 and second["bbox_stage_um"] == [27.5, 2.5, 32.5, 7.5]
    assert second["tiles"] == [3, 1] and second["confidence"] == 0.9
    assert second["polygon_stage_um"][0] == second["polygon_stage_um"][-1]
    assert second["polygon_chip_um"][0] == [2.5, 67.5]  # box() starts at (x1, y0)
    assert "patch" not in doc["flakes"][0]


def test_ids_do_not_depend_on_input_order(tmp_path: Path) -> None:
    a = write_flake_map(
        tmp_path / "a.json", FLAKES, scan_meta=SCAN_META, chip_origin_stage_um=(0, 0)
    )
    b = write_flake_map(
        tmp_path / "b.json", FLAKES[::-1], scan_meta=SCAN_META, chip_origin_stage_um=(0, 0)
    )
    assert a == b


def test_rewrite_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "flakes.json"
    write_flake_map(path, FLAKES, scan_meta=SCAN_META, chip_origin_stage_um=(0, 0))
    write_flake_map(path, FLAKES[:1], scan_meta=SCAN_META, chip_origin_stage_um=(0, 0))
    assert len(read_flake_map(path)["flakes"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flakes.json"]  # no temp file left
    assert path.stat().st_mode & 0o044  # readable by the robot's user


@pytest.mark.parametrize("where", ["scan metadata", "last record"])
def test_failed_write_leaves_the_old_file(tmp_path: Path, where: str) -> None:
    path = tmp_path / "flakes.json"
    write_flake_map(path, FLAKES, scan_meta=SCAN_META, chip_origin_stage_um=(0, 0))
    before = path.read_bytes()
    meta, flakes = SCAN_META, FLAKES
    if where == "scan metadata":
        meta = {**SCAN_META, "operator": object()}  # not serialisable
    else:  # fails after the header and the first records are already in the temp file
        flakes = [*FLAKES, flake(99, 99).model_copy(update={"area_um2": math.nan})]
    with pytest.raises((TypeError, ValueError)):
        write_flake_map(path, flakes, scan_meta=meta, chip_origin_stage_um=(0, 0))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["flakes.json"]


def test_scan_metadata_may_hold_what_a_scan_has_at_hand(tmp_path: Path, schema: dict) -> None:
    meta = {
        "started": dt.datetime(2026, 1, 5, 9, 30, tzinfo=dt.UTC),
        "chip_outline_stage_um": box(0, 0, 1000, 1000),
        "pixel_size_um": np.float32(0.15),
        "tiles_planned": np.int64(4),
        "out": tmp_path,
    }
    write_flake_map(tmp_path / "f.json", FLAKES, scan_meta=meta, chip_origin_stage_um=(0, 0))
    doc = read_flake_map(tmp_path / "f.json")
    assert doc["scan"]["started"] == "2026-01-05T09:30:00+00:00"
    assert len(doc["scan"]["chip_outline_stage_um"]) == 5 and doc["scan"]["tiles_planned"] == 4
    assert check(doc, schema, schema) == []


def test_scan_metadata_must_carry_the_required_keys(tmp_path: Path) -> None:
    with pytest.raises(FlakeMapError, match="started"):
        write_flake_map(
            tmp_path / "f.json",
            FLAKES,
            scan_meta={"pixel_size_um": 0.15},
            chip_origin_stage_um=(0, 0),
        )


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no flake map"):
        read_flake_map(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": "1.0", "flakes": [')
    with pytest.raises(FlakeMapError, match="not valid JSON"):
        read_flake_map(bad)
    for text, message in [
        ('{"schema_version": "2.0", "flakes": []}', "schema_version '2.0'"),
        ('{"flakes": []}', "schema_version None"),
        ("[1, 2]", "JSON list"),
        ('{"schema_version": "1.0"}', "no 'flakes'"),
    ]:
        bad.write_text(text)
        with pytest.raises(FlakeMapError, match=message):
            read_flake_map(bad)
    bad.write_text('{"schema_version": "1.3", "flakes": []}')  # minor versions only add fields
    assert read_flake_map(bad)["flakes"] == []


# ------------------------------------------------------------------ scoring
def record(x: float, y: float, side: float, layer_class: str = "monolayer") -> dict:
    h = side / 2
    ring = [[x - h, y - h], [x + h, y - h], [x + h, y + h], [x - h, y + h], [x - h, y - h]]
    return {
        "layer_class": layer_class,
        "centroid_stage_um": [x, y],
        "polygon_stage_um": ring,
        "area_um2": side * side,
    }


def test_perfect_scan_of_the_world_truth() -> None:
    world = ChipWorld(small_rig_config())
    truth = [f.to_record((0.0, 0.0)) for f in world.flakes]
    score = score_against_truth(truth, truth)
    counted = [r for r in truth if r["area_um2"] >= 10]
    for c in score.classes.values():
        assert c.precision == 1.0 and c.recall == 1.0
        assert c.centroid_error_median_um == 0.0 and c.centroid_error_max_um == 0.0
    assert sum(c.truth for c in score.classes.values()) == len(counted)
    assert "monolayer" in score.format_table()


def test_misses_false_alarms_wrong_class_and_small_flakes() -> None:
    truth = [
        record(0, 0, 5),  # found, 0.3 µm off
        record(20, 0, 5),  # missed
        record(40, 0, 5, "bilayer"),  # found as monolayer
        record(60, 0, 2),  # 4 µm²: below the minimum, missing it costs nothing
        record(80, 0, 6, "bilayer"),  # found, by the centroid rule
    ]
    found = [
        record(0.3, 0, 5),
        record(40, 0, 5),  # wrong class
        record(0, 40, 5),  # spurious
        record(100, 0, 2),  # spurious but small: not counted
        record(81.5, 0.5, 3, "bilayer"),  # small, inside it: IoU 0.25, centroids 1.6 µm apart
    ]
    score = score_against_truth(found, truth, min_area_um2=10.0, match_um=2.0)
    mono, bi = score.classes["monolayer"], score.classes["bilayer"]
    assert (mono.truth, mono.found, mono.matched_truth, mono.matched_found) == (2, 3, 1, 1)
    assert mono.recall == 0.5 and mono.precision == pytest.approx(1 / 3)
    assert mono.wrong_class == 1
    assert mono.centroid_error_median_um == pytest.approx(0.3)
    assert (bi.truth, bi.found, bi.matched_truth, bi.matched_found) == (2, 0, 1, 0)
    assert bi.recall == 0.5 and bi.precision is None  # nothing counted as found
    assert bi.centroid_error_max_um == pytest.approx(math.hypot(1.5, 0.5))
    table = score.format_table()
    assert "0.500" in table and "—" in table


def test_one_to_one_matching_prefers_overlap() -> None:
    truth = [record(0, 0, 6), record(4, 0, 6)]
    found = [record(3.5, 0, 6)]  # overlaps both; the second far better
    score = score_against_truth(found, truth).classes["monolayer"]
    assert score.matched_truth == 1 and score.centroid_error_max_um == pytest.approx(0.5)


def test_empty_inputs() -> None:
    score = score_against_truth([], [record(0, 0, 5)])
    assert score.classes["monolayer"].recall == 0.0
    assert score.classes["monolayer"].precision is None
    assert score_against_truth([], []).classes["bilayer"].recall is None
