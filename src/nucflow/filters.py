"""Chunk-exact image filters on dask arrays.

Every function takes a 2D or 3D dask array and returns a lazy dask array equal to the
whole-array scipy / scikit-image result, whatever the chunking. Local filters run through
one generic helper (:func:`_overlap`): the halo depth is derived from the parameters, chunks
smaller than the depth are merged until every chunk is at least the depth, and
``map_overlap(boundary="none")`` lets scipy's own edge mode act only at the true image edge.
Because each output voxel is computed from exactly the same input voxels in the same order
as in the whole-array call, results are bit-identical (see the tests).

Global operations (:func:`remove_small_objects`, :func:`fill_holes`, :func:`threshold`)
use dask reductions (connected components across chunks, per-label tables, histograms) and
never gather the image in the driver.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.ndimage as ndi
import skimage.filters
import skimage.morphology

from nucflow import resample
from nucflow.components import again, select_components
from nucflow.errors import DtypeError, ParameterError, ShapeError

__all__ = [
    "gaussian",
    "uniform",
    "median",
    "sobel",
    "erosion",
    "dilation",
    "opening",
    "closing",
    "white_tophat",
    "black_tophat",
    "normalized_convolution",
    "subtract_background",
    "remove_small_objects",
    "fill_holes",
    "threshold",
    "ellipsoid",
    "chain",
    "chain_read",
    "depth_of",
    "STEPS",
]

Footprint = np.ndarray | Sequence[tuple[np.ndarray, int]]
Step = tuple[str, Mapping[str, Any]]

# Modes that only look at the block itself; "wrap" would read the opposite image edge,
# which a block at the edge does not hold.
_MODES = ("reflect", "constant", "nearest", "mirror", "grid-constant", "grid-mirror")
_MORPHOLOGY = ("erosion", "dilation", "opening", "closing", "white_tophat", "black_tophat")
# Compound operations apply the footprint twice, so their halo doubles.
_TWICE = {"opening", "closing", "white_tophat", "black_tophat"}
_THRESHOLDS = ("otsu", "yen", "triangle", "li", "percentile")
_BACKGROUNDS = ("tophat", "median", "gaussian")
_BINS = 256


# --------------------------------------------------------------------------- validation


def _as_image(image: Any, name: str = "image", kinds: str = "uif") -> da.Array:
    image = da.asarray(image)
    if image.ndim not in (2, 3):
        raise ShapeError(f"`{name}` must be 2D or 3D, got {image.ndim}D (shape {image.shape})")
    if image.dtype.kind not in kinds:
        expected = {"b": "boolean", "uif": "integer or float", "buif": "boolean or numeric"}
        raise DtypeError(
            f"`{name}` must have a {expected.get(kinds, kinds)} dtype, got {image.dtype}"
        )
    return image


def _per_axis(value: Any, ndim: int, name: str, *, integer: bool) -> tuple:
    """Broadcast a scalar or check a per-axis sequence; `name` is used in messages."""
    values = tuple(np.ravel(value).tolist()) if np.ndim(value) else (value,) * ndim
    if len(values) != ndim:
        raise ParameterError(f"`{name}` must be a scalar or have {ndim} values, got {value!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float | np.number):
            raise ParameterError(f"`{name}` must be numeric, got {value!r}")
        if integer and (int(v) != v or v <= 0):
            raise ParameterError(f"`{name}` must be a positive integer per axis, got {value!r}")
        if not integer and not (math.isfinite(v) and v >= 0):
            raise ParameterError(f"`{name}` must be finite and >= 0, got {value!r}")
    return tuple(int(v) for v in values) if integer else tuple(float(v) for v in values)


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ParameterError(f"`{name}` must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ParameterError(f"`{name}` must be a positive number, got {value!r}")
    return float(value)


def _as_footprint(footprint: Any, ndim: int) -> tuple[tuple[np.ndarray, int], ...]:
    """Normalise an ndarray or skimage-style sequence to ``((array, n_repeats), ...)``."""
    if isinstance(footprint, np.ndarray):
        parts = [(footprint, 1)]
    elif isinstance(footprint, Sequence) and footprint and not isinstance(footprint, str):
        parts = list(footprint)
    else:
        raise ParameterError(
            f"`footprint` must be an ndarray or a sequence of (ndarray, n_repeats), "
            f"got {type(footprint).__name__}"
        )
    out = []
    for part in parts:
        if not (isinstance(part, tuple) and len(part) == 2):
            raise ParameterError(f"`footprint` entries must be (ndarray, n_repeats), got {part!r}")
        array, n = np.asarray(part[0]), part[1]
        if array.ndim != ndim:
            raise ShapeError(
                f"`footprint` (ndim {array.ndim}) must have the ndim of `image` (ndim {ndim})"
            )
        if array.size == 0 or not np.any(array):
            raise ParameterError("`footprint` must contain at least one True element")
        if int(n) != n or n < 1:
            raise ParameterError(f"`footprint` n_repeats must be a positive integer, got {n!r}")
        out.append((array, int(n)))
    return tuple(out)


# --------------------------------------------------------------------------- step registry
# Each step is (block function, depth function, parameter checker). Public filters and
# `chain` both go through this table, so a step is described exactly once.


def _check_gaussian(ndim: int, sigma: Any, truncate: float = 4.0, mode: str = "reflect") -> dict:
    if mode not in _MODES:
        raise ParameterError(f"`mode` must be one of {_MODES}, got {mode!r}")
    return {
        "sigma": _per_axis(sigma, ndim, "sigma", integer=False),
        "truncate": _positive(truncate, "truncate"),
        "mode": mode,
    }


def _check_size(ndim: int, size: Any) -> dict:
    return {"size": _per_axis(size, ndim, "size", integer=True)}


def _check_none(ndim: int) -> dict:
    return {}


def _check_footprint(ndim: int, footprint: Any) -> dict:
    return {"footprint": _as_footprint(footprint, ndim)}


def _depth_gaussian(sigma: tuple, truncate: float, mode: str) -> tuple[int, ...]:
    # scipy's kernel radius is int(truncate * sigma + 0.5) <= ceil(truncate * sigma).
    return tuple(math.ceil(truncate * s) for s in sigma)


def _depth_size(size: tuple) -> tuple[int, ...]:
    return tuple(s // 2 for s in size)


def _depth_footprint(footprint: tuple, times: int = 1) -> tuple[int, ...]:
    # Successive dilations by a decomposed footprint add their half-extents.
    ndim = footprint[0][0].ndim
    return tuple(times * sum(n * (a.shape[i] // 2) for a, n in footprint) for i in range(ndim))


def _skimage_footprint(footprint: tuple) -> Any:
    return footprint[0][0] if len(footprint) == 1 and footprint[0][1] == 1 else footprint


def _block_morphology(block: np.ndarray, *, name: str, footprint: tuple) -> np.ndarray:
    return getattr(skimage.morphology, name)(block, _skimage_footprint(footprint))


def _block_gaussian(block: np.ndarray, *, sigma: tuple, truncate: float, mode: str) -> np.ndarray:
    return ndi.gaussian_filter(
        block.astype(np.float32, copy=False), sigma, truncate=truncate, mode=mode
    )


def _block_uniform(block: np.ndarray, *, size: tuple) -> np.ndarray:
    return ndi.uniform_filter(block.astype(np.float32, copy=False), size)


def _block_median(block: np.ndarray, *, size: tuple) -> np.ndarray:
    return ndi.median_filter(block, size)


def _block_sobel(block: np.ndarray) -> np.ndarray:
    return skimage.filters.sobel(block)


STEPS: dict[str, tuple[Callable, Callable, Callable]] = {
    "gaussian": (_block_gaussian, _depth_gaussian, _check_gaussian),
    "uniform": (_block_uniform, _depth_size, _check_size),
    "median": (_block_median, _depth_size, _check_size),
    "sobel": (_block_sobel, lambda: (1,), _check_none),
    **{
        name: (
            partial(_block_morphology, name=name),
            partial(_depth_footprint, times=2 if name in _TWICE else 1),
            _check_footprint,
        )
        for name in _MORPHOLOGY
    },
}
"""Steps usable in :func:`chain`: name -> (block function, depth function, checker)."""


def _checked(name: str, ndim: int, params: Mapping[str, Any]) -> dict:
    if name not in STEPS:
        raise ParameterError(f"step name must be one of {sorted(STEPS)}, got {name!r}")
    try:
        return STEPS[name][2](ndim, **params)
    except TypeError as err:  # unknown or missing keyword
        raise ParameterError(f"bad parameters for step {name!r}: {err}") from None


def _step_depth(name: str, ndim: int, params: dict) -> tuple[int, ...]:
    depth = STEPS[name][1](**params)
    return depth * ndim if len(depth) == 1 else depth


def depth_of(step_name: str, *, ndim: int | None = None, **params: Any) -> tuple[int, ...]:
    """Halo (voxels per axis) a step needs so that chunked and whole-array results agree.

    Parameters
    ----------
    step_name : str
        A key of :data:`STEPS` (``"gaussian"``, ``"median"``, ``"white_tophat"``, ...).
    ndim : int, optional
        Number of axes. Inferred from a per-axis ``sigma``/``size`` or from the footprint;
        3 when the parameters do not fix it (scalar ``sigma``/``size``, ``sobel``).
    **params
        The step's parameters, as for the filter of the same name.

    Returns
    -------
    depth : tuple of int
        Gaussian: ``ceil(truncate * sigma)``; median/uniform: ``size // 2``; erosion/dilation:
        footprint half-extent, summed over a decomposed sequence; opening, closing and
        top-hats: twice that; sobel: 1.
    """
    if ndim is None:
        ndim = _infer_ndim(params)
    return _step_depth(step_name, ndim, _checked(step_name, ndim, params))


def _infer_ndim(params: Mapping[str, Any]) -> int:
    for key in ("sigma", "size"):
        if key in params and np.ndim(params[key]):
            return len(np.ravel(params[key]))
    fp = params.get("footprint")
    if isinstance(fp, np.ndarray):
        return fp.ndim
    if isinstance(fp, Sequence) and fp and isinstance(fp[0], tuple):
        return np.asarray(fp[0][0]).ndim
    return 3


# --------------------------------------------------------------------------- overlap engine


def _grow_chunks(chunks: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Merge neighbouring chunks until each is >= depth (a halo comes from one neighbour)."""
    if depth == 0 or all(c >= depth for c in chunks):
        return chunks
    out: list[int] = []
    acc = 0
    for c in chunks:
        acc += c
        if acc >= depth:
            out.append(acc)
            acc = 0
    if acc:
        if out:
            out[-1] += acc
        else:
            out.append(acc)
    return tuple(out)


