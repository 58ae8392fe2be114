"""The real rig: a lab's Micro-Manager .cfg loaded into a CMMCorePlus and checked before a scan.

A scan runs unattended for hours, so a rig that cannot do one must be refused at the start, not
discovered at the first tile. `check_rig` therefore collects every problem it can see and reports
them together: a lab fixes its .cfg in one pass instead of one restart per missing line.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import suppress
from operator import methodcaller
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pymmcore_plus import CMMCorePlus, DeviceInitializationState, DeviceType

from drivers.configfile import ConfigError, format_validation_error, read_rig_mapping
from drivers.unicore import dispose_core

DeviceLabel = Annotated[str, Field(min_length=1)]


class MicroManagerRigConfig(BaseModel):
    """A real microscope: which .cfg to load, which of its devices to scan with, and the limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rig: Literal["micromanager"]
    #: the lab's Micro-Manager hardware config; a relative path is relative to the YAML file
    mm_config: Path
    #: Micro-Manager installation (device adapters); None lets pymmcore-plus find one
    mm_path: Path | None = None
    #: device labels in the .cfg; None = the device the .cfg makes current (Property,Core,...)
    xy_stage: DeviceLabel | None = None
    focus_drive: DeviceLabel | None = None
    camera: DeviceLabel | None = None
    #: the state device holding the objectives; None = the one with a position labelled `objective`
    objective_turret: DeviceLabel | None = None
    #: turret label of the scanning objective
    objective: DeviceLabel = "100x"
    #: the focus drive never goes above this; no default, because only the lab knows its stand
    safe_z_um: Annotated[float, Field(allow_inf_nan=False)]
    #: soft travel limits of the XY stage, in stage micrometres
    x_limits_um: tuple[float, float]
    y_limits_um: tuple[float, float]
    #: core timeout for device waits: a long stage move across the chip takes seconds
    timeout_ms: Annotated[int, Field(gt=0)] = 20_000

    @field_validator("mm_config", mode="after")
    @classmethod
    def _relative_to_yaml(cls, value: Path, info: ValidationInfo) -> Path:
        value = value.expanduser()
        base = (info.context or {}).get("base_dir")
        return (Path(base) / value).resolve() if base and not value.is_absolute() else value

    # Field validators, not a model validator, so that an error names the field.
    @field_validator("x_limits_um", "y_limits_um", mode="after")
    @classmethod
    def _low_high(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"must be finite (low, high), got {value}")
        return value


class RigCheckError(RuntimeError):
    """The rig cannot scan; `problems` lists every reason, one line each."""

    def __init__(self, problems: list[str], header: str = "the rig cannot scan") -> None:
        self.problems = list(problems)
        self.header = header
        super().__init__(header + ":\n" + "\n".join(f"  - {p}" for p in self.problems))

    def __reduce__(self) -> tuple[type[RigCheckError], tuple[list[str], str]]:
        # survive pickling (a process pool, the daemon's job queue) with `problems` intact
        return type(self), (self.problems, self.header)


class RigCheckWarning(UserWarning):
    """Something a scan survives but a lab should know about (e.g. a monochrome camera)."""


def load_rig_config(path: str | Path) -> MicroManagerRigConfig:
    """Read and validate a real-rig YAML file, or raise ConfigError naming the file and field."""
    path = Path(path)
    raw = read_rig_mapping(path)
    try:
        cfg = MicroManagerRigConfig.model_validate(raw, context={"base_dir": path.resolve().parent})
    except ValidationError as e:
        raise ConfigError(f"{path}: {format_validation_error(e)}") from None
    # Caught here, where the YAML can be named, rather than as a bare path at open time.
    if not cfg.mm_config.is_file():
        raise ConfigError(f"{path}: mm_config: no such Micro-Manager config file: {cfg.mm_config}")
    return cfg


class _Role(NamedTuple):
    what: str  # as a person says it
    field: str  # in the rig YAML
    type: DeviceType
    core_property: str  # Property,Core,<this>,<label> makes a device current
    current: Callable[[CMMCorePlus], str]


_ROLES = (
    # methodcaller, not CMMCorePlus.getXYStageDevice: that would skip UniMMCore's override
    _Role("XY stage", "xy_stage", DeviceType.XYStage, "XYStage", methodcaller("getXYStageDevice")),
    _Role("focus drive", "focus_drive", DeviceType.Stage, "Focus", methodcaller("getFocusDevice")),
    _Role("camera", "camera", DeviceType.Camera, "Camera", methodcaller("getCameraDevice")),
)


class _Problem(Exception):
    """One reason the rig cannot scan: raised by a lookup, collected by check_rig."""


