"""Instance-segmentation accuracy against a ground truth (for the demo, tests and benchmarks)."""

from __future__ import annotations

import numpy as np
from scipy import sparse

__all__ = ["match_instances"]


def match_instances(
    predicted: np.ndarray, truth: np.ndarray, *, iou: float = 0.5
) -> dict[str, float]:
    """Match predicted to true instances at an IoU threshold.

    With a threshold of at least 0.5 a true instance can overlap at most one predicted instance
    by that much, so matching is one-to-one without an assignment solver.

    Parameters
    ----------
    predicted, truth : (M, N[, P]) ndarray of int
        Label images (0 is background); label values need not be consecutive.
    iou : float
        A match needs an intersection-over-union above this, which must be >= 0.5.

    Returns
    -------
    dict
        ``f1``, ``precision``, ``recall``, ``true_positives``, ``false_positives``,
        ``false_negatives``, ``mean_matched_iou``.
    """
    if iou < 0.5:
        raise ValueError(f"`iou` must be >= 0.5 for one-to-one matching, got {iou}")
    _, pred = np.unique(predicted.ravel(), return_inverse=True)
    _, true = np.unique(truth.ravel(), return_inverse=True)
    pred_bg = int(predicted.min() == 0) if predicted.size else 0
    true_bg = int(truth.min() == 0) if truth.size else 0
    overlap = sparse.coo_matrix((np.ones(pred.size), (true, pred))).tocsr()
    overlap = overlap[true_bg:, pred_bg:].tocoo()
    true_size = np.bincount(true)[true_bg:]
    pred_size = np.bincount(pred)[pred_bg:]
    union = true_size[overlap.row] + pred_size[overlap.col] - overlap.data
    scores = overlap.data / union
    matched = scores > iou
    tp = int(matched.sum())
    fp, fn = len(pred_size) - tp, len(true_size) - tp
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    return {
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "precision": precision,
        "recall": recall,
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "mean_matched_iou": float(scores[matched].mean()) if tp else 0.0,
    }
