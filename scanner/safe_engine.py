"""The engine that visits one field of view: a frame only where the stage really is.

pymmcore-plus's default `MDAEngine` logs and swallows a failed XY move and snaps anyway, so a
stalled stage gives a frame of the wrong place filed under the right name. `SafeMDAEngine`
moves, checks where the stage reports it arrived, focuses and snaps as one unit, retries the
unit on any hardware error, and reports every field as a `FieldResult`: ok with its frame, or
failed with the error naming the hardware.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field
from pymmcore_plus import CMMCorePlus
from pymmcore_plus.mda import MDAEngine, SkipEvent
from useq import AcquireImage, MDAEvent

from .focus import AutofocusError, autofocus, edge_blur_px
from .plan import FieldOfView

if TYPE_CHECKING:
    from pymmcore_plus.mda._protocol import PImagePayload

log = structlog.get_logger("flakescan.acquisition")

NonNegative = Annotated[float, Field(ge=0)]


class AcquisitionConfig(BaseModel):
    """How hard to try for each field before recording it as failed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: extra attempts after the first; a field is tried at most `retries + 1` times
    retries: Annotated[int, Field(ge=0)] = 2
    #: after a move, the stage must report a position this close to the field centre
    position_tolerance_um: Annotated[float, Field(gt=0)] = 1.0
    #: a frame whose mean is below `black_level` (lamp or shutter failure) is a failed snap
    reject_black_frames: bool = True
    #: a closed lamp shutter reads ~3 (read noise); bare oxide ~170, the stage insert ~40
    black_level: NonNegative = 10.0
    #: wait after the stage reports arrival, for a rig whose stage rings on after settling
    settle_extra_ms: NonNegative = 0.0


