"""``nucflow plan``: what a run will do and cost, measured on one real block before it starts.

The plan lists the data region (zarr chunks never written are skipped), blocks, halo, the
overlap overhead, the size of the task graph (built for real, lazily, and timed), and runs the
flow itself on one block of the stack, single-threaded in a scratch directory, to calibrate
the time and memory estimates.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import dask
import dask.local

from nucflow import io, pipeline, pyramid, resample, stages, table
from nucflow.blockpass import Grid, pass_graph
from nucflow.cluster import Runner
from nucflow.config import Params
from nucflow.errors import ParameterError
from nucflow.segment import whole_voxels

__all__ = ["Plan", "make_plan", "check_native_chunks", "cost_warning", "read_overlap"]

# Stages whose work grows with the segmentation halo.
_PER_PADDED_BLOCK = ("segment", "write")


@dataclasses.dataclass
class Plan:
    """Facts and estimates printed by ``nucflow plan`` (times in s, sizes in MiB)."""

    stack: io.Stack
    params: Params
    region: tuple[slice, ...]
    halo: tuple[int, ...]
    n_blocks: int
    padded_voxels: int
    overlap: float
    n_tasks: int
    graph_seconds: float
    block_voxels: int
    block_timings: dict[str, float]
    block_peak_mib: float
    block_nuclei: int
    threads: int
    timepoints: int | None = None  # a time-lapse: time points selected (each a run of its own)
    flow: tuple[stages.Stage, ...] = pipeline.NUCLEI  # the stages planned
    read_seconds: float = 0.0  # reading the central block with its halo from the input, once

    @property
    def block_seconds(self) -> float:
        return sum(self.block_timings.values())

    @property
    def estimate_seconds(self) -> float:
        """The estimate of one time point (:attr:`stack_seconds`) times the time points."""
        return self.stack_seconds * (self.timepoints or 1)

    @property
    def serial_seconds(self) -> float:
        """One time point on one thread: the calibrated rates times the voxels each stage reads.

        Segmentation (and writing its results) reads every block with its halo; the other
        stages read the data region once (their halos are small).
        """
        per_block = sum(self.block_timings.get(s, 0.0) for s in _PER_PADDED_BLOCK)
        rest = self.block_seconds - per_block
        region = math.prod(s.stop - s.start for s in self.region)
        voxels = rest * region + per_block * self.padded_voxels
        return voxels / self.block_voxels

    @property
    def busy_threads(self) -> int:
        """Threads a pass keeps busy: no more than its blocks (time points run one by one)."""
        return max(1, min(self.threads, self.n_blocks))

    @property
    def stack_seconds(self) -> float:
        """One time point: :attr:`serial_seconds` spread over :attr:`busy_threads` (a one-block
        stack takes its block's time, whatever the threads)."""
        return self.serial_seconds / self.busy_threads

    @property
    def nuclei_estimate(self) -> float:
        """Nuclei in the data region, from their density in the calibration block."""
        region = math.prod(s.stop - s.start for s in self.region)
        return self.block_nuclei / self.block_voxels * region * (self.timepoints or 1)

    @property
    def crossing_estimate(self) -> float:
        """Nuclei cut by a block face: those within a diameter of one (the driver joins them)."""
        diameter = [self.params.diameter / v for v in self.params.voxel_size]
        inside = math.prod(
            max(0.0, 1 - d / c) for d, c in zip(diameter, self.params.chunks, strict=True)
        )
        return self.nuclei_estimate * (1 - inside)

    @property
    def _halo_source(self) -> str:
        if self.params.segment.method != "builtin":
            return f"segment.halo_um = {self.params.segment.halo_um:g}"
        return f"from diameter {self.params.diameter:g}"

    @property
    def _movie(self) -> str:
        if self.timepoints is None:
            return ""
        return (
            f" x {self.timepoints} time point(s) = {self.n_blocks * self.timepoints} blocks "
            "(each time point segmented as a stack of its own; figures below per time point, "
            "time and nuclei for all)"
        )

    @property
    def _table_form(self) -> str:
        if self.nuclei_estimate <= self.params.measure.single_file_rows:
            return "one nuclei.parquet and nuclei.csv"
        return "a partitioned nuclei.parquet/, no CSV"

    @property
    def _reader_line(self) -> str:
        """Which reader opened the input, its stored chunks, and what one block's read cost."""
        native = self.stack.native_chunks
        chunks = "x".join(map(str, native)) if native else "none (read whole)"
        size = self.block_voxels * self.stack.data.dtype.itemsize
        rate = size / 1e6 / self.read_seconds if self.read_seconds > 0 else float("inf")
        return (
            f"reader     {self.stack.format or 'computed'}; stored chunks {chunks}; reading one "
            f"block with its halo ({size / 2**20:.1f} MiB) took {self.read_seconds:.2f} s "
            f"({rate:.0f} MB/s on one thread)"
        )

    def seconds_per_tb(self, threads: int) -> float:
        """Estimated wall time for 10^12 bytes of this stack's dtype on ``threads`` threads."""
        region = math.prod(s.stop - s.start for s in self.region)
        voxels = 1e12 / self.stack.data.dtype.itemsize
        return self.serial_seconds / threads * voxels / region  # a TB has blocks for them all

    @property
    def _shape(self) -> str:
        """``shape (16, 48, 48)``; a time-lapse says its T: ``shape (3, 16, 48, 48) (t, z, y,
        x; 3 time points, each (16, 48, 48))``."""
        shape = tuple(self.stack.data.shape)
        n = self.stack.n_timepoints
        if n <= 1:
            return f"shape {shape}"
        axes = ", ".join(("t", *self.stack.axes))
        return f"shape {(n, *shape)} ({axes}; {n} time points, each {shape})"

    @property
    def _time(self) -> str:
        """The estimate, and the threads it keeps busy (fewer than given on few blocks)."""
        busy = self.busy_threads
        threads = (
            f"{self.threads} worker thread(s)"
            if busy == self.threads
            else f"{busy} of {self.threads} worker thread(s) ({self.n_blocks} block(s) a pass)"
        )
        points = f" for {self.timepoints} time point(s)" if self.timepoints else ""
        return (
            f"about {_duration(self.estimate_seconds)}{points} on {threads}; divide by the "
            "threads you give it, up to one per block"
        )

    def __str__(self) -> str:
        shape = tuple(self.stack.data.shape)
        region_shape = tuple(s.stop - s.start for s in self.region)
        share = math.prod(region_shape) / math.prod(shape)
        box = ", ".join(f"{s.start}:{s.stop}" for s in self.region)
        return "\n".join(
            [
                f"input      {self.stack.path}: {self._shape}, {self.stack.data.dtype}, "
                f"voxel {self.params.voxel_size} µm",
                f"data       [{box}] ({share:.2%} of the stack; unwritten chunks are skipped)",
                self._reader_line,
                f"blocks     {self.n_blocks} of {self.params.chunks} voxels" + self._movie,
                f"halo       {self.halo} voxels (segmentation; {self._halo_source})",
                f"overlap    {self.overlap:.2f}x the data is read while segmenting",
                f"stages     {_stages_line(self.flow, self.params, tuple(self.stack.data.shape))}",
                f"tasks      {self.n_tasks} in passes of at most {self.n_blocks + 1} (a pass's "
                f"graph built in {self.graph_seconds:.1f} s)",
                f"one block  {self.block_seconds:.1f} s on one thread, peak "
                f"{self.block_peak_mib:.0f} MiB (measured on the central block and its halo)",
                f"memory     at most {self.block_peak_mib:.0f} MiB per busy worker thread "
                "(each task holds one block and its halo, whatever the stack's size)",
                f"driver     ~{self.nuclei_estimate:,.0f} nuclei, written by the workers ("
                f"{self._table_form}); the driver holds a QC sample of at most "
                f"{table.QC_SAMPLE_ROWS:,} rows (~{table.QC_SAMPLE_ROWS * _ROW_BYTES / 2**20:.0f} "
                f"MiB) and the mask components crossing block faces (~"
                f"{self.crossing_estimate * _COMPONENT_BYTES / 2**20:,.0f} MiB); scheduler "
                f"~{(self.n_blocks + 1) * _TASK_KIB / 1024:,.0f} MiB ({_TASK_KIB} KiB per task of "
                "a pass)",
                f"time       {self._time}",
                f"per TB     about {_duration(self.seconds_per_tb(self.threads))} on "
                f"{self.threads} thread(s), {_duration(self.seconds_per_tb(640))} on 640 "
                "(e.g. 20 nodes x 32 cores; compute only, the file system assumed to keep up)",
            ]
        )


def make_plan(
    stack: io.Stack,
    params: Params,
    config: dict[str, Any],
    flow: Any,
    *,
    threads: int | None = None,
    timepoints: int | None = None,
) -> Plan:
    """Measure what a run of ``flow`` on ``stack`` will cost.

    Parameters
    ----------
    stack : io.Stack
    params : Params
    config : dict
        The loaded configuration (recorded in the scratch run).
    flow : module
        The flow (:func:`nucflow.flowrun.load_flow`): its ``run(job)`` runs once on a single
        block to calibrate; its ``STAGES`` give the passes and tasks.
    threads : int, optional
        Worker threads the estimate assumes; default: this machine's cores.
    timepoints : int, optional
        A time-lapse: the number of time points to segment (``stack`` is one of them).

    Returns
    -------
    Plan
    """
    region = pipeline.data_region(stack, params.chunks)
    shape = tuple(s.stop - s.start for s in region)
    halo = pipeline.segment_halo(params)
    blocks = list(pipeline.blocks_of(shape, params.chunks))
    padded = _padded_voxels(shape, params.chunks, halo)
    n_tasks = sum(pass_tasks(params, shape, flow.STAGES).values())
    graph_seconds = _graph_seconds(shape, params)
    box, timings, peak, nuclei = _calibrate(stack, params, config, flow.run, region, halo)
    return Plan(
        read_seconds=_read_seconds(stack, box),
        stack=stack,
        params=params,
        region=region,
        halo=halo,
        n_blocks=len(blocks),
        padded_voxels=padded,
        overlap=padded / math.prod(shape),
        n_tasks=n_tasks,
        graph_seconds=graph_seconds,
        block_voxels=math.prod(s.stop - s.start for s in box),
        block_timings=timings,
        block_peak_mib=peak,
        block_nuclei=nuclei,
        threads=threads or os.cpu_count() or 1,
        timepoints=timepoints,
        flow=tuple(flow.STAGES),
    )


def _padded_shape(core: tuple[slice, ...], halo: tuple[int, ...], shape: tuple[int, ...]) -> list:
    return [
        min(n, c.stop + h) - max(0, c.start - h) for c, h, n in zip(core, halo, shape, strict=True)
    ]


def pass_tasks(
    params: Params, shape: tuple[int, ...], flow: Sequence[stages.Stage] = pipeline.NUCLEI
) -> dict[str, int]:
    """Tasks per stage of ``flow`` (default: the nuclei flow) on a region of ``shape``, from
    its passes (:func:`nucflow.stages.pass_grids`).

    Every pass is one task per block of its grid plus one that gathers the blocks' small
    results; a result that is a histogram reduction adds one task per block and dask's
    reduction tree (a task per 8 partial sums).
    """
    blocks = len(Grid(shape, params.chunks))
    factors = tuple(params.preprocess.background_downsample)
    cell_chunks = tuple(max(1, c // f) for c, f in zip(params.chunks, factors, strict=True))
    reach = whole_voxels(params.segment.max_radius, params.voxel_size)
    grids = {
        "blocks": blocks,
        "cells": len(Grid(resample.pooled_shape(shape, factors), cell_chunks)),
        "border": len(table.border_blocks(Grid(shape, params.chunks), reach)),
    }
    level = shape  # the label pyramid's levels, each a pass over its chunks in the region
    for k, level_factors in enumerate(pyramid.level_factors(shape, params.voxel_size), start=1):
        level = tuple(math.ceil(n / f) for n, f in zip(level, level_factors, strict=True))
        grids[f"level{k}"] = len(Grid(level, params.chunks))
    tasks = {}
    for stage in flow:
        n = sum(grids[grid] + 1 for grid in stage.passes(params, shape))
        if any(result.reduction for result in stage.results(params, shape)):
            n += blocks + math.ceil(blocks / 7) + 1
        if n:
            tasks[stage.name] = n
    return tasks


def _stages_line(flow: Sequence[stages.Stage], params: Params, shape: tuple[int, ...]) -> str:
    """``preprocess 4 passes -> smoothed, cells, ... | threshold ...``: the flow's stages."""
    parts = []
    for stage in flow:
        passes = len(stage.passes(params, shape))
        stored = [r.name for r in stage.results(params, shape) if r.stored]
        text = f"{stage.name} {passes} pass{'es' if passes != 1 else ''}"
        parts.append(text + (f" -> {', '.join(stored)}" if stored else ""))
    return " | ".join(parts)


def _graph_seconds(shape: tuple[int, ...], params: Params) -> float:
    """Time to build the graph of one pass over every block (the stages build one per pass)."""
    start = time.perf_counter()
    pass_graph([partial(_noop, core) for _, core in Grid(shape, params.chunks).blocks()])
    return time.perf_counter() - start


def _noop(core: tuple[slice, ...]) -> None:
    return None


def _scratch(path: str) -> Any:
    from pathlib import Path

    out = Path(path) / "run"
    (out / pipeline.WORK).mkdir(parents=True)
    return out


def _calibrate(
    stack: io.Stack,
    params: Params,
    config: dict[str, Any],
    flow: Callable[[pipeline.Run], Any],
    region: tuple[slice, ...],
    halo: tuple[int, ...],
) -> tuple[tuple[slice, ...], dict[str, float], float, int]:
    """Run the flow on the central block with its halo, as one block, on one thread.

    Returns the box, the flow's stage timings (s), the peak memory (MiB) it needed and the
    nuclei it found.
    """
    shape = tuple(s.stop - s.start for s in region)
    core = tuple(
        slice(s.start + (n // 2 // c) * c, s.start + min(n, (n // 2 // c + 1) * c))
        for s, n, c in zip(region, shape, params.chunks, strict=True)
    )
    box = tuple(
        slice(max(r.start, c.start - h), min(r.stop, c.stop + h))
        for c, h, r in zip(core, halo, region, strict=True)
    )
    one_block = dataclasses.replace(params, chunks=tuple(s.stop - s.start for s in box), qc=False)
    runner = Runner("sync", scheduler=dask.local.get_sync, progress=False)
    before = _peak_mib()
    with tempfile.TemporaryDirectory(prefix="nucflow-plan-") as scratch:
        # the box as a stack of its own: its one block then fills one chunk of every output
        whole = tuple(slice(0, s.stop - s.start) for s in box)
        run = pipeline.Run(
            stack.crop(box), one_block, _scratch(scratch), runner, config, region=whole
        )
        with dask.config.set(scheduler=runner.scheduler), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the block's own findings are not the run's
            counts = flow(run)
    peak = max(_peak_mib() - before, 0.0) + _BASELINE_MIB
    return box, run.timings, peak, int(counts.get("nuclei", 0))


def _read_seconds(stack: io.Stack, box: tuple[slice, ...]) -> float:
    """Seconds to read ``box`` of ``stack`` from its input, as a task of the first pass does."""
    start = time.perf_counter()
    stack.reader[box]
    return time.perf_counter() - start


# A table row in pandas (~25 float64/int64 columns), a face-crossing component in the join
# (size, border flag, matched pairs) and a task's scheduler state (dask's rule of thumb).
_ROW_BYTES = 200
_COMPONENT_BYTES = 40
_TASK_KIB = 1

# Memory a worker holds besides the block: interpreter, numpy/scipy/dask imports.
_BASELINE_MIB = 150


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _duration(seconds: float) -> str:
    if seconds < 10:  # the one-block line says tenths: the total must not read "0 s" beside it
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def memory_per_thread(threads: int | None = None) -> int:
    """Bytes of memory this machine has per worker thread: physical memory, or the process's
    address-space limit if lower, over the threads."""
    import psutil

    total = psutil.virtual_memory().total
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        total = min(total, soft)
    return total // (threads or os.cpu_count() or 1)


def check_native_chunks(stack: io.Stack, *, threads: int | None = None) -> None:
    """Refuse an input stored in chunks that a task could not hold.

    Every read decompresses whole stored chunks; one larger than a quarter of the memory
    per worker thread (:func:`memory_per_thread`) would fail with MemoryError mid-run.

    Raises
    ------
    ParameterError
        Naming the chunk shape, its size, the budget and the fix.
    """
    if not stack.native_chunks:
        return
    size = math.prod(stack.native_chunks) * stack.data.dtype.itemsize
    budget = memory_per_thread(threads) // 4
    if size > budget:
        shape = "x".join(map(str, stack.native_chunks))
        raise ParameterError(
            f"--input {stack.path} is stored in chunks of {shape} voxels ({size / 2**30:.2f} GiB "
            f"each), and every read decompresses whole chunks: more than a quarter of the "
            f"{4 * budget / 2**30:.2f} GiB per worker thread here; rewrite the input in smaller "
            "chunks (e.g. 64x256x256), or run where each thread has more memory"
        )


def _padded_voxels(shape: tuple[int, ...], chunks: tuple[int, ...], halo: tuple[int, ...]) -> int:
    blocks = pipeline.blocks_of(shape, chunks)
    return sum(math.prod(_padded_shape(core, halo, shape)) for _, core in blocks)


def read_overlap(shape: tuple[int, ...], chunks: tuple[int, ...], halo: tuple[int, ...]) -> float:
    """Voxels the segmentation reads (each block with its halo) over the stack's voxels."""
    return _padded_voxels(shape, chunks, halo) / math.prod(shape)


#: Above this read overlap a run warns that its blocks are too small for their halo.
MAX_OVERLAP = 4.0


def cost_warning(params: Params, shape: tuple[int, ...]) -> str | None:
    """One line when the blocks are too small for the halo (reads above :data:`MAX_OVERLAP`
    times the data, or a block thinner than its halo), with the ``--chunks`` to use instead."""
    from nucflow.config import default_chunks

    halo = pipeline.segment_halo(params)
    overlap = read_overlap(shape, params.chunks, halo)
    thin = any(c < h and c < n for c, h, n in zip(params.chunks, halo, shape, strict=True))
    if overlap <= MAX_OVERLAP and not thin:
        return None
    better = tuple(
        min(n, max(c, 2 * h)) for c, h, n in zip(default_chunks(shape), halo, shape, strict=True)
    )
    return (
        f"--chunks {' '.join(map(str, params.chunks))} with a halo of "
        f"{' '.join(map(str, halo))} voxels reads {overlap:.1f}x the data; --chunks "
        f"{' '.join(map(str, better))} reads {read_overlap(shape, better, halo):.1f}x"
    )
