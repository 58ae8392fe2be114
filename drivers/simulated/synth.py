"""Synthetic training data: tiles taken through the simulated camera, with true layer masks.

The tiles come from the rig exactly as a scan would take them (move, focus, snap), over many
small chips, each with its own randomised wafer, lamp and camera: real micrographs differ in
oxide thickness, colour temperature, white balance, exposure, focus, noise and compression,
and a model trained on one fixed look would learn that look instead of the layers.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import structlog
import yaml
from PIL import Image

from ..unicore import closing_core
from .config import SimulatedRigConfig
from .optics import RESIDUE_CODE, Substrate
from .rig import create_simulated_core

log = structlog.get_logger("flakescan.synth")

LABEL_VALUES = {0: "other", 1: "monolayer", 2: "bilayer"}


@dataclass(frozen=True)
class TileRecipe:
    """How one tile was taken; written to metadata.jsonl beside the images."""

    stem: str
    chip_seed: int
    x_um: float
    y_um: float
    target: str
    oxide_nm: float
    lamp_kelvin: float
    white_balance: tuple[float, float, float]
    gamma: float
    vignetting: float
    exposure_ms: float
    read_noise_e: float
    defocus_um: float
    jpeg_quality: int
    crosstalk: float = 0.0
    growth: Literal["exfoliated", "cvd"] = "exfoliated"
    substrate: Substrate = "sio2_si"
    illumination_tilt: float = 0.0
    output_noise_dn: float = 0.0
    veiling_glare: float = 0.0


SYNTH_CHIP_UM = 800.0

#: Camera colour mixing fitted to real micrographs (scripts/compare_realism.py): blue takes
#: 0.6 of red, green 0.3 of red. Without it the simulated blue contrast of thin MoS2 has the
#: wrong sign. Each synthetic chip mixes `t` of it with the identity, t in CROSSTALK_RANGE.
CROSSTALK_MATRIX = ((1.0, 0.0, 0.0), (0.3, 0.7, 0.0), (0.6, 0.0, 0.4))
CROSSTALK_RANGE = (0.4, 1.5)
#: share of chips without crosstalk (identity: the simulated rig's own default look)
NO_CROSSTALK_SHARE = 0.2
#: CVD chips (with cvd_share > 0): triangles dense enough to merge into films. Aimed at the real
#: CVD micrographs, 39 % of which are under half substrate (exfoliated synth tiles: 7 %); 47 % of
#: CVD tiles are too (160-tile check, docs/model_card.md).
CVD_FLAKES_PER_MM2 = (150.0, 1200.0)
#: Transparent-substrate chips (with transparent_share > 0) are quartz or sapphire, always CVD
#: (exfoliated flakes go on oxidised silicon, where they are visible): dark background, layers
#: brighter than it. 5 of the 109 real micrographs look so, and on them every layer's contrast
#: has the opposite sign of oxidised silicon's. The camera keeps the exposure it has for SiO2/Si
#: (whose oxide reflects 3-6x more), as the real ones did: their substrate reads ~0.2-0.3.
TRANSPARENT_SUBSTRATES = ("quartz", "sapphire")
#: linear illumination gradient (fraction, corner to corner); real tiles median ~0.09
TILT_RANGE = (0.0, 0.4)
#: post-gamma noise (8-bit levels, sigma); real tiles keep ~3x the noise of shot noise alone
OUTPUT_NOISE_RANGE = (0.0, 4.0)


def crosstalk_matrix(t: float) -> tuple[tuple[float, float, float], ...]:
    """(1 - t)·identity + t·CROSSTALK_MATRIX: t=0 is no crosstalk, t=1 the fitted camera."""
    eye = np.eye(3)
    m = (1 - t) * eye + t * np.asarray(CROSSTALK_MATRIX)
    return tuple(tuple(float(v) for v in row) for row in m)


def randomised_chip(
    base: SimulatedRigConfig,
    rng: np.random.Generator,
    seed: int,
    *,
    randomise: bool = True,
    cvd_share: float = 0.0,
    transparent_share: float = 0.0,
    glare_max: float = 0.0,
) -> SimulatedRigConfig:
    """A small chip with its own wafer, lamp and camera settings, dense with thin flakes.

    With ``randomise=False`` the lamp, optics and camera stay exactly the base config's (the
    rig's own look, for checking a model on what a scan of that rig will see); the chip is
    still small and dense with flakes. ``cvd_share`` of the randomised chips are CVD-grown
    (``flakes.growth: cvd``) instead of exfoliated; ``transparent_share`` of them are CVD on
    quartz or sapphire instead of oxidised silicon; each randomised chip's veiling glare is
    uniform in 0..``glare_max``.
    """
    data = base.model_dump()
    lo_um = float(rng.uniform(6, 25))
    # A scan's own look (the base config, e.g. configs/simulated.yaml) on some chips; the rest
    # spread around it and towards real micrographs.
    crosstalk = 0.0 if rng.random() < NO_CROSSTALK_SHARE else float(rng.uniform(*CROSSTALK_RANGE))
    blue_gain = float(rng.uniform(0.9, 1.1)) * (1.3 if rng.random() < 0.2 else 1.0)
    # No draw at share 0: the shipped model's training images and masks stay as they were.
    cvd = randomise and cvd_share > 0 and rng.random() < cvd_share
    transparent = randomise and transparent_share > 0 and rng.random() < transparent_share
    substrate = TRANSPARENT_SUBSTRATES[rng.integers(2)] if transparent else "sio2_si"
    cvd = cvd or transparent
    growth = (
        {
            "growth": "cvd",
            "thin_flakes_per_mm2": float(rng.uniform(*CVD_FLAKES_PER_MM2)),
            "bulk_pieces_per_mm2": 10.0,
            "residue_per_mm2": 0.0,  # no tape
            "monolayer_size_um": (lo_um, float(rng.uniform(lo_um + 30, 130))),
        }
        if cvd
        # explicit, so a CVD base config does not make every "exfoliated" chip CVD
        else {"growth": "exfoliated"}
    )
    data.update(
        seed=seed,
        time_scale=0.0,
        objective="100x",
        faults={},
        chip={
            "width_um": SYNTH_CHIP_UM,
            "height_um": SYNTH_CHIP_UM,
            "origin_um": (0.0, 0.0),
            "oxide_nm": float(rng.uniform(285, 335)),
            "oxide_drift_nm": float(rng.uniform(0, 4)),
            "substrate": substrate,
        },
        flakes={
            **data["flakes"],
            "thin_flakes_per_mm2": 40.0,
            "bulk_pieces_per_mm2": 30.0,
            "residue_per_mm2": 10.0,
            "dust_per_mm2": 30.0,
            # real tiles are mostly monolayer at high magnification: some chips grow large ones
            "monolayer_size_um": (lo_um, float(rng.uniform(lo_um + 15, 90))),
            "monolayer_fraction": 0.9,
            **growth,
        },
        optics={
            "lamp_kelvin": float(rng.uniform(2800, 4200)),
            # blue gain > 1 on some chips: the blue channel saturates on bright substrate,
            # as in about one real micrograph in six
            "white_balance": (*(float(g) for g in rng.uniform(0.9, 1.1, size=2)), blue_gain),
            "gamma": float(rng.uniform(1.8, 2.5)),
            "vignetting": float(rng.uniform(0.0, 0.2)),
            "illumination_tilt": float(rng.uniform(*TILT_RANGE)),
            "illumination_tilt_deg": float(rng.uniform(0, 360)),
            # The thin-film optics give SiO2/Si tiles a median red contrast of 0.128 (1L) and
            # 0.214 (2L) against the real set's 0.106 and 0.179 (optics.md: 0.11, 0.17); glare
            # up to 0.4 brings them there (0.106 / 0.173). A model trained so scored higher on
            # real bilayers but called specks of bilayer on simulated scans, so the shipped
            # recipe leaves it at 0 (docs/model_card.md), where there is no draw and the
            # shipped model's training tiles stay as they were.
            "veiling_glare": float(rng.uniform(0, glare_max)) if glare_max > 0 else 0.0,
        },
        camera={
            **data["camera"],
            # 0.06-0.15 µm per pixel at 100×: cameras and relay lenses differ between labs
            "pixel_pitch_um": float(rng.uniform(6, 16)),
            # a few dim, under-exposed chips
            "exposure_ms": float(rng.uniform(35, 75) if rng.random() > 0.1 else rng.uniform(8, 30)),
            # Small pixels hold few electrons: shot noise that survives JPEG, as in real tiles.
            # (a fifth keep the base camera's deeper wells: its cleaner look)
            **(
                {
                    "full_well_e": (full_well := float(rng.uniform(3500, 6000))),
                    "electrons_per_ms": 0.05 * full_well,
                }
                if rng.random() > 0.2
                else {}
            ),
            "read_noise_e": float(rng.uniform(5, 30)),
            "colour_mixing": crosstalk_matrix(crosstalk),
            "output_noise_dn": float(rng.uniform(*OUTPUT_NOISE_RANGE)),
        },
    )
    if not randomise:
        data["optics"] = base.optics.model_dump()
        data["camera"] = base.camera.model_dump()
        data["chip"]["oxide_nm"] = base.chip.oxide_nm
        data["chip"]["oxide_drift_nm"] = base.chip.oxide_drift_nm
        data["chip"]["substrate"] = base.chip.substrate
    data["xy_stage"]["x_limits_um"] = (-1000.0, SYNTH_CHIP_UM + 1000)
    data["xy_stage"]["y_limits_um"] = (-1000.0, SYNTH_CHIP_UM + 1000)
    return SimulatedRigConfig.model_validate(data)


def write_synthetic_dataset(
    base: SimulatedRigConfig,
    out_dir: str | Path,
    count: int,
    seed: int = 0,
    *,
    tiles_per_chip: int = 8,
    progress: Callable[[int], None] | None = None,
    randomise: bool = True,
    cvd_share: float = 0.0,
    transparent_share: float = 0.0,
    glare_max: float = 0.0,
) -> Path:
    """Write `count` tiles as a dataset folder (images/, masks/, dataset.yaml).

    ``randomise=False`` keeps the base config's lamp, optics and camera on every chip;
    ``cvd_share`` of the randomised chips grow CVD triangles instead of exfoliated flakes;
    ``transparent_share`` of them grow CVD triangles on quartz or sapphire; ``glare_max`` > 0
    adds veiling glare up to that fraction.

    Refuses a folder that already holds files, so nothing written before is lost.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    for name, share in (("cvd_share", cvd_share), ("transparent_share", transparent_share)):
        if not 0 <= share <= 1:
            raise ValueError(f"{name} is a fraction of chips, 0..1; got {share}")
        if share and not randomise:
            raise ValueError(f"{name} needs randomised chips: the rig's own look is its own chip")
    if not 0 <= glare_max <= 1:
        raise ValueError(f"glare_max is a fraction of the mean light, 0..1; got {glare_max}")
    if glare_max and not randomise:
        raise ValueError("glare_max needs randomised chips: the rig's own look is its own optics")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    written = 0
    growths: set[str] = set()
    substrates: set[str] = set()
    with (out / "metadata.jsonl").open("w") as meta:
        while written < count:
            chip_seed = int(rng.integers(2**31))
            cfg = randomised_chip(
                base,
                rng,
                chip_seed,
                randomise=randomise,
                cvd_share=cvd_share,
                transparent_share=transparent_share,
                glare_max=glare_max,
            )
            n = min(tiles_per_chip, count - written)
            with closing_core(create_simulated_core(cfg)) as core:
                for recipe, image, mask in _tiles(core, cfg, rng, n, written, chip_seed):
                    _save(out, recipe, image, mask)
                    meta.write(json.dumps(asdict(recipe)) + "\n")
                    growths.add(recipe.growth)
                    substrates.add(recipe.substrate)
                    written += 1
                    if progress:
                        progress(1)
    card = _dataset_yaml(base, count, seed, growths, substrates, cvd_share, transparent_share)
    (out / "dataset.yaml").write_text(card)
    log.info("synth.done", out=str(out), tiles=count, seed=seed)
    return out


