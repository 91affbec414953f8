"""Writers: OME-Zarr images with their label images, and empty label images to fill in parallel.

Everything nucflow writes is NGFF 0.5 in zarr format 3 (metadata under the group's ``ome``
attribute, ``dimension_names`` on every array): the version ome-zarr-py (0.12+) and napari read
by default, so they read it without a "version mismatch" warning. :func:`ome_metadata` reads
both 0.5 and 0.4 groups (nucflow's older outputs, ``add_levels`` on either).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np
import zarr

from nucflow.errors import DtypeError, OutputError, ParameterError, ShapeError
from nucflow.io.source import SUPPORTED_DTYPES

__all__ = ["add_levels", "create_label_zarr", "write_ome_zarr", "ome_metadata", "image_reference"]

#: The NGFF version nucflow writes.
NGFF = "0.5"


def ome_metadata(group: zarr.Group) -> dict[str, Any]:
    """A group's OME metadata (``multiscales``, ``image-label``, ...), NGFF 0.5 or 0.4."""
    attrs = dict(group.attrs)
    found = attrs.get("ome", attrs)
    return dict(found) if isinstance(found, Mapping) else {}


def _set_ome(group: zarr.Group, **entries: Any) -> None:
    """Add ``entries`` to the group's OME metadata, in the group's NGFF version's place."""
    if group.metadata.zarr_format == 2:  # an NGFF 0.4 group (written before 0.5, or by others)
        group.attrs.update(entries)
        return
    group.attrs["ome"] = {**ome_metadata(group), "version": NGFF, **entries}


def image_reference(image: str | os.PathLike[str], labels: str | os.PathLike[str]) -> str | None:
    """``image-label.source.image`` for a label image at ``labels`` of the input ``image``:
    the relative path from the one to the other when ``image`` is a local OME-Zarr image
    group (readers then show the labels over it), else None (a TIFF, a URL, a bare array)."""
    image, labels = os.fspath(image), os.fspath(labels)
    if "://" in image or not os.path.isdir(image):
        return None
    try:
        group = zarr.open_group(image, mode="r")
    except (OSError, ValueError, TypeError, KeyError, zarr.errors.GroupNotFoundError):
        return None
    if not ome_metadata(group).get("multiscales"):
        return None
    return os.path.relpath(os.path.abspath(image), os.path.abspath(labels))


def write_ome_zarr(
    path: str | os.PathLike[str],
    data: np.ndarray | da.Array,
    voxel_size: Sequence[float] | None,
    *,
    axes: str | None = None,
    name: str = "image",
    labels: Mapping[str, np.ndarray | da.Array] | None = None,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
) -> None:
    """Write an image, and optionally label images, as OME-Zarr (NGFF 0.5, zarr format 3).

    Dask arrays are written block by block (``da.store``), never loaded whole; the image
    and all labels are stored in one pass so shared upstream work is computed once.

    Parameters
    ----------
    path : str or path-like
        Output directory (conventionally ``*.ome.zarr``).
    data : (Y, X) or (Z, Y, X) array or dask array
        The image; spatial axes only.
    voxel_size : sequence of float or None
        Voxel size in µm, one per axis of ``data``. None writes scale 1 with no unit (pixels),
        which ``open_stack`` reads back as ``voxel_size_known=False``.
    axes : {"yx", "zyx"}, optional
        Axis names; default from ``data.ndim``.
    name : str, optional
        Name stored in the multiscales metadata.
    labels : dict of str to array, optional
        Label images of the shape of ``data`` (integer dtype), written under ``labels/<name>``
        with ``image-label`` metadata pointing back at the image.
    chunks : sequence of int, optional
        Storage chunk shape; default: the block shape of a dask ``data``, else about 16 MiB.
    overwrite : bool, optional
        Replace an existing ``path``; otherwise an existing path raises OutputError.
    """
    path = os.fspath(path)
    image = _as_dask(data, "data")
    axes = _check_axes(axes, image.ndim)
    scale, unit = _check_voxel_size(voxel_size, image.ndim)
    zchunks = _storage_chunks(chunks, image)
    label_arrays = {}
    for key, lab in (labels or {}).items():
        arr = _as_dask(lab, f"labels[{key!r}]")
        if arr.shape != image.shape:
            raise ShapeError(
                f"`labels[{key!r}]` (shape {arr.shape}) must have the shape of `data` "
                f"(shape {image.shape})"
            )
        if arr.dtype.kind not in "uib":
            raise DtypeError(
                f"`labels[{key!r}]` has dtype {arr.dtype}; label images must be integers"
            )
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(key)) or key in (".", ".."):
            raise ParameterError(f"label name {key!r} must be letters, digits, '_', '-' or '.'")
        label_arrays[str(key)] = arr
    _prepare_output(path, overwrite)
    root = zarr.open_group(path, mode="w", zarr_format=3)
    sources = [image.rechunk(zchunks)]
    targets = [_create_level(root, image.shape, zchunks, image.dtype, axes, scale, unit, name)]
    if label_arrays:
        group = root.create_group("labels")
        _set_ome(group, labels=list(label_arrays))
        for key, arr in label_arrays.items():
            sub = group.create_group(key)
            targets.append(
                _create_level(sub, arr.shape, zchunks, arr.dtype, axes, scale, unit, key)
            )
            sources.append(arr.rechunk(zchunks))
            # "../../" is the image group, relative to labels/<name> (NGFF image-label spec).
            _set_ome(sub, **{"image-label": {"source": {"image": "../../"}}})
    # Blocks match storage chunks, so each block writes whole chunks: no lock is needed.
    da.store(sources, targets, lock=False, compute=True)  # type: ignore[arg-type]  # dask's hint omits dask arrays


