"""The scan plan: fields over the chip outline, their order, stage limits, MDA sequence, tiles."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import shapely
from conftest import small_rig_config
from pydantic import ValidationError

from scanner.plan import (
    ChipOutline,
    FieldOfView,
    check_against_limits,
    cut_into_tiles,
    plan_fields,
    to_mda_sequence,
)

FOV = (76.8, 76.8)  # 512 px at 0.15 µm/px: the simulated rig's 100× field
TRIANGLE = ChipOutline(polygon_um=[(0, 0), (1500, 0), (0, 1000)])


def _covered(fields: list[FieldOfView], fov: tuple[float, float], pts: np.ndarray) -> np.ndarray:
    """For each point, whether some field's rectangle contains it."""
    xy = np.array([(f.x_um, f.y_um) for f in fields])
    inside_x = np.abs(pts[:, None, 0] - xy[None, :, 0]) <= fov[0] / 2
    inside_y = np.abs(pts[:, None, 1] - xy[None, :, 1]) <= fov[1] / 2
    return (inside_x & inside_y).any(axis=1)


# ------------------------------------------------------------------ the outline


def test_corners_in_either_order_give_the_same_fields() -> None:
    orders = ([[100, 50], [900, 650]], [[900, 650], [100, 50]], [[100, 650], [900, 50]])
    plans = [plan_fields(ChipOutline(corners_um=c), fov_um=FOV, overlap=0.1) for c in orders]
    assert len(plans[0]) > 1
    assert plans[0] == plans[1] == plans[2]
    assert ChipOutline(corners_um=orders[2]).bounds == (100, 50, 900, 650)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"polygon_um": [(0, 0), (100, 100), (100, 0), (0, 100)]}, "Self-intersection"),
        ({"polygon_um": [(0, 0), (100, 100)]}, "at least 3"),
        ({"corners_um": [(0, 0), (0, 500)]}, "no area"),
        ({}, "exactly one"),
        ({"corners_um": [(0, 0), (1, 1)], "polygon_um": [(0, 0), (1, 0), (0, 1)]}, "exactly one"),
        ({"corners_um": [(0, 0), (1, 1)], "fiducial": (0, 0)}, "Extra inputs"),
    ],
)
def test_a_bad_outline_is_refused_naming_the_problem(kwargs: dict, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        ChipOutline(**kwargs)


# ------------------------------------------------------------------ the grid


@pytest.mark.parametrize("outline", [ChipOutline(corners_um=[(0, 0), (700, 450)]), TRIANGLE])
def test_fields_cover_every_point_of_the_outline(outline: ChipOutline) -> None:
    fov = (80.0, 60.0)
    fields = plan_fields(outline, fov_um=fov, overlap=0.1)
    x0, y0, x1, y1 = outline.bounds
    rng = np.random.default_rng(0)
    pts = rng.uniform((x0, y0), (x1, y1), size=(4000, 2))
    pts = pts[shapely.contains_xy(outline.shape(), pts[:, 0], pts[:, 1])]
    corners = np.array(outline.shape().exterior.coords)  # the hardest points to cover
    assert _covered(fields, fov, np.vstack([pts, corners])).all()


@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.25])
def test_overlap_shrinks_the_step_by_that_fraction_of_the_field(overlap: float) -> None:
    fov = (80.0, 60.0)
    fields = plan_fields(ChipOutline(corners_um=[(0, 0), (600, 500)]), fov_um=fov, overlap=overlap)
    by_cell = {(f.row, f.col): f for f in fields}
    right = by_cell[(0, 1)].x_um - by_cell[(0, 0)].x_um
    down = by_cell[(0, 0)].y_um - by_cell[(1, 0)].y_um  # useq: row 0 at the top, y falls
    assert right == pytest.approx(fov[0] * (1 - overlap))
    assert down == pytest.approx(fov[1] * (1 - overlap))


def test_serpentine_order_visits_neighbours_and_reverses_every_row() -> None:
    fov = (76.8, 76.8)
    fields = plan_fields(ChipOutline(corners_um=[(0, 0), (500, 400)]), fov_um=fov, overlap=0.1)
    assert [f.index for f in fields] == list(range(len(fields)))
    step = fov[0] * 0.9
    for a, b in itertools.pairwise(fields):
        assert abs(a.row - b.row) + abs(a.col - b.col) == 1
        assert math.hypot(a.x_um - b.x_um, a.y_um - b.y_um) == pytest.approx(step)
    rows = sorted({f.row for f in fields})
    assert len(rows) > 2
    for r in rows:
        cols = [f.col for f in fields if f.row == r]
        assert cols == sorted(cols, reverse=r % 2 == 1)
    raster = plan_fields(
        ChipOutline(corners_um=[(0, 0), (500, 400)]), fov_um=fov, overlap=0.1, serpentine=False
    )
    for r in rows:
        cols = [f.col for f in raster if f.row == r]
        assert cols == sorted(cols)


def test_a_triangle_keeps_only_the_fields_that_see_it() -> None:
    fields = plan_fields(TRIANGLE, fov_um=FOV, overlap=0.1)
    box_fields = plan_fields(
        ChipOutline(corners_um=[(0, 0), (1500, 1000)]), fov_um=FOV, overlap=0.1
    )
    assert len(fields) < len(box_fields)
    tri = TRIANGLE.shape()
    assert all(f.footprint(FOV).intersection(tri).area > 0 for f in fields)
    kept = {f.name for f in fields}
    dropped = [f for f in box_fields if f.name not in kept]
    assert dropped and all(f.footprint(FOV).intersection(tri).area == 0 for f in dropped)


