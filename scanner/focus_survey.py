"""The focus survey before a scan: autofocus at points spread over the chip, a surface through.

A chosen point may show bare oxide, with nothing to focus on; the survey then tries the
fields around it, spiralling out, until it finds structure. Each sweep is centred on the
surface through the points found so far, so a tilted chip is followed from point to point.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import numpy as np
import shapely
import structlog
from pymmcore_plus import CMMCorePlus

from .acquisition import StageLimits
from .focus import AutofocusError, autofocus
from .focus_map import FocusMap, choose_focus_points
from .plan import ChipOutline
from .scan_config import FocusConfig

log = structlog.get_logger("flakescan.focus")

Point3 = tuple[float, float, float]


class FocusSurveyError(RuntimeError):
    """Too few focus points found to fit a surface."""


def survey_focus(
    core: CMMCorePlus,
    outline: ChipOutline,
    fc: FocusConfig,
    limits: StageLimits,
    *,
    field_step_um: tuple[float, float],
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[FocusMap, list[Point3]]:
    """Autofocus at `fc.points` places over the chip; the fitted surface and the points.

    `should_stop` is asked before each place: a stopped survey raises FocusSurveyError.
    """
    start_z = fc.start_z_um if fc.start_z_um is not None else float(core.getPosition())
    shape = outline.shape()
    x0, y0, x1, y1 = outline.bounds
    # Points close together pin nothing down and let a quadratic swing between them.
    apart = 0.15 * min(x1 - x0, y1 - y0)
    found: list[Point3] = []
    for x, y in choose_focus_points(outline, fc.points):
        for dx, dy in spiral(fc.tries_per_point):
            px, py = x + dx * field_step_um[0], y + dy * field_step_um[1]
            inside = shape.contains(shapely.Point(px, py))
            near = any(math.hypot(px - q[0], py - q[1]) < apart for q in found)
            if not inside or near or not _within(px, py, limits):
                continue
            if should_stop():
                raise FocusSurveyError("the focus survey was stopped")
            # Once a plane is known it predicts the rest within a few µm: a shorter sweep.
            span = (
                fc.coarse_range_um
                if len(found) < 3
                else min(fc.coarse_range_um, fc.follow_range_um)
            )
            centre = _predict(found, px, py, start_z)
            z = _focus_at(core, px, py, centre, span, fc, limits)
            if z is not None:
                found.append((px, py, z))
                log.info("focus.point", x_um=px, y_um=py, z_um=round(z, 3))
                break
    if len(found) < 3:
        raise FocusSurveyError(
            f"autofocus found the chip at only {len(found)} of {fc.points} focus points "
            f"({fc.tries_per_point} places tried around each): is the chip under the "
            "objective, the lamp on, and focus within "
            f"{start_z:.1f} ± {fc.coarse_range_um / 2:g} µm (scan.focus.start_z_um)?"
        )
    return FocusMap().fit(found), found


def _focus_at(
    core: CMMCorePlus,
    x: float,
    y: float,
    centre: float,
    span: float,
    fc: FocusConfig,
    lim: StageLimits,
) -> float | None:
    try:
        core.setXYPosition(x, y)
        core.waitForDevice(core.getXYStageDevice())
        rx, ry = core.getXYPosition()
        if math.hypot(rx - x, ry - y) > 1.0:  # a Z filed under the wrong place misleads
            raise RuntimeError(f"stage reported ({rx:.1f}, {ry:.1f}) µm, not ({x:.1f}, {y:.1f})")
        return autofocus(
            core,
            center_z_um=min(max(centre, lim.lower_z_um), lim.safe_z_um),
            coarse_range_um=span,
            coarse_step_um=fc.coarse_step_um,
            fine_range_um=fc.fine_range_um,
            fine_step_um=fc.fine_step_um,
            safe_z_um=lim.safe_z_um,
            lower_z_um=lim.lower_z_um,
        ).z_um
    except AutofocusError as e:
        log.info("focus.point_skipped", x_um=x, y_um=y, reason=str(e))
    except ValueError:  # a request the drive refuses (limits): the same everywhere
        raise
    except Exception as e:  # hardware: stop the stage, and try the next place
        log.warning("focus.point_failed", x_um=x, y_um=y, error=str(e))
        with contextlib.suppress(Exception):
            core.stop(core.getXYStageDevice())
    return None


def spiral(n: int) -> Iterator[tuple[int, int]]:
    """(0, 0), then rings of neighbouring fields outwards: `n` places in all."""
    count, ring = 0, 0
    while True:
        cells = [
            (dx, dy)
            for dx in range(-ring, ring + 1)
            for dy in range(-ring, ring + 1)
            if max(abs(dx), abs(dy)) == ring
        ]
        for cell in sorted(cells, key=lambda c: (abs(c[0]) + abs(c[1]), c)):
            yield cell
            count += 1
            if count >= n:
                return
        ring += 1


def _predict(found: list[Point3], x: float, y: float, start: float) -> float:
    """Where to centre the next sweep: the surface through what is known so far."""
    if len(found) >= 3:
        with contextlib.suppress(ValueError):  # collinear so far
            return FocusMap().fit(found).z_at(x, y)
    return float(np.mean([p[2] for p in found])) if found else start


def _within(x: float, y: float, lim: StageLimits) -> bool:
    lo_x, hi_x = lim.x_limits_um
    lo_y, hi_y = lim.y_limits_um
    return lo_x <= x <= hi_x and lo_y <= y <= hi_y
