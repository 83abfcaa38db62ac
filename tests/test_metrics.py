"""Tests of the binary-mask overlap metrics against hand-computed values."""

import numpy as np
import pytest

from hairseg_jax import metrics

# A 4x4 case worked out by hand:
#   prediction   target      tp at (0,0) (1,0) (1,1)       -> tp = 3
#   1 1 0 0      1 0 0 0     fp at (0,1) (3,3)             -> fp = 2
#   1 1 0 0      1 1 1 0     fn at (1,2)                   -> fn = 1
#   0 0 0 0      0 0 0 0     the other 10 pixels           -> tn = 10
#   0 0 0 1      0 0 0 0
# dice = 2*3 / (2*3 + 2 + 1) = 2/3, iou = 3 / (3 + 2 + 1) = 1/2, accuracy = 13/16.
PREDICTION = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], np.uint8)
TARGET = np.array([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], np.uint8)


def test_confusion_by_hand():
    assert metrics.confusion(PREDICTION, TARGET) == {"tp": 3, "fp": 2, "fn": 1, "tn": 10}


def test_confusion_accepts_bool_and_other_dtypes():
    expected = {"tp": 3, "fp": 2, "fn": 1, "tn": 10}
    assert metrics.confusion(PREDICTION.astype(bool), TARGET.astype(np.int64)) == expected
    assert metrics.confusion(PREDICTION[None] * 255, TARGET[None]) == expected


def test_confusion_counts_are_python_ints():
    counts = metrics.confusion(PREDICTION, TARGET)
    assert all(type(v) is int for v in counts.values())


def test_scores_by_hand():
    assert metrics.dice(tp=3, fp=2, fn=1) == pytest.approx(2 / 3)
    assert metrics.iou(tp=3, fp=2, fn=1) == pytest.approx(1 / 2)
    assert metrics.accuracy(tp=3, fp=2, fn=1, tn=10) == pytest.approx(13 / 16)
    scores = metrics.image_scores(metrics.confusion(PREDICTION, TARGET))
    assert scores == pytest.approx({"dice": 2 / 3, "iou": 1 / 2, "accuracy": 13 / 16})


def test_perfect_prediction():
    scores = metrics.image_scores(metrics.confusion(TARGET, TARGET))
    assert scores == {"dice": 1.0, "iou": 1.0, "accuracy": 1.0}


def test_empty_prediction_and_empty_target_score_one():
    empty = np.zeros((3, 5), np.uint8)
    scores = metrics.image_scores(metrics.confusion(empty, empty))
    assert scores == {"dice": 1.0, "iou": 1.0, "accuracy": 1.0}


def test_empty_prediction_of_non_empty_target_scores_zero():
    scores = metrics.image_scores(metrics.confusion(np.zeros_like(TARGET), TARGET))
    assert scores["dice"] == 0.0 and scores["iou"] == 0.0
    assert scores["accuracy"] == pytest.approx(12 / 16)


def test_non_empty_prediction_of_empty_target_scores_zero():
    scores = metrics.image_scores(metrics.confusion(PREDICTION, np.zeros_like(PREDICTION)))
    assert scores["dice"] == 0.0 and scores["iou"] == 0.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ"):
        metrics.confusion(PREDICTION, TARGET[:, :3])
    with pytest.raises(ValueError, match="differ"):
        metrics.confusion(PREDICTION, TARGET.T[None])


def test_dice_and_iou_relation():
    """dice = 2 iou / (1 + iou) for any counts."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        tp, fp, fn = (int(v) for v in rng.integers(0, 50, 3))
        d, j = metrics.dice(tp, fp, fn), metrics.iou(tp, fp, fn)
        assert d == pytest.approx(2 * j / (1 + j))


def test_summarize_mean_and_pooled_differ():
    # Image A (4 pixels): tp 1, fp 0, fn 1, tn 2 -> dice 2/3, iou 1/2, accuracy 3/4.
    # Image B (16 pixels): tp 9, fp 1, fn 0, tn 6 -> dice 18/19, iou 9/10, accuracy 15/16.
    # Pooled: tp 10, fp 1, fn 1, tn 8 -> dice 20/22, iou 10/12, accuracy 18/20.
    a = {"tp": 1, "fp": 0, "fn": 1, "tn": 2}
    b = {"tp": 9, "fp": 1, "fn": 0, "tn": 6}
    summary = metrics.summarize([a, b])
    assert summary == pytest.approx(
        {
            "dice": (2 / 3 + 18 / 19) / 2,
            "iou": (1 / 2 + 9 / 10) / 2,
            "accuracy": (3 / 4 + 15 / 16) / 2,
            "pooled_dice": 20 / 22,
            "pooled_iou": 10 / 12,
            "pooled_accuracy": 18 / 20,
            "num_images": 2,
        }
    )
    assert summary["iou"] != pytest.approx(summary["pooled_iou"])
    assert isinstance(summary["dice"], float) and summary["num_images"] == 2


def test_summarize_from_masks():
    """The same two images as masks give the same summary as their counts."""
    pred_a, target_a = np.array([[1, 0], [0, 0]]), np.array([[1, 1], [0, 0]])
    pred_b = np.zeros((4, 4), np.uint8)
    pred_b[:3, :3] = 1
    pred_b[3, 0] = 1
    target_b = np.zeros((4, 4), np.uint8)
    target_b[:3, :3] = 1
    counts = [metrics.confusion(pred_a, target_a), metrics.confusion(pred_b, target_b)]
    assert counts == [{"tp": 1, "fp": 0, "fn": 1, "tn": 2}, {"tp": 9, "fp": 1, "fn": 0, "tn": 6}]
    assert metrics.summarize(counts)["pooled_dice"] == pytest.approx(20 / 22)


def test_summarize_one_image_mean_equals_pooled():
    summary = metrics.summarize([metrics.confusion(PREDICTION, TARGET)])
    for name in ("dice", "iou", "accuracy"):
        assert summary[name] == pytest.approx(summary[f"pooled_{name}"])
    assert summary["num_images"] == 1


def test_summarize_with_an_empty_image():
    """An empty/empty image counts as a perfect score in the mean but adds nothing pooled."""
    empty = {"tp": 0, "fp": 0, "fn": 0, "tn": 16}
    miss = {"tp": 0, "fp": 0, "fn": 4, "tn": 12}
    summary = metrics.summarize([empty, miss])
    assert summary["dice"] == pytest.approx(0.5)
    assert summary["pooled_dice"] == 0.0


def test_summarize_of_no_images_raises():
    with pytest.raises(ValueError, match="No images"):
        metrics.summarize([])
