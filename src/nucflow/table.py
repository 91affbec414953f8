"""The table stage: one row per nucleus, made final block by block, never gathered whole.

Segmentation leaves, per block, mergeable sums for the labels of the block's core
(``.work/blocks/``). A nucleus lies within ``max_radius`` of its seed, and its label is the
seed's global linear index plus one, so the block that owns the seed is known from the label
alone. One task per block reads the parts of the blocks within reach, keeps the labels whose
seed it owns, adds up their sums and writes their final rows (``.work/table/``): each
nucleus' row is made in exactly one task, and a task holds a neighbourhood of parts, not the
table. The driver receives counts and a bounded sample of rows (for the QC pictures).

Then, up to ``single_file_rows`` rows, the parts are joined into one ``nuclei.parquet``
sorted by label and a ``nuclei.csv``, as always; above it, the parts become the partitioned
dataset ``nuclei.parquet/`` (readable as one table by pandas, pyarrow, dask, polars, DuckDB)
and no CSV is written: at 10^8 rows it would be ~20 GB of text no person reads.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from nucflow import io, labels_table, measure, objects
from nucflow.blockpass import Grid, pass_graph
from nucflow.version import __version__

__all__ = [
    "Table",
    "Objects",
    "OUTPUT_NAMES",
    "channel_suffixes",
    "primary_suffix",
    "intensity_readers",
    "metadata",
    "write_atomic",
    "part_name",
    "write_sums",
    "gather",
    "neighbours",
    "border_blocks",
    "clear_border",
    "write",
    "read_table",
]

#: Rows of the QC sample the driver holds, whatever the number of nuclei.
QC_SAMPLE_ROWS = 100_000


@dataclass
class Table:
    """What the driver knows of the table: counts and a bounded sample of its rows."""

    rows: int
    truncated: int
    sample: pd.DataFrame
    parts: list[Path]
    metadata: dict[str, Any]
    empty: pd.DataFrame | None = None  # every column, no rows (the table of a run without nuclei)
    dropped: int = 0  # nuclei touching the border, left out (measure.drop_border)
    computed: int = 0  # blocks whose rows this attempt made (the others: reused)


@dataclass(frozen=True)
class Objects:
    """What the table pass reads to add the object-level columns (:mod:`nucflow.objects`).

    Attributes
    ----------
    spec : nucflow.objects.Spec
    labels : array-like
        The final label image, sliceable in stack coordinates (picklable: a zarr array).
    intensities : dict
        Channel suffix -> reader of that channel in stack coordinates, in column order.
    """

    spec: objects.Spec
    labels: Any
    intensities: dict[str, Any]


def channel_suffixes(channels: Sequence[int], primary: str = "") -> list[str]:
    """Column suffixes of the measured channels: ``primary`` (``""``: the segmentation
    channel; ``nucflow measure --channel C``: ``_cC``), then ``_cN`` for each other of
    ``measure.channels``."""
    return [primary, *(f"_c{c}" for c in channels if f"_c{c}" != primary)]


def intensity_readers(
    stack: io.Stack, channels: Sequence[int], primary: str = ""
) -> dict[str, Any]:
    """Channel suffix -> reader in stack coordinates (picklable), in column order.

    Parameters
    ----------
    stack : nucflow.io.Stack
        The opened input (its reader is the segmentation channel).
    channels : sequence of int
        ``measure.channels``: further channels of the same file.
    primary : str, optional
        The suffix of ``stack``'s own channel (:func:`channel_suffixes`).
    """
    readers = {primary: stack.reader}
    for c in _others(channels, primary):
        readers[f"_c{c}"] = io.open_stack(stack.path, channel=c, timepoint=stack.timepoint).reader
    return readers


def _others(channels: Sequence[int], primary: str) -> list[int]:
    return [c for c in channels if f"_c{c}" != primary]


def primary_suffix(channel: int | None) -> str:
    """``nucflow measure``'s suffix of the channel it measures: ``_cC`` for ``--channel C``
    (the columns say which channel), ``""`` for an input of one channel."""
    return "" if channel is None else f"_c{channel}"


def metadata(
    params: Any, *, calibrated: bool, channel: int | None = None, primary: str = ""
) -> dict[str, Any]:
    """What the table's Parquet schema metadata holds (under ``b"nucflow"``).

    Parameters
    ----------
    params : nucflow.config.Params
        The run's resolved parameters.
    calibrated : bool
        Whether the voxel size is known (from the input or the config): the unit is then
        "micrometer", else "pixel" (lengths in voxels of side 1).
    channel : int, optional
        The input channel of the ``primary``-suffixed columns (``--channel``; None: the
        input's only channel).
    primary : str, optional
        That channel's column suffix (:func:`channel_suffixes`).

    Returns
    -------
    dict
        ``voxel_size``, ``unit``, ``nucflow`` (version), and the measurement settings that
        shape the columns: ``properties`` (``measure.properties`` as requested), ``channels``,
        ``percentiles``, ``shell_width_um``, ``neighbour_distance_um``, ``drop_border``, and
        ``channel_of_suffix``: each intensity column suffix (``""``, ``_c1``, ...) -> the
        input channel it measured (None: the input's only channel).
    """
    suffixes = channel_suffixes(params.measure.channels, primary)
    channels = [channel, *_others(params.measure.channels, primary)]
    return {
        "voxel_size": list(params.voxel_size),
        "unit": "micrometer" if calibrated else "pixel",
        "nucflow": __version__,
        "properties": list(params.measure.properties),
        "channels": list(params.measure.channels),
        "percentiles": list(params.measure.percentiles),
        "shell_width_um": params.measure.shell_width,
        "neighbour_distance_um": params.measure.neighbour_distance,
        "drop_border": params.measure.drop_border,
        "channel_of_suffix": dict(zip(suffixes, channels, strict=True)),
    }


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` under a temporary name, then move it into place: a reader
    (or ``--resume``) never sees a half-written file."""
    partial_path = path.with_name(f".{path.name}.partial")
    partial_path.write_bytes(data)
    os.replace(partial_path, path)


def part_name(index: tuple[int, ...]) -> str:
    """File name of block ``index``'s part (segmentation sums and final rows alike)."""
    return "_".join(map(str, index)) + ".parquet"


def write_sums(
    stats: pd.DataFrame,
    sums: Path,
    index: tuple[int, ...],
    grid: Grid,
    *,
    offset: tuple[int, ...],
    full_shape: tuple[int, ...],
) -> None:
    """Write block ``index``'s sums (:func:`nucflow.measure.block_stats`) filed by owner.

    The nuclei the block owns (seed in its core) go to ``sums/<index>.parquet``; the pieces of
    nuclei another block owns go to that block's inbox ``sums/<owner>.in/<index>.parquet``.
    So each table task reads its own file and inbox once (not its neighbours' whole files).

    Parameters
    ----------
    stats : pandas.DataFrame
        The block's sums, indexed by label.
    sums : Path
        The folder of every block's sums (exists).
    index : tuple of int
        The block's index in ``grid``.
    grid : Grid
        The segmentation's blocks (region coordinates).
    offset, full_shape : tuple of int
        Where the region lies in the stack, and the stack's shape (labels are its indices).
    """
    owners = _owners(stats.index.to_numpy(), grid, offset, full_shape)
    flat = np.ravel_multi_index(tuple(owners.T), grid.counts)
    mine = flat == np.ravel_multi_index(index, grid.counts)
    for owner in np.unique(flat[~mine]):
        folder = sums / _inbox(tuple(int(i) for i in np.unravel_index(owner, grid.counts)))
        folder.mkdir(exist_ok=True)
        write_atomic(folder / part_name(index), stats[flat == owner].to_parquet())
    # Last: its presence says the block is done (resume, nucflow status).
    write_atomic(sums / part_name(index), stats[mine].to_parquet())


def _inbox(owner: tuple[int, ...]) -> str:
    """The folder of the pieces of nuclei ``owner`` owns, sent by other blocks."""
    return "_".join(map(str, owner)) + ".in"


def _owners(labels: np.ndarray, grid: Grid, offset, full_shape) -> np.ndarray:
    """The block owning each label: the one holding its seed (a label is 1 + its index)."""
    seeds = np.unravel_index(labels.astype(np.uint64) - np.uint64(1), full_shape)
    phase = grid.phase or (0,) * len(grid.shape)
    columns = [
        (coords.astype(np.int64) - o + p) // c
        for coords, o, p, c in zip(seeds, offset, phase, grid.chunks, strict=True)
    ]
    return np.stack(columns, 1)


def gather(
    runner: Any,
    grid: Grid,
    *,
    sums: Path,
    out: Path,
    offset: tuple[int, ...],
    full_shape: tuple[int, ...],
    reach: tuple[int, ...],
    finalize: dict[str, Any],
    metadata: dict[str, Any],
    measured: Objects | None = None,
    owner: str = "seed",
    drop_border: bool = False,
    reuse: bool = False,
) -> Table:
    """Final rows of every block's own nuclei, written to ``out`` as one part per block.

    Parameters
    ----------
    runner : nucflow.cluster.Runner
    grid : Grid
        The segmentation's blocks (region coordinates).
    sums : Path
        The folder of per-block sums: filed by owner (:func:`write_sums`) with
        ``owner="seed"``, one file per block with all its labels with ``owner="first"``.
    out : Path
        The folder for the final parts (created).
    offset, full_shape : tuple of int
        Where the region lies in the stack, and the stack's shape (labels are its indices).
    reach : tuple of int
        Voxels per axis from a seed to the farthest voxel of its nucleus.
    finalize : dict
        Keyword arguments of :func:`nucflow.measure.finalize`.
    metadata : dict
        Stored under ``b"nucflow"`` in each part's schema metadata (voxel size, unit).
    measured : Objects, optional
        Add the object-level columns: each task reads the box around its own nuclei from the
        label image and the intensity stacks.
    owner : {"seed", "first"}
        Which block owns a label: the one holding its seed (``label - 1`` is the seed's linear
        index: nucflow's labels), or the one holding its first voxel in C order (any label
        image; the sums then carry a ``first`` column, the smallest linear index in the block).
    drop_border : bool
        Leave out the nuclei whose ``touches_border`` is true (``measure.drop_border``): each
        task keeps their labels, bboxes and centroids in ``out/border/`` (the neighbour pass counts
        them, :func:`clear_border` erases them from the label image).
    reuse : bool
        Keep the parts an earlier attempt wrote to ``out`` (``--resume`` with the same
        fingerprint): a block whose part (or ``.none`` marker) exists is not made again.
    """
    if not reuse:
        shutil.rmtree(out, ignore_errors=True)
    (out / _BORDER).mkdir(parents=True, exist_ok=True)
    blocks = [index for index, _ in grid.blocks()]
    per_block = max(1, math.ceil(QC_SAMPLE_ROWS / len(blocks)))
    task = partial(
        _final_rows,
        grid=grid,
        sums=sums,
        out=out,
        offset=offset,
        full_shape=full_shape,
        reach=_blocks_within(reach, grid.chunks),
        finalize=finalize,
        metadata=metadata,
        sample=per_block,
        measured=measured,
        owner=owner,
        drop_border=drop_border,
    )
    (results,) = runner.compute(
        pass_graph([partial(task, i) for i in blocks], "table"), label="table"
    )
    samples = [r.sample for r in results if len(r.sample)]
    empty = empty_table(
        len(grid.shape),
        finalize["channel_suffixes"],
        measured,
        finalize.get("label_dtype", "uint64"),
    )
    sample = pd.concat(samples, ignore_index=True) if samples else empty
    parts = [out / part_name(i) for i, r in zip(blocks, results, strict=True) if r.rows]
    if measured is not None and measured.spec.neighbours and parts:
        neighbours(runner, parts, grid, spec=measured.spec, reach=reach, metadata=metadata)
    return Table(
        rows=sum(r.rows for r in results),
        truncated=sum(r.truncated for r in results),
        sample=sample,
        parts=parts,
        metadata=metadata,
        empty=empty,
        dropped=sum(r.dropped for r in results),
        computed=sum(r.computed for r in results),
    )


def empty_table(
    ndim: int,
    channel_suffixes: list[str],
    measured: Objects | None = None,
    label_dtype: str = "uint64",
) -> pd.DataFrame:
    """Every column of the table, no rows (``label`` of the label image's dtype)."""
    empty = measure.empty_table(ndim, channel_suffixes, label_dtype)
    if measured is None:
        return empty
    return pd.concat([empty, pd.DataFrame(objects.empty_columns(measured.spec))], axis=1)


def _blocks_within(reach: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.ceil(r / c) for r, c in zip(reach, chunks, strict=True))


def _final_rows(
    index: tuple[int, ...],
    *,
    grid: Grid,
    sums: Path,
    out: Path,
    offset: tuple[int, ...],
    full_shape: tuple[int, ...],
    reach: tuple[int, ...],
    finalize: dict[str, Any],
    metadata: dict[str, Any],
    sample: int,
    measured: Objects | None,
    owner: str,
    drop_border: bool,
) -> _Done:
    """Rows of the nuclei owned by block ``index``, written to ``out``; what the driver
    learns of them."""
    done = _reused(out, index, sample)
    if done is not None:
        return done
    if owner == "seed":  # filed by owner (write_sums): this block's own file and its inbox
        paths = [sums / part_name(index)]
        inbox = sums / _inbox(index)
        if inbox.is_dir():
            paths += sorted(inbox.glob("*.parquet"))
        totals = measure.combine([pq.ParquetFile(p).read().to_pandas() for p in paths])
    else:  # a label's parts all lie in the neighbourhood of the block with its first voxel
        parts = {}
        for near in _neighbourhood(index, reach, grid.counts):
            path = sums / part_name(near)
            if path.exists():
                part = pq.ParquetFile(path).read().to_pandas()
                if len(part):
                    parts[near] = part
        where = partial(_owner, grid=grid, offset=offset, full_shape=full_shape, index=index)
        own = parts[index].index if index in parts else pd.Index([])
        totals = measure.combine([p[p.index.isin(own)] for p in parts.values()])
        if len(totals):
            totals = totals[where(totals["first"].to_numpy(np.uint64))]
    options = dict(finalize)
    flagged_by = options.pop("truncated_from", None)
    rows = measure.finalize(totals, **options)
    if flagged_by is not None:  # nucflow measure on a run's labels: the run's own flags
        flagged = labels_table.truncated_labels(flagged_by)
        if flagged is not None:
            rows["truncated"] = np.isin(rows["label"].to_numpy(np.uint64), flagged)
    dropped = 0
    if drop_border:
        border = rows["touches_border"].to_numpy(bool)
        dropped = int(border.sum())
        if dropped:  # kept for the neighbour pass and clear_border; measured no further
            kept = [c for c in rows.columns if c.startswith(_BORDER_COLUMNS)]
            write_atomic(border_path(out, index), rows.loc[border, kept].to_parquet())
        rows = rows[~border].reset_index(drop=True)
    if measured is not None:
        rows = _with_objects(rows, measured, full_shape)
    if len(rows):
        _write_parquet(out / part_name(index), rows, metadata)
    else:  # says "done" to a resumed pass
        write_atomic(out / _none_name(index), str(dropped).encode())
    return _Done.of(rows, sample, dropped, computed=True)


class _Done(NamedTuple):
    """What a table task tells the driver of its block."""

    rows: int
    truncated: int
    sample: pd.DataFrame  # the QC sample of its rows
    dropped: int  # border nuclei left out
    computed: bool  # False: an earlier attempt's part, reused

    @classmethod
    def of(cls, rows: pd.DataFrame, sample: int, dropped: int, *, computed: bool) -> _Done:
        step = max(1, math.ceil(len(rows) / sample))
        # A copy: a strided slice is a view that would keep the block's whole table alive in
        # the results (the driver's, on threads: memory growing with the number of blocks).
        picked = rows.iloc[::step].copy().reset_index(drop=True)
        truncated = int(rows["truncated"].sum()) if len(rows) else 0
        return cls(len(rows), truncated, picked, dropped, computed)


def _none_name(index: tuple[int, ...]) -> str:
    return "_".join(map(str, index)) + ".none"


def _reused(out: Path, index: tuple[int, ...], sample: int) -> _Done | None:
    """What an earlier attempt's task for block ``index`` returned, read back from its part
    (None: not finished). ``gather`` empties ``out`` unless it may reuse it."""
    border = border_path(out, index)
    dropped = pq.read_metadata(border).num_rows if border.exists() else 0
    part = out / part_name(index)
    if part.exists():
        rows = pq.ParquetFile(part).read().to_pandas()
        return _Done.of(rows, sample, dropped, computed=False)
    if (out / _none_name(index)).exists():
        return _Done(0, 0, pd.DataFrame(), dropped, False)
    return None


#: The subfolder of a table pass' output holding each block's nuclei left out by drop_border.
_BORDER = "border"
#: What is kept of them: label and bbox (clear_border), centroid in µm (the neighbour pass).
_BORDER_COLUMNS = ("label", "bbox_", "centroid_z_um", "centroid_y_um", "centroid_x_um")


def border_path(out: Path, index: tuple[int, ...]) -> Path:
    """Where block ``index``'s left-out border nuclei (label, bbox, centroid µm) are kept."""
    return out / _BORDER / part_name(index)


def _neighbourhood(index, reach, counts):
    ranges = [
        range(max(0, i - r), min(n, i + r + 1))
        for i, r, n in zip(index, reach, counts, strict=True)
    ]
    return itertools.product(*ranges)


def _with_objects(rows: pd.DataFrame, measured: Objects, shape: tuple[int, ...]) -> pd.DataFrame:
    """``rows`` with the object-level columns (the neighbour columns are filled later)."""
    spec = measured.spec
    found = objects.measure_rows(
        rows, labels=measured.labels, intensities=measured.intensities, spec=spec, shape=shape
    )
    empty = objects.empty_columns(spec)
    added = {c: found[c] if c in found else _unset(empty[c].dtype, len(rows)) for c in empty}
    return pd.concat([rows, pd.DataFrame(added, index=rows.index)], axis=1)


def _unset(dtype: Any, n: int) -> np.ndarray:
    return np.zeros(n, dtype) if np.dtype(dtype).kind == "i" else np.full(n, np.nan)


def _owner(linear: np.ndarray, *, grid: Grid, offset, full_shape, index) -> np.ndarray:
    """Whether each voxel (a linear index in the stack: a label's seed or first voxel) lies
    in block ``index``."""
    seeds = np.unravel_index(linear, full_shape)
    phase = grid.phase or (0,) * len(grid.shape)
    mine = np.ones(len(linear), bool)
    for coords, o, p, c, i in zip(seeds, offset, phase, grid.chunks, index, strict=True):
        mine &= (coords.astype(np.int64) - o + p) // c == i
    return mine


def neighbours(
    runner: Any,
    parts: list[Path],
    grid: Grid,
    *,
    spec: objects.Spec,
    reach: tuple[int, ...],
    metadata: dict[str, Any],
) -> None:
    """Fill ``neighbours_count`` and ``neighbours_nearest_um`` in every part: one task per block.

    A nucleus' centroid lies within ``reach`` voxels of its owner block's core, so every centroid
    within ``measure.neighbour_distance`` of a block's nuclei is in a part of the blocks within
    that distance plus twice the reach: each task reads those parts' centroids only.
    """
    distance = spec.settings.neighbour_distance
    span = tuple(
        math.ceil(distance / v - 1e-9) + 2 * r for v, r in zip(spec.voxel_size, reach, strict=True)
    )
    near = _blocks_within(span, grid.chunks)
    # each task finds its neighbours' parts on disk: a list of them would travel with every task
    task = partial(_neighbour_task, grid=grid, near=near, distance=distance, metadata=metadata)
    tasks = [partial(task, part) for part in parts]
    runner.compute(pass_graph(tasks, "neighbours"), label="neighbours")


def _neighbour_task(path: Path, *, grid, near, distance, metadata) -> None:
    rows = pq.ParquetFile(path).read().to_pandas()
    columns = [f"centroid_{a}_um" for a in "zyx"[-len(grid.shape) :]]
    index = tuple(int(i) for i in path.stem.split("_"))
    # the nuclei drop_border leaves out are still neighbours: the table's rows are those of
    # the whole table, less the border nuclei's own
    found = [
        f
        for n in _neighbourhood(index, near, grid.counts)
        for f in (path.with_name(part_name(n)), border_path(path.parent, n))
    ]
    others = [pq.read_table(f, columns=columns).to_pandas() for f in found if f.exists()]
    rows["neighbours_count"], rows["neighbours_nearest_um"] = objects.neighbour_columns(
        rows[columns].to_numpy(), pd.concat(others)[columns].to_numpy(), distance=distance
    )
    _write_parquet(path, rows, metadata)


def border_blocks(grid: Grid, reach: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The blocks that may hold a voxel of a nucleus touching the region's border.

    Such a nucleus has a voxel on the border and every voxel within ``reach`` of its seed, so
    all its voxels lie within ``2 * reach`` voxels of the border.
    """
    band = [2 * r + 1 for r in reach]
    return [
        index
        for index, core in grid.blocks()
        if any(
            s.start < b or s.stop > n - b for s, b, n in zip(core, band, grid.shape, strict=True)
        )
    ]


def clear_border(
    runner: Any,
    grid: Grid,
    *,
    labels: Any,
    out: Path,
    offset: tuple[int, ...],
    reach: tuple[int, ...],
) -> int:
    """Erase the nuclei :func:`gather` left out with ``drop_border`` from the label image.

    One task per block of :func:`border_blocks`: it reads the left-out nuclei (label, bbox)
    of the blocks within ``reach`` (the owners of every nucleus with a voxel in it) and, if a
    bbox meets its block, rewrites its block of ``labels`` with those labels set to 0 inside
    their bboxes. The result equals
    ``skimage.segmentation.clear_border`` of the whole label image (the region's border).

    Parameters
    ----------
    runner : nucflow.cluster.Runner
    grid : Grid
        The segmentation's blocks (region coordinates; their cores are whole chunks of
        ``labels``).
    labels : zarr.Array
        The label image, writable, in stack coordinates.
    out : Path
        ``gather``'s output folder.
    offset : tuple of int
        Where the region lies in the stack.
    reach : tuple of int
        Voxels per axis from a seed to the farthest voxel of its nucleus.

    Returns
    -------
    int
        Blocks rewritten.
    """
    near = _blocks_within(reach, grid.chunks)
    task = partial(_clear_task, grid=grid, labels=labels, out=out, offset=offset, near=near)
    tasks = [partial(task, index) for index in border_blocks(grid, reach)]
    (written,) = runner.compute(pass_graph(tasks, "clear-border"), label="clear border")
    return sum(written)


def _clear_task(index, *, grid, labels, out, offset, near) -> bool:
    found = [border_path(out, n) for n in _neighbourhood(index, near, grid.counts)]
    dropped = [pq.read_table(f).to_pandas() for f in found if f.exists()]
    if not dropped:
        return False
    rows = pd.concat(dropped)
    core = [slice(s.start + o, s.stop + o) for s, o in zip(grid.core(index), offset, strict=True)]
    axes = "zyx"[-len(core) :]
    # each left-out nucleus' bbox within the block: O(its bbox) per nucleus, not a test of
    # every voxel of the block against every left-out label
    lo = np.maximum(rows[[f"bbox_min_{a}" for a in axes]].to_numpy(), [s.start for s in core])
    hi = np.minimum(rows[[f"bbox_max_{a}" for a in axes]].to_numpy(), [s.stop for s in core])
    inside = (lo < hi).all(1)
    if not inside.any():
        return False
    block = np.asarray(labels[tuple(core)])
    for label, a, b in zip(rows["label"].to_numpy()[inside], lo[inside], hi[inside], strict=True):
        box = tuple(slice(x - s.start, y - s.start) for x, y, s in zip(a, b, core, strict=True))
        view = block[box]
        view[view == label] = 0
    labels[tuple(core)] = block
    return True


def _write_parquet(path: Path, rows: pd.DataFrame, metadata: dict[str, Any]) -> None:
    arrow = pa.Table.from_pandas(rows, preserve_index=False)
    arrow = arrow.replace_schema_metadata(
        {**(arrow.schema.metadata or {}), b"nucflow": json.dumps(metadata).encode()}
    )
    partial_path = path.with_name(f".{path.name}.partial")
    pq.write_table(arrow, partial_path)
    os.replace(partial_path, path)


#: What :func:`write` may create in the output directory.
OUTPUT_NAMES = ("nuclei.parquet", "nuclei.csv")


def write(table: Table, output: Path, *, single_file_rows: int, empty: pd.DataFrame) -> str:
    """Write ``nuclei.parquet`` (and ``nuclei.csv``) into ``output``; returns how.

    Up to ``single_file_rows`` rows: one Parquet file sorted by label (by ``t``, then label,
    in a time-lapse), and a CSV. Above:
    the parts, moved into the folder ``nuclei.parquet/`` with a ``_common_metadata`` file,
    and no CSV. ``empty`` is the table's schema with no rows (for a run without nuclei).
    """
    final = output / "nuclei.parquet"
    if final.is_dir():  # an earlier attempt's dataset (--resume)
        shutil.rmtree(final)
    if table.rows <= single_file_rows:
        frames = [pq.ParquetFile(p).read().to_pandas() for p in table.parts] or [empty]
        order = ["t", "label"] if "t" in frames[0].columns else "label"  # a time-lapse: by t
        rows = pd.concat(frames, ignore_index=True).sort_values(order, ignore_index=True)
        _write_parquet(final, rows, table.metadata)
        csv = output / "nuclei.csv"
        partial_csv = csv.with_name(".nuclei.csv.partial")
        if table.metadata.get("unit") == "pixel":  # a CSV has no metadata to say so
            rows = rows.assign(length_unit="pixel")
        rows.to_csv(partial_csv, index=False)
        os.replace(partial_csv, csv)
        return "file"
    folder = output / ".nuclei.parquet.partial"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    schema = pq.read_schema(table.parts[0])
    pq.write_metadata(schema, folder / "_common_metadata")
    for part in table.parts:
        os.replace(part, folder / f"part-{part.name}")
    final.unlink(missing_ok=True)
    (output / "nuclei.csv").unlink(missing_ok=True)
    os.replace(folder, final)
    return "dataset"


def read_table(output: str | os.PathLike[str], *, lazy: bool = False) -> Any:
    """The nuclei table of a run's output directory, single file or partitioned dataset.

    Parameters
    ----------
    output : path
        The run's ``--output`` directory (or its ``nuclei.parquet`` itself).
    lazy : bool, optional
        Return a ``dask.dataframe.DataFrame`` (one partition per part file) instead of
        reading everything into pandas.

    Returns
    -------
    pandas.DataFrame or dask.dataframe.DataFrame
        A pandas frame's ``.attrs["nucflow"]`` holds the voxel size and unit from the Parquet
        metadata (dask frames have no ``attrs``: read them from the eager frame, or from
        ``pyarrow.parquet.read_schema``).
    """
    path = Path(output)
    path = path if path.name == "nuclei.parquet" else path / "nuclei.parquet"
    if lazy:
        import dask.dataframe as dd

        return dd.read_parquet(str(path))
    schema = pq.read_schema(path / "_common_metadata" if path.is_dir() else path)
    frame = pd.read_parquet(path)
    frame.attrs["nucflow"] = json.loads((schema.metadata or {}).get(b"nucflow", b"{}"))
    return frame
