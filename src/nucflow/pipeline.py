"""Stages of a nucflow run and the output directory they fill.

A run lives in its output directory: ``run.json`` says ``"status": "running"`` from the start and
``"complete"`` only after every output is on disk. Intermediate stacks live in ``.work/`` (each
stage leaves a ``.done`` file when finished, so ``--resume`` skips it), segmentation blocks record
their part of the table in ``.work/blocks/`` as they finish (so ``--resume`` redoes only unfinished
blocks), and every final file is written under a temporary name and moved into place.

Flows (``flows/*.py``) compose these stages; stage functions take a :class:`Run` and lazy dask
arrays and return lazy arrays or small results.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import dask
import dask.array as da
import numpy as np
import pandas as pd
import zarr

import nucflow
from nucflow import (
    components,
    detect,
    filters,
    fingerprint,
    histogram,
    io,
    lock,
    measure,
    objects,
    outdir,
    resample,
    stages,
)
from nucflow import progress as progress_report
from nucflow import table as table_stage
from nucflow.blockpass import Grid, Region, fmt_region, padded, pass_graph
from nucflow.config import Params
from nucflow.detect import DetectParams
from nucflow.errors import (
    BlockError,
    ConfigError,
    NucflowError,
    OutputError,
    ParameterError,
    Terminated,
    environment_message,
)
from nucflow.segment import SegmentParams, segment_block

__all__ = [
    "Run",
    "open_run",
    "preprocess",
    "filter_pass",
    "select_components",
    "foreground",
    "clean_mask",
    "segment",
    "pyramid",
    "table",
    "finish",
    "fail",
    "data_region",
    "segment_halo",
    "blocks_of",
]

WORK = ".work"
LABELS = "labels.ome.zarr"
RUN_JSON = outdir.RUN_JSON


@dataclass
class Run:
    """One run: its input, resolved parameters, output directory and compute runner."""

    stack: io.Stack
    params: Params
    output: Path
    runner: Any
    config: dict[str, Any]
    resume: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    region: tuple[slice, ...] = ()
    lock: lock.OutputLock | None = None  # held from open_run to finish/fail
    claim: outdir.Claim | None = None  # the output directory's manifest (open_run)
    lineage: fingerprint.Lineage | None = None  # what --resume may reuse (fingerprint.start)
    progress: Any = field(default=None, repr=False, compare=False)  # nucflow.progress.attach
    # A time-lapse: the time points to segment (None: the input has no time axis). Each is
    # segmented by a run of its own (``time`` set, ``.work/t0003/``): nucflow.timelapse.
    timepoints: tuple[int, ...] | None = None
    time: int | None = None

    @property
    def work(self) -> Path:
        root = self.output / WORK
        return root if self.time is None else root / timepoint_folder(self.time)

    def entry(self, name: str) -> Path:
        """``output / name``, listed in the output's manifest first: only listed entries are
        ever deleted by ``--overwrite`` (:mod:`nucflow.outdir`). Call before creating it."""
        return self.claim.entry(name) if self.claim is not None else self.output / name

    @property
    def data(self) -> da.Array:
        """The part of the stack that holds data (:attr:`region`), on the run's blocks."""
        return self.stack.data[self.region].rechunk(self.params.chunks)

    @property
    def offset(self) -> tuple[int, ...]:
        """Global coordinates of ``data[0, 0(, 0)]``."""
        return tuple(s.start for s in self.region)

    @property
    def segment_params(self) -> SegmentParams:
        return _segment_params(self.params)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage into run.json's timings; report its progress (nucflow.progress)."""
        start = time.perf_counter()
        label = name if self.time is None else f"{name} t{self.time}"
        with progress_report.stage(self, label):
            yield
        self.timings[name] = round(time.perf_counter() - start, 3)


def timepoint_folder(t: int) -> str:
    """The work folder of time point ``t`` of a time-lapse, under ``.work/``."""
    return f"t{t:04d}"


# ----------------------------------------------------------------------------- output directory


def open_run(
    stack: io.Stack,
    params: Params,
    output: str | os.PathLike[str],
    *,
    runner: Any,
    config: dict[str, Any],
    resume: bool = False,
    overwrite: bool = False,
    timepoints: Sequence[int] | None = None,
) -> Run:
    """Claim the output directory and mark the run as running.

    One run at a time writes to a directory: the run takes its lock (:mod:`nucflow.lock`)
    before changing anything in it, and :func:`finish` or :func:`fail` releases it. Only a
    directory nucflow claimed is reused or emptied, and only the entries it wrote
    (:mod:`nucflow.outdir`). ``timepoints`` (a time-lapse: the time points to segment;
    ``stack`` holds the first) makes the flow segment each of them
    (:func:`nucflow.timelapse.each`).

    Raises
    ------
    OutputError
        The directory exists without ``resume``/``overwrite``, is not a nucflow output
        directory or holds entries nucflow did not write, overlaps an input, or another run
        holds its lock.
    InputChangedError
        ``resume`` and the input is not the one the stored run read.
    """
    out = Path(output).resolve()
    check_apart(out, stack.path, what="the input")
    if params.tissue_mask:
        check_apart(out, params.tissue_mask, what="preprocess.tissue_mask")
    if out.is_dir() and (holder := lock.holder_of(out)):  # say who, whatever else is wrong
        raise OutputError(
            f"output directory {out} is in use by {holder}; wait for that run to end, or stop "
            "it, or choose another --output"
        )
    outdir.check_claimable(out, resume=resume, overwrite=overwrite)
    made_directory = outdir.make_directory(out)
    held = lock.acquire(out)
    try:  # checked again holding the lock: nothing changes the directory now but this run
        found = outdir.check_claimable(out, resume=resume, overwrite=overwrite)
        claim = outdir.claim(out, found, overwrite=overwrite)
        claim.made_directory = made_directory
        claim.entry(WORK).mkdir(exist_ok=True)
        claim.entry(RUN_JSON)
        before = _read_run_json(out) if not claim.fresh else None
        run = Run(stack, params, out, runner, config, resume=resume and before is not None)
        run.claim = claim
        run.timepoints = None if timepoints is None else tuple(timepoints)
        run.lock = held
        run.region = data_region(stack, params.chunks)
        run.facts["data_region"] = [[s.start, s.stop] for s in run.region]
        fingerprint.start(run, before)
        write_run_json(run, "running")
        progress_report.attach(run, partial(write_run_json, run, "running"))
    except BaseException:
        held.release()
        raise
    return run


