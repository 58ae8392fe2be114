"""Python stand-ins for a microscope's devices, loadable from a .cfg with `#py pyDevice`.

Micro-Manager's C++ device adapters are not installed where the tests run, so the tests
describe rigs with these instead. They do nothing but remember what they were told: the
driver under test only looks at what devices exist, what type they are, whether they
initialized, and their labels and pixel configs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pymmcore_plus.experimental.unicore import (
    ShutterDevice,
    SimpleCameraDevice,
    StageDevice,
    StateDevice,
    XYStageDevice,
)


class StubXYStage(XYStageDevice):
    """An XY stage that arrives instantly."""

    def __init__(self) -> None:
        super().__init__()
        self._xy = (0.0, 0.0)

    def set_position_um(self, x: float, y: float) -> None:
        self._xy = (float(x), float(y))

    def get_position_um(self) -> tuple[float, float]:
        return self._xy

    def set_origin_x(self) -> None:
        self._xy = (0.0, self._xy[1])

    def set_origin_y(self) -> None:
        self._xy = (self._xy[0], 0.0)

    def home(self) -> None:
        self._xy = (0.0, 0.0)

    def stop(self) -> None:
        pass


class BrokenXYStage(StubXYStage):
    """An XY stage whose controller does not answer (a wrong COM port, say)."""

    def initialize(self) -> None:
        raise OSError("no answer from the stage controller on COM9")


class StubFocus(StageDevice):
    """A focus drive that arrives instantly."""

    def __init__(self) -> None:
        super().__init__()
        self._z = 0.0

    def set_position_um(self, val: float) -> None:
        self._z = float(val)

    def get_position_um(self) -> float:
        return self._z

    def set_origin(self) -> None:
        self._z = 0.0

    def set_focus_direction(self, sign: int) -> None:
        self._direction = int(sign)  # the .cfg's FocusDirection line; nothing reads it here

    def home(self) -> None:
        self._z = 0.0

    def stop(self) -> None:
        pass


class StubTurret(StateDevice):
    """A six-position nosepiece; the .cfg names its positions with `Label` lines."""

    def __init__(self) -> None:
        super().__init__({i: f"Position-{i + 1}" for i in range(6)})
        self._state = 0

    def get_state(self) -> int:
        return self._state

    def set_state(self, position: int) -> None:
        self._state = int(position)


class StubShutter(ShutterDevice):
    """A lamp shutter."""

    def __init__(self) -> None:
        super().__init__()
        self._open = False

    def get_open(self) -> bool:
        return self._open

    def set_open(self, open: bool) -> None:
        self._open = bool(open)


class StubRGBCamera(SimpleCameraDevice):
    """A small colour camera (height, width, 3): what flakescan expects."""

    _SHAPE: tuple[int, ...] = (24, 32, 3)

    def __init__(self) -> None:
        super().__init__()
        self._exposure = 10.0

    def get_exposure(self) -> float:
        return self._exposure

    def set_exposure(self, exposure: float) -> None:
        self._exposure = float(exposure)

    def sensor_shape(self) -> tuple[int, int] | tuple[int, int, int]:
        return self._SHAPE  # type: ignore[return-value]

    def dtype(self) -> type[np.uint8]:
        return np.uint8

    def snap(self, buffer: np.ndarray) -> Mapping[str, object]:
        buffer[:] = 128
        return {}


class StubMonoCamera(StubRGBCamera):
    """A monochrome camera: usable, but MoS2 layer contrast is a colour signal."""

    _SHAPE = (24, 32)
