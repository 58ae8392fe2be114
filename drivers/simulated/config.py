"""The simulated rig's configuration: one validated YAML document.

Every number a lab would recognise lives here with its unit in the name, so a config file
reads like a description of the microscope and the chip under it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..configfile import ConfigError, format_validation_error, read_rig_mapping
from .optics import Substrate

PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChipConfig(_Strict):
    """The chip: a rectangle of SiO2/Si (or a transparent crystal) whose lower-left corner sits
    at `origin_um` on the stage."""

    #: "sio2_si" (oxidised silicon wafer), or a transparent "quartz" or "sapphire" substrate,
    #: on which CVD MoS2 is often grown: dark background, every layer brighter than it
    substrate: Substrate = "sio2_si"

    width_um: Annotated[float, Field(gt=0, le=10_000)] = 5000.0
    height_um: Annotated[float, Field(gt=0, le=10_000)] = 5000.0
    origin_um: tuple[float, float] = (0.0, 0.0)
    #: nominal oxide thickness of a sio2_si wafer; 300, 285 and 90 nm are the common ones
    oxide_nm: Annotated[float, Field(ge=50, le=400)] = 300.0
    #: peak-to-peak slow variation of the oxide across the chip
    oxide_drift_nm: Annotated[float, Field(ge=0, le=40)] = 6.0


class FlakeConfig(_Strict):
    """Densities and sizes of the flakes on a chip, exfoliated or CVD-grown, and of debris."""

    #: flakes with thin (1L/2L) terraces, per mm²; labs see about one usable flake per mm²
    thin_flakes_per_mm2: Annotated[float, Field(ge=0)] = 2.0
    #: thick debris (bulk pieces, no thin terraces) per mm²
    bulk_pieces_per_mm2: Annotated[float, Field(ge=0)] = 12.0
    #: tape-residue films per mm²
    residue_per_mm2: Annotated[float, Field(ge=0)] = 4.0
    #: dust particles per mm²
    dust_per_mm2: Annotated[float, Field(ge=0)] = 15.0
    #: monolayer terrace size (longest extent), µm
    monolayer_size_um: tuple[PositiveFloat, PositiveFloat] = (3.0, 22.0)
    #: share of thin flakes that carry a monolayer terrace (the rest start at bilayer);
    #: exfoliated only: every CVD crystal starts as a monolayer
    monolayer_fraction: Fraction = 0.75
    #: "exfoliated": cleaved terraces stepping up to thick material; "cvd": grown triangles
    #: (thin_flakes_per_mm2 of them), half with a bilayer triangle and most with a thick
    #: nucleus at the centre, as in CVD micrographs. Hundreds per mm² and sizes up to ~100 µm
    #: merge them into films; residue_per_mm2 stays as set (CVD has no tape: set it to 0)
    growth: Literal["exfoliated", "cvd"] = "exfoliated"

    @model_validator(mode="after")
    def _ordered(self) -> FlakeConfig:
        lo, hi = self.monolayer_size_um
        if lo > hi:
            raise ValueError(f"monolayer_size_um must be (min, max), got {self.monolayer_size_um}")
        return self


class FocusSurfaceConfig(_Strict):
    """Where the chip's surface is in focus-drive Z: a tilted, slightly warped plane."""

    z_um: float = 1000.0
    tilt_x_um_per_mm: float = 2.0
    tilt_y_um_per_mm: float = -1.0
    #: amplitude of a smooth bow across the chip
    warp_um: Annotated[float, Field(ge=0)] = 0.8


class OpticsConfig(_Strict):
    """Illumination and colour formation (see shared optics.md)."""

    lamp_kelvin: Annotated[float, Field(ge=2000, le=7000)] = 3200.0
    #: per-channel gains applied after the camera's white balance against a mirror
    white_balance: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (1.0, 1.0, 1.0)
    gamma: Annotated[float, Field(ge=1, le=3)] = 2.2
    #: fractional drop of brightness from the centre to the corner of the field
    vignetting: Fraction = 0.18
    #: linear illumination gradient across the field (uneven Köhler alignment): brightness
    #: goes from 1 - tilt/2 at one corner to 1 + tilt/2 at the opposite one
    illumination_tilt: Annotated[float, Field(ge=0, le=0.5)] = 0.0
    #: direction the field gets brighter towards, degrees from the +column axis
    illumination_tilt_deg: float = 0.0
    #: stray light (veiling glare) spread evenly over the image, as a fraction of the field's
    #: mean reflectance: every flake's linear contrast falls by 1 / (1 + glare)
    veiling_glare: Annotated[float, Field(ge=0, le=1)] = 0.0


class ObjectiveConfig(_Strict):
    label: str
    magnification: PositiveFloat
    na: Annotated[float, Field(gt=0, lt=1.0)]


def _default_objectives() -> list[ObjectiveConfig]:
    return [
        ObjectiveConfig(label="5x", magnification=5, na=0.15),
        ObjectiveConfig(label="10x", magnification=10, na=0.30),
        ObjectiveConfig(label="20x", magnification=20, na=0.45),
        ObjectiveConfig(label="50x", magnification=50, na=0.80),
        ObjectiveConfig(label="100x", magnification=100, na=0.90),
    ]