def _failed_devices(core: CMMCorePlus) -> dict[str, str]:
    """Devices that did not initialize. UniMMCore only logs a Python device's failure."""
    failed = {}
    for label in core.getLoadedDevices():
        if label == "Core":
            continue
        try:
            state = core.getDeviceInitializationState(label)
        except Exception as e:
            failed[label] = f"its state cannot be read ({e})"
            continue
        if state != DeviceInitializationState.InitializedSuccessfully:
            # The cause is in the core's log; naming the adapter says which hardware to look at.
            adapter = f"{core.getDeviceLibrary(label)}/{core.getDeviceName(label)}"
            failed[label] = f"{adapter}: {state.name}"
    return failed


def _role_device(core: CMMCorePlus, cfg: MicroManagerRigConfig, role: _Role) -> str:
    label = getattr(cfg, role.field)
    of_type = list(core.getLoadedDevicesOfType(role.type))
    if label is None:
        if current := role.current(core):
            return current
        raise _Problem(
            f"no {role.what}: neither the .cfg (Property,Core,{role.core_property},<label>) nor "
            f"the rig YAML ({role.field}) names one; {role.type.name} devices: {of_type}"
        )
    if label not in core.getLoadedDevices():
        raise _Problem(
            f"no {role.what}: {role.field} {label!r} is not a device in the .cfg "
            f"({role.type.name} devices: {of_type})"
        )
    if (actual := core.getDeviceType(label)) != role.type:
        raise _Problem(
            f"{role.what} {label!r} has the wrong type: {actual.name}, expected {role.type.name}"
        )
    return label


def _turret_device(core: CMMCorePlus, cfg: MicroManagerRigConfig, failed: dict[str, str]) -> str:
    states = [d for d in core.getLoadedDevicesOfType(DeviceType.State) if d not in failed]
    if (label := cfg.objective_turret) is not None:
        if label not in core.getLoadedDevices():
            raise _Problem(
                f"no objective turret: objective_turret {label!r} is not a device in the .cfg "
                f"(StateDevices: {states})"
            )
        if (actual := core.getDeviceType(label)) != DeviceType.State:
            raise _Problem(
                f"objective turret {label!r} has the wrong type: {actual.name}, "
                "expected StateDevice"
            )
        return label
    holding = [d for d in states if cfg.objective in core.getStateLabels(d)]
    if len(holding) > 1:
        raise _Problem(
            f"objective {cfg.objective!r} labels a position on several devices {holding}: "
            "set objective_turret in the rig YAML"
        )
    if not holding:
        labels = {d: list(core.getStateLabels(d)) for d in states}
        raise _Problem(
            f"no objective turret: no StateDevice has a position labelled {cfg.objective!r} "
            f"(labels: {labels}); add Label,<turret>,<position>,{cfg.objective} to the .cfg"
        )
    return holding[0]


def _objective_pixel_configs(core: CMMCorePlus, cfg: MicroManagerRigConfig, turret: str) -> None:
    labels = core.getStateLabels(turret)
    if cfg.objective not in labels:
        raise _Problem(
            f"objective turret {turret!r} has no position labelled {cfg.objective!r} "
            f"(labels: {list(labels)}); add Label,{turret},<position>,{cfg.objective}"
        )
    # a pixel-size config may select the objective by its label or by its position number
    wanted = {
        (turret, "Label", cfg.objective),
        (turret, "State", str(core.getStateFromLabel(turret, cfg.objective))),
    }
    res_ids = []
    for res_id in core.getAvailablePixelSizeConfigs():
        data = core.getPixelSizeConfigData(res_id, native=True)
        for s in (data.getSetting(i) for i in range(data.size())):
            if (s.getDeviceLabel(), s.getPropertyName(), s.getPropertyValue()) in wanted:
                res_ids.append(res_id)
                break
    if not res_ids:
        raise _Problem(
            f"no pixel-size config selects objective {cfg.objective!r} "
            f"(pixel-size configs: {list(core.getAvailablePixelSizeConfigs())}); add "
            f"ConfigPixelSize,Res{cfg.objective},{turret},Label,{cfg.objective} and "
            f"PixelSize_um,Res{cfg.objective},<µm per pixel>"
        )
    if bad := [r for r in res_ids if not core.getPixelSizeUmByID(r) > 0]:
        raise _Problem(
            f"pixel-size config {bad[0]!r} for objective {cfg.objective!r} has no pixel size; "
            f"set PixelSize_um,{bad[0]},<µm per pixel> from a calibration"
        )


