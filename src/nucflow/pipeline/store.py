"""The stored-pass engine every stage uses: one task per block, results in ``.work/``.

A pass computes each block of a grid from stored inputs and writes it to
``.work/<name>.zarr``; a ``.work/<name>.done`` mark and a fingerprint
(:mod:`nucflow.fingerprint`) tell ``--resume`` it may reuse the result. Value ranges and
block histograms can ride on a pass (:func:`store_blocks` ``ranged``), for the global values
computed before local work.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import dask.array as da
import numpy as np
import zarr

from nucflow import (
    filters,
    fingerprint,
    histogram,
)
from nucflow import progress as progress_report
from nucflow import table as table_stage
from nucflow.blockpass import Grid, Region, fmt_region, pass_graph
from nucflow.errors import (
    ParameterError,
)
from nucflow.pipeline.rundir import Run


def region_shape(region: Sequence[slice]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in region)


def refuse_non_finite(image: da.Array, path: str) -> da.Array:
    """Fail the block that holds NaN or infinite voxels, naming it (policy: refuse, exit 2).

    Treating them as background would need a rule for every filter (a Gaussian spreads one NaN
    over its footprint); the check rides on the preprocess pass, which reads every voxel anyway.
    """
    if image.dtype.kind != "f":
        return image
    return da.map_blocks(_check_finite_block, image, path=path, dtype=image.dtype, meta=image._meta)


def _check_finite_block(block: np.ndarray, *, path: str, block_info: dict) -> np.ndarray:
    where = tuple(slice(a, b) for a, b in block_info[0]["array-location"])
    check_finite(block, where, path=path)
    return block


def check_finite(block: np.ndarray, where: tuple[slice, ...], *, path: str) -> None:
    bad = block.size - int(np.count_nonzero(np.isfinite(block)))
    if bad:
        raise ParameterError(
            f"input {path} has {bad} NaN or infinite voxel(s) in block {fmt_region(where)}; "
            "replace them (e.g. with 0) before running nucflow"
        )


def array_path(run: Run, name: str) -> Path:
    return run.work / f"{name}.zarr"


def reuse(run: Run, name: str, *, source: zarr.Array | None = None) -> zarr.Array | None:
    """The stored result ``name`` of an earlier attempt, if ``--resume`` may reuse it (same
    fingerprint: :func:`nucflow.fingerprint.reusable`). Call once per stored result.

    With ``source``: a result found equal to it (:func:`same_as`) is ``source`` itself."""
    path, done = array_path(run, name), run.work / f"{name}.done"
    same = same_path(run, name)
    if source is not None and same.exists():
        path = same
    if fingerprint.reusable(run, name, path, done):
        return source if path == same else zarr.open_array(str(path), mode="r")
    return None


def same_path(run: Run, name: str) -> Path:
    """The mark of a result equal to its source, stored as that source alone."""
    return run.work / f"{name}.same"


def same_as(run: Run, name: str, source: zarr.Array, *, label: str) -> zarr.Array:
    """Record that result ``name`` equals ``source`` (nothing written; the planned pass
    ``label`` is recorded as skipped) and return it."""
    shutil.rmtree(array_path(run, name), ignore_errors=True)
    table_stage.write_atomic(same_path(run, name), b"")
    mark_done(run, name)
    progress_report.skipped(run, label)
    return source


def mark_done(run: Run, name: str) -> None:
    table_stage.write_atomic(run.work / f"{name}.done", b"")
    fingerprint.record(run, name)


def create(run: Run, name: str, grid: Grid, dtype: Any) -> zarr.Array:
    """A fresh ``.work/<name>.zarr`` whose chunks are the pass's blocks (no two tasks share a
    chunk). Float stacks are stored raw: compressing noise costs 3x the write for ~20%.
    Every chunk is written: testing each for emptiness costs more than it saves here."""
    dtype = np.dtype(dtype)
    shutil.rmtree(histograms_of(run, name), ignore_errors=True)  # they were of the old array
    return zarr.create_array(
        str(array_path(run, name)),
        shape=grid.shape,
        chunks=grid.chunks,
        dtype=dtype,
        fill_value=0,
        compressors=None if dtype.kind == "f" else "auto",
        config={"write_empty_chunks": True},
        overwrite=True,
    )


def store_blocks(
    run: Run,
    name: str,
    grid: Grid,
    dtype: Any,
    compute: Callable[[Region], np.ndarray],
    *,
    label: str,
    ranged: bool = False,
    reusable: bool = True,
    per_block: dict[tuple[int, ...], dict[str, Any]] | None = None,
    also: Callable[[Region, np.ndarray], None] | None = None,
) -> zarr.Array:
    """One pass writing ``compute(core)`` for every block of ``grid`` to ``.work/<name>.zarr``.

    ``per_block`` maps a block's grid index to keyword arguments of ``compute`` for that block
    only: each task carries its own (a shared argument would travel with every task).

    With ``ranged``, the stored stack's minimum and maximum ride on the pass (the threshold
    needs them and would otherwise read the whole stack once more) and are kept in its
    attributes as ``value_range``; so do the blocks' value histograms (the noise estimate's,
    :func:`stack_histogram`), in ``.work/<name>.histogram/``. With ``reusable`` (default), a
    result an earlier attempt stored is reused when ``--resume`` may (pass False when the
    caller has checked already). ``also(core, block)`` stores more from each computed block
    (its cells, say).
    """
    stored = reuse(run, name) if reusable else None
    if stored is not None:
        return stored
    target = create(run, name, grid, dtype)
    histograms = fresh_histograms(run, name) if ranged else None
    tasks = [
        partial(
            _write_task,
            core,
            compute=partial(compute, **per_block[index]) if per_block else compute,
            target=target,
            ranged=ranged,
            histograms=histograms,
            also=also,
        )
        for index, core in grid.blocks()
    ]
    (ranges,) = run.runner.compute(pass_graph(tasks, name), label=label)
    if ranged:
        found = [r for r in ranges if r is not None]
        low = min((r[0] for r in found), default=0)
        high = max((r[1] for r in found), default=0)
        target.attrs["value_range"] = [low, high]
    mark_done(run, name)
    return target


def _write_task(
    core: Region,
    *,
    compute: Callable,
    target: zarr.Array,
    ranged: bool,
    histograms: Path | None = None,
    also: Callable[[Region, np.ndarray], None] | None = None,
) -> tuple[Any, Any] | None:
    out = compute(core)
    target[core] = out
    if also is not None:
        also(core, out)
    if histograms is not None:
        _write_histogram(core, out, folder=histograms)
    if ranged and out.size:
        return out.min().item(), out.max().item()
    return None


def histograms_of(run: Run, name: str) -> Path:
    """Where the block histograms of ``.work/<name>.zarr`` are kept (:func:`create` empties it)."""
    return run.work / f"{name}.histogram"


def fresh_histograms(run: Run, name: str) -> Path:
    folder = histograms_of(run, name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def _write_histogram(core: Region, block: np.ndarray, *, folder: Path) -> None:
    name = "_".join(str(s.start) for s in core)  # unique per block, whatever the grid
    table_stage.write_atomic(folder / name, histogram.encode(block))


def histogram_files(folder: Path) -> list[Path]:
    """The blocks' histogram files (not a partial one a killed task left)."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if not path.name.startswith("."))


