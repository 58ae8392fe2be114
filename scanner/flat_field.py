"""Flat-field correction: take the lamp's uneven illumination and the objective's vignetting
out of every frame before the model sees it.

The model reads a flake's layer count from its contrast against the bare oxide around it.
At 100× the corners of a field are some 10 % darker than its centre, about the contrast of
one MoS2 layer, so without correction a monolayer in a tile corner reads as a bilayer.

The gain is a smooth surface, so it is estimated retrospectively from the scan's own frames:
each frame divided by its median, the per-pixel median over frames (flakes sit in different
places in different fields, the oxide is everywhere), block medians, and a low-order
polynomial fitted robustly through them. Illumination and vignetting multiply the light
before the camera's gamma, and x^(1/γ) of a product is a product, so the correction is a
division of the frame as recorded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile

#: block size (px) of the medians the surface is fitted through
_BLOCK = 16
#: a frame whose median is darker than this share of full scale shows no lit oxide
_MIN_MEDIAN = 0.05


class FlatFieldError(ValueError):
    """The frames or file cannot give a flat field; the message says why."""


def estimate_flat_field(frames: Sequence[np.ndarray], degree: int = 4) -> np.ndarray:
    """(H, W, C) float32 gain with mean 1, from frames of one camera (H×W×C or H×W).

    Frames too dark to show oxide (the stage beyond the chip, a closed shutter) are left out.
    """
    if not frames:
        raise FlatFieldError("no frames to estimate a flat field from")
    shape = frames[0].shape
    if any(f.shape != shape for f in frames):
        shapes = sorted({f.shape for f in frames})
        raise FlatFieldError(f"flat-field frames differ in shape: {shapes}")
    full = _full_scale(frames[0].dtype)
    grids = []
    for frame in frames:
        x = _as_hwc(frame).astype(np.float32)
        median = np.median(x.reshape(-1, x.shape[2]), axis=0)
        if median.min() < _MIN_MEDIAN * full:
            continue
        grids.append(_block_medians(x / median))
    if not grids:
        raise FlatFieldError(
            f"all {len(frames)} flat-field frames are dark (median under {_MIN_MEDIAN:.0%} of "
            "full scale): is the lamp on and the chip under the objective?"
        )
    grid = np.median(np.stack(grids), axis=0)
    h, w = shape[:2]
    gain = np.stack(
        [_fit_surface(grid[..., c], (h, w), degree) for c in range(grid.shape[2])], axis=-1
    )
    return _unit_mean(gain, "estimated").astype(np.float32)


def apply_flat_field(frame: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """`frame` divided by `gain`, in the frame's own dtype and range."""
    x = _as_hwc(frame)
    check_frame_shape(gain, x.shape[:2])
    out = x.astype(np.float32) / (gain if gain.shape[2] == x.shape[2] else gain[..., :1])
    if np.issubdtype(frame.dtype, np.integer):
        np.clip(np.rint(out, out=out), 0, _full_scale(frame.dtype), out=out)
    return out.astype(frame.dtype).reshape(frame.shape)


def check_frame_shape(gain: np.ndarray, shape: tuple[int, ...]) -> None:
    if tuple(gain.shape[:2]) != tuple(shape[:2]):
        raise FlatFieldError(
            f"the flat field is {gain.shape[0]}×{gain.shape[1]} px but frames are "
            f"{shape[0]}×{shape[1]}: take a new one for this camera and ROI"
        )


def read_flat_field(path: str | Path) -> np.ndarray:
    """A flat-field image from a TIFF (a bare wafer's frame, or a saved gain), as a gain."""
    path = Path(path)
    if not path.is_file():
        raise FlatFieldError(f"flat-field file {path} does not exist")
    try:
        image = tifffile.imread(path)
    except Exception as e:  # tifffile raises several kinds for a file that is not a TIFF
        raise FlatFieldError(f"{path} is not a readable TIFF: {e}") from None
    if image.ndim not in (2, 3):
        raise FlatFieldError(f"{path}: a flat field is H×W or H×W×C, this is {image.shape}")
    gain = _as_hwc(image).astype(np.float32)
    if not np.isfinite(gain).all() or gain.min() <= 0:
        raise FlatFieldError(f"{path}: a flat field must be positive everywhere")
    return _unit_mean(gain, str(path))


def write_flat_field(path: str | Path, gain: np.ndarray) -> None:
    tifffile.imwrite(path, gain.astype(np.float32), photometric="minisblack")


def _as_hwc(image: np.ndarray) -> np.ndarray:
    return image[..., None] if image.ndim == 2 else image


def _full_scale(dtype: np.dtype) -> float:
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def _block_medians(x: np.ndarray) -> np.ndarray:
    h, w, c = x.shape
    gh, gw = h // _BLOCK, w // _BLOCK
    if gh < 2 or gw < 2:
        raise FlatFieldError(f"a {h}×{w} frame is too small for a flat field")
    blocks = x[: gh * _BLOCK, : gw * _BLOCK].reshape(gh, _BLOCK, gw, _BLOCK, c)
    return np.median(blocks.transpose(0, 2, 4, 1, 3).reshape(gh, gw, c, -1), axis=-1)


def _terms(u: np.ndarray, v: np.ndarray, degree: int) -> np.ndarray:
    return np.stack(
        [u**i * v**j for i in range(degree + 1) for j in range(degree + 1 - i)], axis=-1
    )


def _fit_surface(grid: np.ndarray, shape: tuple[int, int], degree: int) -> np.ndarray:
    """A polynomial surface through block medians, refitted without outlying blocks."""
    h, w = shape
    gh, gw = grid.shape
    # Block centres in coordinates that run -1..1 over the whole frame.
    rows = ((np.arange(gh) + 0.5) * _BLOCK - h / 2) / (h / 2)
    cols = ((np.arange(gw) + 0.5) * _BLOCK - w / 2) / (w / 2)
    v, u = np.meshgrid(rows, cols, indexing="ij")
    a = _terms(u.ravel(), v.ravel(), degree)
    y = grid.ravel()
    keep = np.isfinite(y)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(a[keep], y[keep], rcond=None)
        residual = y - a @ coef
        mad = 1.4826 * np.median(np.abs(residual[keep])) + 1e-6
        keep = np.abs(residual) < 3 * mad
    rr = (np.arange(h) + 0.5 - h / 2) / (h / 2)
    cc = (np.arange(w) + 0.5 - w / 2) / (w / 2)
    # Separable evaluation: the full H×W×terms design matrix would be 40 MB for 512×512.
    out = np.zeros((h, w), np.float64)
    k = 0
    for i in range(degree + 1):
        for j in range(degree + 1 - i):
            out += coef[k] * np.outer(rr**j, cc**i)
            k += 1
    return out


def _unit_mean(gain: np.ndarray, what: str) -> np.ndarray:
    """`gain` scaled to mean 1 per channel, refused if no lamp and objective could give it."""
    gain = gain / gain.mean(axis=(0, 1), keepdims=True)
    lo, hi = float(gain.min()), float(gain.max())
    if lo < 0.3 or hi > 3.0 or not math.isfinite(lo + hi):
        raise FlatFieldError(
            f"the {what} flat field runs from {lo:.2f} to {hi:.2f} of its mean; real "
            "illumination varies far less: the frames hold more than bare oxide, or the lamp "
            "flickered (use more frames, scan.flat_field.source: none, or a reference TIFF)"
        )
    return gain