def _tiles(
    core, cfg: SimulatedRigConfig, rng: np.random.Generator, n: int, first: int, chip_seed: int
):
    world = core.simulation.world
    thin = list(world.flakes)
    thick = [p for p in world.pieces if p.layers >= 3]
    # Tape residue is a smooth film a little like a monolayer; unless tiles seek it out the
    # model hardly sees it and calls it monolayer (most false flakes of a simulated scan).
    residue = [p for p in world.pieces if p.code == RESIDUE_CODE]
    px = core.getPixelSizeUm()
    h, w = cfg.camera.sensor_shape
    fov = np.array([w, h]) * px
    for i in range(n):
        roll = rng.random()
        if thin and roll < 0.7:
            target, c = "flake", thin[rng.integers(len(thin))].polygon.centroid
        elif thick and roll < 0.82:
            target, c = "debris", thick[rng.integers(len(thick))].polygon.centroid
        elif residue and roll < 0.92:
            target, c = "residue", residue[rng.integers(len(residue))].polygon.centroid
        else:
            target, c = "random", None
        if c is None:
            x, y = rng.uniform(0, cfg.chip.width_um), rng.uniform(0, cfg.chip.height_um)
        else:
            # Anywhere up to half a field off centre: a scan sees flakes in tile corners and
            # cut by tile edges as often as centred, and the model must know them there too.
            x, y = np.array([c.x, c.y]) + rng.uniform(-0.5, 0.5, 2) * fov
        if rng.random() > 0.05:  # a few tiles see the chip's edge, as a scan's border fields do
            x = float(np.clip(x, fov[0] / 2, cfg.chip.width_um - fov[0] / 2))
            y = float(np.clip(y, fov[1] / 2, cfg.chip.height_um - fov[1] / 2))
        defocus = float(rng.normal(0, 0.2) if rng.random() < 0.9 else rng.uniform(-0.8, 0.8))
        core.setXYPosition(float(x), float(y))
        core.waitForDevice(core.getXYStageDevice())
        x, y = core.getXYPosition()
        core.setPosition(world.focus_z_um(x, y) + defocus)
        core.waitForDevice(core.getFocusDevice())
        core.snapImage()
        image = np.array(core.getImage())
        mask = world.label_raster((x, y), (h, w), px, cfg.camera.rotation_deg)
        recipe = TileRecipe(
            stem=f"synth-{first + i:05d}",
            chip_seed=chip_seed,
            x_um=round(x, 3),
            y_um=round(y, 3),
            target=target,
            oxide_nm=round(world.oxide_nm(x, y), 2),
            lamp_kelvin=round(cfg.optics.lamp_kelvin, 1),
            white_balance=tuple(round(g, 3) for g in cfg.optics.white_balance),
            gamma=round(cfg.optics.gamma, 3),
            vignetting=round(cfg.optics.vignetting, 3),
            exposure_ms=round(cfg.camera.exposure_ms, 2),
            read_noise_e=round(cfg.camera.read_noise_e, 2),
            defocus_um=round(defocus, 3),
            jpeg_quality=int(rng.integers(70, 91)),
            crosstalk=round(crosstalk_of(cfg), 3),
            growth=cfg.flakes.growth,
            substrate=cfg.chip.substrate,
            illumination_tilt=round(cfg.optics.illumination_tilt, 3),
            output_noise_dn=round(cfg.camera.output_noise_dn, 3),
            veiling_glare=round(cfg.optics.veiling_glare, 3),
        )
        yield recipe, image, mask


