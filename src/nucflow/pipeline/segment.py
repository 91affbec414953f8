"""The segment stage: every block labelled with its halo, its core written to
``labels.ome.zarr`` and its nuclei's mergeable sums to ``.work/blocks/``."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from nucflow import (
    adapters,
    fingerprint,
    histogram,
    io,
    measure,
    segmenters,
    stages,
)
from nucflow import table as table_stage
from nucflow.blockpass import Grid, fmt_region, padded, pass_graph
from nucflow.config import Params
from nucflow.errors import (
    BlockError,
    ConfigError,
    NucflowError,
    environment_message,
)
from nucflow.pipeline.rundir import LABELS, Run, segment_halo, segment_params_of
from nucflow.pipeline.store import (
    fresh_histograms,
    histogram_files,
    histogram_task,
    region_shape,
    shifted,
)
from nucflow.pipeline.threshold import stack_histogram
from nucflow.segment import SegmentParams, segment_block


def segment(run: Run, mask: zarr.Array | None, preprocessed: zarr.Array | None = None) -> None:
    """Label every block's core with its halo and write the label image.

    Each task reads its padded mask block and its core's intensities, writes its core of
    ``labels.ome.zarr`` (only if it holds a nucleus) and the mergeable sums of its core's
    labels to ``.work/blocks/``, filed by the block owning each nucleus
    (:func:`nucflow.table.write_sums`; :func:`table` makes the rows); finished blocks are
    skipped on ``--resume``.
    """
    shape = region_shape(run.region)
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
    halo = segment_halo(run.params)
    own = run.params.segment.method != "builtin"
    if own:  # a user's function: its input, scaled by the whole stack's percentiles
        source = _Source.of(run, preprocessed, reuse=reuse)
        segmenter = _segmenter(run.params)
    tasks, part_files = [], []
    grid = segment_grid(run, shape)
    for index, core in grid.blocks():
        part = parts_dir / table_stage.part_name(index)
        part_files.append(part)
        if reuse and part.exists():
            continue
        where = {
            "padded": padded(core, halo, shape),
            "core": core,
            "offset": run.offset,
            "shape": full_shape,
            "sums": (parts_dir, index, grid),
        }
        if own:
            task = partial(
                _own_task, source, readers, labels, segmenter, run.params.voxel_size, **where
            )
        else:
            assert mask is not None  # the builtin's flow made it
            task = partial(_segment_task, mask, readers, labels, run.segment_params, **where)
        tasks.append(task)
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


@dataclass(frozen=True)
class _Source:
    """What a python segmenter reads (picklable): the input in stack coordinates or the
    stored preprocessed stack in region coordinates, and the scale of ``segment.normalize``."""

    array: Any
    in_region: bool
    scale: tuple[float, float] | None

    @classmethod
    def of(cls, run: Run, preprocessed: zarr.Array | None, *, reuse: bool) -> _Source:
        s = run.params.segment
        array: Any = preprocessed if s.input == "preprocessed" else run.stack.reader
        in_region = s.input == "preprocessed"  # stored in region coordinates
        assert array is not None  # the flow's preprocess stage ran before
        scale = None
        if s.normalize == "percentile":
            scale = _percentiles(run, array, in_region, reuse=reuse)
        return cls(array, in_region, scale)

    def read(self, region: tuple[slice, ...], offset: tuple[int, ...]) -> np.ndarray:
        """``region`` (region coordinates), normalised when configured."""
        block = np.asarray(self.array[region if self.in_region else shifted(region, offset)])
        if self.scale is None:
            return block
        low, high = self.scale
        scaled = (block.astype(np.float32) - np.float32(low)) / np.float32(high - low or 1.0)
        return scaled.astype(np.float32, copy=False)


def _percentiles(run: Run, array: Any, in_region: bool, *, reuse: bool) -> tuple[float, float]:
    """``segment.normalize_percentiles`` of the whole source, from its block histograms
    (one pass, or none when the preprocess pass stored them); kept in ``.work/normalize.json``
    for a resumed segmentation."""
    stored = run.work / "normalize.json"
    if reuse and stored.is_file():
        low, high = json.loads(stored.read_text())["percentiles"]
        return float(low), float(high)
    if in_region:
        values = stack_histogram(run, array)
    else:
        folder = fresh_histograms(run, "input")
        grid = Grid(region_shape(run.region), run.params.chunks)
        reader = _Shifted(array, run.offset)
        tasks = [
            partial(histogram_task, core, source=reader, folder=folder) for _, core in grid.blocks()
        ]
        run.runner.compute(pass_graph(tasks, "histograms"), label="histograms")
        values = histogram.Histogram.of(p.read_bytes() for p in histogram_files(folder))
    low, high = (float(v) for v in values.percentiles(run.params.segment.normalize_percentiles))
    table_stage.write_atomic(stored, json.dumps({"percentiles": [low, high]}).encode())
    run.facts["normalize_percentiles"] = [low, high]
    return low, high


@dataclass(frozen=True)
class _Shifted:
    """A stack-coordinate reader read in region coordinates."""

    reader: Any
    offset: tuple[int, ...]

    def __getitem__(self, region: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self.reader[shifted(region, self.offset)])


def _own_task(
    source: _Source,
    readers: dict[str, Any],
    labels: zarr.Array | io.TimePoint,
    segmenter: segmenters.Segmenter,
    voxel_size: tuple[float, ...],
    *,
    padded: tuple[slice, ...],
    core: tuple[slice, ...],
    offset: tuple[int, ...],
    shape: tuple[int, ...],
    sums: tuple[Path, tuple[int, ...], Grid],
) -> int:
    """A python segmenter on one padded block (region coordinates, the region at ``offset``):
    global ids, its core written, its objects' sums filed by owner."""
    stack_core = shifted(core, offset)
    try:
        return _own_block(
            source, readers, labels, segmenter, voxel_size, padded, core, offset, shape, sums
        )
    except NucflowError as e:
        raise type(e)(f"block {fmt_region(stack_core)}: {e}") from e
    except Exception as e:
        if environment_message(e):
            raise
        raise BlockError(
            f"block {fmt_region(stack_core)}: `segment.method` {segmenter.method} failed: "
            f"{type(e).__name__}: {e}"
        ) from e


