"""Locally adaptive foreground detection: every nucleus measured against its own brightness.

A single global threshold drops the dim third of a real light-sheet volume (stain uptake, cell
cycle, depth attenuation, uneven illumination). Here each nucleus decides its own extent, with
rules that depend only on a bounded neighbourhood, so a block read with :meth:`DetectParams.halo`
gives its core exactly the mask the whole stack would:

1. **Blob response.** ``R = -s² ∇²(G_s * P)``, the scale-normalized Laplacian of Gaussian of the
   preprocessed image ``P`` in physical units (central differences of the Gaussian), with
   ``s = blob_radius / √ndim`` (the scale at which a ball of that radius responds most). It is
   large at the centre of a bright blob whatever its absolute brightness, and near zero on
   smooth background.
2. **Seeds.** A voxel is a seed when ``R`` is the maximum of the box of half-width
   ``peak_radius`` around it and ``R >= snr * noise * gain``, ``noise`` being the background
   noise of ``P`` estimated once for the whole stack (:func:`noise_level`) and ``gain`` how much
   more (or less) noise ``R`` carries at that voxel than deep inside the stack: near a face the
   Gaussians mirror the image, so they average fewer independent voxels and ``R`` is noisier
   there (about 1.35x on the face itself; :func:`noise_gain`). Ties need no rule: every tied
   voxel is a seed and their regions are united.
3. **Extent.** Each seed claims the voxels connected to it, within ``max_radius`` of it, whose
   ``P`` is at least ``fraction`` of ``P`` at the seed (``P`` is background-subtracted, so this
   is a fraction of the nucleus' own contrast: its half-maximum outline with the default 0.5).
4. **Foreground** is the union of all claims at least ``blob_radius`` thick along every axis
   (a sheet is not a nucleus: see :func:`_thick`); hole filling, small-object removal and the
   seam-free splitting of touching nuclei (:mod:`nucflow.segment`) follow as with a threshold.

A voxel depends on seeds within ``max_radius``; a seed on ``R`` within ``peak_radius``; ``R``
on ``P`` within the Gaussian's reach; a claim on ``P`` within ``max_radius`` of its seed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nucflow.blockpass import padded
from nucflow.components import label
from nucflow.errors import ParameterError
from nucflow.filters.local import gaussian_filter1d
from nucflow.segment import box_maxima, whole_voxels, within_voxels

__all__ = [
    "DetectParams",
    "blob_response",
    "foreground",
    "least_gain",
    "noise_gain",
    "noise_level",
    "seeds",
]

_TRUNCATE = 4.0  # Gaussian reach of the blob response, in standard deviations


@dataclass(frozen=True)
class DetectParams:
    """Parameters of the local detection; lengths in µm.

    Parameters
    ----------
    voxel_size : tuple of float
        Voxel size per spatial axis.
    blob_radius : float
        Radius of the smallest nuclei to find; sets the scale of the blob response.
    peak_radius : float
        Half-width of the box in which a seed must be the largest blob response.
    max_radius : float
        Largest distance from a seed to a voxel it claims.
    snr : float
        A seed's blob response must be at least this many times ``noise``.
    fraction : float
        A seed claims the voxels at least this fraction of its own brightness.
    noise : float
        Standard deviation of the background noise of the preprocessed image (whole stack).
    stack_shape : tuple of int, optional
        The stack's shape: along an axis thinner than ``blob_radius`` (a single slice), a claim
        need only span the stack; with it, the seed threshold follows the noise gain near the
        stack's faces (:func:`noise_gain`).
    smoothing : tuple of float, optional
        Standard deviation per axis, in voxels, of the Gaussian that preprocessing applied
        (its noise is correlated accordingly); empty: none.
    """

    voxel_size: tuple[float, ...]
    blob_radius: float
    peak_radius: float
    max_radius: float
    snr: float
    fraction: float
    noise: float
    stack_shape: tuple[int, ...] | None = None
    smoothing: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("blob_radius", "peak_radius", "max_radius", "snr"):
            if not getattr(self, name) > 0:
                raise ParameterError(f"`{name}` must be > 0, got {getattr(self, name)}")
        if not 0 < self.fraction < 1:
            raise ParameterError(f"`detect.fraction` must be in (0, 1), got {self.fraction}")

    @property
    def scale(self) -> tuple[float, ...]:
        """Standard deviation of the blob response's Gaussian per axis, in voxels."""
        sigma = self.blob_radius / math.sqrt(len(self.voxel_size))
        return tuple(sigma / v for v in self.voxel_size)

    def voxels(self, length_um: float) -> tuple[int, ...]:
        """A length in µm as a whole number of voxels per axis (at least 1)."""
        return whole_voxels(length_um, self.voxel_size)

    def halo(self) -> tuple[int, ...]:
        """Context per axis, in voxels, that makes a block's core exact (see the module doc)."""
        # scipy's Gaussian kernel radius, and one voxel for the central differences
        response = tuple(int(_TRUNCATE * s + 0.5) + 1 for s in self.scale)
        reach = self.voxels(self.max_radius)
        peak = self.voxels(self.peak_radius)
        return tuple(max(2 * m, m + p + r) for m, p, r in zip(reach, peak, response, strict=True))


