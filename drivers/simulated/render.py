"""What the simulated camera sees: the chip's materials turned into an 8-bit RGB frame.

Order of the image chain, as in a real microscope + camera: thin-film colour of each
material (optics.py) -> optical blur (diffraction + defocus) -> motion smear -> vignetting
-> photo-electrons (exposure) -> shot and read noise -> full-well clipping -> white balance
-> gamma -> 8 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .config import ObjectiveConfig, SimulatedRigConfig
from .optics import DUST_CODE, N_MATERIALS, material_colours
from .world import OFF_CHIP_CODE, ChipWorld

#: reflectance of the stage insert around the chip
_OFF_CHIP_REFLECTANCE = 0.02
_GAMMA_LEVELS = 4096
_WAVELENGTH_UM = 0.55


@dataclass(frozen=True)
class Exposure:
    """Everything about one frame that is not the chip: where, how sharp, how long, moving?"""

    center_um: tuple[float, float]
    objective: ObjectiveConfig
    defocus_um: float
    exposure_ms: float
    #: stage velocity during the exposure (µm/s); non-zero smears the frame
    velocity_um_s: tuple[float, float] = (0.0, 0.0)


def blur_sigma_px(defocus_um: float, na: float, pixel_size_um: float) -> float:
    """Gaussian sigma of the point spread: diffraction in quadrature with geometric defocus."""
    diffraction_um = 0.21 * _WAVELENGTH_UM / na
    # A defocused cone of half-angle asin(NA) spreads a point over a disc of radius
    # dz·tan(θ); a disc of radius r has the second moment of a Gaussian of sigma r/2.
    geometric_um = abs(defocus_um) * math.tan(math.asin(na)) / 2
    return math.hypot(diffraction_um, geometric_um) / pixel_size_um


class FrameRenderer:
    """Renders frames of one world through one camera; holds the per-camera precomputations."""

    def __init__(self, world: ChipWorld, cfg: SimulatedRigConfig, seed: int = 0) -> None:
        self.world = world
        self.cfg = cfg
        cam = cfg.camera
        self.shape = (cam.sensor_shape[0], cam.sensor_shape[1])
        self._rng = np.random.default_rng(seed)
        h, w = self.shape
        r = (np.arange(h) - (h - 1) / 2)[:, None] / (h / 2)
        c = (np.arange(w) - (w - 1) / 2)[None, :] / (w / 2)
        falloff = 1.0 - cfg.optics.vignetting * (r**2 + c**2) / 2
        self._vignette = falloff.astype(np.float32)[..., None]
        # A bank of Gaussian noise read at a random offset per frame: drawing 786k normals
        # per frame would cost more than the rest of the render.
        self._noise = self._rng.standard_normal((h + 64, w + 64, 3), dtype=np.float32)
        gamma = cfg.optics.gamma
        levels = np.linspace(0, 1, _GAMMA_LEVELS, dtype=np.float64)
        self._gamma_lut = np.round(255 * levels ** (1 / gamma)).astype(np.uint8)
        lo, hi = world.oxide_range_nm()
        self._colours = {
            o.label: material_colours(lo, hi, cfg.optics.lamp_kelvin, o.na) for o in cfg.objectives
        }

    def pixel_size_um(self, objective: ObjectiveConfig) -> float:
        return self.cfg.camera.pixel_pitch_um / objective.magnification

    def reflectance(self, exp: Exposure) -> np.ndarray:
        """Linear RGB reflectance (mirror = 1) of the field, blurred and smeared: float32 H×W×3."""
        px = self.pixel_size_um(exp.objective)
        sigma = blur_sigma_px(exp.defocus_um, exp.objective.na, px)
        smear_px = np.asarray(exp.velocity_um_s) * exp.exposure_ms / 1000 / px
        # Render a margin so blur and smear pull in what lies just outside the field.
        margin = min(math.ceil(3 * sigma + np.abs(smear_px).max()) + 1, 256)
        h, w = self.shape
        codes = self.world.material_raster(
            exp.center_um, (h + 2 * margin, w + 2 * margin), px, self.cfg.camera.rotation_deg
        )
        lut = np.empty((256, 3), dtype=np.float32)
        lut[:N_MATERIALS] = self._colours[exp.objective.label].linear_rgb(
            self.world.oxide_nm(*exp.center_um)
        )
        lut[DUST_CODE] = 0.04
        lut[OFF_CHIP_CODE] = _OFF_CHIP_REFLECTANCE
        lo, hi = int(codes.min()), int(codes.max())
        if lo == hi:  # bare substrate (most tiles): blur and smear change nothing
            return np.broadcast_to(lut[lo], (h, w, 3)).copy()
        img = lut[codes]
        img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest", truncate=3.0)
        if np.abs(smear_px).max() >= 1:
            img = _smear(img, smear_px)
        return img[margin : margin + h, margin : margin + w]

    def render(self, exp: Exposure, out: np.ndarray | None = None) -> np.ndarray:
        """The 8-bit RGB frame (H×W×3 uint8); written into `out` if given."""
        cam, optics = self.cfg.camera, self.cfg.optics
        img = self.reflectance(exp)
        img *= self._vignette
        electrons = img * np.float32(cam.electrons_per_ms * exp.exposure_ms)
        h, w = self.shape
        oy, ox = self._rng.integers(0, 64, size=2)
        noise = self._noise[oy : oy + h, ox : ox + w]
        sigma = np.sqrt(electrons + np.float32(cam.read_noise_e**2))
        electrons += sigma * noise
        gains = np.asarray(optics.white_balance, dtype=np.float32) / np.float32(cam.full_well_e)
        # Clip at full well before the white-balance gains: a saturated channel stays flat.
        signal = np.clip(electrons, 0, cam.full_well_e) * gains
        idx = np.clip(signal * (_GAMMA_LEVELS - 1), 0, _GAMMA_LEVELS - 1).astype(np.int32)
        if out is None:
            return self._gamma_lut[idx]
        np.take(self._gamma_lut, idx, out=out)
        return out

    def dark_frame(self, exposure_ms: float, out: np.ndarray | None = None) -> np.ndarray:
        """What the camera reads with the lamp shutter closed: read noise around zero."""
        cam = self.cfg.camera
        h, w = self.shape
        oy, ox = self._rng.integers(0, 64, size=2)
        electrons = np.abs(self._noise[oy : oy + h, ox : ox + w]) * np.float32(cam.read_noise_e)
        idx = (electrons / np.float32(cam.full_well_e) * (_GAMMA_LEVELS - 1)).astype(np.int32)
        frame = self._gamma_lut[np.clip(idx, 0, _GAMMA_LEVELS - 1)]
        if out is not None:
            out[:] = frame
            return out
        return frame


def _smear(img: np.ndarray, smear_px: np.ndarray) -> np.ndarray:
    """Average of the image shifted along the path the stage travelled during the exposure."""
    n = int(min(max(np.abs(smear_px).max(), 1), 48))
    acc = np.zeros_like(img)
    for t in np.linspace(-0.5, 0.5, n):
        dy, dx = round(t * smear_px[1]), round(t * smear_px[0])
        acc += np.roll(img, shift=(dy, dx), axis=(0, 1))
    return acc / n