def _run_steps(block: np.ndarray, *, steps: tuple[tuple[str, dict], ...]) -> np.ndarray:
    for name, params in steps:
        block = STEPS[name][0](block, **params)
    return block


def _overlap(image: da.Array, steps: Sequence[tuple[str, dict]]) -> da.Array:
    """Run checked steps in order as ONE map_overlap with the summed depth."""
    ndim = image.ndim
    depth = tuple(sum(d) for d in zip(*(_step_depth(n, ndim, p) for n, p in steps), strict=True))
    chunks = tuple(_grow_chunks(c, d) for c, d in zip(image.chunks, depth, strict=True))
    if chunks != image.chunks:
        image = image.rechunk(chunks)
    # One chunk on an axis means the true edge is on both sides: no halo needed there.
    depth = tuple(0 if len(c) == 1 else d for c, d in zip(chunks, depth, strict=True))
    func = partial(_run_steps, steps=tuple(steps))
    # The output dtype comes from a 1-voxel trial run so it always matches the kernels.
    dtype = func(np.zeros((1,) * ndim, image.dtype)).dtype
    return image.map_overlap(
        func,
        depth=depth,
        boundary="none",
        trim=True,
        dtype=dtype,
        meta=np.empty((0,) * ndim, dtype),
    )


def _filter(name: str, image: Any, kinds: str = "uif", **params: Any) -> da.Array:
    image = _as_image(image, kinds=kinds)
    return _overlap(image, [(name, _checked(name, image.ndim, params))])


