"""nucflow.evaluate on hand-made label images whose scores are known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from nucflow.evaluate import accuracy_report, match_instances


@pytest.fixture
def labels() -> tuple[np.ndarray, np.ndarray]:
    """Truth: nucleus 1 at the top, 2 and 3 side by side in the middle, 4 at the bottom.

    Found: 1 with an extra row (IoU 2/3), 2 and 3 as one object (a merge), 4 in two halves
    (a split), one object on background; found labels are not consecutive.
    """
    truth = np.zeros((12, 30), np.uint32)
    truth[1:3, :10] = 1
    truth[5:7, :5], truth[5:7, 5:10] = 2, 3
    truth[9:11, :10] = 4
    found = np.zeros((12, 30), np.int32)
    found[0:3, :10] = 7
    found[5:7, :10] = 40
    found[9:11, :5], found[9:11, 5:10] = 3, 41
    found[0, 20:26] = 5
    return found, truth


def test_accuracy_report_counts_matches_splits_merges_and_groups(labels):
    found, truth = labels
    report = accuracy_report(found, truth, np.array([3.0, 1.0, 2.0, 0.5]))
    assert report["f1_iou50"] == pytest.approx(2 / 9)  # 1 match, 4 true, 5 found
    assert report["f1_iou70"] == 0.0  # the one match has IoU 2/3
    assert report["mean_matched_iou"] == pytest.approx(2 / 3)
    assert (report["true_nuclei"], report["found_nuclei"]) == (4, 5)
    assert (report["splits"], report["merges"]) == (1, 1)
    assert report["recall_by_depth"] == [1.0, 0.0, 0.0]
    # terciles of brightness 0.5 | 1 | 2, 3: nucleus 4 | 2 | 1 (found) and 3
    assert report["recall_by_brightness"] == [0.0, 0.0, 0.5]


def test_match_instances_without_background_or_objects(labels):
    found, truth = labels
    shifted = match_instances(truth + 1, truth)  # every nucleus found; background is object 1
    assert (shifted["true_positives"], shifted["false_positives"]) == (4, 1)
    assert match_instances(np.zeros_like(found), truth)["recall"] == 0.0
    empty = match_instances(np.zeros_like(found), np.zeros_like(truth))
    assert (empty["f1"], empty["true_positives"], empty["false_positives"]) == (0.0, 0, 0)
    assert match_instances(found, truth, iou=0.6)["true_positives"] == 1
