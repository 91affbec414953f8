"""Chunk-exact resampling on dask arrays: minimum pooling down, linear interpolation up.

Both work on a grid anchored at the global origin, so every output voxel is computed from the
same input voxels in the same order whatever the chunking (bit-identical results). They exist
for estimating a smooth background at reduced resolution
(:func:`nucflow.filters.subtract_background` with ``downsample``), which is far cheaper than a
large-footprint opening at full resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import dask.array as da
import numpy as np

__all__ = [
    "min_pool",
    "upsample_linear",
    "pooled_shape",
    "min_pool_block",
    "cells_needed",
    "interpolate_cells",
]


def pooled_shape(shape: Sequence[int], factors: Sequence[int]) -> tuple[int, ...]:
    """Cells per axis when pooling ``shape`` by ``factors`` (a partial last cell counts)."""
    return tuple(math.ceil(n / f) for n, f in zip(shape, factors, strict=True))


def _aligned_chunks(chunks: tuple[tuple[int, ...], ...], factors: Sequence[int]) -> tuple:
    """Chunk sizes that are multiples of the factors (so cells never straddle two chunks)."""
    return tuple(
        max(f, (max(c) // f) * f) if len(c) > 1 else c[0]
        for c, f in zip(chunks, factors, strict=True)
    )


def min_pool(image: da.Array, factors: Sequence[int]) -> da.Array:
    """Minimum over cells of ``factors`` voxels, cells anchored at the origin.

    Parameters
    ----------
    image : (M, N[, P]) dask array
    factors : sequence of int
        Cell size per axis, >= 1. The last cell of an axis may be partial.

    Returns
    -------
    dask array
        Shape ``ceil(shape / factors)``, same dtype. Rechunks the input first if its chunks are
        not multiples of the factors; the output chunks are the input's divided by the factors.
    """
    factors = tuple(int(f) for f in factors)
    aligned = image.rechunk(_aligned_chunks(image.chunks, factors))
    out_chunks = tuple(
        tuple(math.ceil(c / f) for c in axis)
        for axis, f in zip(aligned.chunks, factors, strict=True)
    )
    return aligned.map_blocks(
        min_pool_block, factors=factors, chunks=out_chunks, dtype=image.dtype, meta=image._meta
    )


def min_pool_block(block: np.ndarray, *, factors: tuple[int, ...]) -> np.ndarray:
    """:func:`min_pool` of one numpy block whose origin is a cell corner.

    One axis at a time, the last first, as the minimum of its strided slices: 4x faster than
    numpy's reduction over the split axes of a reshaped block (the same values)."""
    out = block
    for axis in reversed(range(block.ndim)):
        factor, n = factors[axis], out.shape[axis]
        if factor == 1:
            continue
        # Pad a partial last cell with its own edge values: they never lower the minimum.
        short = -n % factor
        if short:
            out = np.pad(out, [(0, short if a == axis else 0) for a in range(out.ndim)], "edge")
        parts = [out[(slice(None),) * axis + (slice(k, None, factor),)] for k in range(factor)]
        pooled = parts[0].copy()
        for part in parts[1:]:
            np.minimum(pooled, part, out=pooled)
        out = pooled
    return out if out is not block else block.copy()


