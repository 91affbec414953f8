"""nucflow.histogram: range-free block histograms whose sum is the same on every chunking, and
the equal-width histograms (and noise estimate) derived from it."""

from __future__ import annotations

import numpy as np
import pytest

from nucflow import histogram
from nucflow.detect import noise_level


def _values(seed: int = 0) -> np.ndarray:
    """A top-hat-like stack: exact zeros, noisy background, bright nuclei, a few negatives."""
    rng = np.random.default_rng(seed)
    parts = [
        np.zeros(3000),
        rng.normal(12.0, 3.0, 200_000),
        rng.normal(300.0, 80.0, 20_000),
        -rng.exponential(2.0, 500),
    ]
    return rng.permutation(np.concatenate(parts)).astype(np.float32)


def test_keys_follow_the_values_and_each_bin_holds_its_values():
    values = np.concatenate([_values(), np.float32([-np.inf, np.inf, -0.0, 1e-40, -1e-40])])
    order = np.argsort(values, kind="stable")
    keys = histogram.keys(values).astype(np.int64)
    assert np.all(np.diff(keys[order]) >= 0)
    assert keys.min() >= 0 and keys.max() < histogram.BINS
    finite = np.isfinite(values)
    lower = histogram._lower_edges(keys[finite])
    upper = histogram._lower_edges(keys[finite] + 1)
    assert np.all(lower <= values[finite]) and np.all(values[finite] < upper)
    # 128 bins per octave: a bin is under 1 % of its values wide
    big = np.abs(values[finite]) > 1
    assert np.all((upper - lower)[big] <= np.abs(values[finite][big]) / 128)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "non-negative"])
def test_a_blocks_counts_are_its_keys_counts(signed):
    """Non-negative blocks (a background subtraction's) take a shortcut: the same counts, -0.0
    counted as 0.0."""
    values = _values() if signed else np.maximum(_values(), np.float32(0))
    values[:7] = -0.0
    counts = histogram.Histogram.of([histogram.encode(values)]).counts
    np.testing.assert_array_equal(counts, np.bincount(histogram.keys(values), minlength=1 << 16))
    assert counts[histogram.keys(np.float32([0.0]))[0]] == np.count_nonzero(values == 0)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "non-negative"])
@pytest.mark.parametrize("pieces", [1, 2, 7, 64])
def test_the_sum_of_block_histograms_is_the_same_on_every_chunking(pieces, signed):
    values = _values() if signed else np.maximum(_values(), np.float32(0))
    whole = histogram.Histogram.of([histogram.encode(values)])
    parts = histogram.Histogram.of(histogram.encode(p) for p in np.array_split(values, pieces))
    np.testing.assert_array_equal(parts.counts, whole.counts)
    assert (parts.low, parts.high, parts.at_low) == (whole.low, whole.high, whole.at_low)
    assert whole.counts.sum() == values.size
    assert (whole.low, whole.high) == (values.min(), values.max())
    assert whole.at_low == np.count_nonzero(values == values.min())


def test_equal_width_counts_match_numpys_histogram_up_to_a_bins_width():
    values = _values()
    total = histogram.Histogram.of([histogram.encode(values)])
    above_min = float(np.nextafter(values.min(), np.float32(np.inf)))
    edges = np.linspace(above_min, float(values.max()), 1025)
    derived = total.counts_in(edges)
    exact, _ = np.histogram(values, bins=edges)
    # every voxel but those at the minimum, and the same bins hold the mass
    assert derived.sum() == pytest.approx(exact.sum())
    assert abs(np.argmax(derived) - np.argmax(exact)) <= 1  # neighbours near the mode: chance
    assert np.abs(np.cumsum(derived) - np.cumsum(exact)).max() < 0.002 * values.size
    # a narrower range leaves out what lies beyond it
    fine = np.linspace(above_min, 20.0, 4097)
    exact_fine, _ = np.histogram(values, bins=fine)
    assert total.counts_in(fine).sum() == pytest.approx(exact_fine.sum(), rel=1e-3)


def test_the_noise_estimate_from_derived_counts_equals_numpys():
    values = np.maximum(_values(1), 0)  # as the background subtraction leaves it
    total = histogram.Histogram.of(histogram.encode(p) for p in np.array_split(values, 5))
    edges = np.linspace(float(np.nextafter(np.float32(0), np.float32(1))), 40.0, 4097)
    exact, _ = np.histogram(values, bins=edges)
    derived = noise_level(total.counts_in(edges), edges)
    assert derived == pytest.approx(noise_level(exact, edges), rel=1e-3)
    assert derived == pytest.approx(3.0, rel=0.05)
