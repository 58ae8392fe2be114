"""Evaluation: segment a dataset folder, score it, optionally write the predicted masks.

Predicted masks go out as PNGs with the images' stems, values 0 other / 1 monolayer /
2 bilayer, at each image's own size, so anyone can score them with their own code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .data import Dataset
from .illumination import level_image
from .metrics import ScoreAccumulator, Scores, plot_curves
from .segmenter import Segmenter, substrate_read_as

if TYPE_CHECKING:
    from .train import TrainConfig
    from .unet import UNet


@dataclass
class Reading:
    """How single images were read: the stems levelled (`model/illumination.py`) and those
    read as on a transparent substrate (`Segmenter.substrate`; decided for the whole image,
    which each window is read by unless the Segmenter's ``image_reference`` is off)."""

    levelled: list[str] = field(default_factory=list)
    transparent: list[str] = field(default_factory=list)


def evaluate(
    segmenter: Segmenter,
    dataset: Dataset,
    indices: Sequence[int] | None = None,
    *,
    pred_out: str | Path | None = None,
    plots: str | Path | None = None,
    on_image: Callable[[str], None] | None = None,
    level: bool = False,
    reading: Reading | None = None,
) -> Scores:
    """Scores of `segmenter` on the dataset's images (all, or those at `indices`); ``level``
    and ``reading`` as `read_image` takes them."""
    chosen = range(len(dataset)) if indices is None else indices
    if pred_out is not None:
        Path(pred_out).mkdir(parents=True, exist_ok=True)
    acc = ScoreAccumulator()
    for i in chosen:
        sample = dataset.samples[i]
        image, truth = dataset.read_pair(sample)
        probs, labels = read_image(segmenter, image, sample.stem, level=level, reading=reading)
        acc.update(truth, pred=labels, probs=probs, name=sample.stem)
        if pred_out is not None:
            Image.fromarray(labels.astype(np.uint8)).save(Path(pred_out) / f"{sample.stem}.png")
        if on_image:
            on_image(sample.stem)
    if plots is not None:
        plot_curves(acc.curves(), plots)
    return acc.scores()


def levels_by_default(segmenter: Segmenter, illumination: str | None = None) -> bool:
    """Whether single images are levelled unless told otherwise: for nets trained on levelled
    images (``illumination``, the training's; None: the checkpoint's) and nets read with
    `hue` (trained on synthetic tiles, read against one reference), not for nets that learnt
    a lab's own images as they are."""
    meta = segmenter.checkpoint
    if illumination is None and meta is not None:
        illumination = (meta.training.get("config") or {}).get("illumination")
    hue = segmenter.config.input_contrast and segmenter.reference == "hue"
    return illumination == "plane" or hue


def reading_for(model: UNet, config: TrainConfig, **kwargs: Any) -> tuple[Segmenter, bool]:
    """A Segmenter for a net just trained by ``config``, and whether to level images for it:
    read as `flakescan evaluate` and scans will read its checkpoint (mirrored where trained
    so, `hue` nets with `auto`; levelled where trained so, and `hue` nets), so that
    cross-validation and training's validation score what a lab will get."""
    kwargs.setdefault("device", str(next(model.parameters()).device))
    segmenter = Segmenter(model, substrate=substrate_read_as(config.substrate), **kwargs)
    return segmenter, levels_by_default(segmenter, config.illumination)


def read_image(
    segmenter: Segmenter,
    image: np.ndarray,
    stem: str = "",
    *,
    level: bool = False,
    reading: Reading | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels for one H×W×3 uint8 micrograph.

    ``level``: first divide out a plane through its substrate (`level_image`), for nets that
    read optical contrast. ``reading``: where to note, under ``stem``, what was done.
    """
    if level:
        levelled = level_image(image)
        if levelled is not None:
            image = levelled
            if reading is not None:
                reading.levelled.append(stem)
    given: tuple[np.ndarray, np.ndarray] | tuple[()] = ()
    if reading is not None and segmenter.substrate != "oxide":
        references, transparent = segmenter.substrate_references(image[None])
        if transparent[0]:
            reading.transparent.append(stem)
        if segmenter.image_reference:  # what predict finds itself: no need to again
            given = (references, transparent)
    probs, labels = segmenter.predict(image[None], *given)
    return probs[0], labels[0]
