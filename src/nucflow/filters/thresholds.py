"""Global thresholds from histogram reductions, equal to ``skimage.filters.threshold_<method>``
on the whole array, and exact order statistics (percentiles, medians) of a dask array."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import dask
import dask.array as da
import numpy as np
import skimage.filters

from nucflow.errors import ParameterError
from nucflow.filters._checks import _as_image, _is_real, _positive

_THRESHOLDS = ("otsu", "yen", "triangle", "li", "percentile")
_BINS = 256


def _per_block(image: da.Array, func: Callable, length: int, dtype: Any) -> da.Array:
    """A 1D statistic of fixed length per block: shape ``numblocks + (length,)``."""
    ndim = image.ndim
    return da.map_blocks(
        lambda b: func(b).reshape((1,) * ndim + (length,)),
        image,
        new_axis=ndim,
        chunks=tuple((1,) * len(c) for c in image.chunks) + ((length,),),
        dtype=dtype,
        meta=np.empty((0,) * (ndim + 1), dtype),
    )


def _block_reduce(image: da.Array, func: Callable, length: int, dtype: Any) -> da.Array:
    """Sum a per-block 1D statistic of fixed length over all blocks (a tree reduction)."""
    return _per_block(image, func, length, dtype).sum(axis=tuple(range(image.ndim)))


def _int_histogram(image: da.Array, low: int, high: int) -> np.ndarray:
    """skimage's integer histogram: one bin per value in [low, high]."""
    length = high - low + 1

    def count(b: np.ndarray) -> np.ndarray:
        return np.bincount((b.astype(np.int64) - low).ravel(), minlength=length)

    return _block_reduce(image, count, length, np.int64).compute()


def _float_histogram(image: da.Array, low: Any, high: Any) -> tuple[np.ndarray, np.ndarray]:
    """``np.histogram(image, 256)``: `low`/`high` keep the image dtype so edges match."""
    edges = np.histogram(np.empty(0, image.dtype), _BINS, range=(low, high))[1]

    def count(b: np.ndarray) -> np.ndarray:
        return np.histogram(b, _BINS, range=(low, high))[0]

    counts = _block_reduce(image, count, _BINS, np.int64).compute()
    return counts, edges


def _histogram(image: da.Array, low: Any, high: Any) -> tuple[np.ndarray, np.ndarray]:
    """skimage's ``histogram(image, 256, source_range="image")``: counts and bin centres."""
    if image.dtype.kind in "iu":
        counts = _int_histogram(image, int(low), int(high))
        return counts, np.arange(int(low), int(high) + 1)
    counts, edges = _float_histogram(image, low, high)
    return counts, (edges[:-1] + edges[1:]) / 2.0


def threshold(
    image: da.Array,
    method: str = "otsu",
    *,
    value_range: tuple[Any, Any] | None = None,
    **kwargs: Any,
) -> float:
    """Global threshold, equal to ``skimage.filters.threshold_<method>`` on the whole array.

    Parameters
    ----------
    image : (M, N[, P]) dask array
        Integer or float image (no NaN).
    method : {"otsu", "yen", "triangle", "li", "percentile"}, optional
        otsu/yen/triangle: from one min/max pass and one histogram pass that reproduces
        skimage's (one bin per integer value; ``np.histogram`` with 256 bins on [min, max]
        for floats), so the result is exact. li: integer images reproduce skimage's
        histogram iteration exactly; float images iterate with one dask reduction per step
        and stop at ``tolerance`` (kwarg; default ``(max - min) * 2**-20`` instead of
        skimage's half the smallest gap between values), so they agree within about that
        tolerance. percentile: ``np.percentile(image, percentile)`` (kwarg ``percentile=``,
        in [0, 100]) from exact order statistics (histogram refinement, then only the
        values in one narrow bin are gathered).
    value_range : (low, high), optional
        The image's minimum and maximum when already known (e.g. computed while the image
        was written): saves the min/max pass. Must be exact, or the result is not.
    **kwargs
        ``percentile`` for ``"percentile"``; ``tolerance`` for ``"li"``.

    Returns
    -------
    value : float
        A constant image returns its value.
    """
    image = _as_image(image)
    if method not in _THRESHOLDS:
        raise ParameterError(f"`method` must be one of {_THRESHOLDS}, got {method!r}")
    allowed = {"percentile": {"percentile"}, "li": {"tolerance"}}.get(method, set())
    if set(kwargs) - allowed:
        raise ParameterError(
            f"threshold method {method!r} accepts keywords {sorted(allowed)}, got {sorted(kwargs)}"
        )
    if method == "percentile":
        percentile = kwargs.get("percentile")
        if percentile is None or not _is_real(percentile) or not 0 <= percentile <= 100:
            raise ParameterError(f"`percentile` must be a number in [0, 100], got {percentile!r}")
    if value_range is None:
        low, high = dask.compute(image.min(), image.max())
    else:
        low, high = np.asarray(value_range, dtype=image.dtype)
    if low == high:
        return float(low)
    if method == "percentile":
        return _percentile(image, float(kwargs["percentile"]), low, high)
    if method == "li":
        return _li(image, low, high, kwargs.get("tolerance"))
    counts, centers = _histogram(image, low, high)
    if method == "triangle":
        return float(_triangle(counts, centers))
    func = getattr(skimage.filters, f"threshold_{method}")
    # skimage casts image-derived counts to float32; do the same so results match bit for bit.
    return float(func(hist=(counts.astype(np.float32), centers)))


