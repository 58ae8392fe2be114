"""The simulated microscope's devices, as Micro-Manager sees them (pymmcore-plus Python devices).

All devices share one `SimulatedMicroscope`: the physical state (where the stage is, which
objective is in, whether the lamp shutter is open) and the chip under it. The camera looks at
that state when it exposes, as a real camera looks at whatever is under the objective.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import numpy as np
import structlog
from pymmcore_plus.experimental.unicore import (
    ShutterDevice,
    SimpleCameraDevice,
    StageDevice,
    StateDevice,
    XYStageDevice,
)

from .config import SimulatedRigConfig
from .faults import FaultInjector
from .motion import AxisMove, SimClock
from .render import Exposure, FrameRenderer
from .world import ChipWorld

log = structlog.get_logger("flakescan.sim")


class StageLimitError(ValueError):
    """A move was refused because its target lies outside the soft limits."""


class SimulatedHardwareError(RuntimeError):
    """An injected hardware fault (the simulated counterpart of an adapter error code)."""


class SimulatedMicroscope:
    """Physical state of the rig plus the chip; one per simulated core."""

    def __init__(self, cfg: SimulatedRigConfig, world: ChipWorld | None = None) -> None:
        self.cfg = cfg
        self.world = world or ChipWorld(cfg)
        self.clock = SimClock(cfg.time_scale)
        self.faults = FaultInjector(cfg.faults)
        self.renderer = FrameRenderer(self.world, cfg, seed=cfg.seed + 1)
        self.lock = threading.RLock()
        chip = cfg.chip
        start = np.array(
            [chip.origin_um[0] + chip.width_um / 2, chip.origin_um[1] + chip.height_um / 2]
        )
        self.xy_move = AxisMove.begin(start, start, cfg.xy_stage.timing, self.clock)
        self.xy_stalled = False
        # Start where a person left it: focused on the middle of the chip.
        z0 = np.array([self.world.focus_z_um(*start)])
        self.z_move = AxisMove.begin(z0, z0, cfg.focus_drive.timing, self.clock)
        self.objective = cfg.objective_config(cfg.objective)
        self.shutter_open = False
        self.frames = 0

    def xy_um(self) -> np.ndarray:
        return self.xy_move.position(self.clock.wall_now())

    def z_um(self) -> float:
        return float(self.z_move.position(self.clock.wall_now())[0])


class SimXYStage(XYStageDevice):
    """Motorised XY stage with soft limits, a timing model, stalls and position errors."""

    def __init__(self, scope: SimulatedMicroscope) -> None:
        super().__init__()
        self.scope = scope

    def set_position_um(self, x: float, y: float) -> None:
        s = self.scope
        (xlo, xhi), (ylo, yhi) = s.cfg.xy_stage.x_limits_um, s.cfg.xy_stage.y_limits_um
        if not (xlo <= x <= xhi and ylo <= y <= yhi):
            raise StageLimitError(
                f"XY stage move to ({x:.1f}, {y:.1f}) µm refused: outside the soft limits "
                f"x {xlo:g}..{xhi:g} µm, y {ylo:g}..{yhi:g} µm"
            )
        with s.lock:
            target = np.array([x, y], dtype=float)
            if s.faults.strikes("stage_position_error"):
                off = s.faults.direction("stage_position_error") * s.cfg.faults.position_error_um
                # the stage misses its target but never leaves its travel range
                target = np.clip(target + off, (xlo, ylo), (xhi, yhi))
                log.warning("sim.fault", fault="stage_position_error", target=[x, y])
            start = s.xy_um()
            s.xy_stalled = s.faults.strikes("stage_timeout")
            if s.xy_stalled:
                # A stalled stage stops part-way and never reports arrival; the camera sees
                # where it stopped, not the target.
                target = start + 0.5 * (target - start)
                log.warning("sim.fault", fault="stage_timeout", target=[x, y])
            s.xy_move = AxisMove.begin(start, target, s.cfg.xy_stage.timing, s.clock)

    def get_position_um(self) -> tuple[float, float]:
        with self.scope.lock:
            p = self.scope.xy_um()
        return float(p[0]), float(p[1])

    def busy(self) -> bool:
        s = self.scope
        with s.lock:
            return s.xy_stalled or not s.xy_move.done(s.clock.wall_now())

    def stop(self) -> None:
        s = self.scope
        with s.lock:
            here = np.array(self.get_position_um())
            s.xy_stalled = False
            s.xy_move = AxisMove.begin(here, here, s.cfg.xy_stage.timing, s.clock)

    def home(self) -> None:
        x0, y0 = self.scope.cfg.chip.origin_um
        self.set_position_um(x0, y0)

    def set_origin_x(self) -> None:
        raise NotImplementedError("the simulated stage's origin is fixed: the chip is placed in it")

    def set_origin_y(self) -> None:
        raise NotImplementedError("the simulated stage's origin is fixed: the chip is placed in it")


class SimFocusDrive(StageDevice):
    """Focus drive (Z, up = towards the objective) that never goes above its safe Z."""

    def __init__(self, scope: SimulatedMicroscope) -> None:
        super().__init__()
        self.scope = scope

    def set_position_um(self, val: float) -> None:
        s = self.scope
        fd = s.cfg.focus_drive
        if val > fd.safe_z_um:
            raise StageLimitError(
                f"focus move to {val:.2f} µm refused: above the safe Z {fd.safe_z_um:g} µm "
                "(the objective would touch the chip)"
            )
        if val < fd.lower_limit_um:
            raise StageLimitError(
                f"focus move to {val:.2f} µm refused: "
                f"below the lower limit {fd.lower_limit_um:g} µm"
            )
        if s.faults.strikes("focus_error"):
            raise SimulatedHardwareError(f"focus drive error while moving to {val:.2f} µm")
        with s.lock:
            s.z_move = AxisMove.begin(np.array([s.z_um()]), np.array([val]), fd.timing, s.clock)

    def get_position_um(self) -> float:
        return self.scope.z_um()

    def busy(self) -> bool:
        s = self.scope
        return not s.z_move.done(s.clock.wall_now())

    def home(self) -> None:
        self.set_position_um(self.scope.cfg.focus_drive.lower_limit_um)

    def stop(self) -> None:
        s = self.scope
        with s.lock:
            here = np.array([s.z_um()])
            s.z_move = AxisMove.begin(here, here, s.cfg.focus_drive.timing, s.clock)

    def set_origin(self) -> None:
        raise NotImplementedError("the simulated focus drive's origin is fixed")


class SimObjectiveTurret(StateDevice):
    """Objective nosepiece; its state labels are the objectives' labels (`100x`, ...)."""

    def __init__(self, scope: SimulatedMicroscope) -> None:
        labels = {i: o.label for i, o in enumerate(scope.cfg.objectives)}
        super().__init__(labels)
        self.scope = scope
        self._labels = labels

    def get_state(self) -> int:
        return next(i for i, lbl in self._labels.items() if lbl == self.scope.objective.label)

    def set_state(self, position: int) -> None:
        self.scope.objective = self.scope.cfg.objective_config(self._labels[int(position)])


