"""k-fold cross-validation split by sample, over a grid of augmentation sets and losses.

Reproduces the paper's Table 1 (augment {none, grayscale, contrast, grayscale+contrast} ×
loss {ce, weighted}); `subset` picks the paper's 24 training images out of a larger set.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import structlog

from .data import Dataset, kfold_by_sample, preload
from .evaluate import evaluate, reading_for
from .metrics import Scores
from .train import TrainConfig, train

log = structlog.get_logger("flakescan.cv")

TABLE1_AUGMENTS = ("none", "grayscale", "contrast", "grayscale+contrast")
TABLE1_LOSSES = ("ce", "weighted")


@dataclass
class CvResult:
    augment: str
    loss: str
    folds: list[Scores] = field(default_factory=list)
    seconds: float = 0.0

    def mean(self, metric: str) -> tuple[float, float]:
        values = np.array([_metric(s, metric) for s in self.folds], dtype=float)
        return float(np.nanmean(values)), float(np.nanstd(values))


def _metric(scores: Scores, metric: str) -> float:
    if metric == "region_accuracy":
        return scores.regions.accuracy
    return float(getattr(scores, metric))


def subset_by_sample(dataset: Dataset, n_images: int, seed: int = 0) -> list[int]:
    """At least `n_images` image indices (or all), whole samples at a time, chosen by `seed`.

    Never cuts a sample: its images are views of one flake, and a split sample would put the
    same flake on both sides of a cross-validation fold.
    """
    by_sample: dict[str, list[int]] = {}
    for i, s in enumerate(dataset.samples):
        by_sample.setdefault(s.sample_id, []).append(i)
    ids = sorted(by_sample)
    chosen: list[int] = []
    for j in np.random.default_rng(seed).permutation(len(ids)):
        if len(chosen) >= n_images:
            break
        chosen += by_sample[ids[j]]
    return sorted(chosen)


def cross_validate(
    dataset: Dataset,
    base: TrainConfig,
    *,
    augments: Sequence[str] = ("contrast",),
    losses: Sequence[str] = ("weighted",),
    folds: int = 3,
    subset: int | None = None,
    batch_size: int = 4,
    on_fold: Callable[[CvResult, int, Scores], None] | None = None,
) -> list[CvResult]:
    """Train and score every (augment, loss) on every fold; folds never split a sample."""
    indices = subset_by_sample(dataset, subset, base.seed) if subset else list(range(len(dataset)))
    samples = [dataset.samples[i] for i in indices]
    splits = kfold_by_sample(samples, k=folds, seed=base.seed)
    level = base.illumination == "plane"
    pairs = preload(dataset, indices, split_other=base.split_other, level=level)
    other_outputs = dataset.config.other_outputs if base.split_other else 1
    results = []
    for augment, loss in itertools.product(augments, losses):
        result = CvResult(augment, loss)
        start = time.perf_counter()
        for k, (train_idx, val_idx) in enumerate(splits):
            cfg = base.model_copy(update={"augment": augment, "loss": loss})
            model, _, _ = train([pairs[i] for i in train_idx], cfg, other_outputs=other_outputs)
            segmenter, read_level = reading_for(model, cfg, batch_size=batch_size)
            scores = evaluate(segmenter, dataset, [indices[i] for i in val_idx], level=read_level)
            result.folds.append(scores)
            log.info(
                "cv.fold",
                augment=augment,
                loss=loss,
                fold=k,
                mean_pixel_accuracy=round(scores.mean_pixel_accuracy, 4),
                region_accuracy=round(scores.regions.accuracy, 4),
            )
            if on_fold:
                on_fold(result, k, scores)
        result.seconds = time.perf_counter() - start
        results.append(result)
    return results
