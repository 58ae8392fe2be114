"""Optical contrast: each pixel against the colour of the bare substrate around it.

Labs read layer counts from the flake-to-substrate contrast, and channel gains (lamp colour,
white balance, exposure) cancel in it. The hard part is finding the substrate in one image
without labels; the rules here are ways to guess its colour (``reference_colours``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

ContrastReference = Literal["mean", "median", "bright", "hue"]
#: what the flakes lie on: oxidised silicon (layers darker than it in red), a transparent
#: crystal such as quartz (layers brighter than it), or `auto`, decided per image
Substrate = Literal["auto", "oxide", "transparent"]

#: optical contrast of a monolayer is ~0.1 at 100× on 300 nm oxide: scaled to order 1
CONTRAST_GAIN = 10.0

# `hue`: the least green 5 % of the pixels (green / red) seed the substrate's hue; every pixel
# within ±5 % of it counts as substrate. Pixels near black (the stage; their ratio is noise) or
# clipped in red or green (their ratio is wrong) take no part.
HUE_SEED_SHARE = 0.05
HUE_TOLERANCE = 0.05
HUE_VALID_RED = (0.05, 0.98)
HUE_CLIPPED = 0.98
# The hue pick replaces `bright` only where it is brighter in red: `bright` then sits on a film
# that hides the substrate. At least 2 % brighter (not `bright`'s own spread over a vignetted
# substrate), at most 1.5× (a thin film is at most ~35 % darker in red than its substrate, a
# bilayer on the real set 18 %; brighter still is a thick flake, pink on some oxides).
HUE_MIN_RED_RATIO = 1.02
HUE_MAX_RED_RATIO = 1.5
# Too few valid pixels or too small a substrate to trust: `bright` stands.
HUE_MIN_SHARE = 0.005

# Transparent substrates (quartz, sapphire) are dark, and MoS2 on them is *brighter*, most of
# all in blue: the mirror image of the oxide, which a net trained on oxide has never seen. Such
# an image's contrast is mapped onto the oxide's before the net: per channel it is multiplied by
# the ratio of a layer's contrast on 285-335 nm SiO2/Si to its contrast on quartz, from the
# thin-film model (drivers/simulated/optics.py, 1 and 2 layers, gamma 2.2; the test
# test_transparent_contrast_is_the_optics_ratio recomputes it). Red keeps its size and flips
# sign; green's ratio spreads widely with the oxide (±0.5) and blue barely changes on oxide.
TRANSPARENT_CONTRAST = (-0.88, -0.36, 0.07)
# Its substrate: seeded by the darkest 5 % of the valid pixels in red, grown to every pixel at
# most 6 % brighter in red (half a quartz monolayer's red contrast, 12.5 %).
TRANSPARENT_SEED_SHARE = 0.05
TRANSPARENT_GROW = 1.06
# `auto` calls an image transparent where `bright`'s pick (the films, when they cover half the
# field) is 3-60 % brighter in red than that surface and brighter still in blue, by 10 % more.
# In the thin-film model a monolayer on quartz is 1.16× more so in blue than in red, a bilayer
# 1.31×; the other way round, oxide seen brighter than a film on it is less so (0.76-1.05 in
# the real images on oxide, 0.86 in the model; the dark-background real images 1.17-1.38;
# synthetic quartz tiles, through the camera's colour crosstalk, 0.99-1.15). Where the
# substrate is most of the field `bright` sits on it and `auto` cannot tell: set
# `transparent` for such chips.
TRANSPARENT_RED_RATIO = (1.03, 1.6)
TRANSPARENT_BLUER = 1.10


def optical_contrast(x: torch.Tensor, reference: ContrastReference = "mean") -> torch.Tensor:
    """Per image and channel, x / ref(x) - 1, times CONTRAST_GAIN (see `reference_colours`)."""
    return contrast_against(x, reference_colours(x, reference))


def contrast_against(
    x: torch.Tensor, reference: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """x / reference - 1 times CONTRAST_GAIN, per channel; times ``scale`` (per image and
    channel, as `substrate_reference` gives it) where given."""
    contrast = (x / reference.clamp_min(1e-3) - 1) * CONTRAST_GAIN  # a black frame stays finite
    return contrast if scale is None else contrast * scale


def reference_colours(x: torch.Tensor, reference: ContrastReference = "mean") -> torch.Tensor:
    """The colours each image's contrast is taken against: ...×C×1×1 for ...×C×H×W.

    - `mean`, `median`: of each channel. The median stays on the substrate when the tile also
      holds the dark stage or big thick flakes, which drag the mean off it; neither does when
      flakes cover more than half the field, as CVD films often do.
    - `bright`: the median of the half of the pixels brightest in red, where thin MoS2 and the
      stage are darker than the oxide: right while a quarter of the field is substrate. A thick
      flake brighter than the oxide over a quarter of the field pulls it off.
    - `hue`: `bright`, unless a surface of the substrate's hue is brighter in red than
      `bright`'s pick: then a film covers most of the field and that surface is the substrate.
      Thin MoS2 absorbs red more than green, so on the oxide the substrate is the least green
      surface; its hue is seeded by the least green 5 % of the pixels and every pixel within
      ±5 % of it counts. On the real set its error against the labelled substrate is 0.017 of
      full scale (mean over images; `bright` 0.029), 4 % substrate included; it cannot help
      where the monolayer keeps the substrate's hue (the dark-background images). On
      synthetic tiles, where the substrate is mostly the larger part, it is `bright` itself
      (191 of 192 held-out tiles, bit for bit).
    """
    if reference == "median":
        return x.flatten(-2).median(dim=-1).values[..., None, None]
    if reference == "mean":
        return x.mean(dim=(-2, -1), keepdim=True)
    if reference not in ("bright", "hue"):
        raise ValueError(f"unknown contrast reference {reference!r}")
    flat = _flat(x)
    return _bright_or_hue(flat, _bright(flat), reference).reshape(*x.shape[:-2], 1, 1)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-3], x.shape[-2] * x.shape[-1])  # images × C × pixels


def _bright_or_hue(flat: torch.Tensor, bright: torch.Tensor, reference: str) -> torch.Tensor:
    return _hue(flat, bright) if reference == "hue" and flat.shape[1] >= 2 else bright


def _bright(flat: torch.Tensor) -> torch.Tensor:
    red = flat[:, :1]
    brighter = red >= red.median(dim=-1, keepdim=True).values
    return flat.masked_fill(~brighter, float("nan")).nanmedian(dim=-1).values


def _hue(flat: torch.Tensor, bright: torch.Tensor) -> torch.Tensor:
    red, green = flat[:, 0], flat[:, 1]
    lo, hi = HUE_VALID_RED
    valid = (red > lo) & (red < hi) & (green < HUE_CLIPPED)
    eps = 1 / 255  # one grey level: keeps dark pixels' ratio finite
    ratio = ((green + eps) / (red + eps)).masked_fill(~valid, float("inf"))
    n_valid = valid.sum(dim=-1)
    # The seed's median is the ratio at half the seed share, in the valid pixels' order.
    at = (n_valid * HUE_SEED_SHARE / 2).long().clamp(min=0, max=flat.shape[-1] - 1)
    # One selection per image (k differs) rather than a sort: a third of the time per tile.
    seed = torch.stack([row.kthvalue(int(k) + 1).values for row, k in zip(ratio, at, strict=True)])
    seed = seed[:, None]
    substrate = valid & ((ratio - seed).abs() <= HUE_TOLERANCE * seed)
    ref = flat.masked_fill(~substrate[:, None], float("nan")).nanmedian(dim=-1).values
    enough = substrate.sum(dim=-1) >= HUE_MIN_SHARE * flat.shape[-1]
    ratio_red = ref[:, 0] / bright[:, 0].clamp_min(1e-6)
    hidden = (ratio_red >= HUE_MIN_RED_RATIO) & (ratio_red <= HUE_MAX_RED_RATIO)
    return torch.where((enough & hidden)[:, None], ref, bright)


def substrate_reference(
    x: torch.Tensor, reference: ContrastReference, substrate: Substrate
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(colours, scale)`` for N×C×H×W images: what `contrast_against` takes.

    On `oxide` the colours of ``reference`` and no scale. An image on a `transparent`
    substrate (all of them, or where `auto` finds one) is read against its dark substrate,
    its contrast mapped onto the oxide's by TRANSPARENT_CONTRAST.
    """
    if substrate == "oxide":
        return reference_colours(x, reference), None
    if x.shape[-3] != len(TRANSPARENT_CONTRAST):
        raise ValueError(f"substrate {substrate!r} needs RGB images, got {x.shape[-3]} channels")
    flat = _flat(x)
    bright = _bright(flat)
    if reference in ("bright", "hue"):
        ref = _bright_or_hue(flat, bright, reference).clone()  # rows are overwritten below
    else:
        ref = _flat(reference_colours(x, reference))[..., 0]
    grown = _dark_surface(flat)
    if substrate == "transparent":
        transparent = torch.ones(len(flat), dtype=torch.bool, device=x.device)
    else:  # the red criterion first, on red alone: most tiles stop there
        dark_red = flat[:, 0].masked_fill(~grown, float("nan")).nanmedian(dim=-1).values
        transparent = _red_in_range(bright[:, 0], dark_red)
    if transparent.any():
        rows = transparent.nonzero()[:, 0]
        dark = flat[rows].masked_fill(~grown[rows, None], float("nan")).nanmedian(dim=-1).values
        if substrate == "auto":
            transparent[rows] = is_transparent(bright[rows], dark)
        ref[rows] = torch.where(transparent[rows, None], dark, ref[rows])
    shape = (*x.shape[:-2], 1, 1)
    return ref.reshape(shape), contrast_scale(transparent, ref).reshape(shape)


