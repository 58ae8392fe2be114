"""Software autofocus on the simulated rig, and the focus map through its points."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from conftest import small_rig_config

from drivers.simulated import SimulatedCore
from drivers.simulated.world import ChipWorld
from scanner.focus import AutofocusError, autofocus, sharpness
from scanner.focus_map import FocusMap, choose_focus_points
from scanner.plan import ChipOutline

#: the simulated focus drive's own range (config defaults)
LOWER_Z, SAFE_Z = 0.0, 1500.0
#: an empty chip: bare oxide everywhere, nothing to focus on
BARE = {"thin_flakes_per_mm2": 0, "bulk_pieces_per_mm2": 0, "residue_per_mm2": 0, "dust_per_mm2": 0}


def _go_to_thick_flake(core: SimulatedCore, near: tuple[float, float]) -> float:
    """Centre the field on the thick piece nearest `near`; return the true focus Z there."""
    pieces = [p for p in core.simulation.world.pieces if p.layers >= 3 and p.polygon.area > 10]
    piece = min(pieces, key=lambda p: p.polygon.centroid.distance(shapely.Point(near)))
    c = piece.polygon.centroid
    core.setXYPosition(c.x, c.y)
    core.waitForDevice(core.getXYStageDevice())
    return core.simulation.world.focus_z_um(c.x, c.y)


def _record_focus_moves(core: SimulatedCore, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every Z requested through core.setPosition, passed on unchanged."""
    requested: list[float] = []
    real = core.setPosition

    def spy(*args: object) -> None:
        requested.append(float(args[-1]))  # type: ignore[arg-type]
        real(*args)

    monkeypatch.setattr(core, "setPosition", spy)
    return requested


# ------------------------------------------------------------------ sharpness


def test_sharpness_falls_with_defocus(make_core) -> None:
    core = make_core(small_rig_config())
    focus = _go_to_thick_flake(core, (500, 500))
    scores = []
    for dz in (0, 0.5, 1, 2, 4):
        core.setPosition(focus + dz)
        core.waitForDevice(core.getFocusDevice())
        core.snapImage()
        scores.append(sharpness(core.getImage()))
    assert scores == sorted(scores, reverse=True)
    assert scores[0] > 3 * scores[-1]


def test_sharpness_ignores_brightness_and_black_frames() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(40, 120, size=(64, 64, 3)).astype(np.uint8)
    assert sharpness(img * 2) == pytest.approx(sharpness(img), rel=1e-6)
    assert sharpness(np.zeros((64, 64, 3), np.uint8)) == 0.0
    assert sharpness(np.full((64, 64), 150, np.uint8)) == 0.0  # monochrome works too


# ------------------------------------------------------------------ autofocus


def test_autofocus_finds_focus_from_8um_off(make_core) -> None:
    core = make_core(small_rig_config())
    focus = _go_to_thick_flake(core, (300, 600))
    result = autofocus(core, center_z_um=focus + 8, safe_z_um=SAFE_Z, lower_z_um=LOWER_Z)
    assert result.z_um == pytest.approx(focus, abs=0.3)
    assert core.getPosition() == pytest.approx(result.z_um)  # left in focus
    assert len(result.sweep) < 40
    assert result.sharpness == max(s for _, s in result.sweep)


@pytest.mark.parametrize("side", ["safe_z", "lower_z"])
def test_autofocus_never_asks_for_z_beyond_its_limits(make_core, monkeypatch, side: str) -> None:
    core = make_core(small_rig_config())
    focus = _go_to_thick_flake(core, (600, 400))
    requested = _record_focus_moves(core, monkeypatch)
    # The sweep's centre sits 8 µm past a limit 3 µm beyond focus: half the sweep is off limits.
    if side == "safe_z":
        lower, safe, centre = LOWER_Z, focus + 3, focus + 8
    else:
        lower, safe, centre = focus - 3, SAFE_Z, focus - 8
    result = autofocus(core, center_z_um=centre, safe_z_um=safe, lower_z_um=lower)
    assert result.z_um == pytest.approx(focus, abs=0.3)
    assert requested and all(lower <= z <= safe for z in requested)


def test_autofocus_refuses_a_focus_beyond_safe_z(make_core, monkeypatch) -> None:
    core = make_core(small_rig_config())
    focus = _go_to_thick_flake(core, (500, 500))
    requested = _record_focus_moves(core, monkeypatch)
    with pytest.raises(AutofocusError, match="edge of the allowed range"):
        autofocus(core, center_z_um=focus - 4, safe_z_um=focus - 1.5, lower_z_um=LOWER_Z)
    assert max(requested) <= focus - 1.5