def create_label_zarr(
    path: str | os.PathLike[str],
    shape: Sequence[int],
    chunks: Sequence[int],
    voxel_size: Sequence[float] | None,
    *,
    axes: str | None = None,
    dtype: str | np.dtype = "uint64",
    overwrite: bool = False,
    timepoints: int | None = None,
    time_interval_s: float | None = None,
    source_image: str | None = None,
) -> zarr.Array:
    """Create an empty (all 0) OME-Zarr label image for workers to fill in parallel.

    The root group holds ``multiscales`` (one dataset ``"0"``) and ``image-label`` metadata
    (NGFF 0.5, zarr format 3, readable by ome-zarr-py and napari). Chunks that are never
    written, or written all 0, stay absent on disk.

    Parameters
    ----------
    path : str or path-like
        Output directory (conventionally ``labels.ome.zarr``).
    shape : (2,) or (3,) sequence of int
        Spatial shape (Y, X) or (Z, Y, X).
    chunks : sequence of int
        Chunk shape, one per axis. Writers must write whole chunks, or serialize writes to
        a chunk, since concurrent partial writes to one chunk race.
    voxel_size : sequence of float or None
        Voxel size in µm per axis; None writes scale 1 with no unit.
    axes : {"yx", "zyx"}, optional
        Axis names; default from ``len(shape)``.
    dtype : str or numpy dtype, optional
        Integer label type, default uint64.
    overwrite : bool, optional
        Replace an existing ``path``; otherwise an existing path raises OutputError.
    timepoints : int, optional
        Add a leading time axis of this length (NGFF axis ``t`` of type ``time``; array
        ``(T, *shape)`` in chunks of one time point, ``(1, *chunks)``).
    time_interval_s : float, optional
        Seconds between time points: the time axis' scale, with unit ``second`` (without it,
        scale 1 and no unit).
    source_image : str, optional
        ``image-label.source.image``: the image these labels are of, relative to ``path``
        (:func:`image_reference`); readers show the labels over it.

    Returns
    -------
    zarr.Array
        The level-0 array, opened for writing; it pickles, and workers in other processes
        can write disjoint regions of it with ``array[region] = block``.
    """
    path = os.fspath(path)
    shape = _check_shape_like("shape", shape, None)
    chunks = _check_shape_like("chunks", chunks, len(shape))
    axes = _check_axes(axes, len(shape))
    scale, unit = _check_voxel_size(voxel_size, len(shape))
    time_unit = None
    if timepoints is not None:
        (timepoints,) = _check_shape_like("timepoints", [timepoints], 1)
        shape, chunks, axes = (timepoints, *shape), (1, *chunks), "t" + axes
        time_unit = "second" if time_interval_s else None
        scale = [float(time_interval_s or 1.0), *scale]
    dt = np.dtype(dtype)
    if dt.kind not in "ui":
        raise DtypeError(f"`dtype` {dt} is not an integer type; label images need e.g. uint64")
    _prepare_output(path, overwrite)
    root = zarr.open_group(path, mode="w", zarr_format=3)
    arr = _create_level(root, shape, chunks, dt, axes, scale, unit, "labels", time_unit)
    source = {"source": {"image": source_image}} if source_image else {}
    _set_ome(root, **{"image-label": source})
    return arr