def image_input(image: np.ndarray) -> torch.Tensor:
    """One H×W×C uint8 image as the 1×C×H×W float input the references are found on, by the
    Segmenter's own conversion (× 1/255 in float32), so its colours are the Segmenter's to the
    bit; a copy, since PIL hands out read-only arrays."""
    return torch.tensor(image).permute(2, 0, 1)[None].float().mul_(1 / 255)


def is_mirrored(scale: torch.Tensor) -> torch.Tensor:
    """N booleans: which images a `substrate_reference` scale (N×C...) reads mirrored, i.e.
    with a negative factor on red (TRANSPARENT_CONTRAST)."""
    return scale.flatten(1)[:, 0] < 0


def mirrored_references(
    x: torch.Tensor, reference: ContrastReference, mirrored: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`substrate_reference` for N×C×H×W crops (windows, training crops) of images whose
    substrate was decided on the whole image: N booleans ``mirrored``. Each crop finds its own
    colours, against its dark substrate where mirrored; no scale where none is."""
    colours, _ = substrate_reference(x, reference, "oxide")
    if not bool(mirrored.any()):
        return colours, None
    dark, _ = substrate_reference(x[mirrored], reference, "transparent")
    colours[mirrored] = dark
    return colours, contrast_scale(mirrored, colours)


def contrast_scale(transparent: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per image (N booleans), the contrast's factor per channel, shaped, typed and placed
    like ``like`` (N×C...): TRANSPARENT_CONTRAST where transparent, 1 elsewhere."""
    mirror = torch.tensor(TRANSPARENT_CONTRAST, dtype=like.dtype, device=like.device)
    picked = transparent.to(like.device).view(-1, *[1] * (like.dim() - 1))
    return torch.where(picked, mirror.view(1, -1, *[1] * (like.dim() - 2)), torch.ones_like(like))


def is_transparent(bright: torch.Tensor, dark: torch.Tensor) -> torch.Tensor:
    """Per image: `bright`'s pick (N×3) brighter in red than the dark substrate's colour by
    TRANSPARENT_RED_RATIO, and in blue by TRANSPARENT_BLUER times more."""
    red = bright[:, 0] / dark[:, 0].clamp_min(1e-6)
    blue = bright[:, 2] / dark[:, 2].clamp_min(1e-6)
    return _red_in_range(bright[:, 0], dark[:, 0]) & (blue > TRANSPARENT_BLUER * red)


def _red_in_range(bright_red: torch.Tensor, dark_red: torch.Tensor) -> torch.Tensor:
    lo, hi = TRANSPARENT_RED_RATIO
    ratio = bright_red / dark_red.clamp_min(1e-6)
    return (ratio >= lo) & (ratio <= hi)


def _dark_surface(flat: torch.Tensor) -> torch.Tensor:
    """N×P: the pixels of each image's darkest surface in red. The darkest
    TRANSPARENT_SEED_SHARE of the pixels neither near black (the stage) nor clipped (of all,
    where none is valid) seed it, grown to every such pixel up to TRANSPARENT_GROW brighter."""
    red = flat[:, 0]
    lo, hi = HUE_VALID_RED
    valid = (red > lo) & (red < hi)
    valid = valid | ~valid.any(dim=-1, keepdim=True)
    # The seed's median is the red at half the seed share, in the valid pixels' order.
    at = (valid.sum(dim=-1) * TRANSPARENT_SEED_SHARE / 2).long().clamp(max=flat.shape[-1] - 1)
    ordered = red.masked_fill(~valid, float("inf"))
    seed_red = torch.stack(
        [row.kthvalue(int(k) + 1).values for row, k in zip(ordered, at, strict=True)]
    )[:, None]
    return valid & (red <= seed_red * TRANSPARENT_GROW)