def blob_response(
    image: np.ndarray, params: DetectParams, region: tuple[slice, ...] | None = None
) -> np.ndarray:
    """Scale-normalized negative Laplacian of Gaussian, in physical units (float32).

    The Gaussian is scipy's; the Laplacian of it is taken by central differences (one
    Gaussian instead of one per axis: a third of the cost, and the same blobs).

    Parameters
    ----------
    image : (M, N[, P]) ndarray
    params : DetectParams
    region : tuple of slice, optional
        Where the response is wanted (default: everywhere). Each Gaussian pass then runs only
        on the lines the later passes and the differences need: the values are the same.

    Returns
    -------
    ndarray of float32
        Shaped like ``image[region]``. Positive at bright blobs; equal, away from a block's
        edges, to the whole-array result.
    """
    data = np.asarray(image, np.float32)
    ndim = data.ndim
    region = tuple(slice(0, n) for n in data.shape) if region is None else region
    ext = padded(region, (1,) * ndim, data.shape)  # the differences' neighbours
    smooth = _gaussian_within(data, params.scale, ext)
    # Beyond the image's faces scipy's mode="reflect" repeats the edge voxel: pad where ext
    # was clipped, so ``smooth`` is ``region`` grown by one voxel on every side.
    pad = [
        (1 - (r.start - e.start), 1 - (e.stop - r.stop)) for r, e in zip(region, ext, strict=True)
    ]
    if any(a or b for a, b in pad):
        smooth = np.pad(smooth, pad, mode="symmetric")
    inner = (slice(1, -1),) * ndim
    twice = smooth[inner] * np.float32(2)
    sigma_um2 = (params.blob_radius / math.sqrt(ndim)) ** 2
    total = np.zeros(twice.shape, np.float32)
    for axis, voxel in enumerate(params.voxel_size):
        before, after = list(inner), list(inner)
        before[axis], after[axis] = slice(0, -2), slice(2, None)
        second = smooth[tuple(before)] + smooth[tuple(after)]  # float32 in place: 3x faster
        second -= twice  # than scipy's correlate1d, which works in float64
        second *= np.float32(sigma_um2 / voxel**2)
        total += second
    return np.negative(total, out=total)


