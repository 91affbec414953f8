"""Range-free value histograms of float32 blocks, summed exactly across blocks.

A value's bin is the top 16 bits of its float32 pattern, flipped so that bins follow values
(128 bins per octave: a bin is at most 0.8 % of its values wide). No range is needed in
advance, so the pass that makes a stack bins it as it goes, and the sum over blocks is the
same on every chunking. Equal-width histograms over any range are derived from the sum, each
bin's count spread evenly over its width (:meth:`Histogram.counts_in`).

A block's histogram is stored as bytes (:func:`encode`): its minimum and maximum (float64),
how many voxels equal the minimum (int64), then its non-empty bins and their counts (uint32).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BINS", "Histogram", "encode", "keys"]

BINS = 1 << 16
_HEADER = 24  # bytes: minimum, maximum, voxels at the minimum


def keys(values: np.ndarray) -> np.ndarray:
    """The bin of each float32 value (uint32 in [0, BINS)), increasing with the value."""
    bits = (np.asarray(values, np.float32) + np.float32(0)).view(np.uint32)  # -0.0 is 0.0
    # negative values: all bits flipped (larger magnitude, smaller key); others: the sign bit
    flip = (bits.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)
    return (bits ^ flip) >> 16


def _lower_edges(bins: np.ndarray) -> np.ndarray:
    """The smallest float32 value of each bin, as float64."""
    flipped = np.asarray(bins, np.uint32) << np.uint32(16)
    bits = np.where(flipped >> 31 == 1, flipped ^ np.uint32(0x80000000), ~flipped)
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def encode(block: np.ndarray) -> bytes:
    """One block's histogram, extremes and count at the minimum, as bytes (see the module)."""
    values = np.ascontiguousarray(block, np.float32).ravel()
    low = values.min()
    if low >= 0:  # a background subtraction's output: the sign bit is 0 (or -0.0's, cleared)
        counts = np.zeros(BINS, np.int64)
        top = (values.view(np.uint32) >> 16).astype(np.uint16) & np.uint16(0x7FFF)
        counts[BINS // 2 :] = np.bincount(top, minlength=BINS // 2)
    else:
        counts = np.bincount(keys(values), minlength=BINS)
    header = np.array([low, values.max()], np.float64).tobytes()
    header += np.array([np.count_nonzero(values == low)], np.int64).tobytes()
    bins = np.flatnonzero(counts)
    return header + np.stack([bins, counts[bins]]).astype(np.uint32).tobytes()


@dataclass
class Histogram:
    """The sum of block histograms (:func:`encode`): bin counts, the extreme values and how
    many voxels equal the smallest."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    low: float = np.inf
    high: float = -np.inf
    at_low: int = 0

    @classmethod
    def of(cls, encoded: Iterable[bytes]) -> Histogram:
        """The sum of encoded block histograms (one block's bytes held at a time)."""
        total = cls()
        for data in encoded:
            total.add(data)
        return total

    def add(self, data: bytes) -> None:
        low, high = np.frombuffer(data, np.float64, 2)
        at_low = int(np.frombuffer(data, np.int64, 1, 16)[0])
        bins, counts = np.frombuffer(data, np.uint32, offset=_HEADER).reshape(2, -1)
        self.counts[bins] += counts  # each bin once
        self.high = max(self.high, float(high))
        if low < self.low:
            self.low, self.at_low = float(low), at_low
        elif low == self.low:
            self.at_low += at_low

    def percentiles(self, q: Sequence[float] | np.ndarray) -> np.ndarray:
        """Values below which ``q`` percent of the voxels lie: the voxels at the minimum
        exactly there, each bin's count spread evenly over its width (so within a bin's width,
        0.8 % of the value, of ``numpy.percentile`` of the whole stack; the same on every
        chunking).

        Parameters
        ----------
        q : (K,) array-like of float in [0, 100]

        Returns
        -------
        (K,) ndarray of float64
        """
        bins = np.flatnonzero(self.counts)
        if not len(bins):
            return np.full(len(np.atleast_1d(q)), np.nan)
        counts = self.counts[bins].astype(np.float64)
        counts[0] -= self.at_low
        start = np.maximum(_lower_edges(bins), self.low)
        stop = _lower_edges(np.minimum(bins + 1, BINS - 1))
        stop[bins + 1 == BINS] = np.inf
        stop = np.minimum(stop, self.high)
        # the voxels at the minimum are a step at the minimum, the rest rise linearly
        knots = np.r_[self.low, np.column_stack([start, stop]).ravel()]
        rises = self.at_low + np.cumsum(counts)
        levels = np.r_[0.0, np.column_stack([rises - counts, rises]).ravel()]
        total = levels[-1]
        return np.interp(np.asarray(q, np.float64) / 100 * total, levels, knots)

    def counts_in(self, edges: np.ndarray) -> np.ndarray:
        """Counts between increasing ``edges`` (values beyond them left out), the voxels at the
        minimum left out too; a bin's count is spread evenly over the part of its width that
        lies between the extreme values.

        Parameters
        ----------
        edges : (B + 1,) ndarray

        Returns
        -------
        (B,) ndarray of float64
        """
        bins = np.flatnonzero(self.counts)
        if not len(bins):
            return np.zeros(len(edges) - 1)
        counts = self.counts[bins].astype(np.float64)
        counts[0] -= self.at_low  # the minimum lies in the first bin
        start = np.maximum(_lower_edges(bins), self.low)
        stop = _lower_edges(np.minimum(bins + 1, BINS - 1))
        stop[bins + 1 == BINS] = np.inf  # the top bin has no next bin
        stop = np.minimum(stop, self.high)
        # the cumulative count rises linearly across each bin: knots at both ends
        knots = np.column_stack([start, stop]).ravel()
        rises = np.cumsum(counts)
        levels = np.column_stack([rises - counts, rises]).ravel()
        return np.diff(np.interp(np.asarray(edges, np.float64), knots, levels))