# --------------------------------------------------------------------------- local filters


def gaussian(
    image: da.Array, sigma: float | Sequence[float], *, truncate: float = 4.0, mode: str = "reflect"
) -> da.Array:
    """Gaussian filter, equal to ``scipy.ndimage.gaussian_filter(image.astype(float32), ...)``.

    Parameters
    ----------
    image : (M, N[, P]) dask array
        Integer or float image.
    sigma : float or sequence of float
        Standard deviation in voxels, scalar or one per axis (anisotropic); 0 skips an axis.
    truncate : float, optional
        Kernel radius in standard deviations; the halo is ``ceil(truncate * sigma)``.
    mode : str, optional
        scipy edge mode, applied at the true image edge only (``"wrap"`` is not supported).

    Returns
    -------
    out : (M, N[, P]) dask array of float32
    """
    return _filter("gaussian", image, sigma=sigma, truncate=truncate, mode=mode)


def uniform(image: da.Array, size: int | Sequence[int]) -> da.Array:
    """Mean filter, equal to ``scipy.ndimage.uniform_filter(image.astype(float32), size)``.

    Parameters
    ----------
    image : (M, N[, P]) dask array
    size : int or sequence of int
        Window edge length (voxels), scalar or per axis, >= 1.

    Returns
    -------
    out : (M, N[, P]) dask array of float32
        scipy uses a running sum, so on non-integer floats a voxel may differ from the
        whole-array result by about one float32 ulp; integer-valued input is exact.
    """
    return _filter("uniform", image, size=size)