def _gaussian_within(
    data: np.ndarray, sigma: tuple[float, ...], keep: tuple[slice, ...]
) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(data, sigma, mode="reflect")[keep]`` (float32): the same
    1-D passes in the same order, each axis cut to ``keep`` once it is filtered."""
    out = data
    for axis, s in enumerate(sigma):
        out = gaussian_filter1d(out, s, axis, truncate=_TRUNCATE)
        cut = [slice(None)] * data.ndim
        cut[axis] = keep[axis]
        out = out[tuple(cut)]
    return out


def seeds(
    response: np.ndarray,
    params: DetectParams,
    region: tuple[slice, ...],
    *,
    origin: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Seeds within ``region``: box maxima of the blob response above ``snr * noise * gain``.

    Parameters
    ----------
    response : ndarray
        :func:`blob_response` of a block (with context).
    params : DetectParams
    region : tuple of slice
        Where to look, in ``response``.
    origin : tuple of int, optional
        Where ``response`` starts in the stack; with ``params.stack_shape`` the threshold
        follows :func:`noise_gain` there (without: gain 1 everywhere).

    Returns
    -------
    (K, ndim) ndarray of int64
        Coordinates in ``response``.
    """
    half = within_voxels(params.peak_radius, params.voxel_size)  # never beyond peak_radius
    inner = response[region]
    level = params.snr * params.noise
    if origin is None or params.stack_shape is None:
        return box_maxima(response, region, half, inner >= level)
    # A seed needs R >= level * gain at its position, so at least level * the least gain:
    # a candidate test that leaves the blobs and not the noise's maxima. The gain is then
    # evaluated at the box maxima only.
    found = box_maxima(response, region, half, inner >= level * least_gain(params))
    gain = noise_gain(params, found + np.array(origin))
    return found[response[tuple(found.T)] >= level * gain]


def noise_gain(params: DetectParams, positions: np.ndarray) -> np.ndarray:
    """How many times the blob response's noise at ``positions`` exceeds its noise deep inside.

    White noise passed through the preprocessing Gaussian (``params.smoothing``), the
    response's Gaussian and its second differences, each mirroring the image at the stack's
    faces (scipy's ``reflect``), is noisier near a face: the mirrored kernel counts some voxels
    twice. Along each axis these filters are matrices ``G`` (the Gaussians) and ``D`` (second
    differences after them); ``R = sum_a c_a (D along a, G along the others)``, so the variance
    of ``R`` at a voxel is ``sum_a sum_b c_a c_b prod_k <X_ak, X_bk>``, the inner products of
    the matrices' rows at the voxel's position on each axis. They depend on the distance to
    the faces only, so one short line per axis holds all of them.

    Parameters
    ----------
    params : DetectParams
        With ``stack_shape``.
    positions : (K, ndim) ndarray of int
        Stack coordinates.

    Returns
    -------
    (K,) ndarray of float64
        Standard deviation relative to the stack's interior (1 far from every face).
    """
    lines = _lines(params)
    at = [line.index(np.asarray(positions)[:, k]) for k, line in enumerate(lines)]
    return _gain(params, lines, at)


@functools.lru_cache(maxsize=8)
def least_gain(params: DetectParams) -> float:
    """The smallest :func:`noise_gain` anywhere in the stack (params with ``stack_shape``).

    Every stack position maps to a position on each axis' line and every line position is
    some stack position's, so this is the minimum over all combinations of line positions,
    each computed as :func:`noise_gain` computes it (the same values, bit for bit).
    """
    lines = _lines(params)
    grids = np.meshgrid(*[np.arange(len(line.products[0])) for line in lines], indexing="ij")
    return float(_gain(params, lines, [grid.ravel() for grid in grids]).min())


def _lines(params: DetectParams) -> list[_Line]:
    assert params.stack_shape is not None
    smoothing = params.smoothing or (0.0,) * len(params.scale)
    return [
        _Line.of(n, pre, scale)
        for n, pre, scale in zip(params.stack_shape, smoothing, params.scale, strict=True)
    ]


def _gain(params: DetectParams, lines: list[_Line], at: list[np.ndarray]) -> np.ndarray:
    """Noise gain at positions on the axes' lines (``at``: one index array per axis)."""
    weights = [params.blob_radius**2 / len(params.voxel_size) / v**2 for v in params.voxel_size]
    deep = [np.array([line.middle]) for line in lines]
    return np.sqrt(_variance(lines, at, weights) / _variance(lines, deep, weights))


