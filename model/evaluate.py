"""Evaluation: segment a dataset folder, score it, optionally write the predicted masks.

Predicted masks go out as PNGs with the images' stems, values 0 other / 1 monolayer /
2 bilayer, at each image's own size, so anyone can score them with their own code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .data import Dataset
from .metrics import ScoreAccumulator, Scores, plot_curves
from .segmenter import Segmenter


def evaluate(
    segmenter: Segmenter,
    dataset: Dataset,
    indices: Sequence[int] | None = None,
    *,
    pred_out: str | Path | None = None,
    plots: str | Path | None = None,
    on_image: Callable[[str], None] | None = None,
    transparent_stems: list[str] | None = None,
) -> Scores:
    """Scores of `segmenter` on the dataset's images (all, or those at `indices`).

    ``transparent_stems``: a list to append the stems of the images read as on a transparent
    substrate to (`Segmenter.substrate`; for the whole image, which is what each window is
    read by unless ``image_reference`` is off).
    """
    chosen = range(len(dataset)) if indices is None else indices
    if pred_out is not None:
        Path(pred_out).mkdir(parents=True, exist_ok=True)
    acc = ScoreAccumulator()
    for i in chosen:
        sample = dataset.samples[i]
        image, truth = dataset.read_pair(sample)
        given: tuple[np.ndarray, np.ndarray] | tuple[()] = ()
        if transparent_stems is not None and segmenter.substrate != "oxide":
            references, transparent = segmenter.substrate_references(image[None])
            if transparent[0]:
                transparent_stems.append(sample.stem)
            if segmenter.image_reference:  # what predict finds itself: no need to again
                given = (references, transparent)
        probs, labels = segmenter.predict(image[None], *given)
        acc.update(truth, pred=labels[0], probs=probs[0], name=sample.stem)
        if pred_out is not None:
            Image.fromarray(labels[0].astype(np.uint8)).save(Path(pred_out) / f"{sample.stem}.png")
        if on_image:
            on_image(sample.stem)
    if plots is not None:
        plot_curves(acc.curves(), plots)
    return acc.scores()