def histogram_task(core: Region, *, source: Any, folder: Path) -> None:
    """Store the histogram of ``source[core]`` (a zarr array or any reader) in ``folder``."""
    _write_histogram(core, np.asarray(source[core]), folder=folder)


def filter_pass(
    run: Run,
    name: str,
    source: Any,
    steps: Sequence[filters.Step],
    grid: Grid,
    *,
    region: tuple[slice, ...] | None = None,
    check: Callable | None = None,
    label: str,
    ranged: bool = False,
    reusable: bool = True,
    also: Callable[[Region, np.ndarray], None] | None = None,
) -> zarr.Array:
    """``filters.chain(source[region], steps)`` stored as ``.work/<name>.zarr``, each task
    reading its block and halo from ``source`` (anything with shape, dtype and slicing);
    ``reusable`` and ``also`` as in :func:`store_blocks`."""
    block = filters.BlockFilter.of(steps, len(grid.shape), source.dtype)
    compute = partial(block.read, source, region=region, check=check)
    return store_blocks(
        run, name, grid, block.dtype, compute, label=label, ranged=ranged, reusable=reusable,
        also=also,
    )  # fmt: skip


def store_lazy(run: Run, array: da.Array, name: str, *, label: str, ranged: bool) -> zarr.Array:
    """A lazy dask array stored as ``.work/<name>.zarr`` (for paths not written as passes)."""
    stored = reuse(run, name)
    if stored is not None:
        return stored
    grid = Grid(tuple(array.shape), run.params.chunks)
    target = create(run, name, grid, array.dtype)
    # zarr arrays take slice assignment, which is all da.store needs of a target
    store = da.store(array.rechunk(grid.chunks), cast(Any, target), lock=False, compute=False)
    if ranged:
        _, low, high = run.runner.compute(store, array.min(), array.max(), label=label)
        target.attrs["value_range"] = [low.item(), high.item()]
    else:
        run.runner.compute(store, label=label)
    mark_done(run, name)
    return target


def blocks_of(
    shape: Sequence[int], chunks: Sequence[int]
) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """(grid index, core slices) of every block of ``chunks`` tiling ``shape``."""
    return Grid(tuple(shape), tuple(chunks)).blocks()


def shifted(region: tuple[slice, ...], offset: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(s.start + o, s.stop + o) for s, o in zip(region, offset, strict=True))
