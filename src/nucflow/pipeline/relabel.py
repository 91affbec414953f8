"""``output.relabel: sequential``: labels 1..N for viewers, the seed-derived ids kept.

A run's ids are 1 + the seed's global linear index: the same on any chunking, but they look
random in napari or Fiji (46901 ... 4191080 for 150 nuclei). With ``sequential`` the write stage
renumbers them last, once the table is final: the id of rank ``r`` among the table's sorted ids
becomes ``r + 1``, in every level of ``labels.ome.zarr`` (one pass per level, a task per block,
each mapping its voxels by binary search in the sorted ids, memory-mapped from ``.work/``) and
in the table, which keeps the seed-derived id as ``seed_label`` (the key that stays the same on
any chunking). Renumbering changes the stored segmentation in place, so its fingerprint is
forgotten first: a ``--resume`` after an interruption segments again instead of reusing a
half-renumbered image.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from nucflow import fingerprint, io, stages
from nucflow.blockpass import Grid, pass_graph
from nucflow.config import Params
from nucflow.errors import ConfigError
from nucflow.pipeline.rundir import Run

__all__ = ["SEED_LABEL", "renumber", "check"]

#: The table column that keeps the seed-derived id of a renumbered nucleus.
SEED_LABEL = "seed_label"


def check(stack: io.Stack, params: Params) -> None:
    """Refuse ``sequential`` on a time-lapse (not built: ids would need a numbering per t)."""
    if params.output.relabel == "sequential" and stack.n_timepoints > 1:
        raise ConfigError(
            "`output.relabel` sequential is not available for time-lapses yet (each time point "
            "would need its own numbering); drop --set output.relabel=sequential"
        )


def renumber(run: Run, parts: list[Path]) -> int:
    """Renumber ``labels.ome.zarr`` and the table files ``parts`` (in place); the nuclei.

    Parameters
    ----------
    run : nucflow.pipeline.Run
    parts : list of Path
        ``nuclei.parquet`` (one file) or its partitions.
    """
    fingerprint.forget(run, stages.SEGMENT.name)  # the stored labels change from here on
    ids = _sorted_ids(parts)
    mapping = run.work / "relabel.npy"
    np.save(mapping, ids)
    group = zarr.open_group(str(run.output / "labels.ome.zarr"), mode="r+")
    for dataset in io.ome_metadata(group)["multiscales"][0]["datasets"]:
        level = group[dataset["path"]]
        assert isinstance(level, zarr.Array)
        grid = Grid(tuple(level.shape), _task_shape(level, run.params.chunks))
        tasks = [
            partial(_map_block, core, level=level, mapping=mapping) for _, core in grid.blocks()
        ]
        run.runner.compute(pass_graph(tasks, f"relabel-{dataset['path']}"), label=_label(dataset))
    for part in parts:
        _renumber_table(part, ids)
    return len(ids)


def _label(dataset: dict) -> str:
    return "relabel" if dataset["path"] == "0" else f"relabel level {dataset['path']}"


def _task_shape(level: zarr.Array, chunks: tuple[int, ...]) -> tuple[int, ...]:
    """The run's blocks (a leading time axis: one time point): whole chunks of every level."""
    return (*((1,) * (level.ndim - len(chunks))), *chunks)


def _sorted_ids(parts: list[Path]) -> np.ndarray:
    found = [pq.read_table(p, columns=["label"]).column(0).to_numpy() for p in parts]
    return np.sort(np.concatenate(found)) if found else np.zeros(0, np.uint64)


def _map_block(core: tuple[slice, ...], *, level: zarr.Array, mapping: Path) -> None:
    block = np.asarray(level[core])
    if not block.any():
        return
    ids = np.load(mapping, mmap_mode="r")
    inside = block > 0
    ranks = np.searchsorted(ids, block[inside]) + 1
    out = np.zeros_like(block)
    out[inside] = ranks.astype(block.dtype)
    level[core] = out


def _renumber_table(part: Path, ids: np.ndarray) -> None:
    """``label`` -> its rank + 1 (same dtype), the old one kept as ``seed_label`` after it;
    written under a temporary name, then moved (the CSV beside a single file too)."""
    arrow = pq.read_table(part)
    nucflow = (arrow.schema.metadata or {}).get(b"nucflow")
    rows = arrow.to_pandas()
    seed = rows["label"].to_numpy()
    rows.insert(1, SEED_LABEL, seed)
    rows["label"] = (np.searchsorted(ids, seed) + 1).astype(seed.dtype)
    out = pa.Table.from_pandas(rows, preserve_index=False)
    if nucflow is not None:
        out = out.replace_schema_metadata({**(out.schema.metadata or {}), b"nucflow": nucflow})
    temporary = part.with_name(f".{part.name}.partial")
    pq.write_table(out, temporary)
    temporary.replace(part)
    common = part.parent / "_common_metadata"
    if common.exists():  # a partitioned dataset: its schema gains the column once
        pq.write_metadata(out.schema, common)
    csv = part.with_suffix(".csv")
    if csv.exists():
        partial_csv = csv.with_name(f".{csv.name}.partial")
        rows.to_csv(partial_csv, index=False)
        partial_csv.replace(csv)