def _variance(lines: list[_Line], at: list[np.ndarray], weights: list[float]) -> np.ndarray:
    total = np.zeros(len(at[0]))
    for a, wa in enumerate(weights):
        for b, wb in enumerate(weights):
            term = np.full(len(at[0]), wa * wb)
            for k, (line, i) in enumerate(zip(lines, at, strict=True)):
                term *= line.products[(k == a) + (k == b)][i]
            total += term
    return total


@dataclass(frozen=True)
class _Line:
    """Row inner products of one axis' filters: ``products[j]`` holds ``<G,G>``, ``<G,D>``,
    ``<D,D>`` for ``j`` = 0, 1, 2 second differences, on a line long enough for the kernels
    near both faces to be seen, with one interior position in the middle."""

    length: int  # the axis' length in the stack
    middle: int
    products: tuple[np.ndarray, np.ndarray, np.ndarray]

    @staticmethod
    @functools.lru_cache(maxsize=32)
    def of(length: int, smoothing: float, scale: float) -> _Line:
        reach = sum(int(_TRUNCATE * s + 0.5) for s in (smoothing, scale)) + 2
        size = min(length, 2 * reach + 1)
        rows = np.eye(size)
        if smoothing > 0:
            rows = ndimage.gaussian_filter1d(rows, smoothing, axis=0, truncate=_TRUNCATE)
        smooth = ndimage.gaussian_filter1d(rows, scale, axis=0, truncate=_TRUNCATE)
        second = ndimage.correlate1d(smooth, [1.0, -2.0, 1.0], axis=0, mode="reflect")
        products = (
            (smooth * smooth).sum(axis=1),
            (smooth * second).sum(axis=1),
            (second * second).sum(axis=1),
        )
        return _Line(length, size // 2, products)

    def index(self, position: np.ndarray) -> np.ndarray:
        """Stack positions on this axis as positions on the line (the interior: its middle)."""
        size = len(self.products[0])
        from_end = self.length - position
        return np.where(
            position < self.middle,
            position,
            np.where(from_end <= size - self.middle - 1, size - from_end, self.middle),
        )


def foreground(
    image: np.ndarray,
    params: DetectParams,
    core: tuple[slice, ...],
    *,
    origin: tuple[int, ...] | None = None,
) -> np.ndarray:
    """The foreground of ``core`` within a padded block of the preprocessed image.

    Parameters
    ----------
    image : (M, N[, P]) ndarray
        The block with :meth:`DetectParams.halo` of context (clipped at the stack's border).
    params : DetectParams
    core : tuple of slice
        The block's core within ``image``.
    origin : tuple of int, optional
        Where ``image`` starts in the stack (see :func:`seeds`).

    Returns
    -------
    ndarray of bool
        Shaped like the core.
    """
    data = np.asarray(image, np.float32)
    reach = np.array(params.voxels(params.max_radius))
    near = padded(core, tuple(reach), data.shape)
    start = np.array([c.start for c in core])
    stop = np.array([c.stop for c in core])
    mask = np.zeros(tuple(stop - start), bool)
    offsets = _ball(params)
    # The response is needed where seeds may be (near) and in their boxes.
    around = padded(near, params.voxels(params.peak_radius), data.shape)
    corner = np.array([a.start for a in around])
    response = blob_response(data, params, around)
    at = None if origin is None else tuple(int(o) for o in np.add(origin, corner))
    for seed in seeds(response, params, _shifted(near, -corner), origin=at) + corner:
        if not data[tuple(seed)] > 0:  # a blob below the background has no contrast to share
            continue
        lo, hi = seed - reach, seed + reach + 1
        cut_lo, cut_hi = np.maximum(lo, start), np.minimum(hi, stop)
        if np.any(cut_hi <= cut_lo):
            continue
        claim = _claim(data, seed, lo, hi, offsets, params.fraction)
        if not _thick(claim, params):
            continue
        inner = tuple(slice(a, b) for a, b in zip(cut_lo - lo, cut_hi - lo, strict=True))
        out = tuple(slice(a, b) for a, b in zip(cut_lo - start, cut_hi - start, strict=True))
        mask[out] |= claim[inner]
    return mask


def _shifted(region: tuple[slice, ...], by: np.ndarray) -> tuple[slice, ...]:
    return tuple(slice(r.start + b, r.stop + b) for r, b in zip(region, by, strict=True))


def _ball(params: DetectParams) -> np.ndarray:
    """Offsets within ``max_radius`` of the centre of a (2r+1)-box, as a bool array."""
    reach = params.voxels(params.max_radius)
    axes = [
        ((np.arange(2 * r + 1) - r) * v) ** 2 for r, v in zip(reach, params.voxel_size, strict=True)
    ]
    squared = np.zeros(tuple(len(a) for a in axes))
    for grid in np.ix_(*axes):
        squared = squared + grid
    return np.asarray(squared <= params.max_radius**2)


def _claim(data, seed, lo, hi, ball, fraction) -> np.ndarray:
    """Voxels of the box [lo, hi) connected to ``seed`` at >= fraction of its brightness."""
    clipped_lo = np.maximum(lo, 0)
    clipped_hi = np.minimum(hi, data.shape)
    box = tuple(slice(a, b) for a, b in zip(clipped_lo, clipped_hi, strict=True))
    inner = tuple(slice(a, b) for a, b in zip(clipped_lo - lo, clipped_hi - lo, strict=True))
    in_ball = ball[inner]
    level = fraction * float(data[tuple(seed)])  # > 0: seeds have a positive response
    allowed = (data[box] >= level) & in_ball
    components, _ = label(allowed)
    claim = np.zeros(tuple(hi - lo), bool)
    own = components[tuple(seed - clipped_lo)]
    claim[inner] = components == own
    return claim


def _thick(claim: np.ndarray, params: DetectParams) -> bool:
    """Does the claim reach ``blob_radius`` (half the smallest nucleus) along every axis (or
    span the stack, where it is thinner)?

    A sheet is not a nucleus: at a stack's top and bottom faces the background estimate
    lags a steep gradient (an opening sees only one side), leaving a thin bright layer whose
    noise would otherwise seed claims one or two slices thick.
    """
    for axis, voxel in enumerate(params.voxel_size):
        others = tuple(a for a in range(claim.ndim) if a != axis)
        need = params.blob_radius
        if params.stack_shape is not None:
            need = min(need, params.stack_shape[axis] * voxel)
        if np.count_nonzero(claim.any(axis=others)) * voxel < need:
            return False
    return True


def noise_level(counts: np.ndarray, edges: np.ndarray) -> float:
    """Background noise of an image from its histogram: the spread below the histogram's mode.

    The voxels darker than the most common value are background only (nuclei are brighter),
    so their root-mean-square distance to the mode is the noise whatever the share of nuclei.
    The mode is found on the histogram smoothed by a quarter of the spread found before
    (a fine histogram's highest bin is a matter of chance), three times over.

    Parameters
    ----------
    counts : (B,) ndarray
        Histogram counts of the whole stack.
    edges : (B + 1,) ndarray
        Bin edges (equal widths).

    Returns
    -------
    float
        The noise's standard deviation (at least the width of one bin).
    """
    centres = 0.5 * (edges[:-1] + edges[1:])
    width = float(edges[1] - edges[0])
    counts = np.asarray(counts, float)
    spread = width
    for _ in range(3):
        smoothed = ndimage.gaussian_filter1d(counts, spread / width / 4, mode="constant")
        mode = int(np.argmax(smoothed))
        below = counts[:mode]
        if below.sum() == 0:
            return spread
        squares = np.sum(below * (centres[:mode] - centres[mode]) ** 2) / below.sum()
        spread = max(float(np.sqrt(squares)), width)
    return spread