def median(image: da.Array, size: int | Sequence[int]) -> da.Array:
    """Median filter, equal to ``scipy.ndimage.median_filter(image, size)``; keeps the dtype.

    Parameters
    ----------
    image : (M, N[, P]) dask array
    size : int or sequence of int
        Window edge length (voxels), scalar or per axis, >= 1.

    Returns
    -------
    out : (M, N[, P]) dask array, dtype of `image`
    """
    return _filter("median", image, size=size)


def sobel(image: da.Array) -> da.Array:
    """Sobel edge magnitude, equal to ``skimage.filters.sobel(image)``.

    skimage (0.26) convolves with ``mode="reflect"`` and, without a mask, does not zero the
    border; integer input is scaled by ``img_as_float`` first.

    Parameters
    ----------
    image : (M, N[, P]) dask array

    Returns
    -------
    out : (M, N[, P]) dask array
        float32 for float16/float32 input, float64 otherwise (as skimage).
    """
    return _filter("sobel", image)


def _morphology_doc(name: str) -> Callable[[da.Array, Footprint], da.Array]:
    def op(image: da.Array, footprint: Footprint) -> da.Array:
        return _filter(name, image, kinds="buif", footprint=footprint)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"""Grey {name.replace("_", " ")}, equal to ``skimage.morphology.{name}``.

    Parameters
    ----------
    image : (M, N[, P]) dask array
        Boolean, integer or float image.
    footprint : ndarray or sequence of (ndarray, int)
        Flat footprint with the ndim of `image`, or a skimage-style decomposition (see
        :func:`ellipsoid`). The halo is the footprint half-extent (summed over a sequence)
        {"times two, as the footprint is applied twice" if name in _TWICE else ""}.

    Returns
    -------
    out : (M, N[, P]) dask array, dtype of `image`
    """
    return op


erosion = _morphology_doc("erosion")
dilation = _morphology_doc("dilation")
opening = _morphology_doc("opening")
closing = _morphology_doc("closing")
white_tophat = _morphology_doc("white_tophat")
black_tophat = _morphology_doc("black_tophat")


def chain(image: da.Array, steps: Sequence[Step]) -> da.Array:
    """Apply several filters in order as ONE ``map_overlap``.

    Parameters
    ----------
    image : (M, N[, P]) dask array
    steps : sequence of (str, dict)
        E.g. ``[("gaussian", {"sigma": 1.0}), ("white_tophat", {"footprint": fp})]``; names
        are keys of :data:`STEPS`, dicts the keyword arguments of the filter of that name.

    Returns
    -------
    out : (M, N[, P]) dask array
        Equal to applying the whole-array functions in order. The halo is the sum of the
        steps' :func:`depth_of`.
    """
    image = _as_image(image, kinds="buif")
    return _overlap(image, _checked_steps(steps, image.ndim))


def _checked_steps(steps: Sequence[Step], ndim: int) -> list[tuple[str, dict]]:
    if not steps:
        raise ParameterError("`steps` must contain at least one (name, params) pair, got none")
    checked = []
    for step in steps:
        if not (isinstance(step, tuple | list) and len(step) == 2):
            raise ParameterError(f"`steps` entries must be (name, params) pairs, got {step!r}")
        checked.append((step[0], _checked(step[0], ndim, step[1])))
    return checked


def chain_read(
    source: Any,
    steps: Sequence[Step],
    *,
    chunks: Sequence[int],
    region: Sequence[slice] | None = None,
    check: Callable[[np.ndarray, tuple[slice, ...]], None] | None = None,
) -> da.Array:
    """:func:`chain` on a stored image, each block reading its own halo from the source.

    Equal to ``chain(da.from_array(source)[region], steps)``, but every block is one task that
    reads its core plus the summed depth (clipped at the region's edges, where the filters'
    edge modes then apply as on the whole region): no block waits in memory for its
    neighbours, whatever the number of blocks.

    Parameters
    ----------
    source : array-like
        ``shape``, ``dtype`` and ``source[tuple of slices] -> ndarray``, e.g.
        :attr:`nucflow.io.Stack.reader`; picklable when computed on other processes.
    steps : sequence of (str, dict)
        As for :func:`chain`.
    chunks : sequence of int
        Block shape of the result.
    region : sequence of slice, optional
        The part of ``source`` to filter (default: all of it).
    check : callable, optional
        Called as ``check(core_voxels, core_slices_in_source)`` on each block's own voxels
        before filtering (to refuse bad input naming the block).

    Returns
    -------
    out : dask array, shaped like ``region``
    """
    ndim = len(source.shape)
    region = tuple(region or (slice(0, n) for n in source.shape))
    block = BlockFilter.of(steps, ndim, source.dtype)
    shape = tuple(r.stop - r.start for r in region)
    return da.map_blocks(
        _read_and_run,
        source=source,
        region=region,
        block=block,
        check=check,
        chunks=da.core.normalize_chunks(tuple(chunks), shape),
        dtype=block.dtype,
        meta=np.empty((0,) * ndim, block.dtype),
    )


