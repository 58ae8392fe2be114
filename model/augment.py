"""Augmentations of a (tile, mask) pair: geometry for both, colour for the tile only.

The paper (Saito et al.) crops, flips and rotates, then converts to grayscale or adjusts the
contrast; Table 1 compares those colour sets. flakescan adds colour cast, brightness, blur
and noise, because micrographs from another microscope differ in exactly those (`full`, or
`look` without the contrast stretch). A set is
chosen by name so each Table 1 row can be reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage

Photometric = Literal[
    "grayscale", "contrast", "color", "brightness", "blur", "noise", "layer_colour"
]

AUGMENT_SETS: dict[str, tuple[Photometric, ...]] = {
    "none": (),
    "grayscale": ("grayscale",),
    "contrast": ("contrast",),
    "grayscale+contrast": ("grayscale", "contrast"),
    "full": ("contrast", "color", "brightness", "blur", "noise"),
    # Everything but the contrast stretch. Layer count shows as optical contrast, the ratio
    # flake / substrate per channel: gains (cast, brightness) keep it, while a stretch of
    # 0.6-1.8 turns a monolayer's contrast into a bilayer's. For synthetic tiles whose look is
    # already randomised in the optics, this keeps the layer signal intact.
    "look": ("color", "brightness", "blur", "noise"),
    # `look` plus each layer's colour redrawn from its mask (see `layer_colour`): for synthetic
    # tiles, whose masks are exact, so that a model does not learn one simulated camera's
    # colours of a monolayer and a bilayer.
    "synthetic": ("layer_colour", "color", "brightness", "blur", "noise"),
}


def augment_set(name: str) -> tuple[Photometric, ...]:
    if name not in AUGMENT_SETS:
        raise ValueError(f"unknown augmentation set {name!r}; choose from {sorted(AUGMENT_SETS)}")
    return AUGMENT_SETS[name]


@dataclass
class Augmenter:
    """Random crop + flips + 90° rotations, then the chosen colour changes, each with `p`."""

    crop: int = 512
    photometric: tuple[Photometric, ...] = ()
    p: float = 0.5
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 H×W×3 and H×W in; float32 H×W×3 in 0..1 and uint8 crop×crop out."""
        image, mask = random_crop(image, mask, self.crop, self.rng)
        if self.rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if self.rng.random() < 0.5:
            image, mask = image[::-1], mask[::-1]
        k = int(self.rng.integers(4))
        image, mask = np.rot90(image, k), np.rot90(mask, k)
        out = image.astype(np.float32) / 255.0
        for name in self.photometric:
            if self.rng.random() < self.p:
                if name == "layer_colour":
                    out = layer_colour(out, mask, self.rng)
                else:
                    out = _PHOTOMETRIC[name](out, self.rng)
        return np.clip(out, 0.0, 1.0), np.ascontiguousarray(mask)


def random_crop(
    image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A size×size window; images smaller than that are reflect-padded first."""
    h, w = mask.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        image = np.pad(image, (*pads, (0, 0)), mode="reflect")
        mask = np.pad(mask, pads, mode="reflect")
        h, w = mask.shape
    top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
    return image[top : top + size, left : left + size], mask[top : top + size, left : left + size]


def grayscale(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gray = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.repeat(gray[..., None], 3, axis=2)


def contrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mean = img.mean(axis=(0, 1), keepdims=True)
    return mean + (img - mean) * np.float32(rng.uniform(0.6, 1.8))


def color(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A white-balance / colour-temperature cast: independent channel gains."""
    return img * rng.uniform(0.8, 1.2, size=3).astype(np.float32)


def brightness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return img * np.float32(rng.uniform(0.7, 1.3))


def blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma = float(rng.uniform(0.5, 2.0))
    return ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0))


def noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return img + rng.normal(0, rng.uniform(0.005, 0.04), size=img.shape).astype(np.float32)


#: per-layer draws of layer_colour: the red contrast's scale, shared by the layers (so
#: monolayer stays fainter than bilayer in red, as in every micrograph), and each layer's own
#: jitter of it; green and blue become alpha * red + beta * itself, alpha and beta per layer
LAYER_RED_SCALE = (0.5, 1.6)
LAYER_RED_JITTER = (0.8, 1.25)
LAYER_ALPHA = (-0.2, 0.9)
LAYER_BETA = (0.2, 1.3)
LAYER_CLASSES = (1, 2)


def layer_colour(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Redraw each thin layer's optical contrast per channel; substrate away from the layers is
    left as it is.

    A micrograph's layer colours depend on oxide, lamp and camera response: in the real set a
    monolayer's red contrast ranges 0.04-0.21 from image to image and its blue contrast may sit
    above or below the bilayer's, while a simulated camera shows one fixed relation. Only the
    order in red (monolayer fainter than bilayer) holds everywhere, so that is kept (almost:
    where a tile's bilayer is under 1.56× the monolayer's red contrast the per-layer jitter can
    swap them, 0.5 % of draws on synthetic tiles; the shipped weights were trained so) and the
    rest is randomised: a model trained this way reads layers from red contrast and the flake's
    structure, not from one camera's colours. Each layer's median contrast against the
    substrate's median is moved to its new value as one shift per layer, spread through the
    mask blurred by 1 px so that flake edges stay as soft as the optics made them, and each
    pixel keeps its own texture and noise.
    """
    substrate = mask == 0
    if substrate.sum() < 64:
        return img  # no substrate in view: nothing to measure contrast against
    ref = np.median(img[substrate], axis=0)
    if np.any(ref <= 1e-3):
        return img
    red_scale = rng.uniform(*LAYER_RED_SCALE)
    out = img.copy()
    for cls in LAYER_CLASSES:
        where = mask == cls
        if where.sum() < 16:
            continue
        c = np.median(img[where], axis=0) / ref - 1
        red = c[0] * red_scale * rng.uniform(*LAYER_RED_JITTER)
        alpha = rng.uniform(*LAYER_ALPHA, size=2)
        beta = rng.uniform(*LAYER_BETA, size=2)
        target = np.array([red, *(alpha * red + beta * c[1:] * red_scale)], dtype=np.float32)
        shift = ref * (target - c)
        weight = ndimage.gaussian_filter(where.astype(np.float32), 1.0)
        out += weight[..., None] * shift.astype(np.float32)
    return out


_PHOTOMETRIC = {
    "grayscale": grayscale,
    "contrast": contrast,
    "color": color,
    "brightness": brightness,
    "blur": blur,
    "noise": noise,
}
