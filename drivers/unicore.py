"""A UniMMCore that works with Python devices (pixel size, auto-shutter), and core disposal.

pymmcore-plus 0.18's UniMMCore asks the C++ core for the current pixel-size configuration,
and the C++ core cannot see the properties of Python devices. A pixel-size config keyed on a
Python objective turret (our simulated rig) therefore never matches and the pixel size reads 0.
`FlakescanCore` resolves pixel-size configs itself, against every device's properties.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pymmcore
from pymmcore_plus import CMMCorePlus
from pymmcore_plus.experimental.unicore import UniMMCore


class FlakescanCore(UniMMCore):
    """UniMMCore with pixel-size configs that work on Python devices."""

    def getCurrentPixelSizeConfig(self, cached: bool = False) -> str:
        for res_id in self.getAvailablePixelSizeConfigs():
            settings = self.getPixelSizeConfigData(res_id, native=True)
            matches = True
            for i in range(settings.size()):
                s = settings.getSetting(i)
                value = self.getProperty(s.getDeviceLabel(), s.getPropertyName())
                if str(value) != s.getPropertyValue():
                    matches = False
                    break
            if matches and settings.size():
                return res_id
        return ""

    def getPixelSizeUm(self, cached: bool = False) -> float:
        if not (res_id := self.getCurrentPixelSizeConfig()):
            return 0.0
        return (
            float(self.getPixelSizeUmByID(res_id)) * self._binning() / self.getMagnificationFactor()
        )

    def getPixelSizeAffine(self, cached: bool = False) -> tuple[float, ...]:
        if not (res_id := self.getCurrentPixelSizeConfig()):
            return (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        factor = self._binning() / self.getMagnificationFactor()
        return tuple(float(v) * factor for v in self.getPixelSizeAffineByID(res_id))

    def _do_snap_image(self) -> None:
        # UniMMCore leaves auto-shutter to the C++ core, which cannot open a Python shutter:
        # frames from a Python camera behind a Python lamp shutter came out dark. Open it
        # around the exposure, as CMMCore does for C++ shutters.
        shutter = self.getShutterDevice()
        manage = bool(shutter) and self.getAutoShutter() and self.isPyDevice(shutter)
        was_open = manage and self.getShutterOpen(shutter)
        if manage and not was_open:
            self.setShutterOpen(shutter, True)
        try:
            super()._do_snap_image()
        finally:
            if manage and not was_open:
                self.setShutterOpen(shutter, False)

    def _binning(self) -> float:
        cam = self.getCameraDevice()
        if not cam or not self.hasProperty(cam, "Binning"):
            return 1.0
        return float(self.getProperty(cam, "Binning"))


@contextmanager
def closing_core(core: CMMCorePlus) -> Iterator[CMMCorePlus]:
    """Yield `core`, then unload its devices, detach its callbacks and drop it.

    A CMMCore destroyed during interpreter shutdown with its Python callback still registered
    aborts the process ("FATAL: exception not rethrown", exit 134) about half the time;
    `dispose_core` makes that destruction harmless even if a name still holds the core.
    """
    try:
        yield core
    finally:
        dispose_core(core)


def dispose_core(core: CMMCorePlus) -> None:
    with suppress(Exception):
        core.mda.cancel()
    with suppress(Exception):
        core.unloadAllDevices()
    # The C++ core calls back into Python from its destructor; if that runs during interpreter
    # teardown (a name still bound at module level), the process aborts. Unregister now, as
    # CMMCorePlus.__del__ would if it ran in time.
    with suppress(Exception):
        pymmcore.CMMCore.registerCallback(core, None)
    # The runner and signal connections hold references back to the core; collect the cycle
    # now so the C++ destructor runs while the interpreter is still whole.
    del core
    gc.collect()


__all__ = ["FlakescanCore", "closing_core", "dispose_core"]
