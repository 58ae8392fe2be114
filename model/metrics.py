"""Scores of predicted layer masks against ground truth, as Saito et al. report them.

- pixel accuracy per class (recall, TP / (TP + FN)) and its mean over the classes: the paper's
  cross-validation score;
- IoU per class and its mean, the usual segmentation score, for comparison with other work;
- region accuracy: each ground-truth monolayer or bilayer region of at least `min_area` pixels is
  a question, answered by the class most of its pixels are predicted as;
- ROC and precision-recall curves for monolayer-vs-rest and bilayer-vs-rest.

Everything accumulates image by image (a confusion matrix, region counts, score histograms, and
a 3×3 confusion matrix per named image), so a scan-sized evaluation never holds all predictions
at once. Label maps hold class indices 0..n-1; probability maps are channel-first (C×H×W), as
the network emits them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel
from scipy import ndimage

from .data import CLASS_NAMES

N_CLASSES = len(CLASS_NAMES)
REGION_CLASSES = (1, 2)  # monolayer, bilayer: the layers a user picks flakes of
CURVE_CLASSES = (1, 2)
DEFAULT_BINS = 1001
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# ---- pixel scores ---------------------------------------------------------------------------


def confusion_matrix(true: np.ndarray, pred: np.ndarray, n: int = N_CLASSES) -> np.ndarray:
    """n×n pixel counts, rows = true class, columns = predicted; sum these over images."""
    t, p = _labels(true, n, "true"), _labels(pred, n, "pred")
    if t.shape != p.shape:
        raise ValueError(f"true {t.shape} and pred {p.shape} differ in shape")
    flat = t.ravel().astype(np.int64) * n + p.ravel()
    return np.bincount(flat, minlength=n * n).reshape(n, n)


def per_class_pixel_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall per class; NaN for a class absent from the ground truth (nothing to recall)."""
    cm = np.asarray(cm, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(cm) / cm.sum(axis=1)


def mean_pixel_accuracy(cm: np.ndarray) -> float:
    """Mean of per-class recall over the classes present in the ground truth (NaN excluded)."""
    return _nanmean(per_class_pixel_accuracy(cm))


def per_class_iou(cm: np.ndarray) -> np.ndarray:
    """TP / (TP + FP + FN); NaN for a class neither true nor predicted anywhere."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / (cm.sum(axis=0) + cm.sum(axis=1) - tp)


def mean_iou(cm: np.ndarray) -> float:
    return _nanmean(per_class_iou(cm))


# ---- region accuracy ------------------------------------------------------------------------


class RegionScores(BaseModel):
    """Problem regions answered right, overall and per true class.

    `confusion[t][p]` counts regions of true class t answered as class p; the last column counts
    ties. Tie rule: when two or more classes share the largest pixel count inside a region, the
    region has no single answer and counts as wrong, even if the true class is among them.
    """

    min_area: int
    confusion: list[list[int]]

    @property
    def total(self) -> int:
        return int(np.sum(self.confusion))

    @property
    def correct(self) -> int:
        return int(sum(self.confusion[c][c] for c in range(len(self.confusion))))

    @property
    def ties(self) -> int:
        return int(sum(row[-1] for row in self.confusion))

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else math.nan

    def per_class(self) -> dict[str, tuple[int, int]]:
        """(correct, total) for each region class."""
        return {
            CLASS_NAMES[c]: (self.confusion[c][c], sum(self.confusion[c])) for c in REGION_CLASSES
        }


def region_confusion(
    true: np.ndarray, pred: np.ndarray, min_area: int = 200, n: int = N_CLASSES
) -> np.ndarray:
    """n×(n+1) region counts for one image (rows true class, columns answer, last = tie)."""
    t, p = _labels(true, n, "true"), _labels(pred, n, "pred")
    if t.shape != p.shape:
        raise ValueError(f"true {t.shape} and pred {p.shape} differ in shape")
    out = np.zeros((n, n + 1), dtype=np.int64)
    for c in REGION_CLASSES:
        regions, count = ndimage.label(t == c, structure=_EIGHT_CONNECTED)
        if count == 0:
            continue
        inside = regions > 0
        # votes[r, k]: pixels of region r predicted as class k, for all regions in one pass.
        flat = regions[inside].astype(np.int64) * n + p[inside]
        votes = np.bincount(flat, minlength=(count + 1) * n).reshape(count + 1, n)[1:]
        votes = votes[votes.sum(axis=1) >= min_area]
        best = votes.max(axis=1, keepdims=True)
        tied = (votes == best).sum(axis=1) > 1
        answer = np.where(tied, n, votes.argmax(axis=1))
        out[c] += np.bincount(answer, minlength=n + 1)
    return out


def region_accuracy(
    true_masks: Iterable[np.ndarray], pred_masks: Iterable[np.ndarray], min_area: int = 200
) -> RegionScores:
    """Region accuracy over images; regions are 8-connected and at least `min_area` pixels."""
    total = np.zeros((N_CLASSES, N_CLASSES + 1), dtype=np.int64)
    for t, p in zip(true_masks, pred_masks, strict=True):
        total += region_confusion(t, p, min_area)
    return RegionScores(min_area=min_area, confusion=total.tolist())


# ---- ROC and precision-recall ---------------------------------------------------------------


class RocPrAccumulator:
    """One class against the rest, from histogrammed scores: memory is `bins`, not pixels.

    Scores are rounded to `bins` levels in [0, 1]; pixels in one bin share a threshold, which
    is how the AUC treats ties (a constant score gives exactly 0.5).
    """

    def __init__(self, positive_class: int, bins: int = DEFAULT_BINS) -> None:
        if bins < 2:
            raise ValueError(f"bins must be at least 2, got {bins}")
        self.positive_class = positive_class
        self.bins = bins
        self.positives = np.zeros(bins, dtype=np.int64)
        self.negatives = np.zeros(bins, dtype=np.int64)

    def update(self, true: np.ndarray, scores: np.ndarray) -> None:
        """`scores`: the positive class's H×W probability, or the C×H×W probability map."""
        t = np.asarray(true)
        s = np.asarray(scores, dtype=np.float64)
        if s.ndim == t.ndim + 1:
            s = s[self.positive_class]
        if s.shape != t.shape:
            raise ValueError(f"scores {s.shape} do not match truth {t.shape} (want C×H×W or H×W)")
        if s.size and (s.min() < -1e-6 or s.max() > 1 + 1e-6):
            raise ValueError(f"scores must be probabilities in [0, 1], got {s.min()}..{s.max()}")
        idx = np.clip(np.rint(s * (self.bins - 1)), 0, self.bins - 1).astype(np.int64)
        pos = t == self.positive_class
        self.positives += np.bincount(idx[pos], minlength=self.bins)
        self.negatives += np.bincount(idx[~pos], minlength=self.bins)

    def curves(self) -> dict[str, Any]:
        """ROC (fpr, tpr, roc_auc) and PR (recall, precision, average_precision) points."""
        # Walk thresholds from high to low; keep only bins that hold pixels (others add nothing).
        keep = np.flatnonzero((self.positives + self.negatives)[::-1])
        tp = np.concatenate([[0], np.cumsum(self.positives[::-1])[keep]])
        fp = np.concatenate([[0], np.cumsum(self.negatives[::-1])[keep]])
        levels = np.linspace(1.0, 0.0, self.bins)[keep]
        n_pos, n_neg = int(self.positives.sum()), int(self.negatives.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            tpr, fpr = tp / n_pos, fp / n_neg
            precision = tp[1:] / (tp[1:] + fp[1:])
        roc_auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        # Average precision as a step sum (no interpolation between points), as sklearn does.
        ap = float(np.sum(np.diff(tpr) * precision)) if n_pos else math.nan
        return {
            "class": CLASS_NAMES[self.positive_class],
            "positive_class": self.positive_class,
            "positives": n_pos,
            "negatives": n_neg,
            "thresholds": np.concatenate([[np.inf], levels]),
            "fpr": fpr,
            "tpr": tpr,
            "roc_auc": roc_auc if n_pos and n_neg else math.nan,
            # The PR curve starts at recall 0 with precision 1 by convention.
            "recall": tpr,
            "precision": np.concatenate([[1.0], precision]),
            "average_precision": ap,
        }


def roc_pr_curves(
    true_masks: Iterable[np.ndarray],
    probs: Iterable[np.ndarray],
    positive_class: int,
    bins: int = DEFAULT_BINS,
) -> dict[str, Any]:
    """ROC and PR curves of `positive_class` vs the rest over many images (see RocPrAccumulator)."""
    acc = RocPrAccumulator(positive_class, bins)
    for t, p in zip(true_masks, probs, strict=True):
        acc.update(t, p)
    return acc.curves()


def plot_curves(
    curves: Mapping[str, Any] | Sequence[Mapping[str, Any]], out_dir: str | Path
) -> tuple[Path, Path]:
    """Write `roc.png` and `pr.png` (one line per class) into `out_dir`; returns their paths."""
    try:
        # Figure without pyplot: no global backend state, works headless (Agg canvas).
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # matplotlib is a dev extra, not a runtime dependency
        raise ImportError("plot_curves needs matplotlib: pip install 'flakescan[dev]'") from exc
    items = [curves] if isinstance(curves, Mapping) else list(curves)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "roc.png", out / "pr.png")
    specs = (
        ("fpr", "tpr", "roc_auc", "AUC", "False positive rate", "True positive rate", "ROC"),
        (
            "recall",
            "precision",
            "average_precision",
            "AP",
            "Recall",
            "Precision",
            "Precision-recall",
        ),
    )
    for path, (x, y, area, short, xlabel, ylabel, title) in zip(paths, specs, strict=True):
        fig = Figure(figsize=(5, 5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for c in items:
            ax.plot(c[x], c[y], label=f"{c['class']} vs rest ({short} {c[area]:.3f})")
        if x == "fpr":
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend(loc="lower right" if x == "fpr" else "lower left")
        fig.savefig(path)
    return paths


# ---- everything together --------------------------------------------------------------------


class Scores(BaseModel):
    """All scores of one evaluation; NaN marks a score with nothing to measure (see module doc)."""

    n_images: int
    confusion: list[list[int]]
    pixel_accuracy: dict[str, float]
    mean_pixel_accuracy: float
    iou: dict[str, float]
    mean_iou: float
    regions: RegionScores
    roc_auc: dict[str, float] = {}
    average_precision: dict[str, float] = {}
    #: each named image's own confusion matrix, so anyone can see where the errors sit
    per_image: dict[str, list[list[int]]] = {}

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values: NaN becomes None, region totals are spelled out."""
        d = self.model_dump()
        d["regions"].update(
            total=self.regions.total,
            correct=self.regions.correct,
            ties=self.regions.ties,
            accuracy=self.regions.accuracy,
            per_class={
                k: {"correct": c, "total": n} for k, (c, n) in self.regions.per_class().items()
            },
        )
        return _nan_to_none(d)

    def format_table(self) -> str:
        rows = [
            f"{'class':<10} {'pixel acc':>9} {'IoU':>6} {'regions':>9} {'ROC AUC':>8} {'AP':>6}"
        ]
        per_region = self.regions.per_class()
        for name in CLASS_NAMES:
            right, total = per_region.get(name, (None, None))
            regions = f"{right}/{total}" if total is not None else "-"
            rows.append(
                f"{name:<10} {_fmt(self.pixel_accuracy[name]):>9} {_fmt(self.iou[name]):>6} "
                f"{regions:>9} {_fmt(self.roc_auc.get(name)):>8} "
                f"{_fmt(self.average_precision.get(name)):>6}"
            )
        rows.append(
            f"{'mean':<10} {_fmt(self.mean_pixel_accuracy):>9} {_fmt(self.mean_iou):>6} "
            f"{_fmt(self.regions.accuracy):>9}"
        )
        rows.append(
            f"{self.n_images} image(s); regions ≥ {self.regions.min_area} px, "
            f"{self.regions.ties} tie(s) counted wrong"
        )
        return "\n".join(rows)

    def accuracy_lost(self) -> dict[str, float]:
        """Each named image's share of 1 - mean per-class pixel accuracy.

        A pixel missed from class c costs 1 / (pixels of c in all images · classes present), so
        a missed monolayer weighs far more than a speck of substrate called monolayer, as in
        the score itself; over all images (named or not) the shares add up to 1 - the score.
        """
        pooled = np.asarray(self.confusion, dtype=np.float64).sum(axis=1)
        present = pooled > 0
        cost = np.zeros_like(pooled)
        cost[present] = 1.0 / (pooled[present] * present.sum())
        lost = {}
        for name, matrix in self.per_image.items():
            cm = np.asarray(matrix)
            lost[name] = float(((cm.sum(axis=1) - np.diag(cm)) * cost).sum())
        return lost

    def format_worst(self, n: int) -> str:
        """The `n` images that cost the mean per-class accuracy most, with their own accuracy.

        The pixel scores pool all images, so a few images that go wrong over whole regions can
        move them more than every boundary together: these are the images to look at first.
        """
        lost = self.accuracy_lost()
        header = f"{'image':<28} {'acc. lost':>9} {'wrong px':>9} " + " ".join(
            f"{name:>9}" for name in CLASS_NAMES
        )
        rows = [header]
        for name in sorted(lost, key=lambda k: (-lost[k], k))[:n]:
            cm = np.asarray(self.per_image[name])
            accuracy = per_class_pixel_accuracy(cm)
            rows.append(
                f"{name:<28} {lost[name]:>9.4f} {int(cm.sum() - np.trace(cm)):>9} "
                + " ".join(f"{_fmt(float(a)):>9}" for a in accuracy)
            )
        return "\n".join(rows)


class ScoreAccumulator:
    """Feed (truth, prediction) one image at a time; `scores()` and `curves()` at the end."""

    def __init__(self, min_area: int = 200, bins: int = DEFAULT_BINS) -> None:
        self.min_area = min_area
        self.n_images = 0
        self.confusion = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
        self.regions = np.zeros((N_CLASSES, N_CLASSES + 1), dtype=np.int64)
        self.roc = {c: RocPrAccumulator(c, bins) for c in CURVE_CLASSES}
        self.per_image: dict[str, np.ndarray] = {}
        self._with_probs = False

    def update(
        self,
        true: np.ndarray,
        pred: np.ndarray | None = None,
        probs: np.ndarray | None = None,
        *,
        name: str | None = None,
    ) -> None:
        """`pred`: H×W labels; `probs`: C×H×W probabilities (pred defaults to their argmax).

        `name` (the image's stem) keeps this image's own confusion matrix in the scores.
        """
        if pred is None and probs is None:
            raise ValueError("update needs pred, probs or both")
        if pred is None:
            pred = np.asarray(probs).argmax(axis=0).astype(np.uint8)
        confusion = confusion_matrix(true, pred)
        if name is not None:
            if name in self.per_image:
                raise ValueError(f"image {name!r} was already scored")
            self.per_image[name] = confusion
        self.confusion += confusion
        self.regions += region_confusion(true, pred, self.min_area)
        if probs is not None:
            self._with_probs = True
            for acc in self.roc.values():
                acc.update(true, probs)
        self.n_images += 1

    def curves(self) -> list[dict[str, Any]]:
        return [acc.curves() for acc in self.roc.values()] if self._with_probs else []

    def scores(self) -> Scores:
        pa, iou = per_class_pixel_accuracy(self.confusion), per_class_iou(self.confusion)
        curves = self.curves()
        return Scores(
            n_images=self.n_images,
            confusion=self.confusion.tolist(),
            pixel_accuracy=dict(zip(CLASS_NAMES, pa.tolist(), strict=True)),
            mean_pixel_accuracy=mean_pixel_accuracy(self.confusion),
            iou=dict(zip(CLASS_NAMES, iou.tolist(), strict=True)),
            mean_iou=mean_iou(self.confusion),
            regions=RegionScores(min_area=self.min_area, confusion=self.regions.tolist()),
            per_image={name: cm.tolist() for name, cm in self.per_image.items()},
            roc_auc={c["class"]: c["roc_auc"] for c in curves},
            average_precision={c["class"]: c["average_precision"] for c in curves},
        )


# ---- helpers --------------------------------------------------------------------------------


def _labels(a: np.ndarray, n: int, what: str) -> np.ndarray:
    arr = np.asarray(a)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what} must be an integer label map, got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{what} labels must be in 0..{n - 1}, got {arr.min()}..{arr.max()}")
    return arr


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value