@dataclass(frozen=True)
class BlockFilter:
    """A checked chain of steps, run on one block read with its halo from a stored source.

    Build with :meth:`of`; call :meth:`read` in a task. Picklable (plain steps and arrays).
    """

    steps: tuple[tuple[str, dict], ...]
    depth: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, steps: Sequence[Step], ndim: int, dtype: Any) -> BlockFilter:
        """Check ``steps`` (as :func:`chain`; none: read as is) for ``ndim``-D ``dtype`` input."""
        checked = tuple(_checked_steps(steps, ndim)) if steps else ()
        depths = [_step_depth(n, ndim, p) for n, p in checked] or [(0,) * ndim]
        depth = tuple(sum(d) for d in zip(*depths, strict=True))
        # The output dtype comes from a 1-voxel trial run so it always matches the kernels.
        out = _run_steps(np.zeros((1,) * ndim, dtype), steps=checked).dtype
        return cls(checked, depth, out)

    def read(
        self,
        source: Any,
        core: tuple[slice, ...],
        *,
        region: tuple[slice, ...] | None = None,
        check: Callable[[np.ndarray, tuple[slice, ...]], None] | None = None,
    ) -> np.ndarray:
        """The filtered voxels of ``core`` (coordinates within ``region`` of ``source``).

        Reads ``core`` plus :attr:`depth`, clipped to ``region`` (default: all of
        ``source``), where the filters' own edge modes then act as on the whole region.
        """
        region = tuple(region or (slice(0, n) for n in source.shape))
        lo = [max(0, c.start - d) for c, d in zip(core, self.depth, strict=True)]
        hi = [
            min(r.stop - r.start, c.stop + d)
            for c, d, r in zip(core, self.depth, region, strict=True)
        ]
        box = tuple(slice(r.start + a, r.start + b) for r, a, b in zip(region, lo, hi, strict=True))
        data = np.asarray(source[box])
        inner = tuple(slice(c.start - p, c.stop - p) for c, p in zip(core, lo, strict=True))
        if check is not None:
            where = tuple(
                slice(r.start + c.start, r.start + c.stop)
                for r, c in zip(region, core, strict=True)
            )
            check(data[inner], where)
        return _run_steps(data, steps=self.steps)[inner]


def _read_and_run(
    *,
    source: Any,
    region: tuple,
    block: BlockFilter,
    check: Callable | None,
    block_info: dict,
) -> np.ndarray:
    core = tuple(slice(a, b) for a, b in block_info[None]["array-location"])
    return block.read(source, core, region=region, check=check)


def normalized_convolution(
    image: da.Array, mask: da.Array, sigma: float | Sequence[float], *, truncate: float = 4.0
) -> da.Array:
    """Gaussian smoothing that ignores voxels outside `mask`.

    Parameters
    ----------
    image : (M, N[, P]) dask array
    mask : (M, N[, P]) dask array
        Boolean (or 0/1) mask of valid voxels.
    sigma : float or sequence of float
        Standard deviation in voxels, scalar or per axis.
    truncate : float, optional

    Returns
    -------
    out : (M, N[, P]) dask array of float32
        ``gaussian(image * mask) / gaussian(mask)`` (both as float32) where `mask` is set,
        0 elsewhere.
    """
    image = _as_image(image)
    mask = _as_image(mask, "mask", kinds="buif")
    if mask.shape != image.shape:
        raise ShapeError(
            f"`mask` (shape {mask.shape}) must have the shape of `image` (shape {image.shape})"
        )
    inside = mask != 0
    weights = mask.astype(np.float32)
    numerator = gaussian(image.astype(np.float32) * weights, sigma, truncate=truncate)
    denominator = gaussian(weights, sigma, truncate=truncate)
    # Divide by 1 outside the mask so no 0/0 warning is raised for voxels we discard.
    ratio = numerator / da.where(inside, denominator, np.float32(1))
    return da.where(inside, ratio, np.float32(0))


