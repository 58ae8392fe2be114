"""Metrics on hand-made masks: pixel accuracy, IoU, region accuracy, ROC/PR and the summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.metrics import (
    RocPrAccumulator,
    ScoreAccumulator,
    confusion_matrix,
    mean_iou,
    mean_pixel_accuracy,
    per_class_iou,
    per_class_pixel_accuracy,
    plot_curves,
    region_accuracy,
    roc_pr_curves,
)

# 10 pixels; rows of the confusion matrix are the truth.
TRUE = np.array([[0, 0, 0, 0, 1], [1, 1, 1, 2, 2]], dtype=np.uint8)
PRED = np.array([[0, 0, 0, 1, 1], [1, 1, 2, 2, 0]], dtype=np.uint8)


def test_perfect_prediction_scores_one() -> None:
    cm = confusion_matrix(TRUE, TRUE)
    np.testing.assert_array_equal(per_class_pixel_accuracy(cm), [1, 1, 1])
    assert mean_pixel_accuracy(cm) == 1.0
    assert mean_iou(cm) == 1.0


def test_known_confusion() -> None:
    cm = confusion_matrix(TRUE, PRED)
    np.testing.assert_array_equal(cm, [[3, 1, 0], [0, 3, 1], [1, 0, 1]])
    # recall: 3/4, 3/4, 1/2 -> mean 2/3
    np.testing.assert_allclose(per_class_pixel_accuracy(cm), [0.75, 0.75, 0.5])
    assert mean_pixel_accuracy(cm) == pytest.approx(2 / 3)
    # IoU = TP / (column + row - TP): 3/(4+4-3), 3/(4+4-3), 1/(2+2-1)
    np.testing.assert_allclose(per_class_iou(cm), [0.6, 0.6, 1 / 3])
    assert mean_iou(cm) == pytest.approx((0.6 + 0.6 + 1 / 3) / 3)


def test_confusion_accumulates_over_images() -> None:
    total = confusion_matrix(TRUE, PRED) + confusion_matrix(TRUE[:, ::-1], PRED[:, ::-1])
    np.testing.assert_array_equal(total, 2 * confusion_matrix(TRUE, PRED))


def test_class_absent_from_truth_is_excluded_from_the_mean() -> None:
    true = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 2, 1, 1]])
    cm = confusion_matrix(true, pred)
    acc = per_class_pixel_accuracy(cm)
    assert math.isnan(acc[2])
    assert mean_pixel_accuracy(cm) == pytest.approx((0.5 + 1.0) / 2)
    assert per_class_iou(cm)[2] == 0.0  # predicted but never true: IoU 0, not NaN


def test_labels_are_checked() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(TRUE, PRED[:, :4])
    with pytest.raises(ValueError, match=r"0\.\.2"):
        confusion_matrix(TRUE, PRED + 1)
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(TRUE, PRED.astype(float))


# ---- regions ----


def canvas() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((60, 80), np.uint8), np.zeros((60, 80), np.uint8)


def test_region_size_threshold() -> None:
    true, pred = canvas()
    true[0:10, 0:20] = 1  # 200 px: a problem region
    true[20:30, 0:20] = 2
    true[20, 0] = 0  # 199 px: too small to ask about
    pred[:] = true
    scores = region_accuracy([true], [pred])
    assert (scores.total, scores.correct, scores.accuracy) == (1, 1, 1.0)
    assert scores.per_class() == {"monolayer": (1, 1), "bilayer": (0, 0)}
    assert region_accuracy([true], [pred], min_area=199).total == 2


def test_diagonal_touch_is_one_region() -> None:
    true, pred = canvas()
    true[0:10, 0:10] = 2  # 100 px
    true[10:20, 10:20] = 2  # 100 px, touching the first only at a corner
    # 8-connected they are one 200-px region; 4-connected they would be two 100-px ones.
    scores = region_accuracy([true], [pred])
    assert scores.total == 1
    assert scores.confusion[2][0] == 1  # all predicted "other": answered other, wrong


def test_plurality_rule_and_tie_rule() -> None:
    true, pred = canvas()
    true[0:10, 0:20] = 2  # bilayer region, 200 px
    pred[0:10, 0:9] = 2  # 90 bilayer
    pred[0:10, 9:15] = 1  # 60 monolayer; the remaining 50 other: bilayer wins by plurality
    true[20:30, 0:20] = 1  # monolayer region
    pred[20:30, 0:12] = 0  # 120 other beat 80 monolayer: wrong
    pred[20:30, 12:20] = 1
    true[40:50, 0:20] = 1  # monolayer region with a 100/100 monolayer/bilayer tie
    pred[40:50, 0:10] = 1
    pred[40:50, 10:20] = 2
    scores = region_accuracy([true], [pred])
    assert (scores.total, scores.correct, scores.ties) == (3, 1, 1)
    assert scores.accuracy == pytest.approx(1 / 3)
    assert scores.per_class() == {"monolayer": (0, 2), "bilayer": (1, 1)}
    assert scores.confusion[1] == [1, 0, 0, 1]  # one answered "other", one tie


def test_regions_accumulate_over_images() -> None:
    true, pred = canvas()
    true[0:20, 0:20] = 1
    wrong = pred.copy()
    pred[:] = true
    scores = region_accuracy([true, true], [pred, wrong])
    assert (scores.total, scores.correct, scores.accuracy) == (2, 1, 0.5)


# ---- ROC and PR ----


def scores_for(truth: np.ndarray, pos: float, neg: float) -> np.ndarray:
    return np.where(truth == 1, pos, neg)


def test_roc_perfect_reversed_constant() -> None:
    truth = np.array([[1, 1, 0, 0, 0, 2]])
    perfect = roc_pr_curves([truth], [scores_for(truth, 1.0, 0.0)], positive_class=1)
    assert perfect["roc_auc"] == 1.0 and perfect["average_precision"] == 1.0
    reversed_ = roc_pr_curves([truth], [scores_for(truth, 0.0, 1.0)], positive_class=1)
    assert reversed_["roc_auc"] == 0.0
    constant = roc_pr_curves([truth], [np.full(truth.shape, 0.3)], positive_class=1)
    assert constant["roc_auc"] == pytest.approx(0.5)
    assert constant["average_precision"] == pytest.approx(2 / 6)  # the positive share
    assert (perfect["positives"], perfect["negatives"]) == (2, 4)


def test_roc_pr_by_hand() -> None:
    truth = np.array([[1, 1, 0, 0]])
    score = np.array([[0.9, 0.4, 0.6, 0.1]])
    c = roc_pr_curves([truth], [score], positive_class=1)
    # Positive above negative in 3 of 4 pairs (0.4 < 0.6 is the miss).
    assert c["roc_auc"] == pytest.approx(0.75)
    # Thresholds 0.9, 0.6, 0.4: recall .5 at precision 1, then recall 1 at precision 2/3.
    assert c["average_precision"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    np.testing.assert_allclose(c["recall"], [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(c["precision"], [1, 1, 0.5, 2 / 3, 0.5])


def test_histogram_auc_matches_rank_statistic() -> None:
    rng = np.random.default_rng(1)
    truth = (rng.random((20, 25)) < 0.4).astype(np.uint8) * 2
    score = np.clip(rng.normal(0.4 + 0.2 * (truth == 2), 0.2), 0, 1).round(3)  # 1001 levels
    c = roc_pr_curves([truth[:10], truth[10:]], [score[:10], score[10:]], positive_class=2)
    pos, neg = score[truth == 2], score[truth != 2]
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    assert c["roc_auc"] == pytest.approx(greater + ties / 2)


def test_probability_maps_are_channel_first_and_checked() -> None:
    truth = np.array([[0, 1, 2, 2]])
    probs = np.stack([truth == k for k in range(3)]).astype(np.float32)  # 3×1×4, one-hot
    acc = RocPrAccumulator(positive_class=2)
    acc.update(truth, probs)
    assert acc.curves()["roc_auc"] == 1.0
    with pytest.raises(ValueError, match="do not match"):
        acc.update(truth, probs[:, :, :3])
    with pytest.raises(ValueError, match="probabilities"):
        acc.update(truth, probs * 3 - 1)


def test_no_positives_gives_nan() -> None:
    truth = np.zeros((2, 2), np.uint8)
    c = roc_pr_curves([truth], [np.full((2, 2), 0.5)], positive_class=1)
    assert math.isnan(c["roc_auc"]) and math.isnan(c["average_precision"])


def test_plot_curves_writes_pngs(tmp_path: Path) -> None:
    truth = np.array([[1, 1, 0, 2, 2, 0]])
    probs = np.stack([truth == k for k in range(3)]).astype(float) * 0.8 + 0.2 / 3
    curves = [roc_pr_curves([truth], [probs], c) for c in (1, 2)]
    roc, pr = plot_curves(curves, tmp_path / "plots")
    for path in (roc, pr):
        assert path.name in {"roc.png", "pr.png"}
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (500, 500)


# ---- everything together ----


def test_score_accumulator_and_table() -> None:
    true, _ = canvas()
    true[0:20, 0:20] = 1
    true[30:50, 30:50] = 2
    probs = np.stack([true == k for k in range(3)]).astype(np.float32)
    acc = ScoreAccumulator()
    acc.update(true, probs=probs)
    acc.update(true, pred=np.zeros_like(true))  # labels only: no curves from this one
    s = acc.scores()
    assert s.n_images == 2
    assert s.pixel_accuracy == {"other": 1.0, "monolayer": 0.5, "bilayer": 0.5}
    assert s.mean_pixel_accuracy == pytest.approx(2 / 3)
    assert (s.regions.total, s.regions.correct) == (4, 2)
    assert s.roc_auc == {"monolayer": 1.0, "bilayer": 1.0}
    d = s.as_dict()
    assert d["regions"]["accuracy"] == 0.5
    assert d["regions"]["per_class"]["bilayer"] == {"correct": 1, "total": 2}
    json.dumps(d, allow_nan=False)
    table = s.format_table()
    for word in ("other", "monolayer", "bilayer", "mean", "1/2"):
        assert word in table


def test_as_dict_turns_nan_into_none() -> None:
    acc = ScoreAccumulator()
    acc.update(np.zeros((3, 3), np.uint8), pred=np.zeros((3, 3), np.uint8))
    d = acc.scores().as_dict()
    assert d["pixel_accuracy"]["monolayer"] is None
    assert d["regions"]["accuracy"] is None
    assert d["mean_pixel_accuracy"] == 1.0
    json.dumps(d, allow_nan=False)


def test_worst_images_rank_by_the_accuracy_they_cost() -> None:
    """Per-image confusion matrices are kept by name. The worst list ranks images by their share
    of 1 - mean per-class accuracy, so a missed monolayer outranks more wrong pixels of
    substrate, and the shares of all images add up to what the score lost."""
    true = np.zeros((10, 10), np.uint8)
    true[:, :4] = 1  # 40 monolayer pixels, 60 other
    clean = true.copy()
    half_missed = true.copy()
    half_missed[:5, :4] = 0  # 20 monolayer pixels called substrate
    speckled = true.copy()
    speckled[:5, 5:] = 1  # 25 substrate pixels called monolayer: more pixels, less accuracy
    one_wrong = true.copy()
    one_wrong[9, 9] = 2  # one substrate pixel called bilayer
    acc = ScoreAccumulator()
    acc.update(true, pred=clean, name="clean")
    acc.update(true, pred=speckled, name="speckled")
    acc.update(true, pred=half_missed, name="sample_3")
    acc.update(true, pred=one_wrong)  # unnamed: pooled, not listed
    with pytest.raises(ValueError, match="sample_3"):
        acc.update(true, pred=clean, name="sample_3")
    s = acc.scores()
    assert s.n_images == 4 and np.sum(s.confusion) == 400  # the refused one left no trace
    assert s.per_image["sample_3"] == [[60, 0, 0], [20, 20, 0], [0, 0, 0]]
    lost = s.accuracy_lost()
    assert set(lost) == {"clean", "speckled", "sample_3"}
    # other: 240 pixels in all, monolayer: 160, bilayer absent; two classes in the mean
    assert lost == pytest.approx({"clean": 0.0, "speckled": 25 / 480, "sample_3": 20 / 320})
    unnamed = 1 / 480
    assert sum(lost.values()) + unnamed == pytest.approx(1 - s.mean_pixel_accuracy)
    lines = s.format_worst(2).splitlines()
    assert len(lines) == 3  # header + the two worst
    assert lines[1].split() == ["sample_3", "0.0625", "20", "1.000", "0.500", "-"]
    assert lines[2].split() == ["speckled", "0.0521", "25", "0.583", "1.000", "-"]
    assert json.loads(json.dumps(s.as_dict()))["per_image"]["speckled"][0] == [35, 25, 0]
