"""How to scan a chip: the `scan:` section of a rig YAML, validated with errors naming the field.

One file describes the microscope (the rest of the YAML, read by `drivers`) and how to scan a
chip on it (this section). Every field has a default, so a rig YAML without a `scan:` section
scans the simulated chip, or, on a real rig, asks for the one thing it cannot guess: where the
chip lies on the stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from drivers.configfile import SCAN_SECTION, ConfigError, format_validation_error, read_yaml_mapping

from .plan import ChipOutline
from .safe_engine import AcquisitionConfig

Positive = Annotated[float, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FocusConfig(_Strict):
    """Software autofocus at a few points, a surface through them, Z predicted for every field."""

    #: `map`: autofocus at `points` points and fit a surface (tilt, and bow from 8 points);
    #: `none`: scan at the focus drive's current Z (a flat, level chip; or a test)
    strategy: Literal["map", "none"] = "map"
    points: Annotated[int, Field(ge=5, le=9)] = 9
    #: where the first sweep is centred; None: the focus drive's Z when the scan starts
    start_z_um: float | None = None
    #: the first three points' coarse sweep: how far focus may be from `start_z_um`
    coarse_range_um: Positive = 40.0
    #: later points' coarse sweep, centred on the plane through the first three
    follow_range_um: Positive = 10.0
    coarse_step_um: Positive = 2.0
    fine_range_um: Positive = 2.0
    fine_step_um: Positive = 0.25
    #: a focus point with nothing in view is moved this many fields over, up to `tries` times
    tries_per_point: Annotated[int, Field(ge=1, le=50)] = 16
    #: re-focus a field whose frame comes out blurred (edges wider than this, px); None: never
    refocus_max_edge_blur_px: Positive | None = 2.8


class ModelConfig(_Strict):
    #: None: the default model shipped with flakescan (trained on synthetic chips only)
    checkpoint: Path | None = None
    #: auto (CUDA when present), cpu, cuda, cuda:1 ...
    device: str = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] = 4
    #: divide out the class weights of the model's training loss, so probabilities are the
    #: model's own. A weighted loss tilts unsure pixels towards monolayer and bilayer, and a
    #: chip is mostly bare oxide: the weights shipped until 2026-11 showed 833 monolayers on
    #: simulated-small where 8 were real. The shipped model trained with redrawn layer colours
    #: does not (8 of 8, none false) and under the plain posterior misses every bilayer of
    #: simulated-demo, so it is off by default; turn it on for models that over-call.
    plain_posterior: bool = False
    #: read a tile whose own contrast reference is not the oxide (a CVD film or a thick flake
    #: fills it) against the oxide colour of the tiles before it (scanner/chip_reference.py);
    #: without it a film larger than the field shows holes the size of a field. For models
    #: that take the optical contrast (the shipped one does); ignored for others.
    chip_reference: bool = True
    #: what the flakes lie on: `oxide` (SiO2/Si), `transparent` (quartz, sapphire: the layers
    #: are brighter than the dark substrate and are read mirrored onto the oxide's contrast,
    #: model/unet/reference.py) or `auto`, decided per tile. Unset: the model's own default
    #: (`auto` for the shipped model and nets trained with `--substrate auto`, the `lab`
    #: recipes' default; `oxide` for other nets that see raw colour). `auto` sees a
    #: transparent substrate only where films cover half a tile: set `transparent` for such
    #: chips.
    substrate: Literal["auto", "oxide", "transparent"] | None = None


class FlatFieldConfig(_Strict):
    """Flat-field correction of every frame before the model sees it (scanner/flat_field.py).

    Vignetting darkens a 100× field's corners by about one monolayer's contrast: without this,
    a monolayer in a tile corner reads as a bilayer.
    """

    #: auto: estimated from frames at fields spread over the chip, taken before the scan;
    #: none: frames as the camera gives them; or the path of a TIFF: a frame of a bare wafer
    #: (or a saved flat_field.tif) for this camera and ROI
    source: Literal["auto", "none"] | Path = "auto"
    #: frames the auto estimate takes (all fields on a chip with fewer)
    frames: Annotated[int, Field(ge=1, le=256)] = 16
    #: degree of the polynomial surface fitted through them
    degree: Annotated[int, Field(ge=0, le=6)] = 4


class ScanConfig(_Strict):
    """The `scan:` section. Lengths in stage µm unless named otherwise.

    The objective is the rig's (`objective:` in the rig part of the same YAML): the pixel
    size, and so the whole plan, follow from it.
    """

    #: where the chip lies on the stage; None on the simulated rig: the simulated chip
    chip: ChipOutline | None = None
    #: the chip frame's origin on the stage (the robot picks in chip coordinates);
    #: None: the chip outline's lower-left corner
    chip_origin_um: tuple[float, float] | None = None
    #: the chip's edges against the stage axes, degrees counter-clockwise
    chip_rotation_deg: float = 0.0
    #: share of a field that overlaps its neighbour: a flake cut by one field's edge is whole
    #: in the next when it is smaller than this overlap
    overlap: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1
    focus: FocusConfig = FocusConfig()
    flat_field: FlatFieldConfig = FlatFieldConfig()
    model: ModelConfig = ModelConfig()
    acquisition: AcquisitionConfig = AcquisitionConfig()
    #: regions smaller than this are not flakes (noise, the model's speckle)
    min_flake_area_um2: Positive = 1.0
    #: flakes whose mean class probability is below this are left out of the map (0 keeps
    #: all). For the shipped model, chosen on two validation chips: their true monolayers
    #: scored 0.66 and more, its mistakes (thick edges, terraces) 0.56-0.65 (model card).
    min_flake_confidence: Annotated[float, Field(ge=0.0, le=1.0)] = 0.65
    #: fields acquired but not yet segmented; makes the stage wait when inference falls
    #: behind. Memory holds at most about queue_size + 3 × batch_size fields' frames.
    queue_size: Annotated[int, Field(ge=1, le=1024)] = 16
    #: the overview mosaic's finest level, µm per pixel
    overview_um_per_px: Annotated[float, Field(ge=0.05, le=100)] = 1.0
    #: rewrite flakes.json at most this often while the scan runs
    flake_map_every_s: Annotated[float, Field(ge=0)] = 5.0
    #: where to write (a new or empty folder); None: runs/<config name>-<date>-<time>;
    #: `flakescan scan --out` overrides it
    out: Path | None = None


def load_scan_config(path: str | Path) -> ScanConfig:
    """The `scan:` section of the YAML at `path` (defaults when it has none)."""
    raw = read_yaml_mapping(path)
    section: Any = raw.get(SCAN_SECTION) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: `{SCAN_SECTION}:` must be a mapping")
    try:
        cfg = ScanConfig.model_validate(section)
    except ValidationError as e:
        raise ConfigError(
            f"{path}: {format_validation_error(e).replace(chr(10) + '  ', chr(10) + '  scan.')}"
        ) from None
    # Relative paths are relative to the config file, so a config and its model (or flat
    # field) can travel together.
    base = Path(path).resolve().parent
    if cfg.model.checkpoint is not None and not cfg.model.checkpoint.is_absolute():
        cfg = cfg.model_copy(
            update={
                "model": cfg.model.model_copy(update={"checkpoint": base / cfg.model.checkpoint})
            }
        )
    source = cfg.flat_field.source
    if isinstance(source, Path) and not source.is_absolute():
        cfg = cfg.model_copy(
            update={"flat_field": cfg.flat_field.model_copy(update={"source": base / source})}
        )
    return cfg