def _own_block(
    source: _Source,
    readers: dict[str, Any],
    labels: zarr.Array | io.TimePoint,
    segmenter: segmenters.Segmenter,
    voxel_size: tuple[float, ...],
    padded: tuple[slice, ...],
    core: tuple[slice, ...],
    offset: tuple[int, ...],
    shape: tuple[int, ...],
    sums: tuple[Path, tuple[int, ...], Grid],
) -> int:
    folder, index, grid = sums
    stack_padded, stack_core = shifted(padded, offset), shifted(core, offset)
    found = segmenter(source.read(padded, offset), voxel_size)
    local = tuple(
        slice(c.start - p.start, c.stop - p.start) for c, p in zip(core, padded, strict=True)
    )
    outer = [(p.start > 0, p.stop < n) for p, n in zip(padded, grid.shape, strict=True)]
    origin = tuple(s.start for s in stack_padded)
    ids, cut = segmenters.relabel(found, origin=origin, full_shape=shape, core=local, outer=outer)
    if ids.any():
        labels[stack_core] = ids.astype(labels.dtype, copy=False)
    intensities = {suffix: reader[stack_core] for suffix, reader in readers.items()}
    stats = measure.block_stats(ids, cut, intensities, origin=[c.start for c in stack_core])
    table_stage.write_sums(stats, folder, index, grid, offset=offset, full_shape=shape)
    return len(stats)


def object_reach(p: Params) -> tuple[int, ...]:
    """Voxels per axis from a nucleus' id voxel (seed or first voxel) to its farthest voxel."""
    if p.segment.method != "builtin":
        return segment_halo(p)
    return segment_params_of(p).voxels(p.segment.max_radius)


def check_method(stack: io.Stack, p: Params) -> None:
    """A python segmenter imported and called on one small block of the stack before the
    output is claimed: a module that does not import, a missing function or labels of the
    wrong shape or type exit 2 naming it."""
    if p.segment.method == "builtin":
        return
    if p.segment.method == "stardist":
        _check_stardist(p)
    # the driver may have no GPU (a login node): the device is the workers' to check
    segmenter = _segmenter(p, device="auto")
    corner = tuple(
        slice(0, min(n, c, _CHECK_SIDE)) for n, c in zip(stack.data.shape, p.chunks, strict=True)
    )
    block = np.asarray(stack.reader[corner])
    if p.segment.input == "preprocessed" or p.segment.normalize != "none":
        block = block.astype(np.float32)  # as the run passes them
    if p.segment.normalize == "percentile":  # the corner's own: the stack's are not known yet
        low, high = np.percentile(block, p.segment.normalize_percentiles)
        block = (block - np.float32(low)) / np.float32(high - low or 1.0)
    try:
        segmenter(block, p.voxel_size)
    except NucflowError:
        raise
    except Exception as e:
        raise ConfigError(
            f"`segment.method` {p.segment.method} failed on a test block of shape "
            f"{block.shape}: {type(e).__name__}: {e}; fix the function or its "
            "`segment.options`"
        ) from None


def _check_stardist(p: Params) -> None:
    """Blocks on the network's phase (else its output differs from the whole image's, and
    objects with it); a warning when the halo is narrower than the model's context."""
    _segmenter(p, device="auto")  # a missing segment.model is said first
    assert p.segment.model is not None
    step = adapters.stardist_phase(p.segment.model)
    if any(c % step for c in p.chunks):
        good = [max(step, c // step * step) for c in p.chunks]
        raise ConfigError(
            f"--chunks {' '.join(map(str, p.chunks))}: this StarDist model needs blocks of "
            f"multiples of {step} voxels (grid x 2^unet_n_depth); pass --chunks "
            f"{' '.join(map(str, good))}"
        )
    context = adapters.stardist_context(p.segment.model)
    halo = segment_halo(p)
    if context is not None and any(h < c for h, c in zip(halo, context, strict=False)):
        need = max(c * v for c, v in zip(context, p.voxel_size[-len(context) :], strict=True))
        warnings.warn(
            f"segment.halo_um = {p.segment.halo_um:g} gives a halo of {list(halo)} voxels but "
            f"the model sees {list(context)} around each pixel: objects near block faces may "
            f"differ from the whole image's; pass --set segment.halo_um={need:g}",
            stacklevel=2,
        )


def _segmenter(p: Params, device: str | None = None) -> segmenters.Segmenter:
    s = p.segment
    return segmenters.Segmenter.of(s.method, s.options, model=s.model, device=device or s.device)


#: Side of the test block a python segmenter is called on before the run (voxels per axis).
_CHECK_SIDE = 32


def _body(run: Run, inputs: Mapping[str, Any]) -> None:
    segment(run, inputs["mask"], inputs.get("preprocess"))


STAGE = stages.Stage(
    "segment",
    ("mask", "input", "preprocess"),
    stages.only(stages.SEGMENT),
    (check_method,),
    body=_body,
    per_timepoint=True,
)
"""Seam-free labels and each block's sums."""