class SimLampShutter(ShutterDevice):
    """The halogen lamp's shutter; closed, the camera sees a dark frame."""

    def __init__(self, scope: SimulatedMicroscope) -> None:
        super().__init__()
        self.scope = scope

    def get_open(self) -> bool:
        return self.scope.shutter_open

    def set_open(self, open: bool) -> None:
        self.scope.shutter_open = bool(open)


class SimRGBCamera(SimpleCameraDevice):
    """An 8-bit RGB camera looking at the simulated chip through the current objective."""

    def __init__(self, scope: SimulatedMicroscope) -> None:
        super().__init__()
        self.scope = scope
        self._exposure_ms = scope.cfg.camera.exposure_ms

    def get_exposure(self) -> float:
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        if exposure <= 0:
            raise ValueError(f"exposure must be positive, got {exposure} ms")
        self._exposure_ms = float(exposure)

    def sensor_shape(self) -> tuple[int, int, int]:
        h, w = self.scope.cfg.camera.sensor_shape
        return (h, w, 3)

    def dtype(self) -> type[np.uint8]:
        return np.uint8

    def snap(self, buffer: np.ndarray) -> Mapping:
        s = self.scope
        exposure_ms = self._exposure_ms
        if s.faults.strikes("camera_error"):
            raise SimulatedHardwareError("camera error: frame transfer failed")
        with s.lock:
            # The frame integrates over the exposure: a stage still moving smears it.
            start, end = s.xy_move.path_during(s.clock.wall_now(), exposure_ms / 1000)
            xy = (start + end) / 2
            z = s.z_um()
            objective = s.objective
            shutter_open = s.shutter_open
        s.clock.add(exposure_s=exposure_ms / 1000)
        # Rendered inside the exposure, as a real sensor integrates while the caller waits:
        # the simulation's own work must not make the rig look slower than its hardware.
        began = time.perf_counter()
        with s.lock:
            s.frames += 1
        if s.faults.strikes("black_frame"):
            buffer[:] = 0
        elif not shutter_open:
            s.renderer.dark_frame(exposure_ms, out=buffer)
        else:
            exp = Exposure(
                center_um=(float(xy[0]), float(xy[1])),
                objective=objective,
                defocus_um=z - s.world.focus_z_um(float(xy[0]), float(xy[1])),
                exposure_ms=exposure_ms,
                smear_um=(float(end[0] - start[0]), float(end[1] - start[1])),
            )
            s.renderer.render(exp, out=buffer)
        s.clock.sleep(
            exposure_ms / 1000 - (time.perf_counter() - began) / max(s.clock.time_scale, 1e-9)
        )
        return {"Exposure-ms": exposure_ms}
