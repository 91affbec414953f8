"""Instance-segmentation accuracy against a ground truth (for the demo, tests and benchmarks)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage, sparse

__all__ = ["accuracy_report", "match_instances"]


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
    overlap, _, true_size, pred_size = _overlaps(predicted, truth)
    return _match(overlap, true_size, pred_size, iou)


def _match(overlap, true_size, pred_size, iou: float) -> dict[str, float]:
    """:func:`match_instances` from the overlap of the two label images."""
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


def accuracy_report(
    predicted: np.ndarray, truth: np.ndarray, brightness: np.ndarray | None = None
) -> dict[str, Any]:
    """What users check first: F1 at IoU 0.5 and 0.7, splits, merges, recall per group.

    Parameters
    ----------
    predicted, truth : (M, N[, P]) ndarray of int
        Label images (0 is background).
    brightness : (n,) ndarray of float, optional
        Signal of true nucleus ``label`` at ``brightness[label - 1]``; gives recall per
        brightness tercile (dim, middle, bright).

    Returns
    -------
    dict
        ``f1_iou50``, ``f1_iou70``, ``precision``, ``recall``, ``mean_matched_iou``,
        ``splits`` (true nuclei of which two or more found objects each lie at least half
        inside), ``merges`` (found objects holding at least half of two or more true nuclei),
        ``recall_by_depth`` (thirds along the first axis, top first) and, with ``brightness``,
        ``recall_by_brightness`` (terciles, dimmest first).
    """
    overlap, true_ids, true_size, pred_size = _overlaps(predicted, truth)
    strict = _match(overlap, true_size, pred_size, 0.7)
    loose = _match(overlap, true_size, pred_size, 0.5)
    found = _found(overlap, true_size, pred_size, len(true_ids))
    depth = ndimage.mean(np.indices(truth.shape)[0], labels=truth, index=true_ids) / max(
        truth.shape[0], 1
    )
    report: dict[str, Any] = {
        "f1_iou50": loose["f1"],
        "f1_iou70": strict["f1"],
        "precision": loose["precision"],
        "recall": loose["recall"],
        "mean_matched_iou": loose["mean_matched_iou"],
        "true_nuclei": len(true_ids),
        "found_nuclei": len(pred_size),
        "splits": int(
            np.sum(
                np.bincount(overlap.row[_most_inside(overlap, pred_size)], minlength=len(true_ids))
                >= 2
            )
        ),
        "merges": int(
            np.sum(
                np.bincount(
                    overlap.col[_most_inside(overlap, true_size, rows=True)],
                    minlength=len(pred_size),
                )
                >= 2
            )
        ),
        "recall_by_depth": _recall_by(np.floor(np.asarray(depth) * 3).clip(0, 2), found),
    }
    if brightness is not None:
        level = np.asarray(brightness, float)[true_ids - 1]
        terciles = np.searchsorted(np.quantile(level, [1 / 3, 2 / 3]), level, side="right")
        report["recall_by_brightness"] = _recall_by(terciles, found)
    return report


def _overlaps(predicted: np.ndarray, truth: np.ndarray):
    """Sparse overlap (true x found, background dropped), true ids, sizes."""
    # Voxels that are background in both images count for nothing; skipping them spares
    # sorting the whole stack (most of it is background).
    either = (predicted != 0) | (truth != 0)
    true_ids, true = np.unique(truth[either], return_inverse=True)
    pred_ids, pred = np.unique(predicted[either], return_inverse=True)
    true_bg = int(true_ids.size > 0 and true_ids[0] == 0)
    pred_bg = int(pred_ids.size > 0 and pred_ids[0] == 0)
    shape = (true_ids.size, pred_ids.size)
    overlap = sparse.coo_matrix((np.ones(pred.size), (true, pred)), shape=shape).tocsr()
    overlap = overlap[true_bg:, pred_bg:].tocoo()
    return (
        overlap,
        true_ids[true_bg:].astype(np.int64),
        np.bincount(true, minlength=shape[0])[true_bg:],
        np.bincount(pred, minlength=shape[1])[pred_bg:],
    )


def _most_inside(overlap, size, *, rows: bool = False) -> np.ndarray:
    """Overlap entries covering at least half of the found (or, with rows, true) object."""
    return overlap.data >= 0.5 * size[overlap.row if rows else overlap.col]


def _found(overlap, true_size, pred_size, n_true) -> np.ndarray:
    """Per true nucleus: matched at IoU > 0.5."""
    union = true_size[overlap.row] + pred_size[overlap.col] - overlap.data
    found = np.zeros(n_true, bool)
    found[overlap.row[overlap.data / union > 0.5]] = True
    return found


def _recall_by(group: np.ndarray, found: np.ndarray) -> list[float | None]:
    return [float(found[group == g].mean()) if np.any(group == g) else None for g in range(3)]