def check_apart(out: Path, source: str | os.PathLike[str], *, what: str) -> None:
    """Refuse an output that is, holds, or lies inside any path the input ``source`` reads
    (each file of a glob, the zarr hierarchy around an array; symlinks followed).

    Raises
    ------
    OutputError
        Naming the input path and the fix.
    """
    for path in io.input_paths(source):
        if out == path or path in out.parents:
            raise OutputError(
                f"--output {out} is inside {what} {path}; choose a directory outside it"
            )
        if out in path.parents:
            raise OutputError(f"--output {out} contains {what} {path}; choose another directory")


def recorded_run(output: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run.json of a nucflow output directory (its claim's), or None."""
    out = Path(output).resolve()
    found = outdir.read_claim(out)
    record = _read_run_json(out)
    if found is None or record is None or record.get("claim") != found.claim_id:
        return None
    return record


def _read_run_json(out: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((out / RUN_JSON).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _release(run: Run) -> None:
    if run.lock is not None:
        run.lock.release()


def _segment_params(p: Params) -> SegmentParams:
    return SegmentParams(p.voxel_size, p.peak_radius, p.min_radius, p.max_radius)


def segment_halo(params: Params) -> tuple[int, ...]:
    """Context in voxels per axis that makes a segmentation block exact."""
    return _segment_params(params).halo()


def data_region(stack: io.Stack, chunks: tuple[int, ...]) -> tuple[slice, ...]:
    """Where the stack holds data: the box around its written chunks (zarr) or all of it.

    Chunks never written are not data: they are neither read, thresholded nor segmented, and
    a nucleus at the edge of the box touches the border. A store with no chunk at all
    gives the first block (read as the fill value: an empty result at no cost).
    """
    region = stack.data_region()
    if region is None:
        region = tuple(slice(0, min(c, n)) for c, n in zip(chunks, stack.data.shape, strict=True))
    return region


def write_run_json(run: Run, status: str, **extra: Any) -> None:
    """Write run.json atomically."""
    p = run.params
    record = {
        "status": status,
        "claim": run.claim.claim_id if run.claim is not None else None,
        "nucflow": nucflow.__version__,
        "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "input": run.stack.path,
        "shape": list(run.stack.data.shape),
        "dtype": str(run.stack.data.dtype),
        "voxel_size_um": list(p.voxel_size),
        "unit": "micrometer" if calibrated(run) else "pixel",
        "config": run.config,
        "derived": {k: v for k, v in vars(p).items() if k not in ("voxel_size",)},
        "halo": list(run.segment_params.halo()),
        "cluster": getattr(run.runner, "spec", "threads"),
        "versions": _versions(),
        "timings_s": run.timings,
        **run.facts,
        **extra,
    }
    table_stage.write_atomic(
        run.output / RUN_JSON, json.dumps(record, indent=2, default=_jsonable).encode()
    )


def calibrated(run: Run) -> bool:
    """Whether lengths are µm: the input or the config gives the voxel size."""
    return bool(run.stack.voxel_size_known or run.config.get("voxel_size"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


def _versions() -> dict[str, str]:
    import edt
    import scipy
    import skimage

    modules = {"dask": dask, "zarr": zarr, "numpy": np, "scipy": scipy}
    modules.update({"scikit-image": skimage, "pandas": pd, "edt": edt})
    found = {name: getattr(m, "__version__", "?") for name, m in modules.items()}
    return {"python": platform.python_version(), **found}


def fail(run: Run, error: BaseException) -> None:
    """Mark the run failed, or interrupted (never complete); release the output.

    A new output refused for bad input (a :class:`NucflowError`, e.g. a NaN found while
    preprocessing) before any stage was stored is withdrawn instead: this run's entries and
    claim are removed, so the same command runs again once the input is fixed, with no
    ``--overwrite``. A run.json that cannot be written (no space left) stays "running" with no
    lock: ``nucflow status`` says stopped.
    """
    ours = run.lock is None or run.lock.lost is None  # else run.json is another run's now
    withdrawn = run.claim if ours and _withdrawable(run, error) else None
    if withdrawn is not None:
        with contextlib.suppress(OSError):
            withdrawn.withdraw()
    elif ours:
        if isinstance(error, KeyboardInterrupt):
            signal = "SIGTERM" if isinstance(error, Terminated) else "SIGINT"
            status, extra = "interrupted", {"signal": signal}
        else:
            status, extra = "failed", {"error": f"{type(error).__name__}: {error}"}
        with contextlib.suppress(OSError):
            write_run_json(run, status, **extra)
    _release(run)
    if withdrawn is not None:
        withdrawn.remove_directory()


def _withdrawable(run: Run, error: BaseException) -> bool:
    """Bad input, in an output this run claimed anew, before any stage was stored."""
    return (
        isinstance(error, NucflowError)
        and run.claim is not None
        and run.claim.fresh
        and not any((run.output / WORK).rglob(f"*{fingerprint.SUFFIX}"))
    )


# ----------------------------------------------------------------------------- stages


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
    sigma = tuple(p.sigma / v for v in p.voxel_size)
    steps: list[tuple[str, dict[str, Any]]] = []
    if not p.tissue_mask:
        steps.append(("gaussian", {"sigma": sigma}))
    exact_tophat = p.background == "tophat" and max(p.background_downsample) == 1
    if exact_tophat:  # the full-resolution top-hat joins the Gaussian's pass
        footprint = filters.ellipsoid(p.background_radius, p.voxel_size, decomposition="sequence")
        steps.append(("white_tophat", {"footprint": footprint}))
    final = exact_tophat or p.background == "none"
    name = "preprocessed" if final else "smoothed"
    cells = None
    if p.tissue_mask:
        image = _tissue_smoothed(run)
        image = filters.chain(image, steps) if steps else image  # the exact top-hat, if any
        smoothed = _store_lazy(run, image, name, label="preprocess", ranged=final)
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
    stored = _reuse(run, name)
    if stored is not None:
        return stored, None
    check = partial(_check_finite, path=run.stack.path) if run.data.dtype.kind == "f" else None
    grid = Grid(_region_shape(run.region), p.chunks)
    cells = None if final else _cells_pooled_while_smoothing(run, grid.shape)
    factors = tuple(p.background_downsample)
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
        _mark_done(run, "cells")
    return smoothed, cells


def _cells_pooled_while_smoothing(run: Run, shape: tuple[int, ...]) -> zarr.Array | None:
    """The cell minima's array for the Gaussian's pass to fill (None: they take a pass of their
    own, :func:`stages.pools_while_smoothing`); it saves reading the smoothed stack again."""
    if not stages.pools_while_smoothing(run.params):
        return None
    stored = _reuse(run, "cells")  # in the flow's order; never reusable once smoothed is not
    assert stored is None
    return _create(run, "cells", _cell_grid(run.params, shape), np.float32)


def _cell_grid(p: Params, shape: tuple[int, ...]) -> Grid:
    """The cells of ``background_downsample`` voxels, in blocks of the run's blocks' cells."""
    factors = tuple(p.background_downsample)
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
    assert p.tissue_mask is not None  # preprocess reads it only when one is given
    # the mask covers the whole file: a region of it (nucflow tune) reads the same region
    where = _shifted(run.region, run.stack.origin)
    tissue = io.open_stack(p.tissue_mask).data[where].rechunk(p.chunks) > 0
    sigma = tuple(p.sigma / v for v in p.voxel_size)
    data = _refuse_non_finite(run.data, run.stack.path)
    return filters.normalized_convolution(data, tissue, sigma).astype(np.float32)


def _region_shape(region: Sequence[slice]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in region)


def _subtract_background(
    run: Run, smoothed: zarr.Array, cells: zarr.Array | None = None
) -> zarr.Array:
    """``max(smoothed - background, 0)``, the background estimated on cells of
    ``background_downsample`` voxels (as :func:`nucflow.filters.subtract_background`).

    The cells are 1/prod(downsample) of the stack (1/32 with the defaults) and stored, not held;
    ``cells``: already stored by the Gaussian's pass.
    """
    p = run.params
    factors = tuple(p.background_downsample)
    cell_grid = _cell_grid(p, tuple(smoothed.shape))
    if cells is None:
        cells = _reuse(run, "cells")
    if cells is None:
        cells = _create(run, "cells", cell_grid, np.float32)
        tasks = [
            partial(_pool_task, core, source=smoothed, target=cells, factors=factors)
            for _, core in cell_grid.blocks()
        ]
        run.runner.compute(pass_graph(tasks, "cells"), label="background cells")
        _mark_done(run, "cells")
    cell_size = [v * f for v, f in zip(p.voxel_size, factors, strict=True)]
    steps = filters.background_steps(p.background, p.background_radius, cell_size)
    background = filter_pass(run, "background", cells, steps, cell_grid, label="background")
    grid = Grid(smoothed.shape, p.chunks)
    return _store_blocks(
        run,
        "preprocessed",
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
    steps = configured_steps(run.params, ndim=run.data.ndim)
    return filters.chain(run.stack.data.rechunk(run.params.chunks), steps)


def configured_steps(p: Params, *, ndim: int) -> list[tuple[str, dict[str, Any]]]:
    """``filter.steps`` with lengths in voxels, each step checked against its filter.

    Raises
    ------
    ConfigError
        A step names no filter, or its filter does not take its parameters.
    """
    steps = []
    for name, given in p.filter_steps:
        if name not in filters.STEPS:
            raise ConfigError(
                f"`filter.steps`: unknown filter {name!r}; use one of {', '.join(filters.STEPS)}"
            )
        try:
            in_voxels = filters.in_voxels(name, given, p.voxel_size)  # µm -> voxels
            filters.depth_of(name, ndim=ndim, **in_voxels)  # checks the step's parameters
        except NucflowError as e:
            raise ConfigError(f"`filter.steps`: {e}") from None
        steps.append((name, in_voxels))
    return steps


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


def _refuse_non_finite(image: da.Array, path: str) -> da.Array:
    """Fail the block that holds NaN or infinite voxels, naming it (policy: refuse, exit 2).

    Treating them as background would need a rule for every filter (a Gaussian spreads one NaN
    over its footprint); the check rides on the preprocess pass, which reads every voxel anyway.
    """
    if image.dtype.kind != "f":
        return image
    return da.map_blocks(_check_finite_block, image, path=path, dtype=image.dtype, meta=image._meta)


def _check_finite_block(block: np.ndarray, *, path: str, block_info: dict) -> np.ndarray:
    where = tuple(slice(a, b) for a, b in block_info[0]["array-location"])
    _check_finite(block, where, path=path)
    return block


def _check_finite(block: np.ndarray, where: tuple[slice, ...], *, path: str) -> None:
    bad = block.size - int(np.count_nonzero(np.isfinite(block)))
    if bad:
        raise ParameterError(
            f"input {path} has {bad} NaN or infinite voxel(s) in block {fmt_region(where)}; "
            "replace them (e.g. with 0) before running nucflow"
        )


# ----------------------------------------------------------------------------- stored passes


def _path(run: Run, name: str) -> Path:
    return run.work / f"{name}.zarr"


def _reuse(run: Run, name: str, *, source: zarr.Array | None = None) -> zarr.Array | None:
    """The stored result ``name`` of an earlier attempt, if ``--resume`` may reuse it (same
    fingerprint: :func:`nucflow.fingerprint.reusable`). Call once per stored result.

    With ``source``: a result found equal to it (:func:`_same_as`) is ``source`` itself."""
    path, done = _path(run, name), run.work / f"{name}.done"
    same = _same_path(run, name)
    if source is not None and same.exists():
        path = same
    if fingerprint.reusable(run, name, path, done):
        return source if path == same else zarr.open_array(str(path), mode="r")
    return None


def _same_path(run: Run, name: str) -> Path:
    """The mark of a result equal to its source, stored as that source alone."""
    return run.work / f"{name}.same"


def _same_as(run: Run, name: str, source: zarr.Array) -> zarr.Array:
    """Record that result ``name`` equals ``source`` (nothing written; one planned pass the
    fewer) and return it."""
    shutil.rmtree(_path(run, name), ignore_errors=True)
    table_stage.write_atomic(_same_path(run, name), b"")
    _mark_done(run, name)
    progress_report.skipped(run)
    return source


def _mark_done(run: Run, name: str) -> None:
    table_stage.write_atomic(run.work / f"{name}.done", b"")
    fingerprint.record(run, name)


def _create(run: Run, name: str, grid: Grid, dtype: Any) -> zarr.Array:
    """A fresh ``.work/<name>.zarr`` whose chunks are the pass's blocks (no two tasks share a
    chunk). Float stacks are stored raw: compressing noise costs 3x the write for ~20%.
    Every chunk is written: testing each for emptiness costs more than it saves here."""
    dtype = np.dtype(dtype)
    shutil.rmtree(_histograms(run, name), ignore_errors=True)  # they were of the old array
    return zarr.create_array(
        str(_path(run, name)),
        shape=grid.shape,
        chunks=grid.chunks,
        dtype=dtype,
        fill_value=0,
        compressors=None if dtype.kind == "f" else "auto",
        config={"write_empty_chunks": True},
        overwrite=True,
    )


def _store_blocks(
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
    :func:`_stack_histogram`), in ``.work/<name>.histogram/``. With ``reusable`` (default), a
    result an earlier attempt stored is reused when ``--resume`` may (pass False when the
    caller has checked already). ``also(core, block)`` stores more from each computed block
    (its cells, say).
    """
    stored = _reuse(run, name) if reusable else None
    if stored is not None:
        return stored
    target = _create(run, name, grid, dtype)
    histograms = _fresh_histograms(run, name) if ranged else None
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
    _mark_done(run, name)
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


def _histograms(run: Run, name: str) -> Path:
    """Where the block histograms of ``.work/<name>.zarr`` are kept (:func:`_create` empties it)."""
    return run.work / f"{name}.histogram"


def _fresh_histograms(run: Run, name: str) -> Path:
    folder = _histograms(run, name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def _write_histogram(core: Region, block: np.ndarray, *, folder: Path) -> None:
    name = "_".join(str(s.start) for s in core)  # unique per block, whatever the grid
    table_stage.write_atomic(folder / name, histogram.encode(block))


def _histogram_files(folder: Path) -> list[Path]:
    """The blocks' histogram files (not a partial one a killed task left)."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if not path.name.startswith("."))


def _histogram_task(core: Region, *, source: zarr.Array, folder: Path) -> None:
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
    ``reusable`` and ``also`` as in :func:`_store_blocks`."""
    block = filters.BlockFilter.of(steps, len(grid.shape), source.dtype)
    compute = partial(block.read, source, region=region, check=check)
    return _store_blocks(
        run, name, grid, block.dtype, compute, label=label, ranged=ranged, reusable=reusable,
        also=also,
    )  # fmt: skip


def _store_lazy(run: Run, array: da.Array, name: str, *, label: str, ranged: bool) -> zarr.Array:
    """A lazy dask array stored as ``.work/<name>.zarr`` (for paths not written as passes)."""
    stored = _reuse(run, name)
    if stored is not None:
        return stored
    grid = Grid(tuple(array.shape), run.params.chunks)
    target = _create(run, name, grid, array.dtype)
    # zarr arrays take slice assignment, which is all da.store needs of a target
    store = da.store(array.rechunk(grid.chunks), cast(Any, target), lock=False, compute=False)
    if ranged:
        _, low, high = run.runner.compute(store, array.min(), array.max(), label=label)
        target.attrs["value_range"] = [low.item(), high.item()]
    else:
        run.runner.compute(store, label=label)
    _mark_done(run, name)
    return target


def foreground(run: Run, image: zarr.Array) -> Above | Detected:
    """What the mask stage reads: the local detection, or the image above a global threshold.

    Either needs one global pass first: the background noise (a histogram of the stack) or
    the threshold. Stored in ``.work/threshold.json`` for ``--resume``.
    """
    p = run.params
    if p.threshold_method == "local":
        noise = _stack_value(run, "noise", partial(_noise, run, image))
        return Detected(image, detect_params(p, noise, tuple(image.shape)))
    return Above(image, _stack_value(run, "threshold", partial(_threshold, run, image)))


def detect_params(p: Params, noise: float, shape: tuple[int, ...]) -> DetectParams:
    return DetectParams(
        stack_shape=shape,
        smoothing=() if p.tissue_mask else tuple(p.sigma / v for v in p.voxel_size),
        voxel_size=p.voxel_size,
        blob_radius=p.blob_radius,
        peak_radius=p.peak_radius,
        max_radius=p.max_radius,
        snr=p.snr,
        fraction=p.fraction,
        noise=noise,
    )


def _stack_value(run: Run, name: str, compute: Callable[[], float]) -> float:
    """A number computed from the whole stack, reused by ``--resume`` when still valid."""
    done = run.work / "threshold.json"
    if fingerprint.reusable(run, "threshold", done):
        stored = json.loads(done.read_text())
        if name in stored:
            run.facts[name] = stored[name]
            return stored[name]
    value = compute()
    table_stage.write_atomic(done, json.dumps({name: value}).encode())
    fingerprint.record(run, "threshold")
    run.facts[name] = value
    return value


def _threshold(run: Run, image: zarr.Array) -> float:
    p = run.params
    if p.threshold_method == "value":
        assert p.threshold_value is not None  # stages.check refused a method without a value
        return float(p.threshold_value)
    value_range = _value_range(image)
    with dask.config.set(scheduler=run.runner.scheduler):
        value = filters.threshold(
            da.from_zarr(image),
            method=p.threshold_method,
            value_range=value_range,
        )
    return float(value) * p.threshold_factor


# Bins of the noise estimate: a coarse histogram finds the mode, a fine one spans the values
# up to a little above it (both derived from the stack's range-free histogram).
_MODE_BINS, _NOISE_BINS, _ABOVE_MODE = 1024, 4096, 8


def _value_range(image: zarr.Array) -> tuple[float, float] | None:
    """The (min, max) a ranged pass stored with its result, if any."""
    stored = image.attrs.get("value_range")
    if not isinstance(stored, list | tuple):
        return None
    low, high = stored
    return float(cast(float, low)), float(cast(float, high))


def _noise(run: Run, image: zarr.Array) -> float:
    """The background noise of the stored image (:func:`nucflow.detect.noise_level`), from
    equal-width histograms derived from its range-free one (no pass over it when the pass
    that stored it kept its histograms)."""
    values = _stack_histogram(run, image)
    low, high = values.low, values.high
    if not high > low:
        return 1.0  # a constant image: no blob passes any positive threshold anyway
    # Values at the minimum are left out: a top-hat is exactly 0 wherever the opening touches
    # the image, a spike that is not the noise's mode.
    above_min = float(np.nextafter(np.float32(low), np.float32(np.inf)))
    edges = np.linspace(above_min, high, _MODE_BINS + 1)
    top = float(edges[min(int(np.argmax(values.counts_in(edges))) + _ABOVE_MODE, _MODE_BINS)])
    fine_edges = np.linspace(above_min, top, _NOISE_BINS + 1)
    return detect.noise_level(values.counts_in(fine_edges), fine_edges)


def _stack_histogram(run: Run, image: zarr.Array) -> histogram.Histogram:
    """The sum of the stored preprocessed image's block histograms, read one at a time (the
    driver's memory stays bounded); a pass makes them if its own pass did not store them."""
    folder = _histograms(run, "preprocessed")
    grid = Grid(tuple(image.shape), run.params.chunks)
    files = _histogram_files(folder)
    if len(files) != len(grid):
        folder = _fresh_histograms(run, "preprocessed")
        tasks = [
            partial(_histogram_task, core, source=image, folder=folder) for _, core in grid.blocks()
        ]
        run.runner.compute(pass_graph(tasks, "histograms"), label="histograms")
        files = _histogram_files(folder)
    return histogram.Histogram.of(path.read_bytes() for path in files)


class Above:
    """``source > threshold`` as a readable stack (for a pass reading it with a halo)."""

    def __init__(self, source: Any, threshold: float) -> None:
        self.source, self.threshold = source, threshold
        self.shape, self.dtype = tuple(source.shape), np.dtype(bool)

    def __getitem__(self, key: tuple) -> np.ndarray:
        return np.asarray(self.source[key]) > self.threshold


class Detected:
    """The local detection's foreground as a readable stack; each read adds its own halo."""

    def __init__(self, source: Any, params: DetectParams) -> None:
        self.source, self.params = source, params
        self.shape, self.dtype = tuple(source.shape), np.dtype(bool)

    def __getitem__(self, key: tuple) -> np.ndarray:
        wanted = tuple(slice(*k.indices(n)[:2]) for k, n in zip(key, self.shape, strict=True))
        read = padded(wanted, self.params.halo(), self.shape)
        core = _shifted(wanted, tuple(-r.start for r in read))
        origin = tuple(r.start for r in read)
        return detect.foreground(np.asarray(self.source[read]), self.params, core, origin=origin)


def clean_mask(run: Run, found: Above | Detected) -> zarr.Array:
    """Foreground mask: detection, opening, hole filling, small-object removal (bool).

    Detection (:func:`foreground`) and the opening are one pass; hole filling and small-object
    removal are
    global (a hole or an object may span blocks) and each runs as three passes over the
    stored mask before it (:func:`select_components`).
    """
    p = run.params
    steps: list[tuple[str, dict[str, Any]]] = []
    if p.opening_radius > 0:
        steps.append(("opening", {"footprint": filters.ellipsoid(p.opening_radius, p.voxel_size)}))
    grid = Grid(found.shape, p.chunks)
    mask = filter_pass(run, "opened", found, steps, grid, label="threshold")
    if p.fill_holes:
        mask = select_components(run, "filled", mask, _touches_border, invert=True)
    min_voxels = int(p.min_volume / math.prod(p.voxel_size))
    if min_voxels > 0:
        mask = select_components(run, "mask", mask, partial(_larger, limit=min_voxels))
    return mask


def _touches_border(_sizes: np.ndarray, touches_border: np.ndarray) -> np.ndarray:
    return touches_border


def _larger(sizes: np.ndarray, _touches_border: np.ndarray, *, limit: int) -> np.ndarray:
    return sizes > limit


def select_components(
    run: Run,
    name: str,
    source: zarr.Array,
    decide: components.Decision,
    *,
    invert: bool = False,
) -> zarr.Array:
    """The components of a stored mask that ``decide`` keeps, stored as ``.work/<name>.zarr``.

    Three passes (see :class:`nucflow.components.BlockComponents`): each block labels itself,
    decides the components that lie wholly inside it, reports the others' sizes and stores
    its faces in ``.work/<name>.faces/``; each block matches its faces with its upper
    neighbours'; the driver joins the crossing components (its memory grows with their
    number: ~40 bytes each, those touching a block face); each block writes what is kept.
    With ``invert``, the components of ``~source`` are selected and the result is inverted
    (hole filling keeps the background that touches the image border).

    When every component is kept, the third pass is skipped: the result is ``source`` itself
    and ``.work/<name>.same`` says so (to ``--resume``).
    """
    stored = _reuse(run, name, source=source)
    if stored is not None:
        return stored
    _same_path(run, name).unlink(missing_ok=True)
    grid = Grid(tuple(source.shape), run.params.chunks)
    faces = run.work / f"{name}.faces"
    faces.mkdir(exist_ok=True)
    blocks = [index for index, _ in grid.blocks()]
    summarize = [
        partial(
            _summarize_task,
            index,
            source=source,
            grid=grid,
            invert=invert,
            faces=faces,
            decide=decide,
        )
        for index in blocks
    ]
    (found,) = run.runner.compute(pass_graph(summarize, f"{name}-summaries"), label=name)
    summaries = [summary for summary, _ in found]
    match = [partial(_match_task, index, faces=faces, grid=grid) for index in blocks]
    (matched,) = run.runner.compute(pass_graph(match, f"{name}-faces"), label=name)
    shutil.rmtree(faces, ignore_errors=True)
    where = [(axis, index) for index in blocks for axis, _ in grid.neighbours_above(index)]
    pairs = [p for per_block in matched for p in per_block]
    keep = components.join(summaries, pairs, blocks=blocks, where=where, decide=decide)
    keeps_all = {
        index: own and bool(keep[index][1:].all())
        for index, (_, own) in zip(blocks, found, strict=True)
    }
    if all(keeps_all.values()):
        # Every component kept (no hole, no small object: the usual case with the local
        # detection): the result is the source, and the pass that would copy it is skipped.
        return _same_as(run, name, source)
    compute = partial(_kept_task, decide=decide, source=source, grid=grid, invert=invert)
    per_block = {
        index: {"keep": table, "keeps_all": keeps_all[index]} for index, table in keep.items()
    }
    return _store_blocks(
        run, name, grid, bool, compute, label=name, reusable=False, per_block=per_block
    )


def _edges(grid: Grid, index: tuple[int, ...]) -> list[tuple[bool, bool]]:
    return [(i == 0, i == n - 1) for i, n in zip(index, grid.counts, strict=True)]


def _block_components(
    index: tuple[int, ...], source: zarr.Array, grid: Grid, invert: bool
) -> components.BlockComponents:
    block = np.asarray(source[grid.core(index)], dtype=bool)
    return components.BlockComponents(~block if invert else block, _edges(grid, index), 1)


def _face_file(faces: Path, index: tuple[int, ...]) -> Path:
    return faces / ("_".join(map(str, index)) + ".npz")


def _summarize_task(
    index: tuple[int, ...],
    *,
    source: zarr.Array,
    grid: Grid,
    invert: bool,
    faces: Path,
    decide: components.Decision,
) -> tuple[tuple[int, np.ndarray, np.ndarray], bool]:
    """The block's crossing components (for the join), and whether it keeps all its own."""
    found = _block_components(index, source, grid, invert)
    faces_of: dict[str, Any] = found.faces()  # names -> arrays (not savez's own keywords)
    np.savez_compressed(_face_file(faces, index), **faces_of)
    return found.summary(), found.keeps_own(decide)


def _match_task(index: tuple[int, ...], *, faces: Path, grid: Grid) -> list[np.ndarray]:
    with np.load(_face_file(faces, index)) as own:
        out = []
        for axis, above in grid.neighbours_above(index):
            with np.load(_face_file(faces, above)) as other:
                out.append(components.face_pairs(own[f"{axis}hi"], other[f"{axis}lo"], 1))
    return out


def _kept_task(
    core: Region,
    *,
    source: zarr.Array,
    grid: Grid,
    invert: bool,
    keep: np.ndarray,
    decide: components.Decision,
    keeps_all: bool,
) -> np.ndarray:
    if keeps_all:  # the block as it is: no labelling
        return np.asarray(source[core], dtype=bool)
    kept = _block_components(grid.index_of(core), source, grid, invert).kept(keep, decide)
    return ~kept if invert else kept


def blocks_of(
    shape: Sequence[int], chunks: Sequence[int]
) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """(grid index, core slices) of every block of ``chunks`` tiling ``shape``."""
    return Grid(tuple(shape), tuple(chunks)).blocks()


def segment(run: Run, mask: zarr.Array) -> None:
    """Label every block's core with its halo and write the label image.

    Each task reads its padded mask block and its core's intensities, writes its core of
    ``labels.ome.zarr`` (only if it holds a nucleus) and the mergeable sums of its core's
    labels to ``.work/blocks/``, filed by the block owning each nucleus
    (:func:`nucflow.table.write_sums`; :func:`table` makes the rows); finished blocks are
    skipped on ``--resume``.
    """
    shape = tuple(mask.shape)
    full_shape = tuple(run.stack.data.shape)
    labels_path = run.entry(LABELS)
    parts_dir = run.work / "blocks"
    # Labels and block parts are reused only with the fingerprint they were made with.
    reuse = fingerprint.reusable(run, "segment", labels_path, parts_dir)
    if reuse:
        labels = label_image(run, mode="r+")
    else:
        shutil.rmtree(parts_dir, ignore_errors=True)
        labels = _fresh_labels(run)
    fingerprint.record(run, "segment")  # before any block: every part from now on is of it
    parts_dir.mkdir(exist_ok=True)
    readers = table_stage.intensity_readers(run.stack, run.params.channels)
    halo = run.segment_params.halo()
    tasks, part_files = [], []
    grid = _segment_grid(run, shape)
    for index, core in grid.blocks():
        part = parts_dir / table_stage.part_name(index)
        part_files.append(part)
        if reuse and part.exists():
            continue
        tasks.append(
            partial(
                _segment_task,
                mask,
                readers,
                labels,
                run.segment_params,
                padded=padded(core, halo, shape),
                core=core,
                offset=run.offset,
                shape=full_shape,
                sums=(parts_dir, index, grid),
            )
        )
    run.facts["blocks"] = {"total": len(part_files), "computed": len(tasks)}
    if tasks:
        run.runner.compute(pass_graph(tasks, "segment"), label="segment")


def _segment_grid(run: Run, shape: tuple[int, ...]) -> Grid:
    """Blocks of the stack's own grid, so each task writes whole chunks of labels.ome.zarr."""
    chunks = run.params.chunks
    return Grid(shape, chunks, tuple(o % c for o, c in zip(run.offset, chunks, strict=True)))


def pyramid(run: Run) -> None:
    """Levels 1, 2, … of ``labels.ome.zarr`` (:mod:`nucflow.pyramid`): one pass per level.

    Each level is read from the stored level before it, over the data region only (labels are
    0 elsewhere). Blocks an earlier attempt finished (marks in ``.work/pyramid/``) are skipped
    on ``--resume`` when the labels are the ones it downsampled (same fingerprint chain).
    """
    from nucflow import pyramid as pyramid_levels

    marks = run.work / "pyramid"
    keep = fingerprint.reusable(run, "pyramid", marks)
    fingerprint.record(run, "pyramid")  # before any block: every mark from now on is of it
    path = run.output / "labels.ome.zarr"
    # The stored label image's shape: with a leading time axis, level factors are 1 on it and
    # every time point is covered (each has a data region of its own).
    shape = tuple(zarr.open_array(str(path / "0"), mode="r").shape)
    region = run.region if len(shape) == len(run.region) else None
    factors = pyramid_levels.level_factors(shape, run.params.voxel_size)
    shapes = pyramid_levels.build(
        run.runner, path, factors, method="nearest", region=region, marks=marks, keep=keep
    )
    run.facts["pyramid_shapes"] = [list(s) for s in shapes]


def table(run: Run) -> table_stage.Table:
    """One row per nucleus, made final by the block owning its seed (:mod:`nucflow.table`).

    The driver holds counts and a sample of at most ``table.QC_SAMPLE_ROWS`` rows. With
    ``measure.drop_border``, the owner leaves out its nuclei touching the border, and a pass
    over the blocks near the border erases them from ``labels.ome.zarr``
    (:func:`nucflow.table.clear_border`).
    """
    p = run.params
    shape = _region_shape(run.region)
    grid = _segment_grid(run, shape)
    reach = run.segment_params.voxels(p.max_radius)
    labels = label_image(run, mode="r+")
    measured = table_stage.Objects(
        object_spec(run), labels, table_stage.intensity_readers(run.stack, p.channels)
    )
    made = table_stage.gather(
        run.runner,
        grid,
        sums=run.work / "blocks",
        out=run.work / "table",
        offset=run.offset,
        full_shape=tuple(run.stack.data.shape),
        reach=reach,
        finalize={
            "voxel_size": p.voxel_size,
            "shape": shape,
            "origin": run.offset,
            "max_radius": p.max_radius,
            "channel_suffixes": table_stage.channel_suffixes(p.channels),
        },
        metadata=table_stage.metadata(p, calibrated=calibrated(run)),
        measured=measured,
        drop_border=p.drop_border,
    )
    if p.drop_border:
        fingerprint.forget(run, "segment")  # the labels are no longer the segmentation's alone
        table_stage.clear_border(
            run.runner, grid, labels=labels, out=run.work / "table", offset=run.offset, reach=reach
        )
        run.facts["dropped_border"] = made.dropped
    return made


def label_image(run: Run, mode: str = "r") -> zarr.Array | io.TimePoint:
    """The run's level-0 label image in stack coordinates (its time point's, in a time-lapse)."""
    labels = zarr.open_array(str(run.output / "labels.ome.zarr" / "0"), mode=mode)
    return labels if run.time is None else io.TimePoint(labels, run.time)


def label_dtype(shape: Sequence[int]) -> np.dtype:
    """uint32 when every id fits (1 + a voxel's linear index: stacks up to 4.29 G voxels), else
    uint64: half the bytes to write, read and downsample for all but the largest stacks."""
    return np.dtype(np.uint32 if math.prod(shape) <= np.iinfo(np.uint32).max else np.uint64)


def label_chunks(chunks: Sequence[int]) -> tuple[int, ...]:
    """Storage chunks of ``labels.ome.zarr``: a block's half along each axis where it splits
    evenly into halves of at least 32 voxels.

    Reading a nucleus' box decompresses every chunk it touches: the table's box of a block
    (its core and a margin of ``max_radius``) touches 27 block-sized chunks, 10x its own
    voxels; in halves about 3x. Each block still writes whole chunks.
    """
    return tuple(c // 2 if c % 2 == 0 and c >= 64 else c for c in chunks)


def _fresh_labels(run: Run) -> zarr.Array | io.TimePoint:
    """An empty label image for the segmentation (a time-lapse: its time point emptied)."""
    p = run.params
    path = run.entry(LABELS)
    if run.time is None:
        shape = tuple(run.stack.data.shape)
        chunks, dtype = label_chunks(p.chunks), label_dtype(shape)
        return io.create_label_zarr(path, shape, chunks, p.voxel_size, dtype=dtype, overwrite=True)
    labels = label_image(run, mode="r+")
    assert isinstance(labels, io.TimePoint)  # run.time is set: one time point of the movie
    io.clear_timepoint(labels.array, run.time)
    return labels


def object_spec(run: Run) -> objects.Spec:
    """The object-level properties of ``measure.properties``, checked against the stack."""
    p = run.params
    return objects.Spec.of(
        p.properties,
        ndim=len(p.voxel_size),
        voxel_size=p.voxel_size,
        suffixes=table_stage.channel_suffixes(p.channels),
        settings=objects.Settings(p.percentiles, p.shell_width, p.neighbour_distance),
    )


def _segment_task(
    mask_store: zarr.Array,
    readers: dict[str, Any],
    labels: zarr.Array | io.TimePoint,
    params: SegmentParams,
    *,
    padded: tuple[slice, ...],
    core: tuple[slice, ...],
    offset: tuple[int, ...],
    shape: tuple[int, ...],
    sums: tuple[Path, tuple[int, ...], Grid],
) -> int:
    """Segment one block; ``padded`` and ``core`` index the mask, which starts at ``offset``.

    ``sums`` is (folder, block index, grid) for :func:`nucflow.table.write_sums`.
    """
    mask_region = padded
    padded, core = _shifted(padded, offset), _shifted(core, offset)
    try:
        mask = np.asarray(mask_store[mask_region], dtype=bool)
        intensities = {suffix: reader[core] for suffix, reader in readers.items()}
        stats = _segment_core(mask, intensities, labels, params, padded, core, shape)
        folder, index, grid = sums
        table_stage.write_sums(stats, folder, index, grid, offset=offset, full_shape=shape)
        return len(stats)
    except NucflowError as e:
        raise type(e)(f"block {fmt_region(core)}: {e}") from e
    except Exception as e:
        if environment_message(e):  # the machine's (disk full, read-only): said as it is
            raise
        raise BlockError(
            f"block {fmt_region(core)} failed: {type(e).__name__}: {e}; if it ran out of "
            "memory, rerun with smaller --chunks"
        ) from e


def _shifted(region: tuple[slice, ...], offset: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(s.start + o, s.stop + o) for s, o in zip(region, offset, strict=True))


def _segment_core(
    mask: np.ndarray,
    intensities: dict[str, np.ndarray],
    labels: zarr.Array | io.TimePoint,
    params: SegmentParams,
    padded: tuple[slice, ...],
    core: tuple[slice, ...],
    shape: tuple[int, ...],
) -> pd.DataFrame:
    origin = tuple(s.start for s in padded)
    local_core = tuple(slice(c.start - o, c.stop - o) for c, o in zip(core, origin, strict=True))
    lab, seed_distance = segment_block(
        mask, params, origin=origin, global_shape=shape, core=local_core
    )
    if lab.any():
        labels[core] = lab.astype(labels.dtype, copy=False)
    return measure.block_stats(lab, seed_distance, intensities, origin=[c.start for c in core])


# ----------------------------------------------------------------------------- outputs


def finish_stack(run: Run, path: Path) -> dict[str, Any]:
    """Mark a filter-only run complete."""
    if run.lock is not None:
        run.lock.check()  # never "complete" over another run's output
    shutil.rmtree(run.work, ignore_errors=True)
    counts = {"stack": path.name}
    write_run_json(run, "complete", counts=counts)
    _release(run)
    return counts


def write_table(run: Run, table: table_stage.Table, empty: pd.DataFrame) -> str:
    """``nuclei.parquet`` and ``nuclei.csv`` (:func:`nucflow.table.write`), listed first."""
    for name in table_stage.OUTPUT_NAMES:
        run.entry(name)
    return table_stage.write(
        table, run.output, single_file_rows=run.params.single_file_rows, empty=empty
    )


def finish(run: Run, table: table_stage.Table) -> dict[str, Any]:
    """Write the table, QC pictures and the final run.json; remove the intermediates."""
    p = run.params
    with run.stage("write"):
        empty = table.empty
        if empty is None:
            empty = measure.empty_table(len(run.region), table_stage.channel_suffixes(p.channels))
        written = write_table(run, table, empty)
        from nucflow import labels_table

        rows = labels_table.write(run.output / "labels.ome.zarr", run.output / "nuclei.parquet")
        run.facts["labels_table"] = f"labels.ome.zarr/tables/{labels_table.NAME} ({rows} rows)"
        if written == "dataset":
            run.facts["table"] = (
                f"nuclei.parquet/ is a partitioned dataset of {len(table.parts)} part(s), rows "
                f"grouped by block; no nuclei.csv above measure.single_file_rows = "
                f"{p.single_file_rows:,} rows"
            )
        if p.qc:
            from nucflow import qc

            labels = da.from_zarr(str(run.output / "labels.ome.zarr" / "0"))
            if run.timepoints is not None:  # the pictures show the stack's (first) time point
                labels = labels[run.stack.timepoint]
            labels = labels[run.region]
            sample = table.sample
            windows = qc.write(run.entry("qc"), run.data, labels, sample, origin=run.offset)
            run.facts["qc_outline_windows_yx"] = [[[s.start, s.stop] for s in w] for w in windows]
            if len(sample) < table.rows:
                run.facts["qc_sample_rows"] = len(sample)
    counts = {"nuclei": table.rows, "truncated": table.truncated}
    if run.timepoints is not None:
        counts["timepoints"] = run.facts.get("timepoints", {}).get("counts", {})
    if table.truncated:
        fix = (
            f"rerun with --set segment.max_radius={1.5 * p.max_radius:g} (or a larger --diameter)"
            if calibrated(run)
            else "the input has no voxel size: pass --voxel-size (anisotropic voxels counted as "
            "cubes make nuclei look elongated), then check --diameter"
        )
        warnings.warn(
            f"{table.truncated} nuclei reached segment.max_radius = {p.max_radius:g}; they may be "
            f"cut: {fix}",
            stacklevel=2,
        )
    if run.lock is not None:
        run.lock.check()  # never "complete" over another run's output
    shutil.rmtree(run.work, ignore_errors=True)
    write_run_json(run, "complete", counts=counts)
    _release(run)
    return counts
