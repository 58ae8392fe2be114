"""Build a ready Micro-Manager core for the simulated rig.

The core returned here is driven exactly as a real one: `setXYPosition`, `waitForDevice`,
`snapImage`, `getImage`, pixel-size configs that follow the objective turret, the MDA runner.
Only `core.simulation` (the chip and its truth) is extra, for scoring and tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pymmcore_plus import DeviceInitializationState

from ..unicore import FlakescanCore, closing_core, dispose_core
from .config import SimulatedRigConfig, load_simulated_config
from .devices import (
    SimFocusDrive,
    SimLampShutter,
    SimObjectiveTurret,
    SimRGBCamera,
    SimulatedMicroscope,
    SimXYStage,
)
from .motion import travel_time_s
from .world import ChipWorld

# Device labels, as a lab would name them in a Micro-Manager config.
XY_STAGE, FOCUS_DRIVE, OBJECTIVE_TURRET, LAMP_SHUTTER, CAMERA = (
    "XYStage",
    "FocusDrive",
    "Objective",
    "LampShutter",
    "Camera",
)


class SimulatedCore(FlakescanCore):
    """A FlakescanCore that also carries the simulated microscope (world, clock, faults)."""

    simulation: SimulatedMicroscope


class RigStartError(RuntimeError):
    """A device of the rig failed to initialise."""


def create_simulated_core(
    config: SimulatedRigConfig | str | Path, world: ChipWorld | None = None
) -> SimulatedCore:
    """A ready core over the simulated chip. Dispose of it with `drivers.unicore.dispose_core`.

    Pass `world` to reuse a chip already built for the same config (it takes a moment for
    a 1 × 1 cm chip).
    """
    cfg = config if isinstance(config, SimulatedRigConfig) else load_simulated_config(config)
    scope = SimulatedMicroscope(cfg, world)
    # mm_path: a folder without device adapters, so pymmcore-plus does not go looking for a
    # Micro-Manager installation that the simulated rig does not need.
    core = SimulatedCore(mm_path=str(Path(__file__).parent))
    core.simulation = scope
    try:
        for label, device in (
            (XY_STAGE, SimXYStage(scope)),
            (FOCUS_DRIVE, SimFocusDrive(scope)),
            (OBJECTIVE_TURRET, SimObjectiveTurret(scope)),
            (LAMP_SHUTTER, SimLampShutter(scope)),
            (CAMERA, SimRGBCamera(scope)),
        ):
            core.loadPyDevice(label, device)
        core.initializeAllDevices()
        # Python-device init failures do not raise; look at each state.
        failed = [
            lbl
            for lbl in (XY_STAGE, FOCUS_DRIVE, OBJECTIVE_TURRET, LAMP_SHUTTER, CAMERA)
            if core.getDeviceInitializationState(lbl)
            != DeviceInitializationState.InitializedSuccessfully
        ]
        if failed:
            raise RigStartError(f"simulated devices failed to initialise: {', '.join(failed)}")
        core.setXYStageDevice(XY_STAGE)
        core.setFocusDevice(FOCUS_DRIVE)
        core.setCameraDevice(CAMERA)
        # Without a shutter, auto-shutter fails every MDA frame.
        core.setShutterDevice(LAMP_SHUTTER)
        core.setAutoShutter(True)
        rot = math.radians(cfg.camera.rotation_deg)
        for obj in cfg.objectives:
            res = f"Res{obj.label}"
            px = cfg.pixel_size_um(obj.label)
            core.definePixelSizeConfig(res, OBJECTIVE_TURRET, "Label", obj.label)
            core.setPixelSizeUm(res, px)
            core.setPixelSizeAffine(
                res,
                [
                    px * math.cos(rot),
                    -px * math.sin(rot),
                    0.0,
                    px * math.sin(rot),
                    px * math.cos(rot),
                    0.0,
                ],
            )
        core.setProperty(OBJECTIVE_TURRET, "Label", cfg.objective)
        core.setTimeoutMs(_timeout_ms(cfg))
    except BaseException:
        dispose_core(core)
        raise
    return core


def _timeout_ms(cfg: SimulatedRigConfig) -> int:
    """Generous: twice the longest possible move at the configured time scale, plus 1 s."""
    st = cfg.xy_stage
    span = max(st.x_limits_um[1] - st.x_limits_um[0], st.y_limits_um[1] - st.y_limits_um[0])
    longest_s = travel_time_s(span, st.timing) + st.timing.settle_ms / 1000
    return int(1000 + 2000 * longest_s * cfg.time_scale)


@contextmanager
def simulated_rig(
    config: SimulatedRigConfig | str | Path, world: ChipWorld | None = None
) -> Iterator[SimulatedCore]:
    """`with simulated_rig(cfg) as core:` builds the core and always disposes of it."""
    with closing_core(create_simulated_core(config, world)) as core:
        yield core  # type: ignore[misc]
