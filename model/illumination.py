"""Levelling a single micrograph's illumination: a plane through its substrate, divided out.

A scan measures its lamp's falloff from many fields (scanner/flat_field.py). A single image has
only itself, and in real micrographs the light often falls across the field (the real set's
median tilt is 9 % corner to corner, 19 % at the 90th percentile): against one reference colour
the darker side's bare substrate then reads as monolayer, whose red contrast is ~10 %. The
substrate is found from the image's own contrast reference: the pixels within
LEVEL_TOLERANCE of it in every channel, then of the plane fitted to them, for LEVEL_ROUNDS.

`level_image` is the one rule training, cross-validation and `flakescan evaluate` level by, so a
net trained on levelled images is scored on images levelled the same way.
"""

from __future__ import annotations

import numpy as np
import torch

from .unet.reference import image_input, substrate_reference

#: a pixel within 3 % of the substrate's colour in every channel is substrate: under half a
#: monolayer's red contrast, and within what a tilt changes over a few tens of pixels
LEVEL_TOLERANCE = 0.03
#: each round re-selects the substrate around the last plane, following the tilt outwards
LEVEL_ROUNDS = 3
#: the plane has three unknowns a channel: every 4th pixel each way is plenty
LEVEL_STEP = 4
#: fewer substrate pixels than this share of the image: left as it is
LEVEL_MIN_SHARE = 0.05
#: the substrate found must span this share of the image's width and of its height from its
#: 5th to its 95th percentile (an even strip: ~55 % of the image), or the plane would be
#: extrapolated over the rest: left as it is
LEVEL_MIN_SPAN = 0.5


def substrate_colour(image: np.ndarray) -> np.ndarray:
    """An H×W×C uint8 image's substrate colour in 0..1, where the levelling starts: what the
    shipped model reads it against (the `hue` reference; for RGB, the dark substrate where
    `auto` finds a transparent one)."""
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H×W×C uint8 image, got {image.dtype} {image.shape}")
    substrate = "auto" if image.shape[2] == 3 else "oxide"
    with torch.inference_mode():
        colours, _ = substrate_reference(image_input(image), "hue", substrate)
    return colours.flatten().numpy()


def level_image(image: np.ndarray) -> np.ndarray | None:
    """``image`` levelled by a plane through its substrate (`level_illumination`, starting
    from `substrate_colour`); None where too little substrate is found to fit one."""
    return level_illumination(image, substrate_colour(image))


def level_illumination(image: np.ndarray, reference: np.ndarray) -> np.ndarray | None:
    """``image`` (H×W×3 uint8) divided by a plane through its substrate (per channel, in log
    intensity), at the substrate's median level; None where too little substrate is found.

    ``reference``: the substrate's colour in 0..1 (`substrate_colour`), where the search
    starts.
    """
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H×W×C uint8 image, got {image.dtype} {image.shape}")
    height, width, channels = image.shape
    reference = np.asarray(reference, np.float64)
    if reference.shape != (channels,):
        raise ValueError(f"reference: expected {channels} colours, got shape {reference.shape}")
    design = _plane_terms(height, width, LEVEL_STEP)
    sample = image[::LEVEL_STEP, ::LEVEL_STEP].reshape(-1, channels)
    logs = np.log(np.maximum(sample, 1) / 255.0)
    surface = np.broadcast_to(np.log(np.maximum(reference, 1e-3)), logs.shape)
    tolerance = np.log1p(LEVEL_TOLERANCE)
    for _ in range(LEVEL_ROUNDS):
        substrate = (np.abs(logs - surface) < tolerance).all(axis=1)
        if substrate.sum() < LEVEL_MIN_SHARE * len(logs):
            return None
        coef = np.linalg.lstsq(design[substrate], logs[substrate], rcond=None)[0]
        surface = design @ coef
    if not _spread(design[substrate]):
        return None
    level = np.median(surface[substrate], axis=0)
    plane = _plane_terms(height, width, 1) @ coef - level
    gain = np.exp(plane).reshape(height, width, channels)
    return np.clip(image / gain + 0.5, 0, 255).astype(np.uint8)


def _spread(terms: np.ndarray) -> bool:
    """Whether the substrate's pixels (rows of `_plane_terms`) span LEVEL_MIN_SPAN each way."""
    low, high = np.percentile(terms[:, 1:], [5, 95], axis=0)
    return bool((high - low >= LEVEL_MIN_SPAN).all())


def _plane_terms(height: int, width: int, step: int) -> np.ndarray:
    """(pixels, 3): 1, x, y over the image's pixels every ``step``, x and y in -0.5..0.5."""
    ys, xs = np.mgrid[0:height:step, 0:width:step]
    x, y = (xs / width - 0.5).ravel(), (ys / height - 0.5).ravel()
    return np.stack([np.ones_like(x), x, y], axis=1)
