"""Multiscale pyramids of stored OME-Zarr images and label images, written as passes.

Level 0 is the stored result; level ``k`` halves y and x of level ``k - 1`` (and z, once z is no
coarser than y/x in µm) until the y/x plane fits in :data:`MAX_PLANE` × :data:`MAX_PLANE`
voxels. Each level is one pass (:mod:`nucflow.blockpass`): one task per chunk of the new level,
which reads that chunk's source region from the stored level before it, piece by piece (about
one source chunk at a time), so a worker holds one output chunk and one source piece whatever
the stack's size.

Labels are downsampled by taking every second voxel (nearest, a stride anchored at voxel 0):
every value of a coarse level is a value of level 0 (no label is invented, blended or shifted),
strides compose (level ``k`` equals ``level0[::s_z, ::s_y, ::s_x]`` with ``s`` the cumulative
factors, exactly, on any chunking), and a level costs one read of the level before it. Mode
downsampling does not compose (the mode of modes is not the mode of level 0), needs a tie rule
and costs a sort per cell; a nucleus narrower than ``s`` voxels may vanish from level ``k``
with either rule (under the mode, the background around it outvotes it). Images are
downsampled by the mean of each cell (a partial cell at the far edge averages what it holds).

A leading axis that is not spatial (time) is never downsampled: pass a factor of 1 for it.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from nucflow.blockpass import Grid, Region, pass_graph
from nucflow.io.writers import add_levels

__all__ = ["MAX_PLANE", "level_factors", "downsample_block", "build", "target_region"]

#: A pyramid ends at the first level whose y/x plane fits in MAX_PLANE x MAX_PLANE voxels.
MAX_PLANE = 1024

Method = Literal["nearest", "mean"]


def level_factors(
    shape: Sequence[int], voxel_size: Sequence[float], *, max_plane: int | None = None
) -> list[tuple[int, ...]]:
    """The factor per axis of every level after level 0, relative to the level before.

    Parameters
    ----------
    shape : sequence of int
        Shape of level 0: (Y, X) or (Z, Y, X), after any leading axes that are not spatial
        (e.g. (T, Z, Y, X)); those get factor 1 on every level.
    voxel_size : (2,) or (3,) sequence of float
        Voxel size per spatial axis (the trailing axes of ``shape``; any unit, the same for all).
    max_plane : int, optional
        The pyramid ends once y and x are both at most this many voxels (default
        :data:`MAX_PLANE`).

    Returns
    -------
    list of tuple of int
        One entry per level 1, 2, …, one factor per axis of ``shape``: 2 on y and x, 2 on z
        once z's voxel is no coarser than y's and x's, 1 on an axis already a single voxel
        and on leading axes. Empty when level 0 fits already.
    """
    limit = MAX_PLANE if max_plane is None else max_plane
    size = [float(v) for v in voxel_size]
    leading = (1,) * (len(shape) - len(size))
    dims = [int(n) for n in shape[len(leading) :]]
    levels: list[tuple[int, ...]] = []
    while dims[-1] > limit or dims[-2] > limit:
        factors = [2] * len(dims)
        if len(dims) == 3 and size[0] > min(size[1:]):
            factors[0] = 1  # z still coarser than y/x: halving it would make it coarser still
        factors = [1 if n == 1 else f for n, f in zip(dims, factors, strict=True)]
        dims = [math.ceil(n / f) for n, f in zip(dims, factors, strict=True)]
        size = [v * f for v, f in zip(size, factors, strict=True)]
        levels.append(leading + tuple(factors))
    return levels


def downsample_block(block: np.ndarray, factors: Sequence[int], method: Method) -> np.ndarray:
    """Downsample one block whose first voxel is a cell corner (its global index a multiple
    of ``factors``).

    ``nearest`` keeps the first voxel of every cell (``block[::f0, ::f1, …]``); ``mean``
    averages each cell (a partial last cell averages the voxels it has; integer images are
    rounded back to their type).
    """
    if method == "nearest":
        return block[tuple(slice(None, None, f) for f in factors)]
    total = block.astype(np.float64)
    counts = np.ones((), dtype=np.float64)
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        starts = np.arange(0, block.shape[axis], f)
        total = np.add.reduceat(total, starts, axis=axis)
        sizes = np.diff(np.append(starts, block.shape[axis])).astype(np.float64)
        counts = counts * sizes.reshape([-1 if a == axis else 1 for a in range(block.ndim)])
    mean = total / counts
    if block.dtype.kind in "ui":
        mean = np.rint(mean)
    return mean.astype(block.dtype)


def target_region(region: Sequence[slice], factors: Sequence[int]) -> tuple[slice, ...]:
    """The voxels of the next level whose cells meet ``region`` of the level before."""
    return tuple(
        slice(s.start // f, math.ceil(s.stop / f)) for s, f in zip(region, factors, strict=True)
    )


def build(
    runner: Any,
    path: str | os.PathLike[str],
    factors: Sequence[Sequence[int]],
    *,
    method: Method,
    region: Sequence[slice] | None = None,
    marks: Path | None = None,
    keep: bool = False,
    label: str = "pyramid",
) -> list[tuple[int, ...]]:
    """Write levels 1, 2, … of the OME-Zarr multiscale at ``path`` from its stored level 0.

    Parameters
    ----------
    runner : nucflow.cluster runner
        Computes each level's pass (``runner.compute(graph, label=...)``).
    path : str or path-like
        A group with NGFF ``multiscales`` metadata and dataset ``"0"``.
    factors : sequence of sequence of int
        Per level, the factor per axis of dataset "0" (1 on a leading time axis), e.g. from
        :func:`level_factors` with a 1 prepended for time.
    method : {"nearest", "mean"}
        ``nearest`` for label images, ``mean`` for images (see the module's docstring).
    region : sequence of slice, optional
        The part of level 0 that may be non-zero (the run's data region); the rest of every
        level stays unwritten (the fill value 0). Default: all of it.
    marks : Path, optional
        Folder of per-block marks (``<level>/<block>``), written as blocks finish.
    keep : bool, optional
        Keep the levels an earlier attempt wrote and skip its blocks marked in ``marks``
        (``--resume``, when level 0 is unchanged); otherwise every level is created anew.
    label : str
        Progress label of the passes.

    Returns
    -------
    list of tuple of int
        The shape of every level, level 0 first.
    """
    group = zarr.open_group(os.fspath(path), mode="r+")
    if marks is not None and not keep:
        shutil.rmtree(marks, ignore_errors=True)  # marks of levels about to be replaced
    levels = add_levels(group, factors, translate=method == "mean", keep=keep)
    where = tuple(region) if region is not None else tuple(slice(0, n) for n in levels[0].shape)
    for k, level_factor in enumerate(factors, start=1):
        where = target_region(where, level_factor)
        done = None if marks is None else marks / str(k)
        if done is not None:
            done.mkdir(parents=True, exist_ok=True)
        tasks = _level_tasks(levels[k - 1], levels[k], tuple(level_factor), method, where, done)
        if tasks:
            runner.compute(pass_graph(tasks, f"{label}-{k}"), label=f"{label} level {k}")
    return [tuple(a.shape) for a in levels]


def _level_tasks(
    source: zarr.Array,
    target: zarr.Array,
    factors: tuple[int, ...],
    method: Method,
    where: Region,
    done: Path | None,
) -> list[partial]:
    """One task per chunk of ``target`` meeting ``where``, skipping those marked in ``done``."""
    chunks = tuple(target.chunks)
    box = tuple(s.stop - s.start for s in where)
    phase = tuple(s.start % c for s, c in zip(where, chunks, strict=True))
    grid = Grid(box, chunks, phase)
    # A piece reads about one chunk of the source (a whole chunk when the chunks are even).
    piece = tuple(max(1, c // f) for c, f in zip(source.chunks, factors, strict=True))
    tasks = []
    for _, core in grid.blocks():
        core = tuple(
            slice(s.start + w.start, s.stop + w.start) for s, w in zip(core, where, strict=True)
        )
        mark = None if done is None else done / "_".join(str(s.start) for s in core)
        if mark is not None and mark.exists():
            continue
        tasks.append(
            partial(
                _level_task,
                core,
                source=source,
                target=target,
                factors=factors,
                method=method,
                piece=piece,
                mark=mark,
            )
        )
    return tasks


def _level_task(
    core: Region,
    *,
    source: zarr.Array,
    target: zarr.Array,
    factors: tuple[int, ...],
    method: Method,
    piece: tuple[int, ...],
    mark: Path | None,
) -> None:
    """Compute and write one chunk of the next level, reading its source piece by piece."""
    out = np.zeros(tuple(s.stop - s.start for s in core), dtype=target.dtype)
    starts = [range(s.start, s.stop, p) for s, p in zip(core, piece, strict=True)]
    for corner in itertools.product(*starts):
        part = tuple(
            slice(c, min(c + p, s.stop)) for c, p, s in zip(corner, piece, core, strict=True)
        )
        read = tuple(
            slice(s.start * f, min(s.stop * f, n))
            for s, f, n in zip(part, factors, source.shape, strict=True)
        )
        local = tuple(
            slice(s.start - c.start, s.stop - c.start) for s, c in zip(part, core, strict=True)
        )
        out[local] = downsample_block(np.asarray(source[read]), factors, method)
    target[core] = out
    if mark is not None:
        mark.touch()  # after the write: a marked block is on disk