class RefocusConfig(BaseModel):
    """Re-focus a field whose frame comes out blurred, before leaving it.

    The focus map predicts Z from a handful of points; where the chip bends more than the
    surface can follow (a bump, a particle under the chip) the frame blurs. Blur is judged by
    the width of the frame's edges (`edge_blur_px`), which does not depend on what is in view;
    a frame with no edges (bare oxide) has nothing to lose and is left alone.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: edges wider than this (Gaussian sigma, px) mean the field is out of focus; in focus
    #: they measure ~1.4 px on the simulated rig at 100×, 0.5 µm off focus ~3.3 px
    max_edge_blur_px: Annotated[float, Field(gt=0)] = 2.8
    #: the Z sweep around the predicted focus
    range_um: Annotated[float, Field(gt=0)] = 6.0
    step_um: Annotated[float, Field(gt=0)] = 1.0
    safe_z_um: float
    lower_z_um: float = float("-inf")


@dataclass(frozen=True, slots=True)
class FieldResult:
    """What became of one field of view: a frame taken where it should be, or why not."""

    index: int
    name: str
    x_um: float
    y_um: float
    ok: bool
    frame: np.ndarray | None
    #: where the stage reported it was at the last attempt (None if it could not be read)
    stage_xy_um: tuple[float, float] | None
    #: where the focus drive reported it was at the last attempt
    z_um: float | None
    attempts: int
    #: the last attempt's error, naming the hardware; None when ok
    error: str | None = None
    #: the planned Z when the frame came out blurred and the field was re-focused
    refocused_from_um: float | None = None


class _AttemptFailed(Exception):
    """One attempt at a field failed; the message names the hardware."""

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


class SafeMDAEngine(MDAEngine):
    """An MDAEngine that never emits a frame taken at the wrong place.

    Why `exec_event` does the moving: the default `setup_event` moves XY and Z and then
    `waitForSystem`s, with XY errors logged and swallowed, a Z error or wait timeout raised out
    of the whole run, and `exec_event` snapping regardless. A retry has to redo the move *and*
    the snap (a black frame is as much a failed field as a stall), and the decision "frame or
    failed field" can only be made after the snap, so move, position check, focus, snap and
    frame check form one retried unit inside `exec_event`, the one method that can yield a
    frame or decline to. `setup_event` keeps the default's non-positional setup (channel,
    exposure, properties, ROI) but with the event's positions removed and without
    `waitForSystem`, whose timeout on a stalled stage would end the scan.

    Every field's outcome goes to `on_field`, failed fields included; it is called in the
    acquisition thread before the frame is emitted, so a slow `on_field` slows the scan.
    A field interrupted by a stop is reported neither way: it was not done.
    """

    def __init__(
        self,
        mmc: CMMCorePlus,
        config: AcquisitionConfig | None = None,
        *,
        on_field: Callable[[FieldResult], None] | None = None,
        fields: Sequence[FieldOfView] | None = None,
        refocus: RefocusConfig | None = None,
    ) -> None:
        # Sequenced (hardware-triggered) events would move the stage without our checks;
        # restoring the start position after a scan is a move no one asked for.
        super().__init__(mmc, use_hardware_sequencing=False, restore_initial_state=False)
        self.config = config or AcquisitionConfig()
        self.on_field = on_field
        #: the plan, so results carry the plan's field index (a resumed plan is a subset)
        self.fields = list(fields) if fields is not None else None
        self.refocus = refocus
        self._stop = threading.Event()

    def request_stop(self) -> None:
        """Stop after the current attempt; safe from any thread, before or during a run.

        For good: a stopped engine skips every later event (make a new one to scan again).
        """
        self._stop.set()
        self.mmcore.mda.cancel()

    def setup_event(self, event: MDAEvent) -> None:
        if self._stopping():
            # A stop asked for before the runner could take it (it ignores cancel while idle).
            self.mmcore.mda.cancel()
            raise SkipEvent(reason="scan stopped")
        if _takes_frame(event):
            event = event.model_copy(update={"x_pos": None, "y_pos": None, "z_pos": None})
        self.setup_single_event(event)

    def exec_event(self, event: MDAEvent) -> Iterable[PImagePayload | None]:
        if not _takes_frame(event):  # autofocus or custom actions: the default's business
            return super().exec_event(event)
        return self._exec_field(event)

    def _exec_field(self, event: MDAEvent) -> Iterator[PImagePayload]:
        index, name, x, y = self._identity(event)
        tries = self.config.retries + 1
        error = ""
        for attempt in range(1, tries + 1):
            if attempt > 1 and self._stopping():
                return
            try:
                xy, z, frame = self._attempt(event, x, y)
                refocused_from = None
                if self.refocus is not None and z is not None:
                    z, frame, refocused_from = self._refocus_if_blurred(name, z, frame)
            except _AttemptFailed as e:
                error = str(e)
                log.warning("field.attempt_failed", field=name, attempt=attempt, error=error)
                if not e.retry:
                    break
                continue
            result = FieldResult(
                index, name, x, y, True, frame, xy, z, attempt, refocused_from_um=refocused_from
            )
            if self.on_field is not None:
                self.on_field(result)
            t0 = event.metadata.get("runner_t0") or time.perf_counter()
            meta = self.get_frame_metadata(
                event,
                runner_time_ms=(time.perf_counter() - t0) * 1000,
                camera_device=self.mmcore.getCameraDevice(),
            )
            yield frame, event, meta
            return
        log.error("field.failed", field=name, attempts=attempt, error=error)
        if self.on_field is not None:
            xy, z = self._where()
            self.on_field(FieldResult(index, name, x, y, False, None, xy, z, attempt, error))

    def _attempt(
        self, event: MDAEvent, x: float, y: float
    ) -> tuple[tuple[float, float], float | None, np.ndarray]:
        """Move, check, focus, snap, check; raise _AttemptFailed naming what failed."""
        core, cfg = self.mmcore, self.config
        stage = core.getXYStageDevice()
        with _blame("stage did not arrive", core, stage):
            core.setXYPosition(x, y)
            core.waitForDevice(stage)
            rx, ry = (float(v) for v in core.getXYPosition())
        off = math.hypot(rx - x, ry - y)
        if off > cfg.position_tolerance_um:
            # Park it where it is: a controller still trying to reach its target would make
            # the retry's move report arrival from the wrong leg.
            _stop_quietly(core, stage)
            raise _AttemptFailed(
                f"stage did not arrive: reported ({rx:.2f}, {ry:.2f}) µm is {off:.2f} µm from "
                f"({x:.2f}, {y:.2f}) µm, beyond the {cfg.position_tolerance_um:g} µm tolerance"
            )
        if cfg.settle_extra_ms > 0:
            time.sleep(cfg.settle_extra_ms / 1000)
        z: float | None = None
        if focus := core.getFocusDevice():
            with _blame("focus drive error", core, focus):
                if event.z_pos is not None:
                    core.setZPosition(float(event.z_pos))
                    core.waitForDevice(focus)
                z = float(core.getZPosition())
        with _blame("camera error", core, None):
            core.snapImage()
            # Copied: a camera may reuse its buffer for the next snap while this one waits in
            # the queue.
            frame = np.array(core.getImage(), copy=True)
        if cfg.reject_black_frames and (level := float(frame.mean())) < cfg.black_level:
            raise _AttemptFailed(f"black frame: mean {level:.2f} below {cfg.black_level:g}")
        return (rx, ry), z, frame

    def _refocus_if_blurred(
        self, name: str, z: float, frame: np.ndarray
    ) -> tuple[float, np.ndarray, float | None]:
        """(z, frame, planned z or None): a sharper frame where the planned Z was off."""
        rc = self.refocus
        assert rc is not None
        blur = edge_blur_px(frame)
        if blur is None or blur <= rc.max_edge_blur_px:
            return z, frame, None
        core = self.mmcore
        focus = core.getFocusDevice()
        found = None
        with _blame("focus drive error", core, focus):
            try:
                found = autofocus(
                    core,
                    center_z_um=z,
                    coarse_range_um=rc.range_um,
                    coarse_step_um=rc.step_um,
                    fine_range_um=2 * rc.step_um,
                    fine_step_um=0.25,
                    safe_z_um=rc.safe_z_um,
                    lower_z_um=rc.lower_z_um,
                    min_contrast=0.1,
                )
            except AutofocusError as e:
                log.warning("field.refocus_failed", field=name, edge_blur_px=blur, error=str(e))
        if found is not None:
            with _blame("camera error", core, None):
                core.snapImage()
                sharper = np.array(core.getImage(), copy=True)
            after = edge_blur_px(sharper)
            if after is not None and after < blur:
                log.debug("field.refocused", field=name, planned_z_um=z, z_um=found.z_um, blur=blur)
                return found.z_um, sharper, z
            # The sweep chased something else (light spilled in from a flake next door).
            log.debug("field.refocus_no_better", field=name, edge_blur_px=blur, after=after)
        # The planned frame stands (blurred beats none); the drive goes back to where it was
        # taken, since the sweep left it at its far end.
        with _blame("focus drive error", core, focus):
            core.setZPosition(z)
            core.waitForDevice(focus)
        return z, frame, None

    def _identity(self, event: MDAEvent) -> tuple[int, str, float, float]:
        p = int(event.index.get("p", 0))
        if self.fields is not None:
            f = self.fields[p]
            return f.index, f.name, f.x_um, f.y_um
        if event.x_pos is None or event.y_pos is None:
            raise ValueError(f"event {event.index} has no stage position: not a field of view")
        return p, event.pos_name or f"p{p}", float(event.x_pos), float(event.y_pos)

    def _where(self) -> tuple[tuple[float, float] | None, float | None]:
        """Where the stage and focus drive say they are, for the record of a failed field."""
        core = self.mmcore
        xy: tuple[float, float] | None = None
        z: float | None = None
        with suppress(Exception):  # a failed field's record must not fail too
            x, y = core.getXYPosition()
            xy = (float(x), float(y))
        with suppress(Exception):
            z = float(core.getZPosition())
        return xy, z

    def _stopping(self) -> bool:
        return self._stop.is_set() or self.mmcore.mda.status.cancel_requested


def _takes_frame(event: MDAEvent) -> bool:
    return isinstance(event.action, AcquireImage | None)


@contextmanager
def _blame(what: str, core: CMMCorePlus, device: str | None) -> Iterator[None]:
    """Turn any error inside into `_AttemptFailed` naming the hardware; stop `device` first.

    A ValueError is the device refusing the request (a target beyond the soft limits): the
    same request would be refused again, so it is not retried. A C++ core's adapters raise
    RuntimeError for everything, refusals included: those are retried, harmlessly, since a
    refusal fails at once.
    """
    try:
        yield
    except Exception as e:
        if device:
            # A stalled stage stays busy until told to stop; the retry needs it usable.
            _stop_quietly(core, device)
        msg = str(e) or type(e).__name__
        # A refusal names its device and never moved; other errors get what failed in front,
        # unless the adapter's words already start with it.
        if not isinstance(e, ValueError) and not msg.lower().startswith(what.split()[0]):
            msg = f"{what}: {msg}"
        raise _AttemptFailed(msg, retry=not isinstance(e, ValueError)) from e


def _stop_quietly(core: CMMCorePlus, device: str) -> None:
    try:
        core.stop(device)
    except Exception as e:  # the next attempt will find out whether it is usable
        log.warning("device.stop_failed", device=device, error=str(e))
