"""Overlap metrics of binary masks (NumPy): Dice, IoU and pixel accuracy.

An image whose prediction and ground truth are both empty scores 1 (a perfect match).
"""

from collections.abc import Sequence

import numpy as np


def confusion(prediction: np.ndarray, target: np.ndarray) -> dict[str, int]:
    """True/false positives/negatives of two same-shaped binary masks."""
    if prediction.shape != target.shape:
        raise ValueError(f"Prediction {prediction.shape} and target {target.shape} differ.")
    prediction, target = prediction.astype(bool), target.astype(bool)
    tp = int(np.count_nonzero(prediction & target))
    fp = int(np.count_nonzero(prediction & ~target))
    fn = int(np.count_nonzero(~prediction & target))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": prediction.size - tp - fp - fn}


def dice(tp: int, fp: int, fn: int) -> float:
    """2|A∩B| / (|A| + |B|)."""
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else 2 * tp / denominator


def iou(tp: int, fp: int, fn: int) -> float:
    """|A∩B| / |A∪B|."""
    denominator = tp + fp + fn
    return 1.0 if denominator == 0 else tp / denominator


def accuracy(tp: int, fp: int, fn: int, tn: int) -> float:
    """Fraction of pixels classified correctly."""
    return (tp + tn) / (tp + fp + fn + tn)


def image_scores(counts: dict[str, int]) -> dict[str, float]:
    """Dice, IoU and pixel accuracy of one image's confusion counts."""
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    return {"dice": dice(tp, fp, fn), "iou": iou(tp, fp, fn), "accuracy": accuracy(**counts)}


def summarize(per_image: Sequence[dict[str, int]]) -> dict[str, float]:
    """Means over images and pooled (all pixels together) scores of many images' counts."""
    if not per_image:
        raise ValueError("No images to summarize.")
    scores = [image_scores(c) for c in per_image]
    pooled = {k: sum(c[k] for c in per_image) for k in ("tp", "fp", "fn", "tn")}
    summary = {k: float(np.mean([s[k] for s in scores])) for k in ("dice", "iou", "accuracy")}
    summary.update({f"pooled_{k}": v for k, v in image_scores(pooled).items()})
    summary["num_images"] = len(per_image)
    return summary