def _triangle(hist: np.ndarray, bin_centers: np.ndarray) -> Any:
    """skimage 0.26 ``threshold_triangle`` body, which has no ``hist=`` argument."""
    nbins = len(hist)
    arg_peak_height = np.argmax(hist)
    peak_height = hist[arg_peak_height]
    arg_low_level, arg_high_level = np.flatnonzero(hist)[[0, -1]]
    flip = arg_peak_height - arg_low_level < arg_high_level - arg_peak_height
    if flip:
        hist = hist[::-1]
        arg_low_level = nbins - arg_high_level - 1
        arg_peak_height = nbins - arg_peak_height - 1
    width = arg_peak_height - arg_low_level
    x1 = np.arange(width)
    y1 = hist[x1 + arg_low_level]
    norm = np.sqrt(peak_height**2 + width**2)
    peak_height = peak_height / norm
    width = width / norm
    length = peak_height * x1 - width * y1
    arg_level = np.argmax(length) + arg_low_level
    if flip:
        arg_level = nbins - arg_level - 1
    return bin_centers[arg_level]


def _li(image: da.Array, low: Any, high: Any, tolerance: Any) -> float:
    if tolerance is not None:
        tolerance = _positive(tolerance, "tolerance")
    if image.dtype.kind in "iu":
        return _li_integer(image, int(low), int(high), tolerance)
    return _li_float(image, low, high, tolerance)


def _li_integer(image: da.Array, low: int, high: int, tolerance: float | None) -> float:
    """skimage's integer branch, on the shifted bincount histogram (exact)."""
    counts = _int_histogram(image, low, high)
    centers = np.arange(high - low + 1)
    hist = counts.astype(np.float32)
    tolerance = tolerance or 0.5
    # np.mean of the shifted integer image: an exact integer sum divided by the count.
    t_next = float(np.dot(counts, centers)) / counts.sum()
    t_curr = -2 * tolerance
    while abs(t_next - t_curr) > tolerance:
        t_curr = t_next
        fore = centers > t_curr
        mean_fore = np.average(centers[fore], weights=hist[fore])
        mean_back = np.average(centers[~fore], weights=hist[~fore])
        if mean_back == 0:
            break
        t_next = (mean_back - mean_fore) / (np.log(mean_back) - np.log(mean_fore))
    return float(t_next + low)


def _li_sums(block: np.ndarray, *, low: float, t: float) -> np.ndarray:
    values = block.astype(np.float64) - low
    fore = values > t
    return np.array([values[fore].sum(), fore.sum(), values[~fore].sum(), (~fore).sum()])


def _li_float(image: da.Array, low: Any, high: Any, tolerance: float | None) -> float:
    """skimage's float branch with one dask reduction per iteration (at most 200)."""
    low, span = float(low), float(high) - float(low)
    tolerance = tolerance or span * 2.0**-20
    t_next = float((image.astype(np.float64) - low).mean().compute())
    t_curr = -2 * tolerance
    for _ in range(200):
        if abs(t_next - t_curr) <= tolerance:
            break
        t_curr = t_next
        sums = _block_reduce(image, partial(_li_sums, low=low, t=t_curr), 4, np.float64)
        fore_sum, fore_n, back_sum, back_n = sums.compute()
        mean_fore, mean_back = fore_sum / fore_n, back_sum / back_n
        if mean_back == 0.0:
            break
        t_next = (mean_back - mean_fore) / (np.log(mean_back) - np.log(mean_fore))
    return float(t_next + low)


