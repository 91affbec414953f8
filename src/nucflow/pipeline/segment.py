"""The segment stage: every block labelled with its halo, its core written to
``labels.ome.zarr`` and its nuclei's mergeable sums to ``.work/blocks/``."""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from nucflow import (
    fingerprint,
    io,
    measure,
    stages,
)
from nucflow import table as table_stage
from nucflow.blockpass import Grid, fmt_region, padded, pass_graph
from nucflow.errors import (
    BlockError,
    NucflowError,
    environment_message,
)
from nucflow.pipeline.rundir import LABELS, Run
from nucflow.pipeline.store import shifted
from nucflow.segment import SegmentParams, segment_block


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
    reuse = fingerprint.reusable(run, stages.SEGMENT.name, labels_path, parts_dir)
    if reuse:
        labels = label_image(run, mode="r+")
    else:
        shutil.rmtree(parts_dir, ignore_errors=True)
        labels = fresh_labels(run)
    fingerprint.record(
        run, stages.SEGMENT.name
    )  # before any block: every part from now on is of it
    parts_dir.mkdir(exist_ok=True)
    readers = table_stage.intensity_readers(run.stack, run.params.measure.channels)
    halo = run.segment_params.halo()
    tasks, part_files = [], []
    grid = segment_grid(run, shape)
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


def segment_grid(run: Run, shape: tuple[int, ...]) -> Grid:
    """Blocks of the stack's own grid, so each task writes whole chunks of labels.ome.zarr."""
    chunks = run.params.chunks
    return Grid(shape, chunks, tuple(o % c for o, c in zip(run.offset, chunks, strict=True)))


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


def fresh_labels(run: Run) -> zarr.Array | io.TimePoint:
    """An empty label image for the segmentation (a time-lapse: its time point emptied)."""
    p = run.params
    path = run.entry(LABELS)
    if run.time is None:
        shape = tuple(run.stack.data.shape)
        chunks, dtype = label_chunks(p.chunks), label_dtype(shape)
        source = io.image_reference(run.stack.path, path)  # readers show the labels over it
        return io.create_label_zarr(
            path, shape, chunks, p.voxel_size, dtype=dtype, overwrite=True, source_image=source
        )
    labels = label_image(run, mode="r+")
    assert isinstance(labels, io.TimePoint)  # run.time is set: one time point of the movie
    io.clear_timepoint(labels.array, run.time)
    return labels


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
    padded, core = shifted(padded, offset), shifted(core, offset)
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


def _body(run: Run, inputs: Mapping[str, Any]) -> None:
    segment(run, inputs["mask"])


STAGE = stages.Stage(
    "segment", ("mask", "input"), stages.only(stages.SEGMENT), body=_body, per_timepoint=True
)
"""Seam-free labels and each block's sums."""