def upsample_linear(
    low: da.Array, factors: Sequence[int], shape: Sequence[int], dtype: np.dtype | type = np.float32
) -> da.Array:
    """Linear interpolation of cell values back to the voxel grid of ``shape``.

    Voxel ``x`` samples the cell grid at ``u = (x + 0.5) / f - 0.5`` (cell centres), linearly
    between the two nearest cells and, in the half cell beyond the first or last cell's centre,
    on along the line through the two edge cells (as ``scipy.interpolate.
    RegularGridInterpolator(..., fill_value=None)``), computed separably, one axis after the
    other. Clamping there instead would cut a background rising towards a face flat, and the
    residual ramp seeds false nuclei along it.

    Parameters
    ----------
    low : dask array
        Cell values, shape ``pooled_shape(shape, factors)``.
    factors : sequence of int
        Cell size per axis.
    shape : sequence of int
        The full-resolution shape.
    dtype : numpy dtype, optional
        Output dtype (the arithmetic runs in it).

    Returns
    -------
    dask array
        Shape ``shape``; chunk ``i`` covers cells ``i`` of ``low`` (so its chunks are ``low``'s
        times the factors, the last one clipped to ``shape``).
    """
    factors = tuple(int(f) for f in factors)
    shape = tuple(int(n) for n in shape)
    dtype = np.dtype(dtype)
    out_chunks = []
    for axis_chunks, f, n in zip(low.chunks, factors, shape, strict=True):
        sizes = [c * f for c in axis_chunks]
        sizes[-1] -= sum(sizes) - n
        out_chunks.append(tuple(sizes))
    starts = [np.cumsum((0,) + axis)[:-1].tolist() for axis in low.chunks]
    padded = da.overlap.overlap(
        low.astype(dtype), depth=dict.fromkeys(range(low.ndim), 1), boundary="nearest"
    )
    return padded.map_blocks(
        _upsample_block,
        factors=factors,
        starts=starts,
        out_chunks=tuple(out_chunks),
        low_shape=low.shape,
        chunks=tuple(out_chunks),
        dtype=dtype,
        meta=np.empty((0,) * low.ndim, dtype),
    )


def _upsample_block(
    block: np.ndarray,
    *,
    factors: tuple[int, ...],
    starts: list[list[int]],
    out_chunks: tuple[tuple[int, ...], ...],
    low_shape: tuple[int, ...],
    block_id: tuple[int, ...],
) -> np.ndarray:
    voxels = []
    for axis, (f, i) in enumerate(zip(factors, block_id, strict=True)):
        first_voxel = starts[axis][i] * f
        voxels.append(slice(first_voxel, first_voxel + out_chunks[axis][i]))
    # the block starts one halo cell before its first cell
    first_cells = [starts[axis][i] - 1 for axis, i in enumerate(block_id)]
    return interpolate_cells(block, first_cells, factors, tuple(voxels), low_shape)


def cells_needed(voxels: Sequence[slice], factors: Sequence[int], low_shape: Sequence[int]):
    """The cells that :func:`interpolate_cells` needs for the voxels ``voxels``."""
    out = []
    for v, f, n in zip(voxels, factors, low_shape, strict=True):
        first = min(max(math.floor((v.start + 0.5) / f - 0.5), 0), max(n - 2, 0))
        last = min(max(math.floor((v.stop - 0.5) / f - 0.5), 0), max(n - 2, 0))
        out.append(slice(first, min(n, last + 2)))
    return tuple(out)


def interpolate_cells(
    cells: np.ndarray,
    first_cells: Sequence[int],
    factors: Sequence[int],
    voxels: Sequence[slice],
    low_shape: Sequence[int],
) -> np.ndarray:
    """:func:`upsample_linear` of the voxels ``voxels``, from the cells it needs.

    ``cells`` holds the cell grid from ``first_cells`` on (at least :func:`cells_needed`;
    a cell index below 0 or past the grid stands for the nearest edge cell). Computed in
    ``cells.dtype``, separably and in the same order as :func:`upsample_linear`, so the
    voxels are bit-identical to it.
    """
    block = cells
    for axis, (f, v) in enumerate(zip(factors, voxels, strict=True)):
        x = np.arange(v.start, v.stop, dtype=np.float64)
        n = low_shape[axis]
        # Half a cell beyond the edge cells' centres the line through the two edge cells
        # goes on (a background that rises towards a face is not cut flat there).
        u = np.clip((x + 0.5) / f - 0.5, -0.5, n - 0.5)
        below = np.clip(np.floor(u), 0, max(n - 2, 0)).astype(np.intp)
        weight = (u - below).astype(block.dtype) if n > 1 else np.zeros(len(u), block.dtype)
        local = below - first_cells[axis]
        shape = [1] * block.ndim
        shape[axis] = -1
        lo = np.take(block, local, axis=axis)
        hi = np.take(block, np.minimum(local + 1, block.shape[axis] - 1), axis=axis)
        block = lo + (hi - lo) * weight.reshape(shape)
    return block