def check_rig(core: CMMCorePlus, cfg: MicroManagerRigConfig) -> None:
    """Raise RigCheckError listing everything that keeps `core` from scanning as `cfg` says.

    Needs an XY stage, a focus drive and a camera (named in `cfg` or current in the core), all
    devices initialized, the scanning objective on the turret and a pixel size for it. A
    monochrome camera only warns (RigCheckWarning).
    """
    failed = _failed_devices(core)
    problems = [f"device {d!r} did not initialize ({why})" for d, why in failed.items()]

    devices: dict[str, str] = {}
    for role in _ROLES:
        try:
            label = devices[role.what] = _role_device(core, cfg, role)
        except _Problem as p:
            problems.append(str(p))
            continue
        if label not in failed and role.current(core) != label:
            # The scanner drives the core's current devices, not the ones a YAML names.
            problems.append(
                f"{role.what} {label!r} is not the core's current {role.what} "
                f"({role.current(core) or 'none'}); add Property,Core,{role.core_property},{label}"
            )

    try:
        turret = _turret_device(core, cfg, failed)
        if turret not in failed:  # already reported; a failed device cannot list its labels
            _objective_pixel_configs(core, cfg, turret)
    except _Problem as p:
        problems.append(str(p))

    camera = devices.get("camera")
    # MM counts an RGB32 pixel as 4 components and a Python camera reports its channels;
    # either way 1 means grey.
    usable = camera and camera not in failed and camera == core.getCameraDevice()
    if usable and core.getNumberOfComponents() == 1:
        warnings.warn(
            f"camera {camera!r} is monochrome; MoS2 layer contrast is a colour signal "
            "and the model is trained on RGB tiles",
            RigCheckWarning,
            stacklevel=2,
        )
    if problems:
        raise RigCheckError(problems)


def _make_devices_current(core: CMMCorePlus, cfg: MicroManagerRigConfig) -> None:
    setters = {
        "xy_stage": core.setXYStageDevice,
        "focus_drive": core.setFocusDevice,
        "camera": core.setCameraDevice,
    }
    for role in _ROLES:
        if getattr(cfg, role.field) is None:
            continue
        # A bad label is left alone here: check_rig reports it together with everything else.
        with suppress(_Problem):
            setters[role.field](_role_device(core, cfg, role))


def _select_objective(core: CMMCorePlus, cfg: MicroManagerRigConfig) -> None:
    failed = _failed_devices(core)
    try:
        turret = _turret_device(core, cfg, failed)
    except _Problem:
        return  # check_rig reports it
    if turret not in failed and cfg.objective in core.getStateLabels(turret):
        core.setStateLabel(turret, cfg.objective)
        core.waitForDevice(turret)


def open_micromanager_rig(
    cfg: MicroManagerRigConfig, core: CMMCorePlus | None = None
) -> CMMCorePlus:
    """Load the lab's .cfg, make the configured devices current, select the scanning objective
    and check the rig. Returns the core, ready to scan; the caller disposes of it
    (drivers.unicore.closing_core). On failure the devices are unloaded and the error names
    the .cfg.

    `core` defaults to a plain CMMCorePlus. Pass a FlakescanCore to load a .cfg with Python
    devices (`#py` lines), which a plain core skips as comments.
    """
    cfg_file = cfg.mm_config
    if not cfg_file.is_file():
        raise FileNotFoundError(f"Micro-Manager config file not found: {cfg_file}")
    if core is None:
        core = CMMCorePlus(mm_path=None if cfg.mm_path is None else str(cfg.mm_path))
    opened = False
    try:
        core.loadSystemConfiguration(str(cfg_file))
        _make_devices_current(core, cfg)
        core.setTimeoutMs(cfg.timeout_ms)
        _select_objective(core, cfg)
        check_rig(core, cfg)
        if not core.getPixelSizeUm() > 0:
            # e.g. the objective's pixel-size config also keys on a magnifier set elsewhere
            raise RigCheckError(
                [
                    f"with objective {cfg.objective!r} selected the core's pixel size is "
                    f"{core.getPixelSizeUm()} (pixel-size config: "
                    f"{core.getCurrentPixelSizeConfig()!r})"
                ]
            )
        opened = True
    except RigCheckError as e:
        raise RigCheckError(e.problems, header=f"{cfg_file}: the rig cannot scan") from None
    except Exception as e:
        raise RuntimeError(f"{cfg_file}: could not open the Micro-Manager rig: {e}") from e
    finally:
        if not opened:  # Ctrl-C included: a half-loaded core must not outlive the interpreter
            dispose_core(core)
    return core


__all__ = [
    "MicroManagerRigConfig",
    "RigCheckError",
    "RigCheckWarning",
    "check_rig",
    "load_rig_config",
    "open_micromanager_rig",
]