def _percentile(image: da.Array, percentile: float, low: Any, high: Any) -> float:
    """``np.percentile`` (linear) from the two order statistics around its virtual index."""
    n = image.size
    index = (n - 1) * np.true_divide(percentile, 100)  # numpy's "linear" virtual index
    below = math.floor(index)
    above = min(below + 1, n - 1)
    if image.dtype.kind in "iu":
        cumulative = np.cumsum(_int_histogram(image, int(low), int(high)))
        a, b = (int(low) + np.searchsorted(cumulative, k, side="right") for k in (below, above))
        pair = np.array([a, b], image.dtype)
    else:
        pair = np.array(
            _order_pair(image, below, low, high)
            if above > below
            else [_order_statistic(image, below, low, high)] * 2
        )
    # np.quantile on the two neighbours with weight `gamma` repeats numpy's own lerp.
    # gamma as a Python float: numpy then keeps the image's float dtype, as np.percentile does.
    return float(np.quantile(pair, float(index - below)))


def _interval_counts(block: np.ndarray, *, edges: np.ndarray, closed: bool) -> np.ndarray:
    """Counts per bin [e_j, e_j+1) inside [e_0, e_-1) (or ] if closed), plus min and max."""
    values = block.ravel()
    inside = (values >= edges[0]) & ((values <= edges[-1]) if closed else (values < edges[-1]))
    values = values[inside]
    bins = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    counts = np.bincount(bins, minlength=len(edges) - 1).astype(np.float64)
    lo, hi = (values.min(), values.max()) if values.size else (np.inf, -np.inf)
    return np.concatenate([counts, [-lo, hi]])  # negate min so a sum-reduction can't merge it


def _order_statistic(image: da.Array, k: int, low: Any, high: Any) -> Any:
    """The k-th smallest value (0-based) of `image`, whose values lie in [low, high]."""
    return _order_statistics(image, k, low, high)[0]


def _order_pair(image: da.Array, k: int, low: Any, high: Any) -> tuple[Any, Any]:
    """The k-th and (k+1)-th smallest values: the second mostly comes from the bin gathered
    for the first; when the first ends its bin, one more pass finds the second."""
    values = _order_statistics(image, k, low, high)
    if len(values) == 2:
        return values[0], values[1]
    first = values[0]
    at_most, larger = dask.compute(
        (image <= first).sum(), da.where(image > first, image, np.inf).min()
    )
    return first, first if at_most >= k + 2 else image.dtype.type(larger)


def _order_statistics(image: da.Array, k: int, low: Any, high: Any, limit: int = 1 << 20) -> list:
    """The k-th smallest value and, when it is in the same final bin, the (k+1)-th: refine a
    256-bin histogram until the bin holding the k-th is small, then gather and sort that bin."""
    lo, hi, closed, before = float(low), float(high), True, 0
    for _ in range(16):
        edges = np.linspace(lo, hi, _BINS + 1)
        count = partial(_interval_counts, edges=edges, closed=closed)
        stats = _per_block(image, count, _BINS + 2, np.float64)
        axes = tuple(range(image.ndim))
        counts, vmin, vmax = dask.compute(
            stats[..., :_BINS].sum(axis=axes),
            -stats[..., _BINS].max(axis=axes),
            stats[..., _BINS + 1].max(axis=axes),
        )
        if vmin == vmax:
            return [image.dtype.type(vmin)]
        cumulative = before + np.cumsum(counts)
        j = int(np.searchsorted(cumulative, k, side="right"))
        before = int(cumulative[j - 1]) if j else before
        closed = closed and j == _BINS - 1
        lo, hi = edges[j], edges[j + 1]
        if counts[j] <= limit:
            break
    inside = (image >= lo) & ((image <= hi) if closed else (image < hi))
    values = np.sort(image[inside].compute())
    return list(values[k - before : k - before + 2])