class CameraConfig(_Strict):
    """An RGB camera. Pixel size at the sample = pixel_pitch_um / magnification."""

    sensor_shape: tuple[
        Annotated[int, Field(ge=16, le=4096)], Annotated[int, Field(ge=16, le=4096)]
    ] = (
        512,
        512,
    )
    #: effective pitch (binned); 15 µm gives 0.15 µm/px and a 77 µm field at 100×
    pixel_pitch_um: PositiveFloat = 15.0
    exposure_ms: Annotated[float, Field(gt=0, le=10_000)] = 40.0
    #: photo-electrons per ms for a perfect mirror at the field centre; exposed for the chip
    #: (bare 300 nm oxide reads about 170/255), so a mirror would saturate
    electrons_per_ms: PositiveFloat = 1000.0
    full_well_e: PositiveFloat = 20_000.0
    read_noise_e: Annotated[float, Field(ge=0)] = 12.0
    #: the camera's rotation relative to the stage axes (a real rig is calibrated for it)
    rotation_deg: float = 0.0
    #: the camera's colour matrix, applied to the 8-bit R, G, B levels after gamma (rows:
    #: output channel, columns: input); it stands in for spectral crosstalk. identity = none
    colour_mixing: tuple[
        tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]
    ] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    #: Gaussian noise (8-bit levels, sigma) added after gamma: amplifier, demosaicing and
    #: processing noise that photon statistics alone do not give
    output_noise_dn: Annotated[float, Field(ge=0, le=20)] = 0.0


class AxisTiming(_Strict):
    velocity_um_s: PositiveFloat
    acceleration_um_s2: PositiveFloat
    settle_ms: Annotated[float, Field(ge=0)]


class XYStageConfig(_Strict):
    #: soft travel limits; a move outside them is refused
    x_limits_um: tuple[float, float] = (-2000.0, 12_000.0)
    y_limits_um: tuple[float, float] = (-2000.0, 12_000.0)
    timing: AxisTiming = AxisTiming(velocity_um_s=5000, acceleration_um_s2=50_000, settle_ms=60)

    @model_validator(mode="after")
    def _ordered(self) -> XYStageConfig:
        for name in ("x_limits_um", "y_limits_um"):
            lo, hi = getattr(self, name)
            if lo >= hi:
                raise ValueError(f"{name} must be (low, high), got {(lo, hi)}")
        return self


class FocusDriveConfig(_Strict):
    lower_limit_um: float = 0.0
    #: the focus drive never goes above this: the objective would touch the chip
    safe_z_um: float = 1500.0
    timing: AxisTiming = AxisTiming(velocity_um_s=500, acceleration_um_s2=5000, settle_ms=20)

    @model_validator(mode="after")
    def _ordered(self) -> FocusDriveConfig:
        if self.lower_limit_um >= self.safe_z_um:
            raise ValueError(
                f"lower_limit_um ({self.lower_limit_um}) must be below safe_z_um ({self.safe_z_um})"
            )
        return self


class FaultConfig(_Strict):
    """One kind of fault: at the listed operation numbers (0-based), and/or at random."""

    rate: Fraction = 0.0
    at: list[Annotated[int, Field(ge=0)]] = []


class FaultsConfig(_Strict):
    seed: int = 0
    #: the stage stalls and never reports arrival: waitForDevice times out
    stage_timeout: FaultConfig = FaultConfig()
    #: the stage settles `position_error_um` away from the target (and reports where it is)
    stage_position_error: FaultConfig = FaultConfig()
    position_error_um: float = 8.0
    #: the camera returns an all-black frame (lamp or shutter failure)
    black_frame: FaultConfig = FaultConfig()
    #: the camera raises on snap
    camera_error: FaultConfig = FaultConfig()
    #: the focus drive raises on a move
    focus_error: FaultConfig = FaultConfig()


class SimulatedRigConfig(_Strict):
    """The whole simulated microscope and the chip on its stage."""

    rig: Literal["simulated"] = "simulated"
    #: one seed makes the chip, its flakes and the noise reproducible
    seed: int = 0
    #: wall-clock seconds per simulated second; 0 never sleeps (tests), 1 is real time
    time_scale: Annotated[float, Field(ge=0)] = 0.0
    chip: ChipConfig = ChipConfig()
    flakes: FlakeConfig = FlakeConfig()
    focus_surface: FocusSurfaceConfig = FocusSurfaceConfig()
    optics: OpticsConfig = OpticsConfig()
    objectives: list[ObjectiveConfig] = Field(default_factory=_default_objectives, min_length=1)
    #: the objective in place when the rig starts
    objective: str = "100x"
    camera: CameraConfig = CameraConfig()
    xy_stage: XYStageConfig = XYStageConfig()
    focus_drive: FocusDriveConfig = FocusDriveConfig()
    faults: FaultsConfig = FaultsConfig()

    @model_validator(mode="after")
    def _consistent(self) -> SimulatedRigConfig:
        labels = [o.label for o in self.objectives]
        if len(set(labels)) != len(labels):
            raise ValueError(f"objective labels must be unique, got {labels}")
        if self.objective not in labels:
            raise ValueError(f"objective {self.objective!r} is not one of the objectives {labels}")
        fs = self.focus_surface
        if not self.focus_drive.lower_limit_um < fs.z_um < self.focus_drive.safe_z_um:
            raise ValueError(
                f"focus_surface.z_um ({fs.z_um}) must lie inside the focus drive's range "
                f"({self.focus_drive.lower_limit_um}, {self.focus_drive.safe_z_um})"
            )
        return self

    def objective_config(self, label: str) -> ObjectiveConfig:
        for o in self.objectives:
            if o.label == label:
                return o
        raise KeyError(f"no objective {label!r}; known: {[o.label for o in self.objectives]}")

    def pixel_size_um(self, objective: str) -> float:
        return self.camera.pixel_pitch_um / self.objective_config(objective).magnification


def load_simulated_config(path: str | Path) -> SimulatedRigConfig:
    """Read and validate a simulated-rig YAML file, or raise ConfigError saying what is wrong."""
    raw = read_rig_mapping(path)
    try:
        return SimulatedRigConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {format_validation_error(e)}") from None
