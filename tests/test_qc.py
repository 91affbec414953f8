"""nucflow.qc: the distributions picture shows the table's histograms where they are."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from nucflow import qc

BLUE = (70, 130, 180)


def _blue_columns(picture: np.ndarray, panel: int) -> dict[int, int]:
    """x -> height in pixels of the blue bar at x, within the panel's third of the picture."""
    third = picture.shape[1] // 3
    blue = np.all(picture[:, panel * third : (panel + 1) * third] == BLUE, axis=-1)
    return {int(x) + panel * third: int(blue[:, x].sum()) for x in np.flatnonzero(blue.any(0))}


def test_distributions_picture_draws_each_histogram_bar_to_scale(tmp_path):
    """Volumes: 30 nuclei at 100 µm³ and 10 at 200 (the bars 3:1, left and right); intensity:
    all alike; the scatter: one dot per nucleus, deeper to the right."""
    volume = np.r_[np.full(30, 100.0), np.full(10, 200.0)]
    table = pd.DataFrame(
        {
            "volume_um3": volume,
            "intensity_mean": np.r_[np.full(30, 5.0), np.full(10, 9.0)],
            "centroid_z": np.r_[np.full(30, 2.0), np.full(10, 40.0)],
        }
    )
    path = tmp_path / "distributions.png"
    qc._histograms(path, table)
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape == (qc._FIGURE[1], qc._FIGURE[0], 3)
    for panel in (0, 1):
        bars = _blue_columns(picture, panel)
        left, right = min(bars), max(bars)
        assert right - left > 200  # the first and the last of 40 bins
        assert bars[left] / bars[right] == pytest.approx(3.0, rel=0.02)
    dots = _blue_columns(picture, 2)
    low, high = min(dots), max(dots)
    assert high - low > 250  # depth 2 on the left, 40 on the right
    empty = tmp_path / "empty.png"
    qc._histograms(empty, table.iloc[:0])
    assert not np.any(np.all(np.asarray(Image.open(empty).convert("RGB")) == BLUE, axis=-1))


@pytest.mark.parametrize("seed", [0, 1])
def test_outline_pixels_are_scikit_images_inner_boundaries(seed):
    """Random labels (every pixel a boundary case, the image edges included) and blobs."""
    from skimage.measure import label
    from skimage.segmentation import find_boundaries

    rng = np.random.default_rng(seed)
    noisy = rng.integers(0, 4, (50, 61))
    blobs = label(rng.random((80, 90)) > 0.6)
    for labels in (noisy, blobs):
        expected = find_boundaries(labels, mode="inner")
        np.testing.assert_array_equal(qc._inner_boundaries(labels), expected)
        assert 0 < expected.sum() < expected.size
