"""The preprocess stage: smoothing and background subtraction, stored as
``.work/preprocessed.zarr``; and the preprocess flow's ``filter.steps`` chain."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from nucflow import (
    filters,
    io,
    resample,
    stages,
)
from nucflow.blockpass import Grid, Region, pass_graph
from nucflow.config import Params
from nucflow.errors import ConfigError, NucflowError
from nucflow.pipeline.rundir import Run
from nucflow.pipeline.store import (
    check_finite,
    create,
    filter_pass,
    mark_done,
    refuse_non_finite,
    region_shape,
    reuse,
    shifted,
    store_blocks,
    store_lazy,
)
from nucflow.stages import Result


def preprocess(run: Run) -> zarr.Array:
    """Smoothing and background subtraction, stored as ``.work/preprocessed.zarr`` (float32).

    Gaussian of ``sigma`` µm (or, with a tissue mask, normalized convolution inside it), then the
    configured background subtraction with ``background_radius`` µm, equal on every chunking
    to :func:`nucflow.filters.subtract_background` of the Gaussian. Each pass reads its block
    and halo from the stored result of the pass before (the first from the input, refusing
    NaN/inf voxels) and writes its block: the reduced-resolution background runs as three
    such passes (cell minima, the background on the cells, interpolation and subtraction); the
    Gaussian's pass stores the cell minima itself where blocks are whole cells.
    """
    p = run.params
    sigma = tuple(p.preprocess.sigma / v for v in p.voxel_size)
    steps: list[tuple[str, dict[str, Any]]] = []
    if not p.preprocess.tissue_mask:
        steps.append(("gaussian", {"sigma": sigma}))
    exact_tophat = (
        p.preprocess.background == "tophat" and max(p.preprocess.background_downsample) == 1
    )
    if exact_tophat:  # the full-resolution top-hat joins the Gaussian's pass
        footprint = filters.ellipsoid(
            p.preprocess.background_radius, p.voxel_size, decomposition="sequence"
        )
        steps.append(("white_tophat", {"footprint": footprint}))
    final = exact_tophat or p.preprocess.background == "none"
    name = stages.PREPROCESSED.name if final else stages.SMOOTHED.name
    cells = None
    if p.preprocess.tissue_mask:
        image = _tissue_smoothed(run)
        image = filters.chain(image, steps) if steps else image  # the exact top-hat, if any
        smoothed = store_lazy(run, image, name, label="preprocess", ranged=final)
    else:
        smoothed, cells = _gaussian_pass(run, name, steps, final=final)
    if final:
        return smoothed
    return _subtract_background(run, smoothed, cells)


def _gaussian_pass(
    run: Run, name: str, steps: list[tuple[str, dict[str, Any]]], *, final: bool
) -> tuple[zarr.Array, zarr.Array | None]:
    """The first pass, from the input; and the cell minima when it stored them too."""
    p = run.params
    stored = reuse(run, name)
    if stored is not None:
        return stored, None
    check = partial(check_finite, path=run.stack.path) if run.data.dtype.kind == "f" else None
    grid = Grid(region_shape(run.region), p.chunks)
    cells = None if final else _cells_pooled_while_smoothing(run, grid.shape)
    factors = tuple(p.preprocess.background_downsample)
    smoothed = filter_pass(
        run,
        name,
        run.stack.reader,
        steps,
        grid,
        region=run.region,
        check=check,
        label="preprocess",
        ranged=final,
        reusable=False,
        also=None if cells is None else partial(_pool_into, target=cells, factors=factors),
    )
    if cells is not None:
        mark_done(run, stages.CELLS.name)
    return smoothed, cells


def _cells_pooled_while_smoothing(run: Run, shape: tuple[int, ...]) -> zarr.Array | None:
    """The cell minima's array for the Gaussian's pass to fill (None: they take a pass of their
    own, :func:`stages.pools_while_smoothing`); it saves reading the smoothed stack again."""
    if not stages.pools_while_smoothing(run.params):
        return None
    stored = reuse(
        run, stages.CELLS.name
    )  # in the flow's order; never reusable once smoothed is not
    assert stored is None
    return create(run, stages.CELLS.name, _cell_grid(run.params, shape), np.float32)


def _cell_grid(p: Params, shape: tuple[int, ...]) -> Grid:
    """The cells of ``background_downsample`` voxels, in blocks of the run's blocks' cells."""
    factors = tuple(p.preprocess.background_downsample)
    cell_chunks = tuple(max(1, c // f) for c, f in zip(p.chunks, factors, strict=True))
    return Grid(resample.pooled_shape(shape, factors), cell_chunks)


def _pool_into(core: Region, block: np.ndarray, *, target: zarr.Array, factors: tuple) -> None:
    """Store the cell minima of a block that starts at a cell corner."""
    cells = tuple(slice(c.start // f, -(-c.stop // f)) for c, f in zip(core, factors, strict=True))
    target[cells] = resample.min_pool_block(block, factors=factors)


def _tissue_smoothed(run: Run) -> da.Array:
    """Normalized convolution inside the tissue mask (a lazy graph: an option for small
    stacks; its memory is not bounded by construction)."""
    p = run.params
    assert p.preprocess.tissue_mask is not None  # preprocess reads it only when one is given
    # the mask covers the whole file: a region of it (nucflow tune) reads the same region
    where = shifted(run.region, run.stack.origin)
    tissue = io.open_stack(p.preprocess.tissue_mask).data[where].rechunk(p.chunks) > 0
    sigma = tuple(p.preprocess.sigma / v for v in p.voxel_size)
    data = refuse_non_finite(run.data, run.stack.path)
    return filters.normalized_convolution(data, tissue, sigma).astype(np.float32)


def _subtract_background(
    run: Run, smoothed: zarr.Array, cells: zarr.Array | None = None
) -> zarr.Array:
    """``max(smoothed - background, 0)``, the background estimated on cells of
    ``background_downsample`` voxels (as :func:`nucflow.filters.subtract_background`).

    The cells are 1/prod(downsample) of the stack (1/32 with the defaults) and stored, not held;
    ``cells``: already stored by the Gaussian's pass.
    """
    p = run.params
    factors = tuple(p.preprocess.background_downsample)
    cell_grid = _cell_grid(p, tuple(smoothed.shape))
    if cells is None:
        cells = reuse(run, stages.CELLS.name)
    if cells is None:
        cells = create(run, stages.CELLS.name, cell_grid, np.float32)
        tasks = [
            partial(_pool_task, core, source=smoothed, target=cells, factors=factors)
            for _, core in cell_grid.blocks()
        ]
        run.runner.compute(pass_graph(tasks, "cells"), label="background cells")
        mark_done(run, stages.CELLS.name)
    cell_size = [v * f for v, f in zip(p.voxel_size, factors, strict=True)]
    steps = filters.background_steps(
        p.preprocess.background, p.preprocess.background_radius, cell_size
    )
    background = filter_pass(run, "background", cells, steps, cell_grid, label="background")
    grid = Grid(smoothed.shape, p.chunks)
    return store_blocks(
        run,
        stages.PREPROCESSED.name,
        grid,
        np.float32,
        partial(_subtract_task, smoothed=smoothed, background=background, factors=factors),
        label="subtract background",
        ranged=True,
    )


def _pool_task(core: Region, *, source: zarr.Array, target: zarr.Array, factors: tuple) -> None:
    voxels = tuple(
        slice(c.start * f, min(c.stop * f, n))
        for c, f, n in zip(core, factors, source.shape, strict=True)
    )
    target[core] = resample.min_pool_block(np.asarray(source[voxels]), factors=factors)


def _subtract_task(
    core: Region, *, smoothed: zarr.Array, background: zarr.Array, factors: tuple
) -> np.ndarray:
    need = resample.cells_needed(core, factors, background.shape)
    cells = np.asarray(background[need])
    low = resample.interpolate_cells(
        cells, [s.start for s in need], factors, core, background.shape
    )
    return np.maximum(np.asarray(smoothed[core]) - low, np.float32(0))


def configured_filters(run: Run) -> da.Array:
    """The ``filter.steps`` chain in physical units, as one lazy overlapped pass."""
    steps = stages.configured_steps(run.params, ndim=run.data.ndim)
    return filters.chain(run.stack.data.rechunk(run.params.chunks), steps)


def write_stack(run: Run, image: da.Array, name: str) -> Path:
    """Write a result stack as OME-Zarr into the output directory (streamed block by block)."""
    path = run.entry(name)
    partial = run.work / name
    if partial.exists():
        shutil.rmtree(partial)
    with dask.config.set(scheduler=run.runner.scheduler):
        io.write_ome_zarr(partial, image, run.params.voxel_size, chunks=run.params.chunks)
    from nucflow import pyramid as pyramid_levels

    factors = pyramid_levels.level_factors(image.shape, run.params.voxel_size)
    shapes = pyramid_levels.build(run.runner, partial, factors, method="mean")
    run.facts["pyramid_shapes"] = [list(s) for s in shapes]
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)
    return path


def _results(p: Params, _shape: tuple[int, ...]) -> tuple[Result, ...]:
    if not stages.preprocessing_needed(p):  # a python segmenter reading the input itself
        return ()
    exact = p.preprocess.background == "tophat" and max(p.preprocess.background_downsample) == 1
    if exact or p.preprocess.background == "none":
        return (stages.PREPROCESSED,)
    cells = replace(stages.CELLS, passes=()) if stages.pools_while_smoothing(p) else stages.CELLS
    return (stages.SMOOTHED, cells, stages.BACKGROUND, stages.PREPROCESSED)


def _tissue_mask_matches(stack: io.Stack, params: Params) -> None:
    """A tissue mask must open and have the stack's spatial shape (the whole file's, for a
    region of it: ``nucflow tune``)."""
    if not params.preprocess.tissue_mask:
        return
    try:
        mask = io.open_stack(params.preprocess.tissue_mask)
    except NucflowError as e:
        raise ConfigError(f"`preprocess.tissue_mask`: {e}") from None
    if tuple(mask.data.shape) != stack.uncropped_shape:
        raise ConfigError(
            f"`preprocess.tissue_mask` {params.preprocess.tissue_mask} has shape "
            f"{tuple(mask.data.shape)} "
            f"but the input has {stack.uncropped_shape}; give a mask of the input's shape"
        )


def _body(run: Run, _inputs: Mapping[str, Any]) -> zarr.Array | None:
    return preprocess(run) if stages.preprocessing_needed(run.params) else None


STAGE = stages.Stage(
    "preprocess", ("input",), _results, (_tissue_mask_matches,), body=_body, per_timepoint=True
)
"""Smoothing and background subtraction (with a tissue mask: normalized convolution)."""
