"""The focus map: a surface z(x, y) fitted through autofocus points, and where to take them.

A chip is tilted and slightly bowed; focusing once per field would cost a Z sweep per tile, so
the scanner focuses at a handful of points and predicts Z everywhere else from this surface.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import shapely
import shapely.ops

from .plan import ChipOutline

_QUADRATIC_POINTS = 8


class FocusMap:
    """A smooth surface z(x, y) through measured focus points.

    A plane (least squares) through 3 to 7 points; a quadratic (6 terms: tilt plus bow) from
    8 points on. Through exactly 6 points a quadratic follows every focusing error and swings
    wildly between points that happen to lie close together; two spare points average that.
    """

    def __init__(self) -> None:
        self.kind: str = ""
        self.residuals_um: np.ndarray = np.empty(0)
        self._coef: np.ndarray | None = None
        self._origin = np.zeros(2)
        self._scale = 1.0

    def fit(self, points: Sequence[tuple[float, float, float]]) -> FocusMap:
        """Fit through (x, y, z) points in stage µm; returns self."""
        pts = np.asarray(points, dtype=float)
        if pts.ndim != 2 or pts.shape[1] != 3 or not np.isfinite(pts).all():
            raise ValueError("focus points must be finite (x, y, z) triples")
        if len(pts) < 3:
            raise ValueError(f"a focus map needs at least 3 points, got {len(pts)}")
        # Centre and scale x, y to about ±1 so x² terms of a 1 cm chip stay well conditioned.
        self._origin = pts[:, :2].mean(axis=0)
        spread = np.linalg.svd(pts[:, :2] - self._origin, compute_uv=False)
        if spread[1] < 1e-3 * spread[0]:
            raise ValueError(
                f"the {len(pts)} focus points lie on one line: a surface through them is "
                "undetermined; spread them over the chip"
            )
        self._scale = float(np.abs(pts[:, :2] - self._origin).max())
        terms = _terms(*self._normalised(pts[:, 0], pts[:, 1]))
        self.kind, n = "plane", 3
        # Six points on one conic (e.g. a circle) do not determine a quadratic: fall back.
        if len(pts) >= _QUADRATIC_POINTS and np.linalg.cond(terms) < 1e8:
            self.kind, n = "quadratic", 6
        self._coef = np.linalg.lstsq(terms[:, :n], pts[:, 2], rcond=None)[0]
        self.residuals_um = pts[:, 2] - terms[:, :n] @ self._coef
        return self

    def z_at(self, x: float, y: float) -> float:
        """Focus Z at stage (x, y), µm."""
        if self._coef is None:
            raise RuntimeError("fit the focus map before asking it for Z")
        terms = _terms(*self._normalised(np.atleast_1d(x), np.atleast_1d(y)))
        return float((terms[:, : len(self._coef)] @ self._coef)[0])

    def _normalised(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (x - self._origin[0]) / self._scale, (y - self._origin[1]) / self._scale


def _terms(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones_like(u), u, v, u * u, u * v, v * v])


def choose_focus_points(
    outline: ChipOutline, n: int = 5, *, inset: float = 0.1
) -> list[tuple[float, float]]:
    """`n` (5 to 9) points spread over the chip for the focus map, inside the outline.

    The centre, then the four corners, then the four edge midpoints of the bounding box, all
    moved in by `inset` × the chip's shorter side: the edges are chipped and dirty, and points
    far apart pin a tilt down best. A point outside a non-rectangular outline moves to the
    nearest place inside; coinciding points are dropped, so a narrow outline may give fewer.
    """
    if not 5 <= n <= 9:
        raise ValueError(f"choose 5 to 9 focus points, not {n}")
    shape = outline.shape()
    x0, y0, x1, y1 = outline.bounds
    margin = inset * min(x1 - x0, y1 - y0)
    inner = shape.buffer(-margin)
    if inner.is_empty:
        inner = shape
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    xl, xh, yl, yh = x0 + margin, x1 - margin, y0 + margin, y1 - margin
    candidates = [(cx, cy), (xl, yl), (xh, yl), (xh, yh), (xl, yh)]
    candidates += [(xl, cy), (xh, cy), (cx, yl), (cx, yh)]
    chosen: list[tuple[float, float]] = []
    for x, y in candidates[:n]:
        p = shapely.Point(x, y)
        if not inner.covers(p):
            p = shapely.ops.nearest_points(inner, p)[0]
        if all(math.hypot(p.x - q[0], p.y - q[1]) > margin / 2 for q in chosen):
            chosen.append((float(p.x), float(p.y)))
    return chosen