def crosstalk_of(cfg: SimulatedRigConfig) -> float:
    """t such that cfg's colour mixing is crosstalk_matrix(t) (read off blue <- red)."""
    return cfg.camera.colour_mixing[2][0] / CROSSTALK_MATRIX[2][0]


def _save(out: Path, recipe: TileRecipe, image: np.ndarray, mask: np.ndarray) -> None:
    # Real micrographs arrive as JPEG; the compression artefacts are part of the look.
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=recipe.jpeg_quality)
    (out / "images" / f"{recipe.stem}.jpg").write_bytes(buf.getvalue())
    Image.fromarray(mask).save(out / "masks" / f"{recipe.stem}.png")


def _dataset_yaml(
    base: SimulatedRigConfig,
    count: int,
    seed: int,
    growths: set[str],
    substrates: set[str],
    cvd_share: float,
    transparent_share: float,
) -> str:
    names = {"exfoliated": "exfoliated", "cvd": "CVD"}
    kinds = " and ".join(name for growth, name in names.items() if growth in growths)
    on = {"sio2_si": "SiO2/Si", "quartz": "quartz", "sapphire": "sapphire"}
    grounds = ", ".join(name for key, name in on.items() if key in substrates)
    header = (
        f"# Synthetic micrographs of {kinds} MoS2 on {grounds} from the flakescan simulated rig.\n"
        "# Made by `flakescan synth`; free to use and to train shipped weights on.\n"
    )
    body = {
        "material": "MoS2",
        "growth": f"{kinds} (simulated)",  # per tile in metadata.jsonl
        "source": "flakescan synth",
        "count": count,
        "seed": seed,
        **({"cvd_share": cvd_share} if cvd_share else {}),
        **({"transparent_share": transparent_share} if transparent_share else {}),
        "base_config_seed": base.seed,
        "image_glob": "images/*.jpg",
        "mask_glob": "masks/*.png",
        "label_values": LABEL_VALUES,
    }
    return header + yaml.safe_dump(body, sort_keys=False)
