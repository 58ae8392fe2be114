"""What the simulated camera sees: the chip's materials turned into an 8-bit RGB frame.

Order of the image chain, as in a real microscope + camera: thin-film colour of each
material (optics.py) -> optical blur (diffraction + defocus) -> motion smear -> vignetting
-> photo-electrons (exposure) -> shot and read noise -> full-well clipping -> white balance
-> gamma -> 8 bits.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from .config import ObjectiveConfig, SimulatedRigConfig
from .optics import N_MATERIALS, MaterialColours, material_colours
from .world import OFF_CHIP_CODE, ChipWorld

#: reflectance of the stage insert around the chip
_OFF_CHIP_REFLECTANCE = 0.02
_GAMMA_LEVELS = 4096
_WAVELENGTH_UM = 0.55
#: beyond this blur (about 9 µm of defocus at 100×) a field is featureless; cap the work
_MAX_BLUR_PX = 60.0


@dataclass(frozen=True)
class Exposure:
    """Everything about one frame that is not the chip: where, how sharp, how long, moving?"""

    center_um: tuple[float, float]
    objective: ObjectiveConfig
    defocus_um: float
    exposure_ms: float
    #: how far the stage travelled during the exposure (µm); non-zero smears the frame
    smear_um: tuple[float, float] = (0.0, 0.0)


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
        cam, optics = cfg.camera, cfg.optics
        self.shape = (cam.sensor_shape[0], cam.sensor_shape[1])
        self._rng = np.random.default_rng(seed)
        h, w = self.shape
        r = (np.arange(h) - (h - 1) / 2)[:, None] / (h / 2)
        c = (np.arange(w) - (w - 1) / 2)[None, :] / (w / 2)
        falloff = 1.0 - optics.vignetting * (r**2 + c**2) / 2
        if optics.illumination_tilt:
            # r and c run -1..1: the projection onto the tilt direction runs -√2..√2 at most
            a = math.radians(optics.illumination_tilt_deg)
            along = (c * math.cos(a) - r * math.sin(a)) / (abs(math.cos(a)) + abs(math.sin(a)))
            falloff = falloff * (1.0 + optics.illumination_tilt / 2 * along)
        # Full H×W×3 arrays rather than broadcasts: numpy is several times slower when a
        # broadcast axis is the innermost one.
        self._vignette = np.repeat(falloff.astype(np.float32)[..., None], 3, axis=2)
        # A bank of Gaussian noise read at a random offset per frame: drawing 786k normals
        # per frame would cost more than the rest of the render.
        self._noise = self._rng.standard_normal((h + 64, w + 64, 3), dtype=np.float32)
        mixing = np.asarray(cam.colour_mixing, dtype=np.float32)
        self._mixing = None if np.array_equal(mixing, np.eye(3)) else mixing
        # White balance and gamma in one lookup table per channel, indexed by the clipped
        # signal (0..levels-1) plus the channel's offset into the table.
        levels = np.linspace(0, 1, _GAMMA_LEVELS, dtype=np.float64)
        lut = [
            np.round(255 * np.clip(levels * g, 0, 1) ** (1 / optics.gamma))
            for g in optics.white_balance
        ]
        self._lut = np.concatenate(lut).astype(np.uint8)
        offsets = np.arange(3, dtype=np.int32) * _GAMMA_LEVELS
        self._channel_offset = np.ascontiguousarray(np.broadcast_to(offsets, (h, w, 3)))
        # render() reuses these buffers; the lock keeps two snaps (e.g. a live view during an
        # MDA run) from writing into each other's frames.
        self._lock = threading.Lock()
        self._electrons = np.empty((h, w, 3), dtype=np.float32)
        self._scratch = np.empty((h, w, 3), dtype=np.float32)
        self._index = np.empty((h, w, 3), dtype=np.int32)

    def pixel_size_um(self, objective: ObjectiveConfig) -> float:
        return self.cfg.pixel_size_um(objective.label)

    def _colours_for(self, objective: ObjectiveConfig) -> MaterialColours:
        # material_colours is cached: built on first use of an objective, shared after that.
        lo, hi = self.world.oxide_range_nm()
        return material_colours(
            lo, hi, self.cfg.optics.lamp_kelvin, objective.na, self.cfg.chip.substrate
        )

    def reflectance(self, exp: Exposure) -> np.ndarray:
        """Linear RGB reflectance (mirror = 1) of the field, blurred and smeared: float32 H×W×3."""
        px = self.pixel_size_um(exp.objective)
        sigma = blur_sigma_px(exp.defocus_um, exp.objective.na, px)
        # stage travel -> image axes, with the camera's rotation as in material_raster
        cos, sin = (
            np.cos(np.radians(self.cfg.camera.rotation_deg)),
            np.sin(np.radians(self.cfg.camera.rotation_deg)),
        )
        dx, dy = exp.smear_um
        smear_px = np.array([cos * dx + sin * dy, -sin * dx + cos * dy]) / px
        # Render a margin so blur and smear pull in what lies just outside the field.
        sigma = min(sigma, _MAX_BLUR_PX)
        margin = min(math.ceil(3 * sigma + np.abs(smear_px).max()) + 1, 256)
        h, w = self.shape
        codes = self.world.material_raster(
            exp.center_um, (h + 2 * margin, w + 2 * margin), px, self.cfg.camera.rotation_deg
        )
        lut = np.empty((256, 3), dtype=np.float32)
        lut[:N_MATERIALS] = self._colours_for(exp.objective).linear_rgb(
            self.world.oxide_nm(*exp.center_um)
        )
        lut[OFF_CHIP_CODE] = _OFF_CHIP_REFLECTANCE
        background = int(
            np.bincount(codes[:: max(h // 32, 1), :: max(w // 32, 1)].ravel()).argmax()
        )
        structure = codes != background
        if not structure.any():  # bare substrate (most tiles): blur and smear change nothing
            return _filled((h, w), lut[background])
        img = _filled(codes.shape, lut[background])
        # Blur only the box around what is not background: a constant stays constant.
        rows, cols = np.nonzero(structure.any(axis=1))[0], np.nonzero(structure.any(axis=0))[0]
        pad = margin
        r0, r1 = max(rows[0] - pad, 0), min(rows[-1] + pad + 1, codes.shape[0])
        c0, c1 = max(cols[0] - pad, 0), min(cols[-1] + pad + 1, codes.shape[1])
        box = np.take(lut, codes[r0:r1, c0:c1], axis=0)
        box = _blur(box, sigma)
        img[r0:r1, c0:c1] = box
        if np.abs(smear_px).max() >= 1:
            img = _smear(img, smear_px)
        return img[margin : margin + h, margin : margin + w]

    def render(self, exp: Exposure, out: np.ndarray | None = None) -> np.ndarray:
        """The 8-bit RGB frame (H×W×3 uint8); written into `out` if given."""
        with self._lock:
            return self._render(exp, out)

    def _render(self, exp: Exposure, out: np.ndarray | None) -> np.ndarray:
        cam = self.cfg.camera
        h, w = self.shape
        e, tmp, idx = self._electrons, self._scratch, self._index
        reflectance = self.reflectance(exp)
        np.multiply(reflectance, self._vignette, out=e)
        if glare := self.cfg.optics.veiling_glare:
            # scattered in the optics, so it reaches the sensor evenly, vignetting or not
            e += np.float32(glare) * reflectance.mean(axis=(0, 1), dtype=np.float32)
        e *= np.float32(cam.electrons_per_ms * exp.exposure_ms)
        # Shot noise (Poisson, as a Gaussian of variance = signal) and read noise together.
        np.add(e, np.float32(cam.read_noise_e**2), out=tmp)
        np.sqrt(tmp, out=tmp)
        oy, ox = self._rng.integers(0, 64, size=2)
        tmp *= self._noise[oy : oy + h, ox : ox + w]
        e += tmp
        frame = self._digitise(e, idx, out)
        if self._mixing is None and cam.output_noise_dn == 0:
            return frame
        # The camera's processing after gamma: colour matrix, then its own noise.
        levels = frame.astype(np.float32)
        if self._mixing is not None:
            levels = levels @ self._mixing.T
        if cam.output_noise_dn > 0:
            oy, ox = self._rng.integers(0, 64, size=2)
            # the bank flipped: independent of the shot noise drawn from it above
            levels += (
                np.float32(cam.output_noise_dn) * self._noise[::-1, ::-1][oy : oy + h, ox : ox + w]
            )
        np.clip(levels, 0, 255, out=levels)
        np.rint(levels, out=levels)
        frame[:] = levels
        return frame

    def _digitise(
        self, electrons: np.ndarray, idx: np.ndarray, out: np.ndarray | None
    ) -> np.ndarray:
        # Clip at full well before the white-balance gains (in the LUT): a saturated channel
        # stays flat, as on a real sensor.
        fw = np.float32(self.cfg.camera.full_well_e)
        np.clip(electrons, 0, fw, out=electrons)
        electrons *= np.float32((_GAMMA_LEVELS - 1) / fw)
        idx[:] = electrons
        idx += self._channel_offset
        if out is None:
            return self._lut[idx]
        np.take(self._lut, idx, out=out)
        return out

    def dark_frame(self, exposure_ms: float, out: np.ndarray | None = None) -> np.ndarray:
        """What the camera reads with the lamp shutter closed: read noise around zero."""
        with self._lock:
            return self._dark_frame(out)

    def _dark_frame(self, out: np.ndarray | None) -> np.ndarray:
        h, w = self.shape
        oy, ox = self._rng.integers(0, 64, size=2)
        e = self._electrons
        np.multiply(
            self._noise[oy : oy + h, ox : ox + w], np.float32(self.cfg.camera.read_noise_e), out=e
        )
        return self._digitise(e, self._index, out)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an H×W×3 image; wide blurs run on a block-averaged copy (same result
    to the eye, a fraction of the work)."""
    if sigma <= 4:
        return ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest", truncate=3.0)
    f = int(sigma // 2)
    h, w = img.shape[0] // f * f, img.shape[1] // f * f
    if h == 0 or w == 0:
        return np.broadcast_to(img.mean(axis=(0, 1)), img.shape).astype(np.float32)
    small = img[:h, :w].reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3))
    small = ndimage.gaussian_filter(small, sigma=(sigma / f, sigma / f, 0), mode="nearest")
    # Bilinear upsampling per channel in PIL: scipy's zoom is ten times slower here.
    out = np.empty_like(img)
    size = (img.shape[1], img.shape[0])
    for c in range(3):
        plane = Image.fromarray(np.ascontiguousarray(small[..., c]), mode="F")
        out[..., c] = np.asarray(plane.resize(size, Image.Resampling.BILINEAR))
    return out


def _filled(shape: tuple[int, int], rgb: np.ndarray) -> np.ndarray:
    """An H×W×3 float32 image of one colour (row-wise fill: far faster than a broadcast)."""
    img = np.empty((*shape, 3), dtype=np.float32)
    img.reshape(shape[0], -1)[:] = np.tile(rgb.astype(np.float32), shape[1])
    return img


def _smear(img: np.ndarray, smear_px: np.ndarray) -> np.ndarray:
    """Average of the image shifted along the path the stage travelled during the exposure."""
    n = int(min(max(np.abs(smear_px).max(), 1), 48))
    acc = np.zeros_like(img)
    for t in np.linspace(-0.5, 0.5, n):
        dy, dx = round(t * smear_px[1]), round(t * smear_px[0])
        acc += np.roll(img, shift=(dy, dx), axis=(0, 1))
    return acc / n
