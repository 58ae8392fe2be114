"""The scan plan: which fields of view cover the chip, in what order, and how frames become tiles.

Coordinates are stage micrometres. Fields follow useq-schema's grid conventions: (x, y) is the
centre of a field; row 0 runs along the outline's top edge (largest y) and rows step towards
smaller y; columns step towards larger x; the first field's edges sit on the outline's left and
top bounds, and the last row and column may overhang the outline's far bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import shapely
import useq
from pydantic import BaseModel, ConfigDict, Field, model_validator
from shapely.geometry import Polygon, box
from shapely.validation import explain_validity

Point = tuple[float, float]
#: share of a field's area below which its overlap with the chip is rounding, not chip
_SLIVER = 1e-6


class ChipOutline(BaseModel):
    """Where the chip lies on the stage: a rectangle from two opposite corners, or a polygon."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    #: two opposite corners, in any order
    corners_um: tuple[Point, Point] | None = None
    #: the outline's vertices (not closed: the last point joins the first)
    polygon_um: list[Point] | None = Field(default=None, min_length=3)

    @model_validator(mode="after")
    def _one_valid_shape(self) -> ChipOutline:
        if (self.corners_um is None) == (self.polygon_um is None):
            raise ValueError("give exactly one of corners_um or polygon_um")
        if self.corners_um is not None:
            (x0, y0), (x1, y1) = self.corners_um
            if x0 == x1 or y0 == y1:
                raise ValueError(f"the chip's corners {self.corners_um} enclose no area")
        shape = self.shape()
        if not shape.is_valid:
            # explain_validity names the problem and where, e.g. "Self-intersection[500 500]"
            raise ValueError(f"the chip outline is not a valid polygon: {explain_validity(shape)}")
        if shape.area <= 0:
            raise ValueError(f"the chip outline encloses no area: {self.polygon_um}")
        return self

    def shape(self) -> Polygon:
        if self.corners_um is not None:
            (x0, y0), (x1, y1) = self.corners_um
            return box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        return Polygon(self.polygon_um)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(x_min, y_min, x_max, y_max) in stage µm."""
        x0, y0, x1, y1 = self.shape().bounds
        return float(x0), float(y0), float(x1), float(y1)


@dataclass(frozen=True, slots=True)
class FieldOfView:
    """One stop of the stage: `index` in scan order, grid `row` and `col`, centre in stage µm."""

    index: int
    row: int
    col: int
    x_um: float
    y_um: float

    @property
    def name(self) -> str:
        """Stable across re-plans of the same grid (unlike `index`): journals and files use it."""
        return f"r{self.row:03d}c{self.col:03d}"

    def footprint(self, fov_um: tuple[float, float]) -> Polygon:
        """The rectangle of the chip this field sees."""
        w, h = fov_um
        return box(self.x_um - w / 2, self.y_um - h / 2, self.x_um + w / 2, self.y_um + h / 2)


def plan_fields(
    outline: ChipOutline,
    *,
    fov_um: tuple[float, float],
    overlap: float,
    serpentine: bool = True,
) -> list[FieldOfView]:
    """Fields of view on a grid over the outline, each overlapping its neighbours by `overlap`
    (a fraction of the field), in scan order.

    Serpentine order reverses direction every row, so the stage never flies back across the
    chip between rows.
    """
    w, h = fov_um
    if w <= 0 or h <= 0:
        raise ValueError(f"field of view must be positive, got {fov_um} µm")
    if not 0 <= overlap <= 0.5:
        raise ValueError(f"overlap is a fraction of the field, 0 to 0.5; got {overlap}")
    shape = outline.shape()
    grid = useq.GridFromPolygon(
        vertices=list(shape.exterior.coords)[:-1],
        fov_width=w,
        fov_height=h,
        overlap=overlap * 100,  # useq counts overlap in percent
        mode=useq.OrderMode.row_wise_snake if serpentine else useq.OrderMode.row_wise,
    )
    positions = list(grid.iter_grid_positions())
    if not positions:
        return []
    # useq keeps every field whose rectangle *intersects* the outline. When the chip is an
    # exact multiple of the step, rounding leaves an extra row or column that only touches the
    # chip's edge, or overlaps it by 1e-13 µm: a frame with no chip in it. Drop fields that see
    # less chip than rounding can explain.
    xy = np.array([(p.x, p.y) for p in positions], dtype=float)
    rects = shapely.box(xy[:, 0] - w / 2, xy[:, 1] - h / 2, xy[:, 0] + w / 2, xy[:, 1] + h / 2)
    sees_chip = shapely.area(shapely.intersection(shape, rects)) > _SLIVER * w * h
    kept = [p for p, keep in zip(positions, sees_chip, strict=True) if keep]
    return [
        FieldOfView(i, int(p.grid_row or 0), int(p.grid_col or 0), float(p.x), float(p.y))
        for i, p in enumerate(kept)
    ]


def to_mda_sequence(
    fields: Sequence[FieldOfView], z_um: Callable[[float, float], float] | None = None
) -> useq.MDASequence:
    """An MDA sequence visiting `fields` in order; `z_um(x, y)` (a focus map) sets each Z.

    Without `z_um` the positions carry no Z, and the runner leaves the focus drive where it is.
    """
    positions = [
        useq.Position(
            x=f.x_um,
            y=f.y_um,
            z=None if z_um is None else float(z_um(f.x_um, f.y_um)),
            name=f.name,
        )
        for f in fields
    ]
    return useq.MDASequence(stage_positions=positions)


def check_against_limits(
    fields: Sequence[FieldOfView],
    x_limits_um: tuple[float, float],
    y_limits_um: tuple[float, float],
    *,
    show: int = 5,
) -> None:
    """Refuse a plan with any field centre outside the stage's soft limits (ValueError).

    Checked before the scan starts, so a scan is refused whole rather than failing halfway.
    """
    (xlo, xhi), (ylo, yhi) = x_limits_um, y_limits_um
    outside = [f for f in fields if not (xlo <= f.x_um <= xhi and ylo <= f.y_um <= yhi)]
    if not outside:
        return
    listed = ", ".join(f"{f.name} ({f.x_um:.1f}, {f.y_um:.1f})" for f in outside[:show])
    more = f" and {len(outside) - show} more" if len(outside) > show else ""
    raise ValueError(
        f"{len(outside)} of {len(fields)} fields lie outside the stage's soft limits "
        f"x {xlo:g}..{xhi:g} µm, y {ylo:g}..{yhi:g} µm: {listed}{more}"
    )


def cut_into_tiles(frame: np.ndarray, tile: int = 512) -> list[tuple[int, int, np.ndarray]]:
    """(row_offset, col_offset, tile) for every `tile`×`tile` piece of a camera frame.

    The last tile of a row or column is shifted back inside the frame, overlapping its
    neighbour, rather than padded: padding would show the model an edge that is not on the
    chip. Tiles are views into `frame`; copy one to keep it beyond the frame.
    """
    h, w = frame.shape[:2]
    if h < tile or w < tile:
        raise ValueError(
            f"a {h}×{w} frame is smaller than one {tile}×{tile} tile; "
            "the model needs whole tiles (use a larger camera ROI or a smaller tile)"
        )
    return [
        (r, c, frame[r : r + tile, c : c + tile])
        for r in _offsets(h, tile)
        for c in _offsets(w, tile)
    ]


def _offsets(length: int, tile: int) -> list[int]:
    offsets = list(range(0, length - tile + 1, tile))
    if offsets[-1] + tile < length:
        offsets.append(length - tile)
    return offsets


def check_focus_plan(
    fields: Sequence[FieldOfView],
    z_um: Callable[[float, float], float],
    safe_z_um: float,
    lower_z_um: float = -math.inf,
    *,
    show: int = 5,
) -> None:
    """Refuse a plan whose focus map asks for a Z above the safe Z (or below the lower limit).

    A badly fitted focus surface must stop the scan before the objective meets the chip.
    """
    bad = [(f, z) for f in fields if not lower_z_um <= (z := z_um(f.x_um, f.y_um)) <= safe_z_um]
    if bad:
        listed = ", ".join(f"{f.name} z {z:.2f} µm" for f, z in bad[:show])
        more = f" and {len(bad) - show} more" if len(bad) > show else ""
        raise ValueError(
            f"{len(bad)} of {len(fields)} fields would need a focus Z outside "
            f"{lower_z_um:g}..{safe_z_um:g} µm (safe Z {safe_z_um:g} µm): {listed}{more}"
        )


def flat_field_fields(
    fields: Sequence[FieldOfView], chip: Polygon, fov_um: tuple[float, float], n: int
) -> list[FieldOfView]:
    """Up to `n` fields spread evenly through the plan for estimating the flat field.

    Fields that see only the chip come first: the dark stage beyond the chip's edge lies in
    the same part of every border field's frame, where the per-pixel median would take it
    for the lamp's shadow. A chip with fewer inner fields than `n` lends border fields too.
    """
    inner = [f for f in fields if chip.contains(f.footprint(fov_um))]
    pool = inner if len(inner) >= min(n, len(fields)) else list(fields)
    if len(pool) <= n:
        return list(pool)
    picks = np.unique(np.linspace(0, len(pool) - 1, n).round().astype(int))
    return [pool[i] for i in picks]
