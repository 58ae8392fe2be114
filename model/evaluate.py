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
) -> Scores:
    """Scores of `segmenter` on the dataset's images (all, or those at `indices`)."""
    chosen = range(len(dataset)) if indices is None else indices
    if pred_out is not None:
        Path(pred_out).mkdir(parents=True, exist_ok=True)
    acc = ScoreAccumulator()
    for i in chosen:
        sample = dataset.samples[i]
        image, truth = dataset.read_pair(sample)
        probs, labels = segmenter.predict(image[None])
        acc.update(truth, pred=labels[0], probs=probs[0], name=sample.stem)
        if pred_out is not None:
            Image.fromarray(labels[0].astype(np.uint8)).save(Path(pred_out) / f"{sample.stem}.png")
        if on_image:
            on_image(sample.stem)
    if plots is not None:
        plot_curves(acc.curves(), plots)
    return acc.scores()