def add_levels(
    group: zarr.Group,
    factors: Sequence[Sequence[int]],
    *,
    translate: bool = False,
    keep: bool = False,
) -> list[zarr.Array]:
    """Add the empty datasets "1", "2", … of a multiscale pyramid and their NGFF metadata.

    The group's ``multiscales`` metadata must list dataset "0" (as :func:`write_ome_zarr` and
    :func:`create_label_zarr` write it; any axes, e.g. a leading time axis). Level ``k`` has
    the shape ``ceil(shape / s)`` with ``s`` the product of the factors of levels 1..k, the
    chunks of level 0 (clipped to its shape), and the scale of level 0 times ``s``.

    Parameters
    ----------
    group : zarr.Group
        An OME-Zarr image or label image group, opened for writing.
    factors : sequence of sequence of int
        Per level after level 0, the factor per axis relative to the level before (>= 1;
        1 on a time axis).
    translate : bool, optional
        True when a voxel of level ``k`` summarizes its cell (mean): it then lies at the
        cell's centre, a translation of ``(s - 1) / 2`` level-0 voxels per axis. False when it
        is the cell's first voxel (nearest, stride from voxel 0): no translation.
    keep : bool, optional
        Reuse a dataset already there with the expected shape and dtype (``--resume``);
        otherwise every level is created anew.

    Returns
    -------
    list of zarr.Array
        Every level, level 0 first.
    """
    found: Any = ome_metadata(group)["multiscales"]
    meta = [dict(m) for m in found]
    base = group["0"]
    assert isinstance(base, zarr.Array)
    first = meta[0]["datasets"][0]["coordinateTransformations"]
    scale = [float(v) for v in first[0]["scale"]]
    shift = [float(v) for v in first[1]["translation"]] if len(first) > 1 else [0.0] * len(scale)
    levels, datasets = [base], [meta[0]["datasets"][0]]
    cumulative = np.ones(base.ndim, dtype=np.int64)
    for k, level in enumerate(factors, start=1):
        step = _check_shape_like("factors", level, base.ndim)
        cumulative = cumulative * np.asarray(step)
        shape = tuple(-(-n // int(s)) for n, s in zip(base.shape, cumulative, strict=True))
        levels.append(_level_array(group, str(k), base, shape, keep=keep))
        transforms: list[dict[str, Any]] = [
            {"type": "scale", "scale": [v * int(s) for v, s in zip(scale, cumulative, strict=True)]}
        ]
        if translate or any(shift):
            offsets = [
                o + (v * (int(s) - 1) / 2 if translate else 0.0)
                for o, v, s in zip(shift, scale, cumulative, strict=True)
            ]
            transforms.append({"type": "translation", "translation": offsets})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    meta[0]["datasets"] = datasets
    _set_ome(group, multiscales=meta)
    return levels


def _level_array(
    group: zarr.Group, name: str, base: zarr.Array, shape: tuple[int, ...], *, keep: bool
) -> zarr.Array:
    if keep and name in group:
        found = group[name]
        if isinstance(found, zarr.Array) and found.shape == shape and found.dtype == base.dtype:
            return found
    return group.create_array(
        name,
        shape=shape,
        chunks=tuple(min(c, n) for c, n in zip(base.chunks, shape, strict=True)),
        dtype=base.dtype,
        fill_value=0,
        **_layout(group, _axis_names(base)),
        config={"write_empty_chunks": False},
        overwrite=True,
    )


def _axis_names(array: zarr.Array) -> tuple[str, ...] | None:
    """A zarr 3 array's ``dimension_names`` (NGFF 0.5 requires them), as its levels get them."""
    if array.metadata.zarr_format != 3:
        return None
    names = array.metadata.dimension_names
    return tuple(str(n) for n in names) if names else None


def _layout(group: zarr.Group, axes: Sequence[str] | None) -> dict[str, Any]:
    """How an array of ``group`` names its chunks and axes: NGFF 0.5 (zarr 3) names its axes
    (``dimension_names``, as the spec requires); 0.4 (zarr 2) needs "/" as the separator."""
    if group.metadata.zarr_format == 2:
        return {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
    return {"dimension_names": tuple(axes) if axes is not None else None}


def _as_dask(data: Any, what: str) -> da.Array:
    arr = data if isinstance(data, da.Array) else da.from_array(np.asarray(data), chunks="auto")
    if arr.ndim not in (2, 3):
        raise ShapeError(
            f"`{what}` has shape {arr.shape}; OME-Zarr output must be 2D (Y, X) or 3D (Z, Y, X)"
        )
    if arr.dtype.kind not in "uifb":
        raise DtypeError(f"`{what}` has dtype {arr.dtype}; supported: {SUPPORTED_DTYPES}")
    return arr


def _check_axes(axes: str | None, ndim: int) -> str:
    expected = "zyx"[-ndim:]
    if axes is not None and axes.lower() != expected:
        raise ParameterError(f"`axes` {axes!r} does not fit {ndim}D data; use {expected!r}")
    return expected


def _check_voxel_size(
    voxel_size: Sequence[float] | None, ndim: int
) -> tuple[list[float], str | None]:
    if voxel_size is None:
        return [1.0] * ndim, None
    try:
        scale = [float(v) for v in voxel_size]
    except (TypeError, ValueError):
        scale = []
    if len(scale) != ndim or not all(np.isfinite(v) and v > 0 for v in scale):
        raise ParameterError(
            f"`voxel_size` must be {ndim} positive numbers (µm), got {voxel_size!r}"
        )
    return scale, "micrometer"


def _check_shape_like(what: str, value: Any, ndim: int | None) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value if not isinstance(v, bool) and v == int(v))
    except (TypeError, ValueError):
        out = ()
    bad = len(out) != len(value) if hasattr(value, "__len__") else True
    if bad or any(v <= 0 for v in out) or len(out) not in ((ndim,) if ndim else (2, 3)):
        n = f"{ndim}" if ndim else "2 or 3"
        raise ParameterError(f"`{what}` must be {n} positive ints, got {value!r}")
    return out


def _storage_chunks(chunks: Sequence[int] | None, arr: da.Array) -> tuple[int, ...]:
    if chunks is not None:
        return _check_shape_like("chunks", chunks, arr.ndim)
    # Start from the dask blocks and halve the longest axis: storage chunks then divide the
    # blocks (cheap rechunk) and stay small enough for viewers, which fetch whole chunks.
    out = [int(c) for c in arr.chunksize]
    while int(np.prod(out)) * arr.dtype.itemsize > 16 * 2**20 and max(out) > 1:
        i = out.index(max(out))
        out[i] = -(-out[i] // 2)
    return tuple(out)


def _create_level(
    group: zarr.Group,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: np.dtype,
    axes: str,
    scale: list[float],
    unit: str | None,
    name: str,
    time_unit: str | None = None,
) -> zarr.Array:
    """Create dataset "0" of ``group`` and the group's NGFF multiscales metadata.

    ``axes`` is spatial (``"zyx"``, ``"yx"``), or a leading ``"t"`` and spatial axes.
    """
    arr = group.create_array(
        "0",
        shape=tuple(shape),
        chunks=tuple(chunks),
        dtype=dtype,
        fill_value=0,
        **_layout(group, tuple(axes)),
        config={"write_empty_chunks": False},
    )
    axes_meta = [
        {"name": a, "type": "time", **({"unit": time_unit} if time_unit else {})}
        if a == "t"
        else {"name": a, "type": "space", **({"unit": unit} if unit else {})}
        for a in axes
    ]
    version = {"version": "0.4"} if group.metadata.zarr_format == 2 else {}  # 0.5: in "ome"
    multiscales = [
        {
            **version,
            "name": name,
            "axes": axes_meta,
            "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}
            ],
        }
    ]
    _set_ome(group, multiscales=multiscales)
    return arr


def _prepare_output(path: str, overwrite: bool) -> None:
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise OutputError(
            f"output {path} already exists; pass overwrite=True (--overwrite) or choose a new path"
        )
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)
