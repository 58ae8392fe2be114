"""Flakes from label maps and their merging across tiles: exact numbers and the world's truth."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import shapely
from conftest import small_rig_config
from shapely.geometry import Polygon, box

from drivers.simulated.world import ChipWorld, TruthFlake
from scanner.flakes import Flake, PixelToStage, TileFlake, extract_flakes, merge_flakes

PX = 0.15  # µm per pixel at 100×, as the simulated camera
SHAPE = (512, 512)
FOV = PX * SHAPE[0]
STEP = 0.9 * FOV  # tiles overlap by 10 %


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.stack([labels == k for k in range(3)]).astype(np.float32)


def paint(to_stage: PixelToStage, shapes: list[tuple[Polygon, int]]) -> np.ndarray:
    """A label map of stage-frame shapes: a pixel takes the class of the last shape holding its
    centre. Exact by construction, unlike a rasteriser with its own conventions."""
    rows, cols = np.mgrid[0 : to_stage.shape[0], 0 : to_stage.shape[1]]
    x, y = to_stage.pixel_to_stage(rows, cols)
    labels = np.zeros(to_stage.shape, dtype=np.uint8)
    for polygon, value in shapes:
        labels[shapely.contains_xy(polygon, x, y)] = value
    return labels


def scan(shapes: list[tuple[Polygon, int]], centres: list[tuple[float, float]]) -> list[TileFlake]:
    pieces = []
    for tile, centre in enumerate(centres):
        to_stage = PixelToStage.from_calibration(centre, SHAPE, PX)
        labels = paint(to_stage, shapes)
        pieces += extract_flakes(labels, one_hot(labels), to_stage, tile=tile)
    return pieces


# ------------------------------------------------------------------ pixel -> stage
def test_square_region_maps_to_exact_stage_polygon() -> None:
    to_stage = PixelToStage.from_calibration((100.0, 200.0), (10, 20), 0.5)
    labels = np.zeros((10, 20), dtype=np.uint8)
    labels[2:5, 5:9] = 1  # 3 rows × 4 cols: pixel corners cols 5..9, rows 2..5
    probs = one_hot(labels)
    (flake,) = extract_flakes(labels, probs, to_stage, min_area_um2=0.5, simplify_um=0.01)
    # corner (col, row) -> x = 100 + 0.5 (col - 10), y = 200 + 0.5 (row - 5)
    assert flake.bbox_stage_um == (97.5, 198.5, 99.5, 200.0)
    # the outline runs through the pixel-edge midpoints, so each corner loses ½·¼·¼ µm²
    assert flake.area_um2 == pytest.approx(3.0 - 4 * 0.5 * 0.25**2, abs=1e-9)
    assert flake.centroid_stage_um == pytest.approx((98.5, 199.25), abs=1e-9)
    octagon = [(97.75, 198.5), (99.25, 198.5), (99.5, 198.75), (99.5, 199.75), (99.25, 200)]
    octagon += [(97.75, 200), (97.5, 199.75), (97.5, 198.75)]
    assert flake.polygon.equals(Polygon(octagon))
    assert flake.polygon.exterior.is_ccw and len(flake.polygon.exterior.coords) == 9
    assert flake.confidence == 1.0 and flake.pixels == 12 and not flake.touches_edge


@pytest.mark.parametrize(
    ("rotation_deg", "flip", "bounds"),
    [
        # x = 100 − 0.5·drow, y = 200 + 0.5·dcol with dcol ∈ [−5, −1], drow ∈ [−3, 0]
        (90.0, False, (100.0, 197.5, 101.5, 199.5)),
        # mirrored columns: x = 100 − 0.5·dcol
        (0.0, True, (100.5, 198.5, 102.5, 200.0)),
        # mirrored then turned: x = 100 − 0.5·drow, y = 200 − 0.5·dcol
        (90.0, True, (100.0, 200.5, 101.5, 202.5)),
    ],
)
def test_rotation_and_flip(rotation_deg: float, flip: bool, bounds: tuple) -> None:
    to_stage = PixelToStage.from_calibration((100.0, 200.0), (10, 20), 0.5, rotation_deg, flip)
    labels = np.zeros((10, 20), dtype=np.uint8)
    labels[2:5, 5:9] = 2
    (flake,) = extract_flakes(labels, one_hot(labels), to_stage, min_area_um2=0.5)
    assert flake.layer_class == "bilayer"
    assert flake.bbox_stage_um == pytest.approx(bounds, abs=1e-9)
    assert flake.area_um2 == pytest.approx(2.875, abs=1e-9)
    assert flake.polygon.exterior.is_ccw  # a mirror image reverses rings; output is oriented


def test_mm_affine_agrees_with_calibration() -> None:
    px, rot = 0.15, 30.0
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    # what the simulated rig gives Micro-Manager (drivers/simulated/rig.py)
    affine = [px * c, -px * s, 0.0, px * s, px * c, 0.0]
    a = PixelToStage.from_mm_affine(affine, (10.0, 20.0), SHAPE)
    b = PixelToStage.from_calibration((10.0, 20.0), SHAPE, px, rot)
    assert a.matrix == pytest.approx(b.matrix, abs=1e-12)
    rows, cols = np.array([0.0, 255.5, 511.0]), np.array([3.0, 255.5, 400.0])
    np.testing.assert_allclose(a.pixel_to_stage(rows, cols), b.pixel_to_stage(rows, cols))
    assert a.pixel_size_um == pytest.approx(px)
    with pytest.raises(ValueError, match="6 elements"):
        PixelToStage.from_mm_affine(affine[:4], (0, 0), SHAPE)
    with pytest.raises(ValueError, match="singular"):
        PixelToStage.from_mm_affine([0.0] * 6, (0, 0), SHAPE)


def test_image_centre_is_the_stage_position() -> None:
    t = PixelToStage.from_calibration((5.0, -7.0), SHAPE, PX, 12.0)
    x, y = t.pixel_to_stage(np.array(255.5), np.array(255.5))
    assert (float(x), float(y)) == pytest.approx((5.0, -7.0))
    assert t.footprint().area == pytest.approx(FOV**2)
    assert t.footprint().centroid.coords[0] == pytest.approx((5.0, -7.0))


# ------------------------------------------------------------------ against the world's truth
@pytest.fixture(scope="module")
def world() -> ChipWorld:
    return ChipWorld(small_rig_config())


def isolated(world: ChipWorld, lo: float, hi: float, count: int) -> list[TruthFlake]:
    """Truth flakes of lo..hi µm² with no other flake of their class within 3 µm."""
    picked = []
    for f in world.flakes:
        others = [g for g in world.flakes if g is not f and g.layers == f.layers]
        if lo < f.polygon.area < hi and all(g.polygon.distance(f.polygon) > 3 for g in others):
            picked.append(f)
    by_class = [f for f in picked if f.layers == 1][:count] + [f for f in picked if f.layers == 2][
        :count
    ]
    assert len(by_class) == 2 * count, "the small rig's world should hold enough flakes"
    return by_class


def best_match(flakes: list, truth: TruthFlake):
    same = [f for f in flakes if f.layer_class == truth.layer_class]
    return max(same, key=lambda f: f.polygon.intersection(truth.polygon).area)


def assert_agrees(area: float, centroid: tuple, polygon: Polygon, truth: TruthFlake) -> None:
    # The world's rasteriser (PIL) decides a boundary pixel with up to a pixel of slop and
    # measures ~0.5 px off its documented pixel centres, so a faithful outline may sit up to a
    # pixel from the truth: area within one pixel times the perimeter, centroid within 1.5 px
    # (measured: ≤ 0.57 px·perimeter and ≤ 1.14 px over this world's flakes).
    c = truth.polygon.centroid
    assert abs(area - truth.polygon.area) <= PX * truth.polygon.length
    assert math.dist(centroid, (c.x, c.y)) <= 1.5 * PX
    iou = polygon.intersection(truth.polygon).area / polygon.union(truth.polygon).area
    assert iou > 0.85


@pytest.mark.parametrize("rotation_deg", [0.0, 30.0])
def test_extract_lands_on_world_truth(world: ChipWorld, rotation_deg: float) -> None:
    for truth in isolated(world, 15, 150, 2):
        c = truth.polygon.centroid
        labels = world.label_raster((c.x, c.y), SHAPE, PX, rotation_deg)
        to_stage = PixelToStage.from_calibration((c.x, c.y), SHAPE, PX, rotation_deg)
        f = best_match(extract_flakes(labels, one_hot(labels), to_stage), truth)
        assert f.confidence == 1.0 and not f.touches_edge
        assert_agrees(f.area_um2, f.centroid_stage_um, f.polygon, truth)


def world_tiles(world: ChipWorld, centres: list[tuple[float, float]]) -> list[TileFlake]:
    pieces = []
    for tile, centre in enumerate(centres):
        labels = world.label_raster(centre, SHAPE, PX)
        to_stage = PixelToStage.from_calibration(centre, SHAPE, PX)
        pieces += extract_flakes(labels, one_hot(labels), to_stage, tile=tile)
    return pieces


@pytest.mark.parametrize(
    "offsets", [[(-1, 0), (1, 0)], [(-1, -1), (1, -1), (-1, 1), (1, 1)]], ids=["two", "four"]
)
def test_flake_split_across_overlapping_tiles_is_one_record(world, offsets) -> None:
    for truth in isolated(world, 55, 150, 1):  # > 11 µm across: every tile cuts it
        x0, y0, x1, y1 = truth.polygon.bounds  # seams through the middle of the flake
        c = shapely.Point((x0 + x1) / 2, (y0 + y1) / 2)
        centres = [(c.x + dx * STEP / 2, c.y + dy * STEP / 2) for dx, dy in offsets]
        pieces = world_tiles(world, centres)
        cut = [p for p in pieces if p.layer_class == truth.layer_class]
        cut = [p for p in cut if p.polygon.intersection(truth.polygon).area > 1]
        # a tile may see a concave flake's cut-off lobes as pieces of their own
        assert len(cut) >= len(centres) and all(p.touches_edge for p in cut)
        merged = merge_flakes(pieces)
        hits = [f for f in merged if f.layer_class == truth.layer_class]
        hits = [f for f in hits if f.polygon.intersects(truth.polygon)]
        assert len(hits) == 1
        (flake,) = hits
        assert flake.tiles == tuple(range(len(centres)))
        assert_agrees(flake.area_um2, flake.centroid_stage_um, flake.polygon, truth)
        # and it is the flake one centred tile sees, but for the world's raster, which moves
        # an outline by up to a pixel with the tile's sub-pixel phase: < 1 px · perimeter
        whole = best_match(world_tiles(world, [(c.x, c.y)]), truth)
        assert flake.polygon.symmetric_difference(whole.polygon).area < PX * whole.polygon.length


def test_order_independent(world: ChipWorld) -> None:
    truth = isolated(world, 55, 150, 1)[0]
    c = truth.polygon.centroid
    centres = [(c.x + dx * STEP / 2, c.y + dy * STEP / 2) for dx in (-1, 1) for dy in (-1, 1)]
    pieces = world_tiles(world, centres)
    reference = merge_flakes(pieces)
    for seed in range(3):
        shuffled = pieces[:]
        random.Random(seed).shuffle(shuffled)
        again = merge_flakes(shuffled)
        assert [f.model_dump(exclude={"polygon"}) for f in again] == [
            f.model_dump(exclude={"polygon"}) for f in reference
        ]
        assert all(
            a.polygon.equals_exact(b.polygon, 0) for a, b in zip(again, reference, strict=True)
        )


# ------------------------------------------------------------------ merging, painted
def test_seam_between_abutting_tiles_is_closed() -> None:
    flake = box(30, -5, 50, 5)  # crosses the seam at x = FOV / 2 = 38.4
    pieces = scan([(flake, 1)], [(0.0, 0.0), (FOV, 0.0)])
    assert len(pieces) == 2
    (merged,) = merge_flakes(pieces)
    assert merged.tiles == (0, 1)
    assert merged.area_um2 == pytest.approx(flake.area, abs=PX * flake.length)


@pytest.mark.parametrize(
    ("gap_um", "centres"),
    [
        (1.0, [(0.0, 0.0), (STEP, 0.0)]),  # wider than gap_um, both tiles see both
        (0.3, [(0.0, 0.0), (STEP, 0.0)]),  # narrower, but the tiles saw them apart
        (1.0, [(0.0, 0.0), (FOV, 0.0)]),  # abutting tiles, flakes across the seam
    ],
)
def test_nearby_distinct_flakes_stay_two(gap_um: float, centres: list) -> None:
    upper = box(33, 0, 42, 4)  # across the overlap strip x ∈ [30.7, 38.4]
    lower = box(33, -4 - gap_um, 42, -gap_um)
    merged = merge_flakes(scan([(upper, 1), (lower, 1)], centres))
    assert len(merged) == 2
    # a pixel centre decides each boundary pixel: half a pixel times the perimeter
    assert sorted(f.area_um2 for f in merged) == pytest.approx([36, 36], abs=PX * 26 / 2)


def test_monolayer_touching_bilayer_stay_separate() -> None:
    mono, bi = box(32, 0, 42, 5), box(32, 5, 42, 8)
    merged = merge_flakes(scan([(mono, 1), (bi, 2)], [(0.0, 0.0), (STEP, 0.0)]))
    assert [f.layer_class for f in merged] == ["monolayer", "bilayer"]
    assert [f.tiles for f in merged] == [(0, 1), (0, 1)]


def test_tile_fed_twice_gives_no_duplicate() -> None:
    pieces = scan([(box(-5, -5, 5, 5), 2), (box(10, 10, 14, 12), 2)], [(0.0, 0.0)])
    merged = merge_flakes(pieces + pieces)
    assert len(merged) == 2 and all(f.tiles == (0,) for f in merged)


def test_min_area_and_confidence() -> None:
    to_stage = PixelToStage.from_calibration((0.0, 0.0), (64, 64), PX)
    labels = np.zeros((64, 64), dtype=np.uint8)
    labels[10:20, 10:15] = 1  # 50 px = 1.125 µm²
    labels[40:46, 40:45] = 1  # 30 px = 0.675 µm²
    probs = np.random.default_rng(0).uniform(0, 1, (3, 64, 64)).astype(np.float32)
    flakes = extract_flakes(labels, probs, to_stage, min_area_um2=1.0)
    assert len(flakes) == 1 and flakes[0].pixels == 50
    assert flakes[0].confidence == pytest.approx(float(probs[1, 10:20, 10:15].mean()), rel=1e-6)
    assert len(extract_flakes(labels, probs, to_stage, min_area_um2=0.5)) == 2


def test_diagonal_contact_is_one_region_and_holes_are_subtracted() -> None:
    to_stage = PixelToStage.from_calibration((0.0, 0.0), (64, 64), PX)
    labels = np.zeros((64, 64), dtype=np.uint8)
    labels[5:15, 5:15] = labels[15:25, 15:25] = 1  # touch only at a corner
    labels[30:50, 30:50] = 2
    labels[36:44, 36:44] = 0  # a hole of 1.4 µm²: kept
    labels[33, 33] = labels[46, 46] = 0  # pinholes: prediction noise, filled
    flakes = extract_flakes(labels, one_hot(labels), to_stage, min_area_um2=0.5)
    mono, bi = flakes
    assert isinstance(mono.polygon, Polygon) and mono.polygon.is_valid and mono.pixels == 200
    assert mono.area_um2 == pytest.approx(200 * PX**2, rel=0.02)
    assert len(bi.polygon.interiors) == 1
    assert bi.area_um2 == pytest.approx((400 - 64) * PX**2, rel=0.02) and bi.pixels == 400 - 66


def test_merged_confidence_is_area_weighted() -> None:
    seen = [(box(30, -5, 40, 5), 0.9), (box(36, -5, 56, 5), 0.6)]
    views = [PixelToStage.from_calibration((x, 0.0), SHAPE, PX).footprint() for x in (0, STEP)]
    pieces = [
        TileFlake(
            layer_class="monolayer",
            confidence=conf,
            tile=tile,
            pixels=1,
            touches_edge=False,
            field_of_view=views[tile],
            **TileFlake.geometry_fields(polygon),
        )
        for tile, (polygon, conf) in enumerate(seen)
    ]
    (merged,) = merge_flakes(pieces)
    assert isinstance(merged, Flake) and merged.tiles == (0, 1)
    assert merged.confidence == pytest.approx((100 * 0.9 + 200 * 0.6) / 300)
    assert merged.area_um2 == pytest.approx(260)


def test_wrong_shapes_are_refused() -> None:
    to_stage = PixelToStage.from_calibration((0.0, 0.0), (8, 8), PX)
    labels = np.zeros((8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="label map"):
        extract_flakes(np.zeros((8, 9), np.uint8), one_hot(labels), to_stage)
    with pytest.raises(ValueError, match="probabilities"):
        extract_flakes(labels, np.zeros((2, 8, 8), np.float32), to_stage)
