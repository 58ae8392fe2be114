"""Median frequency balancing on hand-counted masks, and the two losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from model.losses import make_loss, median_frequency_weights


def hand_masks() -> list[np.ndarray]:
    a = np.array([[0, 0], [0, 1]])  # 4 px: class 0 ×3, class 1 ×1
    b = np.array([[0, 0, 0, 0], [1, 2, 2, 2]])  # 8 px: class 0 ×4, class 1 ×1, class 2 ×3
    c = np.zeros((2, 2), dtype=np.uint8)  # 4 px: class 0 ×4
    return [a, b, c]


def test_median_frequency_weights_by_hand() -> None:
    # freq(c) = pixels of c / pixels of the images that contain c:
    #   class 0: (3 + 4 + 4) / (4 + 8 + 4) = 11/16 = 0.6875
    #   class 1: (1 + 1) / (4 + 8)        = 2/12  = 1/6   (image c has no class 1)
    #   class 2: 3 / 8                               = 0.375 (only image b has class 2)
    # median(0.6875, 1/6, 0.375) = 0.375, so the weights are
    #   0.375 / 0.6875 = 6/11, 0.375 / (1/6) = 2.25, 0.375 / 0.375 = 1.
    weights = median_frequency_weights(hand_masks())
    np.testing.assert_allclose(weights, [6 / 11, 2.25, 1.0])


def test_weights_accept_a_generator() -> None:
    np.testing.assert_allclose(
        median_frequency_weights(m for m in hand_masks()), [6 / 11, 2.25, 1.0]
    )


def test_absent_class_gets_zero_weight_with_a_warning() -> None:
    masks = [np.array([[0, 0, 0, 1]]), np.array([[0, 1]])]
    # class 0: 4/6, class 1: 2/6; median over the present two = 0.5 -> weights 0.75, 1.5, 0.
    with pytest.warns(UserWarning, match=r"\[2\] absent"):
        weights = median_frequency_weights(masks)
    np.testing.assert_allclose(weights, [0.75, 1.5, 0.0])


def test_weights_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match=r"0\.\.2"):
        median_frequency_weights([np.array([[0, 3]])])
    with pytest.raises(ValueError, match="at least one"):
        median_frequency_weights([])


def test_make_loss_plain_and_weighted() -> None:
    ce = make_loss("ce")
    assert isinstance(ce, nn.CrossEntropyLoss) and ce.weight is None
    w = np.array([6 / 11, 2.25, 1.0])
    weighted = make_loss("weighted", w)
    torch.testing.assert_close(weighted.weight, torch.tensor(w, dtype=torch.float32))

    logits = torch.tensor([[[[2.0, 0.0]], [[0.5, 1.0]], [[-1.0, 3.0]]]])  # N=1, C=3, H=1, W=2
    target = torch.tensor([[[1, 2]]])  # N=1, H=1, W=2
    logp = torch.log_softmax(logits, dim=1)[0, :, 0]  # C×W
    nll = torch.stack([-logp[1, 0], -logp[2, 1]])
    torch.testing.assert_close(ce(logits, target), nll.mean())
    # Torch's weighted mean: sum(w_y * nll) / sum(w_y).
    wy = torch.tensor([2.25, 1.0])
    torch.testing.assert_close(weighted(logits, target), (wy * nll).sum() / wy.sum())


def test_make_loss_refuses_mismatched_arguments() -> None:
    with pytest.raises(ValueError, match="needs class weights"):
        make_loss("weighted")
    with pytest.raises(ValueError, match="unweighted"):
        make_loss("ce", [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="unknown loss kind"):
        make_loss("focal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not all 0"):
        make_loss("weighted", [0.0, 0.0, 0.0])
