"""The table stage: one row per nucleus, made final block by block, never gathered whole.

Segmentation leaves, per block, mergeable sums for the labels of the block's core. A label
is the seed's global linear index plus one, so the block that owns a nucleus (the one holding
its seed) is known from the label alone, and :func:`write_sums` files each block's sums by
owner: ``.work/blocks/<i_j_k>.parquet`` holds the labels the block owns (written last: it
marks the block done), ``.work/blocks/<owner>.in/<i_j_k>.parquet`` the pieces of nuclei
another block owns (a nucleus crossing a border). One task per block reads its own sums and
the pieces addressed to it — every part is read once —, adds them up and writes the final
rows (``.work/table/``): each nucleus' row is made in exactly one task, and a task holds one
block's nuclei, not the table. The driver receives counts and a bounded sample of rows (for
the QC pictures).

Then, up to ``single_file_rows`` rows, the parts are joined into one ``nuclei.parquet``
sorted by label and a ``nuclei.csv``, as always; above it, the parts become the partitioned
dataset ``nuclei.parquet/`` (readable as one table by pandas, pyarrow, dask, polars, DuckDB)
and no CSV is written: at 10^8 rows it would be ~20 GB of text no person reads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from nucflow import measure
from nucflow.blockpass import Grid, pass_graph

__all__ = ["Table", "part_name", "write_sums", "gather", "write", "read_table"]

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
        folder = sums / _inbox(np.unravel_index(owner, grid.counts))
        folder.mkdir(exist_ok=True)
        _write_atomic(folder / part_name(index), stats[flat == owner].to_parquet())
    # Last: its presence says the block is done (resume, nucflow status).
    _write_atomic(sums / part_name(index), stats[mine].to_parquet())


def _inbox(owner: tuple[int, ...]) -> str:
    """The folder of the pieces of nuclei ``owner`` owns, sent by other blocks."""
    return "_".join(map(str, owner)) + ".in"


def _write_atomic(path: Path, data: bytes) -> None:
    partial_path = path.with_name(f".{path.name}.partial")
    partial_path.write_bytes(data)
    os.replace(partial_path, path)


def gather(
    runner: Any,
    grid: Grid,
    *,
    sums: Path,
    out: Path,
    finalize: dict[str, Any],
    metadata: dict[str, Any],
) -> Table:
    """Final rows of every block's own nuclei, written to ``out`` as one part per block.

    Parameters
    ----------
    runner : nucflow.cluster.Runner
    grid : Grid
        The segmentation's blocks (region coordinates).
    sums : Path
        The folder of per-block sums, filed by :func:`write_sums`.
    out : Path
        The folder for the final parts (created).
    finalize : dict
        Keyword arguments of :func:`nucflow.measure.finalize`.
    metadata : dict
        Stored under ``b"nucflow"`` in each part's schema metadata (voxel size, unit).
    """
    out.mkdir(parents=True, exist_ok=True)
    blocks = [index for index, _ in grid.blocks()]
    per_block = max(1, math.ceil(QC_SAMPLE_ROWS / len(blocks)))
    task = partial(
        _final_rows,
        sums=sums,
        out=out,
        finalize=finalize,
        metadata=metadata,
        sample=per_block,
    )
    (results,) = runner.compute(
        pass_graph([partial(task, i) for i in blocks], "table"), label="table"
    )
    samples = [s for _, _, s in results if len(s)]
    ndim = len(grid.shape)
    sample = (
        pd.concat(samples, ignore_index=True)
        if samples
        else measure.empty_table(ndim, finalize["channel_suffixes"])
    )
    parts = [out / part_name(i) for i, (n, _, _) in zip(blocks, results, strict=True) if n]
    return Table(
        rows=sum(n for n, _, _ in results),
        truncated=sum(t for _, t, _ in results),
        sample=sample,
        parts=parts,
        metadata=metadata,
    )


def _final_rows(
    index: tuple[int, ...],
    *,
    sums: Path,
    out: Path,
    finalize: dict[str, Any],
    metadata: dict[str, Any],
    sample: int,
) -> tuple[int, int, pd.DataFrame]:
    """Rows of the nuclei seeded in block ``index``; (rows, truncated, QC sample)."""
    paths = [sums / part_name(index)]
    inbox = sums / _inbox(index)
    if inbox.is_dir():
        paths += sorted(inbox.glob("*.parquet"))
    parts = [pq.ParquetFile(path).read().to_pandas() for path in paths if path.exists()]
    rows = measure.finalize(measure.combine(parts), **finalize)
    if len(rows):
        _write_parquet(out / part_name(index), rows, metadata)
    step = max(1, math.ceil(len(rows) / sample))
    # A copy: a strided slice is a view that would keep the block's whole table alive in the
    # results (the driver's, on threads: memory growing with the number of blocks).
    return len(rows), int(rows["truncated"].sum()), rows.iloc[::step].copy().reset_index(drop=True)


def _owners(labels: np.ndarray, grid: Grid, offset, full_shape) -> np.ndarray:
    """The block owning each label: the one holding its seed (a label is 1 + its index)."""
    seeds = np.unravel_index(labels.astype(np.uint64) - np.uint64(1), full_shape)
    phase = grid.phase or (0,) * len(grid.shape)
    columns = [
        (coords.astype(np.int64) - o + p) // c
        for coords, o, p, c in zip(seeds, offset, phase, grid.chunks, strict=True)
    ]
    return np.stack(columns, 1)


def _write_parquet(path: Path, rows: pd.DataFrame, metadata: dict[str, Any]) -> None:
    arrow = pa.Table.from_pandas(rows, preserve_index=False)
    arrow = arrow.replace_schema_metadata(
        {**(arrow.schema.metadata or {}), b"nucflow": json.dumps(metadata).encode()}
    )
    partial_path = path.with_name(f".{path.name}.partial")
    pq.write_table(arrow, partial_path)
    os.replace(partial_path, path)


def write(table: Table, output: Path, *, single_file_rows: int, empty: pd.DataFrame) -> str:
    """Write ``nuclei.parquet`` (and ``nuclei.csv``) into ``output``; returns how.

    Up to ``single_file_rows`` rows: one Parquet file sorted by label, and a CSV. Above:
    the parts, moved into the folder ``nuclei.parquet/`` with a ``_common_metadata`` file,
    and no CSV. ``empty`` is the table's schema with no rows (for a run without nuclei).
    """
    final = output / "nuclei.parquet"
    if final.is_dir():  # an earlier attempt's dataset (--resume)
        shutil.rmtree(final)
    if table.rows <= single_file_rows:
        frames = [pq.ParquetFile(p).read().to_pandas() for p in table.parts] or [empty]
        rows = pd.concat(frames, ignore_index=True).sort_values("label", ignore_index=True)
        _write_parquet(final, rows, table.metadata)
        csv = output / "nuclei.csv"
        partial_csv = csv.with_name(".nuclei.csv.partial")
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
