"""Edge-preserving denoisers for seeds: non-local means and the bilateral filter, seam-exact.

Both weigh neighbours by how similar their intensities are, so each needs an intensity scale:
the noise level and cut-off of non-local means (``sigma``, ``h``), the colour sigma of the
bilateral filter. These are whole-stack numbers: given, or computed ONCE by a dask reduction
over the whole input (:func:`noise_sigma`, the standard deviation), never per block, so the
result equals the whole-array call with those same numbers on every chunking.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import skimage.restoration

from nucflow.errors import ParameterError
from nucflow.filters._checks import _as_image, _per_axis, _positive
from nucflow.filters.overlap import _filter, _grow_chunks
from nucflow.filters.steps import StepKind, register
from nucflow.filters.thresholds import _order_pair, _order_statistic

# Daubechies-2 high-pass decomposition filter, the values of PyWavelets' Wavelet("db2").dec_hi
# (the wavelet skimage.restoration.estimate_sigma uses; a test compares them).
_DB2_HIGH = (-0.48296291314453416, 0.8365163037378079, -0.2241438680420134, -0.12940952255126037)
# skimage's starting point for the fast non-local means when sigma is given: h = 0.8 * sigma.
_H_PER_SIGMA = 0.8
# Edge modes (scipy names) -> numpy.pad modes.
_PAD_MODES: dict[str, Literal["symmetric", "reflect", "edge", "constant"]] = {
    "reflect": "symmetric",
    "mirror": "reflect",
    "nearest": "edge",
    "constant": "constant",
}


# --------------------------------------------------------------------------- noise level


def noise_sigma(image: da.Array) -> float:
    """Noise standard deviation of the whole stack, one estimate for all blocks.

    Equal to ``skimage.restoration.estimate_sigma(image.astype(float64))`` on the whole
    array (Donoho's robust wavelet estimator): the median absolute value of the non-zero
    finest diagonal detail coefficients of a db2 wavelet transform (symmetric edges),
    divided by ``Φ⁻¹(0.75) ≈ 0.6745``.

    Parameters
    ----------
    image : (M, N[, P]) dask array
        Integer or float image.

    Returns
    -------
    sigma : float
        In the image's intensity units; 0 when every coefficient is 0 (an all-zero image).

    Notes
    -----
    The coefficients are computed lazily (a symmetric pad and strided sums per axis, in
    PyWavelets' order of operations) and their median comes from exact order statistics
    (histogram refinement, then only the values of one narrow bin are gathered): a few
    passes over the stack, never the stack in memory.
    """
    magnitude = abs(_detail_coefficients(_as_image(image).astype(np.float64)))
    zeros, low, high = dask.compute((magnitude == 0).sum(), magnitude.min(), magnitude.max())
    count = magnitude.size - int(zeros)
    if count == 0:
        return 0.0
    # Zeros are the smallest magnitudes: the k-th non-zero one is the (zeros + k)-th of all.
    first = int(zeros) + (count - 1) // 2
    if count % 2:
        middle = [_order_statistic(magnitude, first, low, high)]
    else:
        middle = list(_order_pair(magnitude, first, low, high))
    return float(np.median(np.array(middle, np.float64)) / _NORMAL_Q3)


# The normal distribution's upper quartile (== scipy.stats.norm.ppf(0.75); scipy.stats costs
# 0.4 s to import, paid by every run and worker).
_NORMAL_Q3 = statistics.NormalDist().inv_cdf(0.75)


def _detail_coefficients(image: da.Array) -> da.Array:
    """``pywt.dwtn(image, "db2", mode="symmetric")["d" * ndim]`` as a lazy dask array."""
    for axis in range(image.ndim):
        image = _high_pass(image, axis)
    return image


def _high_pass(image: da.Array, axis: int) -> da.Array:
    """One axis of the db2 detail transform: filter, keep every second coefficient."""
    size = (image.shape[axis] + 3) // 2  # PyWavelets' output length for a 4-tap filter
    pad = [(3, 3) if a == axis else (0, 0) for a in range(image.ndim)]
    extended = da.pad(image, pad, mode="symmetric")
    chunks = list(extended.chunks)
    chunks[axis] = _grow_chunks(chunks[axis], 3)
    filtered = extended.rechunk(tuple(chunks)).map_overlap(
        _filter_backwards,
        depth={a: 3 if a == axis else 0 for a in range(image.ndim)},
        boundary="none",
        trim=True,
        axis=axis,
        dtype=image.dtype,
        meta=np.empty((0,) * image.ndim, image.dtype),
    )
    # Coefficient k is sum_j dec_hi[j] * x[2k + 1 - j], i.e. `extended` index 2k + 4 - j.
    where = [slice(None)] * image.ndim
    where[axis] = slice(4, 4 + 2 * size - 1, 2)
    return filtered[tuple(where)]


def _filter_backwards(block: np.ndarray, *, axis: int) -> np.ndarray:
    """``out[i] = sum_j dec_hi[j] * block[i - j]`` along `axis`, summed in PyWavelets' order
    so that the rounding matches; the first 3 entries (no full window) are never used."""
    block = np.moveaxis(block, axis, 0)
    out = np.zeros_like(block)
    n = len(block)
    out[3:] = _DB2_HIGH[0] * block[3:]
    for j in range(1, 4):
        out[3:] += _DB2_HIGH[j] * block[3 - j : n - j]
    return np.moveaxis(out, 0, axis)


# --------------------------------------------------------------------------- non-local means


def _check_nl_means(
    ndim: int,
    patch_size: int = 5,
    patch_distance: int = 6,
    h: float | None = None,
    sigma: float | None = None,
    fast_mode: bool = True,
) -> dict:
    for name, value in (("patch_size", patch_size), ("patch_distance", patch_distance)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ParameterError(f"`{name}` must be an integer >= 1 (voxels), got {value!r}")
    if not isinstance(fast_mode, bool):
        raise ParameterError(f"`fast_mode` must be true or false, got {fast_mode!r}")
    if sigma is not None and sigma != 0:
        sigma = _positive(sigma, "sigma")
    return {
        "patch_size": int(patch_size),
        "patch_distance": int(patch_distance),
        "h": None if h is None else _positive(h, "h"),
        "sigma": None if sigma is None else float(sigma),
        "fast_mode": fast_mode,
    }


def _depth_nl_means(patch_size: int, patch_distance: int, **_: Any) -> tuple[int, ...]:
    # A voxel averages voxels up to patch_distance away, compared by patches reaching
    # patch_size // 2 further (an even patch_size is made odd by skimage: same half-width).
    return (patch_distance + patch_size // 2,)


def _resolve_nl_means(image: da.Array, params: dict) -> dict:
    sigma = params["sigma"] if params["sigma"] is not None else noise_sigma(image)
    h = params["h"] if params["h"] is not None else _H_PER_SIGMA * sigma
    if not h > 0:
        raise ParameterError(
            "`h` must be given: the image has no measurable noise (estimated sigma 0)"
        )
    return {**params, "sigma": sigma, "h": h}


def _block_nl_means(
    block: np.ndarray,
    *,
    patch_size: int,
    patch_distance: int,
    h: float,
    sigma: float,
    fast_mode: bool,
) -> np.ndarray:
    out = skimage.restoration.denoise_nl_means(
        block,
        patch_size=patch_size,
        patch_distance=patch_distance,
        h=h,
        fast_mode=fast_mode,
        sigma=sigma,
        preserve_range=True,
    )
    # skimage's kernels squeeze every axis of length 1 out of the result (a (1, 1, 1) block
    # comes back 0-d, a (1, Y, X) one 2D): give the block its own shape back, so that a step
    # after this one, and the engine's 1-voxel dtype trial, see the axes they were given.
    return out.reshape(block.shape).astype(np.float32, copy=False)


def nl_means(
    image: da.Array,
    *,
    patch_size: int = 5,
    patch_distance: int = 6,
    h: float | None = None,
    sigma: float | None = None,
    fast_mode: bool = True,
) -> da.Array:
    """Non-local means, equal to ``skimage.restoration.denoise_nl_means`` on the whole array.

    Equal to ``denoise_nl_means(image, patch_size, patch_distance, h, fast_mode, sigma,
    preserve_range=True).astype(float32)`` with the same ``sigma`` and ``h``, on any chunking
    (within float rounding: the fast mode sums squared differences in running integral images
    whose rounding depends on where the array starts).

    Parameters
    ----------
    image : (M, N[, P]) dask array
        Integer or float image; intensities keep their units (``preserve_range=True``).
    patch_size : int, optional
        Edge of the compared patches, voxels.
    patch_distance : int, optional
        Largest offset, voxels, of the patches averaged. The halo is
        ``patch_distance + patch_size // 2``.
    h : float, optional
        Cut-off distance in intensity units. Default ``0.8 * sigma`` (skimage's suggested
        start for the fast mode with a known ``sigma``).
    sigma : float, optional
        Noise standard deviation, intensity units, subtracted from the patch distances.
        Default :func:`noise_sigma` of the whole image, computed once before the pass;
        0 disables the subtraction (skimage's default).
    fast_mode : bool, optional
        skimage's fast algorithm (box patches, cost ~ ``patch_distance ** ndim`` per voxel)
        or the original one (Gaussian-weighted patches, cost also ~ ``patch_size ** ndim``).

    Returns
    -------
    out : (M, N[, P]) dask array of float32

    Notes
    -----
    scikit-image's 3D non-local means treats the axes alike: patches are cubes of
    ``patch_size`` voxels and the search window a cube of ``2 * patch_distance + 1`` voxels,
    whatever the voxel size. On an anisotropic stack (e.g. 2 x 0.5 x 0.5 µm) a patch then
    spans 4 times more µm along z than along y and x; choose ``patch_size`` for the coarse
    axis, or resample to isotropic voxels first.
    """
    return _filter(
        "nl_means",
        image,
        patch_size=patch_size,
        patch_distance=patch_distance,
        h=h,
        sigma=sigma,
        fast_mode=fast_mode,
    )


# --------------------------------------------------------------------------- bilateral


def _check_bilateral(
    ndim: int,
    sigma_spatial: float | Sequence[float] = 1.0,
    sigma_color: float | None = None,
    *,
    truncate: float = 3.0,
    mode: str = "reflect",
) -> dict:
    if mode not in _PAD_MODES:
        raise ParameterError(f"`mode` must be one of {tuple(_PAD_MODES)}, got {mode!r}")
    return {
        "sigma_spatial": _per_axis(sigma_spatial, ndim, "sigma_spatial", integer=False),
        "sigma_color": None if sigma_color is None else _positive(sigma_color, "sigma_color"),
        "truncate": _positive(truncate, "truncate"),
        "mode": mode,
    }


def _depth_bilateral(sigma_spatial: tuple, truncate: float, **_: Any) -> tuple[int, ...]:
    return tuple(math.ceil(truncate * s) for s in sigma_spatial)


def _resolve_bilateral(image: da.Array, params: dict) -> dict:
    std = float(image.astype(np.float64).std().compute())
    # A constant image has no intensity differences: any colour sigma gives the same result.
    return {**params, "sigma_color": std if std > 0 else 1.0}


def _block_bilateral(
    block: np.ndarray,
    *,
    sigma_spatial: tuple[float, ...],
    sigma_color: float,
    truncate: float,
    mode: str,
) -> np.ndarray:
    """The exact windowed bilateral filter: a loop over the window's offsets, each one
    vectorized over the block (so the cost is ~ window size, memory ~ 4 blocks)."""
    data = block.astype(np.float32, copy=False)
    radius = _depth_bilateral(sigma_spatial, truncate)
    padded = np.pad(data, [(r, r) for r in radius], mode=_PAD_MODES[mode])
    total = np.zeros(data.shape, np.float32)
    weights = np.zeros(data.shape, np.float32)
    colour = np.float32(-0.5 / sigma_color**2)
    for offset in itertools.product(*(range(-r, r + 1) for r in radius)):
        spatial = math.exp(
            -0.5 * sum((o / s) ** 2 for o, s in zip(offset, sigma_spatial, strict=True) if s)
        )
        where = tuple(
            slice(r + o, r + o + n) for r, o, n in zip(radius, offset, data.shape, strict=True)
        )
        neighbour = padded[where]
        weight = np.float32(spatial) * np.exp(colour * np.square(neighbour - data))
        total += weight * neighbour
        weights += weight
    return total / weights


def bilateral(
    image: da.Array,
    *,
    sigma_spatial: float | Sequence[float] = 1.0,
    sigma_color: float | None = None,
    truncate: float = 3.0,
    mode: str = "reflect",
) -> da.Array:
    """Bilateral filter (Tomasi & Manduchi), 2D and 3D, anisotropic, exact on any chunking.

    ``out(x) = Σ w(x, y) I(y) / Σ w(x, y)`` over the box ``|y_i - x_i| <= ceil(truncate *
    sigma_spatial_i)``, with ``w = exp(-Σ_i (y_i - x_i)² / (2 sigma_spatial_i²)) ·
    exp(-(I(y) - I(x))² / (2 sigma_color²))``, computed in float32; the edge ``mode`` (scipy
    names) supplies the voxels beyond the image.

    ``skimage.restoration.denoise_bilateral`` is 2D only and quantizes the colour weights
    into ``bins`` (and, in 0.26, indexes its spatial table with the wrong stride), so this is
    the exact definition instead; the tests compare it with a direct whole-array evaluation.

    Parameters
    ----------
    image : (M, N[, P]) dask array
        Integer or float image (intensities keep their units).
    sigma_spatial : float or sequence of float, optional
        Spatial standard deviation, voxels, scalar or per axis; 0 leaves an axis out.
    sigma_color : float, optional
        Intensity standard deviation. Default: the standard deviation of the whole image
        (as skimage), computed once before the pass.
    truncate : float, optional
        Window half-width in spatial sigmas; it is the halo.
    mode : {"reflect", "mirror", "nearest", "constant"}, optional
        Edge mode at the true image edge (``"constant"``: zeros).

    Returns
    -------
    out : (M, N[, P]) dask array of float32
    """
    return _filter(
        "bilateral",
        image,
        sigma_spatial=sigma_spatial,
        sigma_color=sigma_color,
        truncate=truncate,
        mode=mode,
    )


register(
    "nl_means",
    StepKind(_block_nl_means, _depth_nl_means, _check_nl_means, resolve=_resolve_nl_means),
)
register(
    "bilateral",
    StepKind(
        _block_bilateral,
        _depth_bilateral,
        _check_bilateral,
        resolve=_resolve_bilateral,
        lengths=("sigma_spatial",),
    ),
)