def test_a_flat_sweep_raises(make_core) -> None:
    core = make_core(small_rig_config(flakes=BARE))
    with pytest.raises(AutofocusError, match="flat focus sweep"):
        autofocus(core, center_z_um=core.getPosition(), safe_z_um=SAFE_Z, lower_z_um=LOWER_Z)


# ------------------------------------------------------------------ the focus map


def test_focus_map_recovers_a_plane_exactly() -> None:
    def plane(x: float, y: float) -> float:
        return 1000 + 0.002 * x - 0.001 * y

    for pts in (
        [(0, 0), (5000, 0), (0, 5000), (5000, 5000)],
        [(i * 900, (i * 7) % 5 * 800) for i in range(7)],
        [(i * 900, (i * 7) % 5 * 800) for i in range(9)],
    ):
        fmap = FocusMap().fit([(x, y, plane(x, y)) for x, y in pts])
        assert fmap.kind == ("plane" if len(pts) < 8 else "quadratic")
        assert np.abs(fmap.residuals_um).max() < 1e-9
        for x, y in [(1234, 4321), (9000, -300)]:
            assert fmap.z_at(x, y) == pytest.approx(plane(x, y), abs=1e-9)


def test_focus_map_refuses_too_few_or_collinear_points() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        FocusMap().fit([(0, 0, 1000), (100, 0, 1001)])
    with pytest.raises(ValueError, match="one line"):
        FocusMap().fit([(0, 0, 1000), (100, 100, 1001), (200, 200, 1002), (300, 300, 1000)])
    with pytest.raises(RuntimeError, match="fit"):
        FocusMap().z_at(0, 0)


def test_focus_points_spread_over_the_chip_inside_the_outline() -> None:
    square = ChipOutline(corners_um=[(0, 0), (2000, 2000)])
    pts = choose_focus_points(square, 5)
    assert pts[0] == (1000, 1000)
    assert sorted(pts[1:]) == [(200, 200), (200, 1800), (1800, 200), (1800, 1800)]
    triangle = ChipOutline(polygon_um=[(0, 0), (2000, 0), (0, 2000)])
    pts = choose_focus_points(triangle, 9)
    assert len(pts) >= 6
    assert all(triangle.shape().contains(shapely.Point(p)) for p in pts)
    with pytest.raises(ValueError, match="5 to 9"):
        choose_focus_points(square, 3)


def test_focus_map_follows_a_tilted_bowed_chip_within_the_bow() -> None:
    cfg = small_rig_config()  # 1 × 1 mm, tilt (2, -1) µm/mm, bow 0.8 µm
    world = ChipWorld(cfg)
    outline = ChipOutline(corners_um=[(0, 0), (1000, 1000)])
    fmap = FocusMap().fit(
        [(x, y, world.focus_z_um(x, y)) for x, y in choose_focus_points(outline, 9)]
    )
    assert fmap.kind == "quadratic"
    grid = np.linspace(0, 1000, 11)
    errors = [fmap.z_at(x, y) - world.focus_z_um(x, y) for x in grid for y in grid]
    assert np.abs(errors).max() <= cfg.focus_surface.warp_um


def test_focus_map_from_autofocus_predicts_focus_elsewhere(make_core) -> None:
    # A 2 × 2 mm chip tilted 2 µm/mm (4 µm from side to side, several depths of field) with a
    # slight bow: a 5-point plane cannot follow the default 0.8 µm bow that well.
    cfg = small_rig_config(
        chip={"width_um": 2000, "height_um": 2000},
        focus_surface={"tilt_x_um_per_mm": 2.0, "tilt_y_um_per_mm": -1.0, "warp_um": 0.1},
    )
    core = make_core(cfg)
    world = core.simulation.world
    outline = ChipOutline(corners_um=[(0, 0), (2000, 2000)])
    measured = []
    for point in choose_focus_points(outline, 5):
        # Bare oxide has nothing to focus on: go to the nearest thick flake, as a scan must.
        _go_to_thick_flake(core, point)
        x, y = core.getXYPosition()
        # Start from the last point's focus: the tilt has moved focus by a few µm since.
        start = core.getPosition()
        found = autofocus(core, center_z_um=start, safe_z_um=SAFE_Z, lower_z_um=LOWER_Z)
        measured.append((x, y, found.z_um))
    fmap = FocusMap().fit(measured)
    rng = np.random.default_rng(3)
    errors = [fmap.z_at(x, y) - world.focus_z_um(x, y) for x, y in rng.uniform(0, 2000, (25, 2))]
    assert np.abs(errors).max() <= 0.5
