"""Pixel losses: plain cross entropy, or cross entropy weighted by median frequency balancing.

Bilayer is ~4 % of the real set's pixels; unweighted, the network can ignore it and still score
well on pixels. Saito et al. weight each class by median frequency balancing (Eigen & Fergus).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
from torch import nn

LossKind = Literal["ce", "weighted"]


def median_frequency_weights(masks: Iterable[np.ndarray], n_classes: int = 3) -> np.ndarray:
    """Per-class weights `median(freq) / freq(c)` over label masks with values 0..n_classes-1.

    `freq(c)` is the pixels of class c divided by the total pixels of the images in which c is
    present (Eigen & Fergus), so a class that is rare per image, not merely in few images, gets
    the large weight. A class absent from every mask has no frequency: it gets weight 0 (it
    cannot contribute to the loss anyway) with a warning, and the median is taken over the
    classes that are present.
    """
    class_pixels = np.zeros(n_classes, dtype=np.int64)
    present_pixels = np.zeros(n_classes, dtype=np.int64)
    seen = 0
    for mask in masks:
        m = np.asarray(mask)
        if m.size and (m.min() < 0 or m.max() >= n_classes):
            raise ValueError(f"mask values must be in 0..{n_classes - 1}, got {m.min()}..{m.max()}")
        counts = np.bincount(m.ravel().astype(np.int64), minlength=n_classes)
        class_pixels += counts
        present_pixels += np.where(counts > 0, m.size, 0)
        seen += 1
    if seen == 0 or not class_pixels.any():
        raise ValueError("median_frequency_weights needs at least one non-empty mask")
    present = class_pixels > 0
    if not present.all():
        warnings.warn(
            f"class(es) {np.flatnonzero(~present).tolist()} absent from every mask: weight 0",
            stacklevel=2,
        )
    freq = np.zeros(n_classes)
    freq[present] = class_pixels[present] / present_pixels[present]
    weights = np.zeros(n_classes)
    weights[present] = np.median(freq[present]) / freq[present]
    return weights


def make_loss(kind: LossKind, weights: np.ndarray | Iterable[float] | None = None) -> nn.Module:
    """A loss over logits (N×C×H×W) and targets (N×H×W, long).

    `weighted` needs `weights` (e.g. from `median_frequency_weights`). Torch's mean reduction
    divides by the summed weights of the batch's pixels rather than summing as the paper writes
    it; that only rescales each batch's loss and leaves the balance between classes as intended.
    The weights are a buffer of the module, so `.to(device)` moves them with it.
    """
    if kind == "ce":
        if weights is not None:
            raise ValueError("kind='ce' is unweighted; pass kind='weighted' to use weights")
        return nn.CrossEntropyLoss()
    if kind == "weighted":
        if weights is None:
            raise ValueError("kind='weighted' needs class weights (median_frequency_weights)")
        w = torch.as_tensor(np.asarray(list(weights), dtype=np.float32))
        if w.ndim != 1 or not torch.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
            raise ValueError(
                f"weights must be finite, non-negative and not all 0, got {w.tolist()}"
            )
        return nn.CrossEntropyLoss(weight=w)
    raise ValueError(f"unknown loss kind {kind!r}; use 'ce' or 'weighted'")