def test_field_count_for_a_2mm_chip_at_100x_with_10_percent_overlap() -> None:
    fields = plan_fields(ChipOutline(corners_um=[(0, 0), (2000, 2000)]), fov_um=FOV, overlap=0.1)
    step = 76.8 * (1 - 0.1)  # 69.12 µm
    # one field covers the first 76.8 µm, each further one 69.12 µm more
    per_side = math.ceil((2000 - 76.8) / step) + 1  # ceil(27.82) + 1 = 29
    assert per_side == 29
    assert len(fields) == per_side**2 == 841
    assert (fields[0].x_um, fields[0].y_um) == pytest.approx((38.4, 2000 - 38.4))


def test_an_exact_fit_adds_no_field_that_only_touches_the_chip() -> None:
    # 768 µm is exactly ten 76.8 µm fields; rounding must not add an eleventh row or column
    fields = plan_fields(ChipOutline(corners_um=[(0, 0), (768, 768)]), fov_um=FOV, overlap=0.0)
    assert len(fields) == 100


def test_bad_overlap_or_field_is_refused() -> None:
    outline = ChipOutline(corners_um=[(0, 0), (500, 500)])
    with pytest.raises(ValueError, match="overlap"):
        plan_fields(outline, fov_um=FOV, overlap=10)
    with pytest.raises(ValueError, match="field of view"):
        plan_fields(outline, fov_um=(0, 76.8), overlap=0.1)


# ------------------------------------------------------------------ limits and the MDA runner


def test_limits_check_refuses_a_plan_naming_the_fields_outside() -> None:
    fields = plan_fields(ChipOutline(corners_um=[(-100, 0), (1900, 2000)]), fov_um=FOV, overlap=0.1)
    check_against_limits(fields, (-2000, 12_000), (-2000, 12_000))  # fits: no error
    with pytest.raises(ValueError, match=r"29 of 841 fields .* r000c000 \(-61.6, 1961.6\)") as e:
        check_against_limits(fields, (0, 12_000), (-2000, 12_000))
    assert "and 24 more" in str(e.value)


def test_mda_sequence_visits_the_fields_in_order_with_focus_map_z() -> None:
    fields = plan_fields(ChipOutline(corners_um=[(0, 0), (300, 200)]), fov_um=FOV, overlap=0.1)
    seq = to_mda_sequence(fields, z_um=lambda x, y: 1000 + 0.002 * x)
    got = [(e.pos_name, e.x_pos, e.y_pos, e.z_pos) for e in seq]
    assert got == [(f.name, f.x_um, f.y_um, pytest.approx(1000 + 0.002 * f.x_um)) for f in fields]
    assert got[0][0] == "r000c000"
    assert all(e.z_pos is None for e in to_mda_sequence(fields))


def test_a_plan_runs_on_the_simulated_rig(make_core) -> None:
    core = make_core(small_rig_config())
    world = core.simulation.world
    fields = plan_fields(ChipOutline(corners_um=[(400, 400), (600, 450)]), fov_um=FOV, overlap=0.1)
    assert len(fields) == 3
    frames: list[tuple] = []
    core.mda.events.frameReady.connect(
        lambda img, event, meta: frames.append(
            (img.shape, event.pos_name, *core.getXYPosition(), core.getPosition())
        )
    )
    core.mda.run(to_mda_sequence(fields, z_um=world.focus_z_um))
    expected = [
        ((512, 512, 3), f.name, f.x_um, f.y_um, world.focus_z_um(f.x_um, f.y_um)) for f in fields
    ]
    assert [f[:2] for f in frames] == [e[:2] for e in expected]
    assert np.allclose([f[2:] for f in frames], [e[2:] for e in expected], atol=1e-6)


# ------------------------------------------------------------------ tiles


@pytest.mark.parametrize(
    ("shape", "offsets"),
    [
        ((512, 512), [(0, 0)]),
        ((768, 1024), [(0, 0), (0, 512), (256, 0), (256, 512)]),
        ((700, 600), [(0, 0), (0, 88), (188, 0), (188, 88)]),
    ],
)
def test_frames_cut_into_whole_tiles(shape: tuple[int, int], offsets: list) -> None:
    frame = np.arange(shape[0] * shape[1] * 3, dtype=np.int64).reshape(*shape, 3)
    tiles = cut_into_tiles(frame)
    assert [(r, c) for r, c, _ in tiles] == offsets
    seen = np.zeros(shape, dtype=bool)
    for r, c, tile in tiles:
        assert tile.shape == (512, 512, 3)
        assert np.array_equal(tile, frame[r : r + 512, c : c + 512])
        seen[r : r + 512, c : c + 512] = True
    assert seen.all()


def test_a_frame_smaller_than_a_tile_is_refused() -> None:
    with pytest.raises(ValueError, match=r"511×600 frame is smaller than one 512×512 tile"):
        cut_into_tiles(np.zeros((511, 600, 3), dtype=np.uint8))