# --------------------------------------------------------------------------- footprints


def ellipsoid(
    radius_um: float,
    voxel_size: Sequence[float],
    *,
    decomposition: str | None = None,
) -> Footprint:
    """Flat ellipsoid (3D) or ellipse (2D) footprint with a physical radius.

    Parameters
    ----------
    radius_um : float
        Radius in the units of `voxel_size` (µm), > 0.
    voxel_size : (2,) or (3,) sequence of float
        Voxel size per axis; its length sets the footprint ndim.
    decomposition : {None, "sequence"}, optional
        None: the exact footprint. ``"sequence"``: a skimage-style sequence of
        ``(3x3[x3] array, n_repeats)`` whose successive dilation approximates the ellipsoid,
        much faster for large radii (cost ~ radius instead of ~ radius**ndim).

    Returns
    -------
    footprint : uint8 ndarray or sequence of (uint8 ndarray, int)
        Exact shape: with ``r_i = radius_um / voxel_size[i]`` and ``h_i = floor(r_i)``, the
        array has shape ``(2 h_i + 1, ...)`` and holds offset ``d`` iff
        ``sum((d_i / r_i) ** 2) <= 1`` (axes with ``r_i < 1`` have extent 1). For an isotropic
        integer radius it equals ``skimage.morphology.ball(r)`` / ``disk(r)``.

        Sequence: ``R = max h_i``; start from ``ball(R, decomposition="sequence")`` (``disk``
        in 2D), expand it into R unit steps, and keep axis ``i`` extended in ``h_i`` of them
        (evenly spread, Bresenham); the other steps use the footprint's projection along
        that axis (extent 1), i.e. the step scaled by 0 on that axis. The result has half-extent
        exactly ``h_i`` per axis and equals skimage's sequence when isotropic. It is an outer
        polyhedral approximation:
        skimage's isotropic sequence is ~1.2x the ball's volume; the anisotropic one is larger
        (e.g. ~1.7x for radii (4, 12, 15)), because each unit step is either full or projected
        on an axis instead of scaled by the radius ratio.
    """
    radius = _positive(radius_um, "radius_um")
    if np.ndim(voxel_size) != 1 or len(voxel_size) not in (2, 3):
        raise ParameterError(f"`voxel_size` must have 2 or 3 values, got {voxel_size!r}")
    spacing = [_positive(v, "voxel_size") for v in voxel_size]
    if decomposition not in (None, "sequence"):
        raise ParameterError(f"`decomposition` must be None or 'sequence', got {decomposition!r}")
    radii = [radius / v for v in spacing]
    # The tiny tolerance keeps e.g. 0.3 / 0.1 = 2.9999999999999996 at 3 voxels.
    half = [math.floor(r + 1e-9) for r in radii]
    if decomposition is None or max(half) < 2:
        return _ellipsoid_exact(radii, half)
    return _ellipsoid_sequence(half)


def _ellipsoid_exact(radii: list[float], half: list[int]) -> np.ndarray:
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    dist = sum((g / r) ** 2 for g, r in zip(grids, radii, strict=True))
    return (dist <= 1 + 1e-9).astype(np.uint8)


def _ellipsoid_sequence(half: list[int]) -> list[tuple[np.ndarray, int]]:
    big = max(half)
    base = (skimage.morphology.disk if len(half) == 2 else skimage.morphology.ball)(
        big, decomposition="sequence"
    )
    units = [np.asarray(a) for a, n in base for _ in range(int(n))]
    out: list[tuple[np.ndarray, int]] = []
    for j, unit in enumerate(units):
        for axis, h in enumerate(half):
            # Bresenham: step j keeps this axis extended iff it crosses an integer.
            if (j + 1) * h // len(units) == j * h // len(units):
                # Projecting is scaling that axis by 0: the other extents survive.
                unit = unit.any(axis=axis, keepdims=True).astype(np.uint8)
        if out and out[-1][0].shape == unit.shape and np.array_equal(out[-1][0], unit):
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((unit, 1))
    return out


def _voxel_radii(radius: float, voxel_size: Sequence[float] | None, ndim: int) -> list[float]:
    spacing = (1.0,) * ndim if voxel_size is None else tuple(voxel_size)
    if len(spacing) != ndim:
        raise ParameterError(f"`voxel_size` must have {ndim} values, got {voxel_size!r}")
    return [radius / _positive(v, "voxel_size") for v in spacing]


