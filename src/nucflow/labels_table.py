"""The nuclei table inside ``labels.ome.zarr``: an AnnData table linked to the label image.

Layout: the `tables/` convention of fractal and ngio (the NGFF tables proposal, ngff#64, as
fractal-tasks-core and ngio write and read it), stored as AnnData's zarr encoding (0.1.0)::

    labels.ome.zarr/
        0, 1, …                 the label pyramid
        tables/                 attrs {"tables": ["nuclei"]}
            nuclei/             AnnData; attrs type "feature_table", table_version "1",
                                region {"path": "../"} (the label image this group's parent
                                holds), instance_key/index_key "label", index_type "int"
                obs/            one row per nucleus; index "label" (as text, AnnData's
                                rule), integer and boolean columns
                var/            index: the names of the floating-point columns
                X               (nuclei, float columns) float64: the measurements

As ngio's AnnData backend does, floating-point columns form ``X`` and the others ``obs``, with
the label as the index (ngio stores ``X`` as float32; nucflow keeps float64, so the values equal
``nuclei.parquet``'s exactly). ``region.path`` is relative to the ``tables`` group as in fractal's
``"../labels/<name>"``: this label image is that group's parent.

The arrays are written in batches of :data:`BATCH_ROWS` rows straight from ``nuclei.parquet``
(file or partitioned dataset), so the memory needed is one batch, whatever the table's size;
``anndata.AnnData.write_zarr`` would need the whole table, and its text index, in memory.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

__all__ = ["NAME", "BATCH_ROWS", "write", "truncated_labels"]

#: The table's name under ``tables/``.
NAME = "nuclei"
#: Rows read from the Parquet table and written at a time (also the arrays' chunk length).
BATCH_ROWS = 1 << 16

_ARRAY = {"encoding-type": "array", "encoding-version": "0.2.0"}
_STRINGS = {"encoding-type": "string-array", "encoding-version": "0.2.0"}
_DICT = {"encoding-type": "dict", "encoding-version": "0.1.0"}


def write(
    labels: str | os.PathLike[str], table: str | os.PathLike[str], *, name: str = NAME
) -> int:
    """Write the Parquet table ``table`` as ``tables/<name>`` of the label image ``labels``.

    Parameters
    ----------
    labels : path
        An OME-Zarr label image (zarr format 2), e.g. ``OUT/labels.ome.zarr``.
    table : path
        ``nuclei.parquet``: one file, or a partitioned dataset (a folder of ``*.parquet``).
    name : str, optional
        The table's name under ``tables/``.

    Returns
    -------
    int
        Rows written.
    """
    files = _parts(Path(table))
    schema = pq.read_schema(files[0])
    floats = [f.name for f in schema if pa.types.is_floating(f.type)]
    others = [f.name for f in schema if f.name not in floats and f.name != "label"]
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    root = zarr.open_group(os.fspath(labels), mode="r+")
    tables = root.require_group("tables")
    listed: Any = tables.attrs.get("tables", [])
    tables.attrs["tables"] = sorted({*listed, name})
    group = tables.create_group(name, overwrite=True)
    obs = _frame(group, "obs", "label", others)
    x = _array(group, "X", (rows, len(floats)), np.float64)
    index = _array(obs, "label", (rows,), str)
    columns = {c: _array(obs, c, (rows,), schema.field(c).type.to_pandas_dtype()) for c in others}
    start = 0
    for batch in _aligned(files, schema):
        stop = start + batch.num_rows
        index[start:stop] = batch.column("label").to_numpy().astype(str)
        for c, target in columns.items():
            target[start:stop] = batch.column(c).to_numpy(zero_copy_only=False)
        if floats:
            x[start:stop] = np.stack([batch.column(c).to_numpy() for c in floats], axis=1)
        start = stop
    var = _frame(group, "var", "_index", [])
    names = _array(var, "_index", (len(floats),), str)
    if floats:
        names[:] = np.array(floats, dtype=str)
    for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
        group.create_group(key).attrs.update(_DICT)
    # Last: a reader finding this group's type finds a whole table.
    group.attrs.update(_metadata())
    return rows


@functools.lru_cache(maxsize=4)
def truncated_labels(labels: str, name: str = NAME) -> np.ndarray | None:
    """The labels the run that made ``labels`` flagged ``truncated`` (sorted uint64), from the
    table it stored in ``labels/tables/<name>``; None for a label image without one.

    Read once per process (a worker's tasks share it): one boolean per nucleus, then the
    labels of the few flagged ones.
    """
    try:
        root = zarr.open_group(os.fspath(labels), mode="r")
        flags, index = root[f"tables/{name}/obs/truncated"], root[f"tables/{name}/obs/label"]
    except (KeyError, FileNotFoundError, ValueError, TypeError):
        return None
    if not (isinstance(flags, zarr.Array) and isinstance(index, zarr.Array)):
        return None
    where = np.flatnonzero(np.asarray(flags[:], dtype=bool))
    if not len(where):
        return np.zeros(0, np.uint64)
    found = np.asarray(index.get_orthogonal_selection(where)).astype(np.uint64)
    return np.sort(found)


def _parts(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.glob("*.parquet") if not p.name.startswith(("_", ".")))


def _aligned(files: list[Path], schema: pa.Schema) -> Any:
    """The rows of ``files`` in order, as tables of exactly BATCH_ROWS rows (the last: fewer).

    Each then fills whole chunks of the arrays: a partition holds a block's few thousand rows,
    and writing those as they come would rewrite every chunk once per partition and column.
    """
    pending: list[pa.RecordBatch] = []
    count = 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS):
            pending.append(batch)
            count += batch.num_rows
            while count >= BATCH_ROWS:
                rows = pa.Table.from_batches(pending, schema=schema)
                yield rows.slice(0, BATCH_ROWS)
                rest = rows.slice(BATCH_ROWS)
                pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending, schema=schema)


def _frame(group: zarr.Group, key: str, index: str, columns: list[str]) -> zarr.Group:
    frame = group.create_group(key)
    frame.attrs.update(
        {
            "_index": index,
            "column-order": columns,
            "encoding-type": "dataframe",
            "encoding-version": "0.2.0",
        }
    )
    return frame


def _array(group: zarr.Group, key: str, shape: tuple[int, ...], dtype: Any) -> zarr.Array:
    chunks = (max(1, min(BATCH_ROWS, shape[0])), *(max(1, n) for n in shape[1:]))
    arr = group.create_array(key, shape=shape, chunks=chunks, dtype=dtype)
    arr.attrs.update(_STRINGS if dtype is str else _ARRAY)
    return arr


def _metadata() -> dict[str, Any]:
    return {
        "encoding-type": "anndata",
        "encoding-version": "0.1.0",
        # fractal / ngio feature table v1
        "type": "feature_table",
        "fractal_table_version": "1",
        "table_version": "1",
        "backend": "anndata",
        "region": {"path": "../"},
        "instance_key": "label",
        "index_key": "label",
        "index_type": "int",
    }
