"""``nucflow measure``: measure a stack on an existing label image, without segmenting.

Any channel, another acquisition of the same sample or a deconvolved version is measured on the
labels of an earlier run (or any integer label image of the same shape): one row per label,
``label`` the join key, columns as in ``nucflow run``.

Three kinds of pass, each one task per block (memory bounded by a block, its neighbours' small
tables, and the box around the block's own labels):

1. **Sums.** Each block adds up its core's voxels per label (:func:`nucflow.measure.block_stats`)
   and the first voxel of each label in C order; it returns the partial bboxes of the labels
   that cross its core's faces (the driver joins these few to find the largest label extent,
   which bounds how far a label reaches from the block that owns it).
2. **Rows** (:func:`nucflow.table.gather`). A label is owned by the block holding its first voxel
   in C order: labels not made by nucflow carry no seed. That block adds up the label's parts
   and measures its crop (:mod:`nucflow.objects`).
3. **Neighbours**, when ``measure.properties`` asks for them.
4. **Unique labels.** A label in two rows (pieces farther apart than the reach) is refused:
   one task per hash bucket of the labels, each holding ``measure.single_file_rows`` labels
   or fewer, whatever the table's size.

``--resume`` reuses each block's stored sums and rows whose fingerprint matches (the sums
depend on the labels, the blocks and the channels; the rows on every parameter too).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from nucflow import fingerprint, io, measure, objects, pipeline, progress, table
from nucflow.blockpass import Grid, Region, pass_graph
from nucflow.errors import NucflowError, ParameterError, ShapeError

__all__ = ["open_labels", "check_match", "measure_run", "MAX_READ_BLOCKS"]

#: A task reads its block grown by the largest label extent on every side; a label image whose
#: labels make that more than this many blocks' worth of voxels (a region, not nuclei) is refused.
MAX_READ_BLOCKS = 64


def open_labels(
    path: str,
    *,
    chunks: tuple[int, ...] | None = None,
    voxel_size: tuple[float, ...] | None = None,
) -> io.Stack:
    """The label image at ``path`` (e.g. a run's ``labels.ome.zarr``), checked to be one.

    Raises
    ------
    NucflowError
        ``path`` cannot be opened, or holds no integer labels.
    """
    try:
        labels = io.open_stack(path, chunks=chunks, voxel_size=voxel_size)
    except NucflowError as error:
        raise type(error)(f"--labels: {error}") from None
    if labels.data.dtype.kind not in "ui":
        raise ParameterError(
            f"--labels {path} holds {labels.data.dtype} values, not labels; pass a label image "
            "(integer voxels, 0 = background), e.g. RUN/labels.ome.zarr"
        )
    return labels


def check_match(labels: io.Stack, stack: io.Stack, voxel_size: tuple[float, ...] | None) -> None:
    """Refuse an input whose shape or voxel size differs from the labels'."""
    if labels.data.shape != stack.data.shape:
        raise ShapeError(
            f"--input {stack.path} has shape {tuple(stack.data.shape)} but --labels "
            f"{labels.path} has shape {tuple(labels.data.shape)}; measure a stack of the "
            "labels' shape (the same channel-free spatial axes)"
        )
    if voxel_size is None and labels.voxel_size_known and stack.voxel_size_known:
        if not np.allclose(labels.voxel_size, stack.voxel_size, rtol=1e-6, atol=0):
            raise ShapeError(
                f"--input {stack.path} has voxel size {list(stack.voxel_size)} µm but --labels "
                f"{labels.path} has {list(labels.voxel_size)} µm; measure a stack of the same "
                "sampling, or pass --set voxel_size=[...] if one of them is wrong"
            )


def measure_run(run: pipeline.Run, labels: io.Stack) -> dict[str, Any]:
    """Measure ``run.stack`` (and ``measure.channels``) on ``labels``; write the outputs.

    Parameters
    ----------
    run : nucflow.pipeline.Run
        Opened by :func:`nucflow.pipeline.open_run` on the output directory.
    labels : nucflow.io.Stack
        From :func:`open_labels`, of the input's shape.

    Returns
    -------
    dict
        Counts: ``nuclei`` (rows).
    """
    p = run.params
    progress.expect(
        run, {"sums": 1, "table": 1 + objects.cross_block(p.measure.properties), "write": 1}
    )
    shape = tuple(run.stack.data.shape)
    run.region = tuple(slice(0, n) for n in shape)  # labels may lie anywhere
    grid = Grid(shape, p.chunks)
    # the columns say which channel they measured: --channel 1 gives intensity_mean_c1
    channel = run.config.get("channel")
    primary = table.primary_suffix(channel)
    readers = table.intensity_readers(run.stack, p.measure.channels, primary)
    fingerprint.add_input(run, "labels", labels)
    sums = run.work / "blocks"
    with run.stage("sums"):
        reuse = _stored(run, "measure-sums", sums)
        tasks = [
            partial(
                _sums_task,
                index,
                grid=grid,
                labels=labels.reader,
                readers=readers,
                full_shape=shape,
                part=sums / table.part_name(index),
                reuse=reuse,
            )
            for index, _ in grid.blocks()
        ]
        (results,) = run.runner.compute(pass_graph(tasks, "sums"), label="sums")
        run.facts["blocks"] = {"total": len(results), "computed": sum(c for c, _ in results)}
        reach = _reach([found for _, found in results], grid)
    measured = table.Objects(pipeline.object_spec(run, primary), labels.reader, readers)
    with run.stage("table"):
        reuse = _stored(run, "measure-table", run.work / "table")
        made = table.gather(
            run.runner,
            grid,
            sums=sums,
            out=run.work / "table",
            offset=(0,) * len(shape),
            full_shape=shape,
            reach=reach,
            finalize={
                "voxel_size": p.voxel_size,
                "shape": shape,
                "max_radius": math.inf,  # no halo: no label is cut here ...
                # ... but the run that made the labels may have cut some: its table says
                "truncated_from": labels.path,
                "channel_suffixes": table.channel_suffixes(p.measure.channels, primary),
                "label_dtype": str(labels.data.dtype),
            },
            metadata={
                **table.metadata(
                    p, calibrated=_calibrated(run, labels), channel=channel, primary=primary
                ),
                "labels": labels.path,
            },
            measured=measured,
            owner="first",
            drop_border=p.measure.drop_border,  # rows only: the labels are an input, never written
            reuse=reuse,
        )
        run.facts["table_blocks"] = {"total": len(grid), "computed": made.computed}
    return _finish(run, made)


def _calibrated(run: pipeline.Run, labels: io.Stack) -> bool:
    """Whether lengths are µm: the labels, the input or the config give the voxel size."""
    known = labels.voxel_size_known or run.stack.voxel_size_known
    return bool(known or run.config.get("voxel_size"))


def _stored(run: pipeline.Run, stage: str, folder: Path) -> bool:
    """Whether ``--resume`` may reuse the blocks of ``stage`` stored in ``folder``
    (:func:`nucflow.fingerprint.reusable`); else ``folder`` is emptied. The fingerprint is
    recorded at once: every block written from now on is of this run."""
    reuse = fingerprint.reusable(run, stage, folder)
    if not reuse:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint.record(run, stage)
    return reuse


def _sums_task(
    index: tuple[int, ...],
    *,
    grid: Grid,
    labels: Any,
    readers: dict[str, Any],
    full_shape: tuple[int, ...],
    part: Path,
    reuse: bool,
) -> tuple[bool, pd.DataFrame]:
    """Write block ``index``'s sums (unless ``reuse`` and an earlier attempt did); return
    whether it computed them and the partial bboxes of the labels crossing its faces."""
    core = grid.core(index)
    if reuse and part.exists():
        return False, _crossing(pq.read_table(part).to_pandas(), core, full_shape)
    block = np.asarray(labels[core])
    if not block.any():
        table.write_atomic(part, pd.DataFrame().to_parquet())  # done, for --resume
        return True, pd.DataFrame()
    if block.dtype.kind == "i" and block.min() < 0:
        raise ParameterError(
            f"--labels holds negative values in block {[(s.start, s.stop) for s in core]}; "
            "labels must be >= 0 (0 = background)"
        )
    block = block.astype(np.uint64, copy=False)
    origin = [s.start for s in core]
    intensities = {suffix: np.asarray(r[core]) for suffix, r in readers.items()}
    stats = measure.block_stats(
        block, np.zeros(block.shape, np.float32), intensities, origin=origin
    )
    values, first = np.unique(block.ravel(), return_index=True)
    first = first[values > 0]
    coords = [c + o for c, o in zip(np.unravel_index(first, block.shape), origin, strict=True)]
    stats["first"] = np.ravel_multi_index(coords, full_shape).astype(np.uint64)
    table.write_atomic(part, stats.to_parquet())
    return True, _crossing(stats, core, full_shape)


def _crossing(stats: pd.DataFrame, core: Region, full_shape: tuple[int, ...]) -> pd.DataFrame:
    """The partial bboxes of the labels in a block's sums that touch a face it shares with
    another block (they may continue there)."""
    if not len(stats):
        return pd.DataFrame()
    axes = "zyx"[-len(core) :]
    lo = np.stack([stats[f"min_{a}"].to_numpy() for a in axes], 1)
    hi = np.stack([stats[f"max_{a}"].to_numpy() for a in axes], 1)
    start = np.asarray([s.start for s in core])
    stop = np.asarray([s.stop for s in core])
    # labels touching a face shared with another block may continue there
    inner_lo = (lo == start) & (start > 0)
    inner_hi = (hi == stop - 1) & (stop < np.asarray(full_shape))
    crossing = (inner_lo | inner_hi).any(1)
    return stats.loc[crossing, [f"{m}_{a}" for m in ("min", "max") for a in axes]]


def _reach(crossing: list[pd.DataFrame], grid: Grid) -> tuple[int, ...]:
    """Voxels per axis a label reaches from its first voxel: its largest bbox extent."""
    ndim = len(grid.shape)
    found = [c for c in crossing if len(c)]
    if not found:
        return (0,) * ndim
    joined = (
        pd.concat(found)
        .groupby(level=0)
        .agg({c: ("min" if c.startswith("min") else "max") for c in found[0].columns})
    )
    axes = "zyx"[-ndim:]
    extent = np.stack(
        [joined[f"max_{a}"].to_numpy() - joined[f"min_{a}"].to_numpy() + 1 for a in axes], 1
    )
    reach = extent.max(0)
    chunks = np.asarray(grid.chunks)
    read = math.prod((chunks + 2 * reach).tolist()) / math.prod(chunks.tolist())
    if read > MAX_READ_BLOCKS:
        worst = int(np.prod(extent, 1).argmax())
        shape = " x ".join(map(str, extent[worst].tolist()))
        raise ParameterError(
            f"--labels: label {joined.index[worst]} spans {shape} voxels ({axes.upper()}): each "
            f"task would read {read:.0f} blocks of {list(grid.chunks)} voxels around its own "
            f"(limit {MAX_READ_BLOCKS}); measure nuclei, not regions of that size, or pass "
            "larger blocks: --set chunks=[...]"
        )
    return tuple(int(e) for e in reach)


def _check_unique(run: pipeline.Run, made: table.Table) -> None:
    """Refuse a table with a label in two rows: a label in pieces that no block saw together.

    The reach comes from the labels that cross block faces; a label in several pieces, none of
    which crosses a face, can lie farther apart than that, and then two blocks each own a piece.
    One pass of tasks, each finding the repeated labels among one hash bucket of the labels
    (:func:`_repeated`): a task holds about ``measure.single_file_rows`` labels (what the
    driver holds to write a single-file table) whatever the table's size.
    """
    if not made.parts:
        return
    buckets = max(1, math.ceil(made.rows / max(1, run.params.measure.single_file_rows)))
    folder = made.parts[0].parent
    tasks = [partial(_repeated, folder, bucket=b, buckets=buckets) for b in range(buckets)]
    (found,) = run.runner.compute(pass_graph(tasks, "unique"), label="unique labels")
    repeated = [label for label in found if label is not None]
    if repeated:
        raise ParameterError(
            f"--labels: label {min(repeated)} is in pieces farther apart than any "
            "label that crosses a block face; make each label one connected object, or pass "
            "blocks that hold each label whole: --set chunks=[...]"
        )


#: Odd 64-bit constant of Fibonacci hashing: spreads any label numbering over the buckets.
_SPREAD = np.uint64(0x9E3779B97F4A7C15)


def _repeated(folder: Path, *, bucket: int, buckets: int) -> int | None:
    """The smallest label of hash bucket ``bucket`` in two rows of the parts in ``folder``."""
    mine = []
    for path in sorted(folder.glob("*.parquet")):
        labels = pq.read_table(path, columns=["label"]).column(0).to_numpy().astype(np.uint64)
        mine.append(labels[(labels * _SPREAD >> np.uint64(32)) % np.uint64(buckets) == bucket])
    values = np.sort(np.concatenate(mine or [np.zeros(0, np.uint64)]))
    twice = values[1:][values[1:] == values[:-1]]
    return int(twice[0]) if len(twice) else None


def _finish(run: pipeline.Run, made: table.Table) -> dict[str, Any]:
    with run.stage("write"):
        _check_unique(run, made)  # one pass: each label in one row
        written = pipeline.write_table(run, made, made.empty)
        if written == "dataset":
            run.facts["table"] = "nuclei.parquet/ is a partitioned dataset; no nuclei.csv"
    counts = {"nuclei": made.rows}
    if run.lock is not None:
        run.lock.check()  # never "complete" over another run's output
    shutil.rmtree(run.work, ignore_errors=True)
    pipeline.write_run_json(run, "complete", counts=counts)
    if run.lock is not None:
        run.lock.release()
    return counts


def check_output(output: str | os.PathLike[str], labels: str) -> None:
    """Refuse an output directory that holds the labels, or lies inside them (or their
    zarr hierarchy)."""
    pipeline.check_apart(Path(output).resolve(), labels, what="--labels")


def without_qc(params: Any) -> Any:
    """``params`` with the QC pictures off (a measurement makes no label image of its own)."""
    return dataclasses.replace(params, qc=False)