def subtract_background(
    image: da.Array,
    *,
    method: str = "tophat",
    radius: float,
    voxel_size: Sequence[float] | None = None,
    downsample: int | Sequence[int] = 1,
) -> da.Array:
    """Remove a smooth background larger than `radius`.

    Parameters
    ----------
    image : (M, N[, P]) dask array
    method : {"tophat", "median", "gaussian"}, optional
        ``"tophat"``: white top-hat of ``image.astype(float32)`` with
        ``ellipsoid(radius, voxel_size, decomposition="sequence")`` (the fast polyhedral
        approximation; small radii use the exact ellipsoid).
        ``"median"``: ``image - median_filter(image, size)`` clipped at 0, with
        ``size_i = 2 * floor(radius / voxel_size_i) + 1`` (a box of the radius).
        ``"gaussian"``: ``image - gaussian_filter(image, sigma=radius / voxel_size)``
        clipped at 0.
    radius : float
        Background scale, in the units of `voxel_size` (voxels when it is None), > 0.
    voxel_size : sequence of float, optional
        One per axis; default isotropic 1.
    downsample : int or sequence of int, optional
        Estimate the background on cells of this many voxels per axis (default 1: full
        resolution). The background is then the method applied to the cell minima
        (:func:`nucflow.resample.min_pool`) with the radius in cells, interpolated back
        linearly (:func:`nucflow.resample.upsample_linear`), and the result is
        ``max(image - background, 0)``. Much faster for large radii; an approximation of the
        full-resolution result, still identical on every chunking.

    Returns
    -------
    out : (M, N[, P]) dask array of float32
    """
    image = _as_image(image)
    if method not in _BACKGROUNDS:
        raise ParameterError(f"`method` must be one of {_BACKGROUNDS}, got {method!r}")
    radius = _positive(radius, "radius")
    factors = _per_axis(downsample, image.ndim, "downsample", integer=True)
    _voxel_radii(radius, voxel_size, image.ndim)  # validates `voxel_size`
    spacing = (1.0,) * image.ndim if voxel_size is None else tuple(voxel_size)
    data = image.astype(np.float32)
    if max(factors) > 1:
        cells = resample.min_pool(data, factors)
        cell_size = [v * f for v, f in zip(spacing, factors, strict=True)]
        low = _background(cells, method, radius, cell_size)
        background = resample.upsample_linear(low, factors, data.shape)
        # A block's background needs its neighbours' cells only: no need to wait for all of it.
        data = again(data, "background").rechunk(background.chunks)
    else:
        background = _background(data, method, radius, spacing)
    return da.maximum(data - background, np.float32(0))


def _background(data: da.Array, method: str, radius: float, spacing: Sequence[float]) -> da.Array:
    """The background estimate of ``subtract_background`` (float32 in, float32 out)."""
    return chain(data, background_steps(method, radius, spacing))


def background_steps(method: str, radius: float, spacing: Sequence[float]) -> list[Step]:
    """The :func:`chain` steps estimating the background of ``subtract_background``.

    Parameters
    ----------
    method : {"tophat", "median", "gaussian"}
        As :func:`subtract_background` (``"tophat"`` gives the opening it subtracts).
    radius : float
        Background scale in the units of ``spacing``.
    spacing : sequence of float
        Voxel (or cell) size per axis.

    Returns
    -------
    list of (str, dict)
    """
    radii = _voxel_radii(radius, spacing, len(spacing))
    if method == "tophat":
        unit = [radius / r for r in radii]
        return [("opening", {"footprint": ellipsoid(radius, unit, decomposition="sequence")})]
    if method == "median":
        return [("median", {"size": tuple(2 * math.floor(r + 1e-9) + 1 for r in radii)})]
    return [("gaussian", {"sigma": tuple(radii)})]


# --------------------------------------------------------------------------- global masks


def _check_mask(mask: Any) -> da.Array:
    return _as_image(mask, "mask", kinds="b")


def _lookup(table: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return table[labels]


def _combine_lookup(m: np.ndarray, lab: np.ndarray, table: np.ndarray, *, combine: Callable):
    return combine(m, table[lab])


def remove_small_objects(mask: da.Array, max_size: int, *, connectivity: int = 1) -> da.Array:
    """Remove connected objects of at most `max_size` voxels, across chunks.

    Equal to ``skimage.morphology.remove_small_objects(mask, max_size=max_size,
    connectivity=connectivity)``: in skimage 0.26 objects with ``size <= max_size`` go.

    Parameters
    ----------
    mask : (M, N[, P]) dask array of bool
    max_size : int
        Largest size (voxels) removed, >= 0.
    connectivity : int, optional
        Neighbourhood (1 = faces ... ndim = full), as ``scipy.ndimage.generate_binary_structure``.

    Returns
    -------
    out : (M, N[, P]) dask array of bool

    Notes
    -----
    Objects are joined across blocks by :func:`nucflow.components.select_components` (two
    tasks per block); only per-component sizes are held in memory.
    """
    mask = _check_mask(mask)
    if isinstance(max_size, bool) or not isinstance(max_size, int | np.integer) or max_size < 0:
        raise ParameterError(f"`max_size` must be an integer >= 0, got {max_size!r}")
    _structure(mask.ndim, connectivity)  # validates `connectivity`
    if max_size == 0:
        return mask

    def large(sizes: np.ndarray, _touches_border: np.ndarray) -> np.ndarray:
        return sizes > max_size

    return select_components(mask, large, connectivity=int(connectivity))


def _structure(ndim: int, connectivity: Any) -> np.ndarray:
    if isinstance(connectivity, bool) or connectivity not in range(1, ndim + 1):
        raise ParameterError(
            f"`connectivity` must be an integer in 1..{ndim}, got {connectivity!r}"
        )
    return ndi.generate_binary_structure(ndim, int(connectivity))


def fill_holes(mask: da.Array) -> da.Array:
    """Fill holes, equal to ``scipy.ndimage.binary_fill_holes(mask)``, across chunks.

    Parameters
    ----------
    mask : (M, N[, P]) dask array of bool

    Returns
    -------
    out : (M, N[, P]) dask array of bool

    Notes
    -----
    Background components (face connectivity, scipy's default structure) are joined across
    blocks by :func:`nucflow.components.select_components`; a component is a hole iff none of
    its voxels lies on the image border.
    """
    mask = _check_mask(mask)
    return ~select_components(~mask, lambda _, touches_border: touches_border)


# --------------------------------------------------------------------------- thresholds


def _block_reduce(image: da.Array, func: Callable, length: int, dtype: Any) -> da.Array:
    """Sum a per-block 1D statistic of fixed length over all blocks (a tree reduction)."""
    ndim = image.ndim
    per_block = image.map_blocks(
        lambda b: func(b).reshape((1,) * ndim + (length,)),
        new_axis=ndim,
        chunks=tuple((1,) * len(c) for c in image.chunks) + ((length,),),
        dtype=dtype,
        meta=np.empty((0,) * (ndim + 1), dtype),
    )
    return per_block.sum(axis=tuple(range(ndim)))


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
        return _percentile(image, float(percentile), low, high)
    if method == "li":
        return _li(image, low, high, kwargs.get("tolerance"))
    counts, centers = _histogram(image, low, high)
    if method == "triangle":
        return float(_triangle(counts, centers))
    func = getattr(skimage.filters, f"threshold_{method}")
    # skimage casts image-derived counts to float32; do the same so results match bit for bit.
    return float(func(hist=(counts.astype(np.float32), centers)))


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float | np.number)


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
        pair = np.array([_order_statistic(image, k, low, high) for k in (below, above)])
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


def _order_statistic(image: da.Array, k: int, low: Any, high: Any, limit: int = 1 << 20) -> Any:
    """The k-th smallest value: refine a 256-bin histogram until one bin is small."""
    lo, hi, closed, before = float(low), float(high), True, 0
    for _ in range(16):
        edges = np.linspace(lo, hi, _BINS + 1)
        stats = image.map_blocks(
            lambda b, edges=edges, closed=closed: _interval_counts(
                b, edges=edges, closed=closed
            ).reshape((1,) * image.ndim + (_BINS + 2,)),
            new_axis=image.ndim,
            chunks=tuple((1,) * len(c) for c in image.chunks) + ((_BINS + 2,),),
            dtype=np.float64,
            meta=np.empty((0,) * (image.ndim + 1), np.float64),
        )
        axes = tuple(range(image.ndim))
        counts, vmin, vmax = dask.compute(
            stats[..., :_BINS].sum(axis=axes),
            -stats[..., _BINS].max(axis=axes),
            stats[..., _BINS + 1].max(axis=axes),
        )
        if vmin == vmax:
            return image.dtype.type(vmin)
        cumulative = before + np.cumsum(counts)
        j = int(np.searchsorted(cumulative, k, side="right"))
        before = int(cumulative[j - 1]) if j else before
        closed = closed and j == _BINS - 1
        lo, hi = edges[j], edges[j + 1]
        if counts[j] <= limit:
            break
    inside = (image >= lo) & ((image <= hi) if closed else (image < hi))
    values = np.sort(image[inside].compute())
    return values[k - before]
