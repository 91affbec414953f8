"""Open microscopy stacks lazily as dask arrays; write OME-Zarr images and label images.

Only this module and ``pipeline`` touch disk. Readers never load pixels when opening: they
read metadata, then build a dask array whose tasks open the file *by path* and read only
their region, so the graph pickles and runs on process, LocalCluster and SLURM workers.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_FORMATS",
    "Stack",
    "create_label_zarr",
    "open_stack",
    "write_ome_zarr",
]

import contextlib
import glob
import json
import logging
import numbers
import os
import re
import shutil
import threading
import warnings
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr
from dask.base import tokenize

from nucflow.errors import (
    CorruptDataError,
    DtypeError,
    FormatError,
    InputPathError,
    NucflowError,
    OutputError,
    ParameterError,
    ShapeError,
)

SUPPORTED_FORMATS = (
    "zarr v2/v3 array or single-array group, OME-Zarr 0.4/0.5, TIFF/BigTIFF/OME-TIFF/ImageJ "
    "TIFF, or a folder or glob pattern of 2D TIFF slices"
)
SUPPORTED_DTYPES = "unsigned/signed integers, float32, float64"

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_TIFF_SUFFIXES = (".tif", ".tiff")
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup", ".zattrs")
# Micrometres per unit; keys are lower case (OME-Zarr names, OME-TIFF symbols, ImageJ spellings).
_UM_PER_UNIT = {
    "angstrom": 1e-4, "å": 1e-4, "picometer": 1e-6, "pm": 1e-6,
    "nanometer": 1e-3, "nm": 1e-3,
    "micrometer": 1.0, "micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "μm": 1.0,
    "\\u00b5m": 1.0,
    "millimeter": 1e3, "mm": 1e3, "centimeter": 1e4, "cm": 1e4, "meter": 1e6, "m": 1e6,
    "inch": 25400.0, "in": 25400.0,
}  # fmt: skip


@dataclass(frozen=True)
class Stack:
    """A lazily opened image: spatial axes only, with its physical voxel size.

    Attributes
    ----------
    data : (Z, Y, X) or (Y, X) dask array
        Pixels of one channel at time point 0; computing it reads the file.
    voxel_size : tuple of float
        Size of a voxel in µm, one per spatial axis (1.0 each when unknown).
    axes : str
        ``"zyx"`` or ``"yx"``.
    voxel_size_known : bool
        False when the file had no physical size and ``voxel_size`` is in pixels.
    path : str
        The path that was opened.
    n_channels : int
        Number of channels in the file (1 if it has no channel axis).
    """

    data: da.Array
    voxel_size: tuple[float, ...]
    axes: str
    voxel_size_known: bool
    path: str
    n_channels: int
    _selection: Any = field(default=None, repr=False, compare=False)

    @property
    def reader(self) -> Any:
        """A small picklable object: ``reader[region]`` reads those voxels of ``data`` from the
        file directly (as each task of ``data`` does), as a numpy array, without a dask graph."""
        return self._selection if self._selection is not None else _Computing(self.data)

    def crop(self, box: Sequence[slice]) -> Stack:
        """The part ``box`` of this stack as a stack of its own (coordinates start at 0).

        Parameters
        ----------
        box : sequence of slice
            One slice with explicit start and stop per spatial axis.

        Returns
        -------
        Stack
            Lazy and picklable as this one; ``data_region()`` is all of it.
        """
        box = tuple(box)
        return dataclasses.replace(self, data=self.data[box], _selection=_Cropped(self.reader, box))

    def data_region(self) -> tuple[slice, ...] | None:
        """The bounding box of the stored chunks, in voxels of ``data``.

        A zarr store holds only the chunks that were written; the others read as the fill
        value without touching the disk. This lists the store (no pixel is read) and returns
        the box around the written chunks of this channel and time point, or None if there
        are none. Non-zarr images hold data everywhere: the whole stack.

        Returns
        -------
        tuple of slice or None
        """
        whole = tuple(slice(0, n) for n in self.data.shape)
        sel = self._selection
        if sel is None or not isinstance(sel.source, _ZarrSource):
            return whole
        arr = sel.source.array
        grid = tuple(arr.shards or arr.chunks)
        coords = _stored_chunk_coords(arr)
        fixed = [(axis, i) for axis, i in enumerate(sel.index) if i is not None]
        keep = np.ones(len(coords), bool)
        for axis, i in fixed:
            keep &= coords[:, axis] == i // grid[axis]
        spatial = [axis for axis, i in enumerate(sel.index) if i is None]
        coords = coords[keep][:, spatial]
        if not len(coords):
            return None
        step = np.array([grid[a] for a in spatial])
        lo, hi = coords.min(axis=0) * step, (coords.max(axis=0) + 1) * step
        return tuple(
            slice(int(a), int(min(b, n))) for a, b, n in zip(lo, hi, self.data.shape, strict=True)
        )


# ----------------------------------------------------------------------------- sources
# A source is a small picklable object with shape, dtype, ndim and __getitem__ that reads a
# region on demand; da.from_array turns it into one task per block.


@dataclass(frozen=True)
class _ZarrSource:
    array: zarr.Array  # zarr arrays pickle (store + metadata), so workers reopen nothing

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def __getitem__(self, key: tuple) -> np.ndarray:
        return np.asarray(self.array[key])


@dataclass(frozen=True)
class _Cropped:
    """``reader`` of a cropped Stack: reads ``box`` of ``source`` in the crop's coordinates."""

    source: Any
    box: tuple[slice, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b.stop - b.start for b in self.box)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.source.dtype)

    def __getitem__(self, key: tuple) -> np.ndarray:
        shifted = []
        for k, b, n in zip(key, self.box, self.shape, strict=True):
            start, stop, _ = k.indices(n)
            shifted.append(slice(b.start + start, b.start + stop))
        return self.source[tuple(shifted)]


@dataclass(frozen=True)
class _Computing:
    """``reader`` of a Stack built around an arbitrary dask array."""

    data: da.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def __getitem__(self, key: tuple) -> np.ndarray:
        return np.asarray(self.data[key].compute(scheduler="sync"))


def _stored_chunk_coords(arr: zarr.Array) -> np.ndarray:
    """Grid coordinates (K, ndim) of the chunks (or shards) present in the array's store."""
    from zarr.core.sync import collect_aiterator  # zarr 3 lists stores asynchronously

    prefix = arr.store_path.path
    keys = collect_aiterator(arr.store_path.store.list_prefix(prefix + "/" if prefix else ""))
    coords = []
    for key in keys:
        relative = key[len(prefix) :].lstrip("/")
        if relative.startswith("c/") or relative.startswith("c."):
            relative = relative[2:]  # zarr v3 default chunk keys: c/0/1/2
        parts = re.split(r"[./]", relative)
        if len(parts) == arr.ndim and all(p.isdigit() for p in parts):
            coords.append([int(p) for p in parts])
    return np.array(coords, dtype=np.int64).reshape(-1, arr.ndim)


class _OpenTiffs(OrderedDict):
    """Open TiffFiles of one thread; closed when the thread (and its locals) go away."""

    def __del__(self) -> None:
        for tif in self.values():
            tif.close()


_TIFF_CACHE = threading.local()


def _cached_tiff(path: str) -> tifffile.TiffFile:
    """Return an open TiffFile, reused per worker thread while the file is unchanged.

    Parsing the IFDs and OME-XML of a many-page OME-TIFF costs far more than decoding one
    page (25 ms vs 0.3 ms at 1000 pages); reopening per task would make reads O(pages²).
    Per-thread, because a TiffFile's file position is shared state.
    """
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    cache = getattr(_TIFF_CACHE, "files", None)
    if cache is None:
        cache = _TIFF_CACHE.files = _OpenTiffs()
    tif = cache.pop(key, None)
    if tif is None:
        while len(cache) >= 4:
            cache.popitem(last=False)[1].close()
        tif = tifffile.TiffFile(path)
    cache[key] = tif
    return tif


def _read_tiff(path: str, series: int, level: int, key: tuple, shape: tuple) -> np.ndarray:
    """Read ``key`` of one TIFF series, decoding only the pages/tiles it touches."""
    s = _cached_tiff(path).series[series]
    if tuple(s.levels[level].shape) != tuple(shape):
        raise ShapeError(
            f"{path} has shape {tuple(s.levels[level].shape)} but {tuple(shape)} was expected; "
            "all TIFF slices must have the same shape, and a file must not change while read"
        )
    # The ZarrTiffStore does not pickle, so it is created here, inside the task.
    store = s.aszarr(level=level)  # one level: a zarr array, not a multiscales group
    try:
        return np.asarray(zarr.open_array(store, mode="r")[key])
    finally:
        store.close()  # closes only handles the store opened, not the cached TiffFile's


@dataclass(frozen=True)
class _TiffSource:
    path: str
    series: int
    level: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, key: tuple) -> np.ndarray:
        return _read_tiff(self.path, self.series, self.level, key, self.shape)


@dataclass(frozen=True)
class _SliceSource:
    """A stack of 2D TIFF files, one per z."""

    files: tuple[str, ...]
    shape: tuple[int, int, int]
    dtype: np.dtype

    def __getitem__(self, key: tuple) -> np.ndarray:
        zkey, yx = key[0], tuple(key[1:])
        if isinstance(zkey, numbers.Integral):
            return _read_tiff(self.files[zkey], 0, 0, yx, self.shape[1:])
        planes = [_read_tiff(self.files[i], 0, 0, yx, self.shape[1:]) for i in
                  range(len(self.files))[zkey]]  # fmt: skip
        if not planes:
            return np.empty((0, *np.empty(self.shape[1:])[yx].shape), self.dtype)
        return np.stack(planes)


@dataclass(frozen=True)
class _Selection:
    """A view of a source with the t/c axes fixed, so the dask graph covers only the view."""

    source: Any
    index: tuple[int | None, ...]  # int: axis fixed at that index and dropped; None: kept
    path: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(n for n, i in zip(self.source.shape, self.index, strict=True) if i is None)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.source.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: tuple) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        it = iter(key)
        full = tuple(next(it, slice(None)) if i is None else i for i in self.index)
        try:
            return self.source[full]
        except (NucflowError, MemoryError):
            raise
        except OSError as e:
            if not isinstance(e, PermissionError) and os.path.exists(self.path):
                raise CorruptDataError(
                    f"cannot read region {_fmt_key(full)} of {self.path} ({_one_line(e)}); "
                    "the file is damaged: re-copy or re-export it"
                ) from e
            raise InputPathError(
                f"cannot read {self.path} on this worker ({_one_line(e)}); the input must be "
                "readable at the same path on every worker"
            ) from e
        except Exception as e:
            raise CorruptDataError(
                f"cannot decode region {_fmt_key(full)} of {self.path} "
                f"({type(e).__name__}: {_one_line(e)}); the file is damaged: re-copy or "
                "re-export it"
            ) from e


def _one_line(e: object) -> str:
    return " ".join(str(e).split())


def _fmt_key(key: tuple) -> str:
    parts = [f"{k.start or 0}:{k.stop}" if isinstance(k, slice) else str(k) for k in key]
    return "[" + ", ".join(parts) + "]"


@dataclass(frozen=True)
class _Image:
    """What a format reader found, before the axis policy is applied."""

    source: Any
    roles: str | None  # per axis: t, c, s (space) or ? (unknown); None: no axis metadata
    scale: tuple[float | None, ...]  # µm per voxel per axis, None where unknown
    native_chunks: tuple[int, ...]  # the file's own chunking, to align dask blocks with it
    token: tuple  # identifies the file version, for deterministic dask keys


# ----------------------------------------------------------------------------- open_stack


def open_stack(
    path: str | os.PathLike[str],
    *,
    channel: int | None = None,
    level: int = 0,
    chunks: Sequence[int] | None = None,
) -> Stack:
    """Open an image lazily as a dask array of its spatial axes.

    Opening reads metadata only; pixels are read when ``data`` is computed, one task per
    block, each opening the file by path (so the array pickles and runs on any worker).

    Parameters
    ----------
    path : str or path-like
        A zarr v2/v3 array or group holding one array, an OME-Zarr 0.4/0.5 image, a
        TIFF/BigTIFF/OME-TIFF/ImageJ TIFF file, a folder of 2D TIFF slices (one per z, in
        natural order: z2 before z10), or a glob pattern of such slices. A folder or
        pattern holding a single file opens that file.
    channel : int, optional
        Index along the channel axis (OME ``c``, ImageJ ``C``, TIFF samples). Required when
        the image has more than one channel.
    level : int, optional
        Pyramid level of an OME-Zarr or pyramidal TIFF (0 = full resolution).
    chunks : sequence of int, optional
        Block shape of ``data``, one positive int per spatial axis. Default: multiples of
        the file's own chunks (pages, tiles) of about dask's ``array.chunk-size``.

    Returns
    -------
    Stack
        ``data`` is a (Z, Y, X) or (Y, X) dask array holding time point 0 of ``channel``;
        ``voxel_size`` is in µm, from OME-Zarr scale, OME-TIFF PhysicalSize or ImageJ
        resolution/spacing. If any spatial axis lacks a physical size, all are 1.0 and
        ``voxel_size_known`` is False (units are then pixels).

    Raises
    ------
    InputPathError
        ``path`` does not exist (or a pattern matches nothing).
    FormatError
        ``path`` is not a supported image, or a group holds several arrays.
    ShapeError
        The image is 1D or has more than 3 spatial axes, or ``channel`` is missing.
    DtypeError
        The pixel type is not an integer or float32/float64.
    ParameterError
        ``channel``, ``level`` or ``chunks`` is invalid.
    """
    _check_index("level", level)
    if channel is not None:
        _check_index("channel", channel, allow_negative=True)
    name = os.fspath(path)
    if not isinstance(name, str):
        raise ParameterError(f"`path` must be a str path, got {name!r}")
    image = _read_any(name, level)
    return _to_stack(image, name, channel, chunks)


def _read_any(path: str, level: int) -> _Image:
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, m)) for m in _ZARR_MARKERS):
            return _read_zarr(path, level)
        files = sorted(
            (os.path.join(path, f) for f in os.listdir(path)
             if f.lower().endswith(_TIFF_SUFFIXES) and not f.startswith(".")),
            key=_natural_key,
        )  # fmt: skip
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise FormatError(
                f"{path} is a folder with no zarr metadata and no .tif/.tiff files; "
                f"supported: {SUPPORTED_FORMATS}"
            )
        return (
            _read_tiff_file(files[0], level)
            if len(files) == 1
            else _read_slices(files, path, level)
        )
    if os.path.isfile(path):
        if _is_tiff(path):
            return _read_tiff_file(path, level)
        raise FormatError(
            f"{path} is not an image nucflow can read; supported: {SUPPORTED_FORMATS}"
        )
    if glob.has_magic(path):
        matches = sorted(glob.glob(path), key=_natural_key)
        if not matches:
            raise InputPathError(f"input pattern {path} matches no files; check the pattern")
        if len(matches) == 1:
            return _read_any(matches[0], level)
        bad = [m for m in matches if not (os.path.isfile(m) and _is_tiff(m))]
        if bad:
            raise FormatError(
                f"pattern {path} matches {bad[0]}, which is not a TIFF file; a pattern must "
                "match only 2D TIFF slices"
            )
        return _read_slices(matches, path, level)
    raise InputPathError(f"input {path} does not exist; check the path")


def _natural_key(name: str) -> list:
    # re.split with a group alternates text and digits, so items at equal positions compare.
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _is_tiff(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in _TIFF_MAGIC


def _file_token(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.abspath(path), st.st_mtime_ns, st.st_size)


def _check_level(level: int, n_levels: int, path: str) -> None:
    if level >= n_levels:
        raise ParameterError(
            f"`level` {level} is out of range: {path} has {n_levels} level(s); "
            f"valid range 0..{n_levels - 1}"
        )


# ---- zarr / OME-Zarr


_MALFORMED = (TypeError, ValueError, KeyError, AttributeError, IndexError)


def _read_zarr(path: str, level: int) -> _Image:
    try:
        node = zarr.open(path, mode="r")
    except Exception as e:
        raise FormatError(
            f"{path} has zarr metadata but cannot be opened ({_one_line(e)}); "
            "check that it is a complete zarr v2/v3 store"
        ) from e
    try:
        return _read_zarr_node(node, path, level)
    except NucflowError:
        raise
    except _MALFORMED as e:  # metadata of an unexpected type or shape: damaged, not a bug
        raise FormatError(
            f"{path} has malformed zarr/OME-Zarr metadata ({type(e).__name__}: {_one_line(e)}); "
            "the store is damaged: re-copy or re-export it"
        ) from e


def _read_zarr_node(node: Any, path: str, level: int) -> _Image:
    if isinstance(node, zarr.Array):
        return _dataset_of_ome_zarr(node, path, level) or _plain_zarr(node, path, level)
    attrs = node.attrs.asdict()
    ome = attrs.get("ome", attrs)  # OME-Zarr 0.5 nests its metadata under "ome"
    if ome.get("multiscales"):
        return _ome_zarr(node, ome["multiscales"][0], path, level)
    if "plate" in ome or "well" in ome:
        raise FormatError(
            f"{path} is an OME-Zarr plate/well; open one image inside it, e.g. {path}/A/1/0"
        )
    if "bioformats2raw.layout" in ome and "0" in node:
        return _read_zarr(os.path.join(path, "0"), level)  # series 0 of a bioformats2raw export
    arrays = sorted(name for name, _ in node.arrays())
    if len(arrays) == 1:
        return _plain_zarr(node[arrays[0]], path, level)
    if not arrays:
        raise FormatError(
            f"{path} is a zarr group with no arrays and no OME-Zarr metadata; "
            "pass the path of an array or an OME-Zarr image"
        )
    raise FormatError(
        f"{path} is a zarr group with {len(arrays)} arrays ({', '.join(arrays)}) and no OME-Zarr "
        f"metadata; pass one of them, e.g. {os.path.join(path, arrays[0])}"
    )


def _dataset_of_ome_zarr(arr: zarr.Array, path: str, level: int) -> _Image | None:
    """Read ``image.ome.zarr/0`` with the axes and scale of its parent's metadata."""
    parent, name = os.path.split(os.path.normpath(path))
    if level != 0 or not any(os.path.exists(os.path.join(parent, m)) for m in _ZARR_MARKERS):
        return None
    try:
        group = zarr.open_group(parent, mode="r")
    except Exception:
        return None  # a parent that is not a zarr group has no metadata to offer
    attrs = group.attrs.asdict()
    ms = (attrs.get("ome", attrs).get("multiscales") or [{}])[0]
    paths = [d.get("path") for d in ms.get("datasets", [])]
    if name not in paths:
        return None
    return _ome_zarr(group, ms, path, paths.index(name))


def _zarr_native_chunks(arr: zarr.Array) -> tuple[int, ...]:
    # Shards are the unit of storage in zarr v3; reading inner chunks one task each is too fine.
    return tuple(arr.shards or arr.chunks)


def _zarr_token(path: str, arr: zarr.Array) -> tuple:
    # the metadata is only a cache key: zarr's warnings about unstable dtypes are not the user's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = json.dumps(arr.metadata.to_dict(), sort_keys=True, default=str)
    return (os.path.abspath(path), arr.path, meta, os.stat(path).st_mtime_ns)


def _plain_zarr(arr: zarr.Array, path: str, level: int) -> _Image:
    _check_level(level, 1, path)
    names = getattr(arr.metadata, "dimension_names", None) or arr.attrs.get("_ARRAY_DIMENSIONS")
    roles = None
    if names and len(names) == arr.ndim and all(str(n).lower() in "tczyx" for n in names if n):
        roles = "".join(_role_from_name(str(n)) for n in names)
    return _Image(
        _ZarrSource(arr), roles, (None,) * arr.ndim, _zarr_native_chunks(arr),
        _zarr_token(path, arr),
    )  # fmt: skip


def _role_from_name(name: str) -> str:
    name = name.lower()
    if name in ("t", "time"):
        return "t"
    if name in ("c", "ch", "channel"):
        return "c"
    return "s" if name in ("z", "y", "x") else "?"


def _ome_zarr(group: zarr.Group, ms: Mapping, path: str, level: int) -> _Image:
    datasets = ms.get("datasets") or []
    _check_level(level, len(datasets), path)
    ds_path = datasets[level]["path"]
    try:
        arr = group[ds_path]
    except KeyError as e:
        raise FormatError(
            f"{path} lists dataset {ds_path!r} in its multiscales metadata but it is missing; "
            "the OME-Zarr is incomplete"
        ) from e
    except Exception as e:  # its metadata cannot be parsed: zarr raises many kinds of error
        raise FormatError(
            f"{os.path.join(path, str(ds_path))} cannot be opened ({type(e).__name__}: "
            f"{_one_line(e)}); the OME-Zarr is damaged: re-copy or re-export it"
        ) from e
    if not isinstance(arr, zarr.Array):
        raise FormatError(
            f"{os.path.join(path, str(ds_path))} is a group, not an array; the OME-Zarr "
            "multiscales metadata is damaged: re-export it"
        )
    roles, units = _ngff_axes(ms.get("axes"), arr.ndim, path)
    scale = [1.0] * arr.ndim
    # Dataset scale times the optional multiscale-wide scale (NGFF applies both in order).
    for transforms in (datasets[level].get("coordinateTransformations"),
                       ms.get("coordinateTransformations")):  # fmt: skip
        for t in transforms or []:
            if t.get("type") == "scale" and len(t.get("scale", [])) == arr.ndim:
                scale = [a * float(b) for a, b in zip(scale, t["scale"], strict=True)]
    space = [i for i, r in enumerate(roles or "") if r == "s"]
    no_units = not any(units[i] for i in space)
    um: list[float | None] = [None] * arr.ndim
    if not (no_units and all(scale[i] == 1.0 for i in space)):
        for i in space:
            # No unit but a real scale: writers such as ome-zarr-py leave it out; assume µm.
            factor = _UM_PER_UNIT.get((units[i] or "micrometer").lower())
            um[i] = None if factor is None else scale[i] * factor
    return _Image(
        _ZarrSource(arr), roles, tuple(um), _zarr_native_chunks(arr), _zarr_token(path, arr)
    )


def _ngff_axes(axes: Any, ndim: int, path: str) -> tuple[str | None, list[str | None]]:
    if axes is None:
        # NGFF 0.1-0.2 had no axes metadata: images were always 5D t, c, z, y, x.
        return ("tcsss" if ndim == 5 else None), [None] * ndim
    if len(axes) != ndim:
        raise FormatError(
            f"{path} has {len(axes)} axes in its OME-Zarr metadata but its array is {ndim}D; "
            "the metadata is inconsistent"
        )
    roles, units = [], []
    for ax in axes:
        if isinstance(ax, str):
            ax = {"name": ax}
        kind = {"space": "s", "time": "t", "channel": "c"}.get(ax.get("type", ""))
        roles.append(kind or _role_from_name(str(ax.get("name", ""))))
        units.append(ax.get("unit"))
    return "".join(roles), units


# ---- TIFF


def _read_tiff_file(path: str, level: int) -> _Image:
    try:
        with _tiff_log(path), tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            _check_level(level, len(series.levels), path)
            s = series.levels[level]
            page = s.keyframe
            native = (page.tilelength, page.tilewidth) if page.is_tiled else page.shape[:2]
            roles = "".join(_TIFF_ROLES.get(a, "?") for a in s.axes)
            sizes = _tiff_physical_sizes(tif)
            scale = _tiff_scale(s.axes, sizes, series.shape, s.shape)
            native_full = tuple(
                native[0] if a == "Y" else native[1] if a == "X" else 1 for a in s.axes
            )
            source = _TiffSource(path, 0, level, tuple(s.shape), np.dtype(s.dtype))
    except NucflowError:
        raise
    except Exception as e:
        raise FormatError(
            f"{path} cannot be read as TIFF ({_one_line(e)}); check that the file is complete"
        ) from e
    return _Image(source, roles, scale, native_full, _file_token(path) + (level,))


_TIFF_ROLES = {"T": "t", "C": "c", "S": "c", "Z": "s", "Y": "s", "X": "s"}
# tifffile logs these and goes on with the pages it could read: the stack would come out
# silently shorter (a truncated 3D file opens as one 2D page).
_TIFF_DAMAGE = ("invalid page offset", "failed to reshape", "invalid tag", "invalid value offset")


class _TiffLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(_one_line(record.getMessage()))


@contextlib.contextmanager
def _tiff_log(path: str) -> Iterator[None]:
    """Turn what tifffile logs while opening ``path`` into a FormatError (a damaged page
    structure) or one warning line each, instead of logging records on stderr."""
    logger = logging.getLogger("tifffile")
    handler, propagate = _TiffLog(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    damage = [m for m in handler.messages if any(d in m for d in _TIFF_DAMAGE)]
    if damage:
        raise FormatError(
            f"{path} is damaged or truncated (tifffile: {damage[0]}); check that the file is "
            "complete: re-copy or re-export it"
        )
    for message in handler.messages:
        warnings.warn(f"{path}: tifffile: {message}", stacklevel=3)


def _tiff_scale(
    axes: str, sizes: Mapping[str, float], shape0: Sequence[int], shape: Sequence[int]
) -> tuple[float | None, ...]:
    out = []
    for i, a in enumerate(axes):
        size = sizes.get(a)
        # A pyramid level's voxels are larger by the ratio of level-0 to level shape.
        if size is not None and len(shape0) == len(shape):
            size = size * max(1, round(shape0[i] / shape[i]))  # 37 -> 19 is a factor of 2
        out.append(size)
    return tuple(out)


def _tiff_physical_sizes(tif: tifffile.TiffFile) -> dict[str, float]:
    """Physical size per TIFF axis letter in µm, from OME or ImageJ metadata only.

    Plain TIFF resolution tags are ignored: cameras write a meaningless 72 dpi there.
    """
    if tif.is_ome and tif.ome_metadata:
        return _ome_tiff_sizes(tif.ome_metadata)
    meta = tif.imagej_metadata
    if tif.is_imagej and meta:
        factor = _UM_PER_UNIT.get(str(meta.get("unit", "")).lower())
        if factor is None:
            return {}
        sizes = {}
        tags = tif.pages.first.tags
        for axis, tag in (("X", "XResolution"), ("Y", "YResolution")):
            if tag in tags:
                num, den = tags[tag].value
                if num > 0:
                    sizes[axis] = den / num * factor  # the tag holds pixels per unit
        if "spacing" in meta:
            sizes["Z"] = float(meta["spacing"]) * factor
        return sizes
    return {}


def _ome_tiff_sizes(xml: str) -> dict[str, float]:
    try:
        pixels = ET.fromstring(xml).find(".//{*}Image/{*}Pixels")  # series 0 is Image 0
    except ET.ParseError:
        return {}
    if pixels is None:
        return {}
    sizes = {}
    for axis in "XYZ":
        value = pixels.get(f"PhysicalSize{axis}")
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")  # the OME schema's default
        factor = _UM_PER_UNIT.get(unit.lower())
        if value is not None and factor is not None:
            sizes[axis] = float(value) * factor
    return sizes


def _read_slices(files: Sequence[str], path: str, level: int) -> _Image:
    _check_level(level, 1, path)
    first = _read_tiff_file(files[0], 0)
    shape = first.source.shape
    if len(shape) != 2 or first.roles != "ss":
        raise ShapeError(
            f"{files[0]} in {path} has shape {shape}; a folder or pattern must hold 2D "
            "single-channel TIFF slices, one per z"
        )
    last = _read_tiff_file(files[-1], 0)
    if last.source.shape != shape or last.source.dtype != first.source.dtype:
        raise ShapeError(
            f"{files[-1]} has shape {last.source.shape} and dtype {last.source.dtype} but "
            f"{files[0]} has {shape} and {first.source.dtype}; all slices must match"
        )
    source = _SliceSource(tuple(files), (len(files), *shape), first.source.dtype)
    # z spacing of a slice folder is known only if the first slice carries ImageJ spacing.
    with tifffile.TiffFile(files[0]) as tif:
        z = _tiff_physical_sizes(tif).get("Z")
    token = (tuple(files), first.token, last.token)
    return _Image(source, "sss", (z, *first.scale), (1, *first.native_chunks), token)


# ---- axis policy


def _to_stack(image: _Image, path: str, channel: int | None, chunks: Any) -> Stack:
    shape, dtype = tuple(image.source.shape), np.dtype(image.source.dtype)
    if 0 in shape:
        raise ShapeError(
            f"{path} has shape {shape}: an axis of length 0 holds no image; its metadata is "
            "damaged or the image is empty: re-export it"
        )
    if not (dtype.kind in "ui" or dtype in (np.float32, np.float64)):
        raise DtypeError(
            f"{path} has dtype {dtype}, which nucflow cannot process; supported: "
            f"{SUPPORTED_DTYPES}; convert the image to one of them"
        )
    roles = _resolve_roles(image.roles, shape, path)
    chan_axes = [i for i, r in enumerate(roles) if r == "c"]
    if len(chan_axes) > 1:
        raise ShapeError(
            f"{path} has shape {shape} with {len(chan_axes)} channel axes; nucflow supports one"
        )
    n_channels = shape[chan_axes[0]] if chan_axes else 1
    chan = _check_channel(channel, n_channels, path)
    index = tuple({"t": 0, "c": chan, "d": 0}.get(r) for r in roles)
    spatial = [i for i, r in enumerate(roles) if r == "s"]
    sel = _Selection(image.source, index, path)
    blocks = _block_shape(chunks, sel.shape, dtype, [image.native_chunks[i] for i in spatial])
    name = "open_stack-" + tokenize(image.token, index, blocks)
    data = da.from_array(
        sel, chunks=blocks, name=name, meta=np.empty((0,) * len(spatial), dtype), asarray=True
    )
    sizes = [image.scale[i] for i in spatial]
    known = all(s is not None and np.isfinite(s) and s > 0 for s in sizes)
    voxel = tuple(float(s) for s in sizes) if known else (1.0,) * len(spatial)
    axes = "zyx"[-len(spatial) :]
    return Stack(data, voxel, axes, known, path, n_channels, sel)


def _resolve_roles(roles: str | None, shape: tuple[int, ...], path: str) -> str:
    """Give each axis a role: t (take 0), c (select), s (spatial) or d (length 1, dropped)."""
    found = list(roles or "?" * len(shape))
    if sum(r in "s?" for r in found) > 3:
        # Unknown axes of length 1 carry no information: drop them before giving up.
        found = ["d" if r == "?" and n == 1 else r for r, n in zip(found, shape, strict=True)]
    n_space = sum(r in "s?" for r in found)
    if not 2 <= n_space <= 3:
        described = f"axes {roles}" if roles else "no axis metadata"
        raise ShapeError(
            f"{path} has shape {shape} ({described}): {n_space} spatial dimension(s) after "
            "removing t and c; nucflow supports 2D (Y, X) or 3D (Z, Y, X) images, plus t and c "
            "axes described by OME-Zarr, OME-TIFF or ImageJ metadata"
        )
    # Unknown axes become spatial (e.g. tifffile's "Q" for a plain page stack).
    return "".join("s" if r == "?" else r for r in found)


def _check_index(name: str, value: Any, *, allow_negative: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ParameterError(f"`{name}` must be an int, got {value!r}")
    if value < 0 and not allow_negative:
        raise ParameterError(f"`{name}` must be >= 0, got {value}")


def _check_channel(channel: int | None, n_channels: int, path: str) -> int:
    if channel is None:
        if n_channels > 1:
            raise ShapeError(
                f"`channel` is required: {path} has {n_channels} channels (c axis); "
                f"pass --channel 0..{n_channels - 1}"
            )
        return 0
    if not 0 <= channel < n_channels:
        raise ParameterError(
            f"`channel` {channel} is out of range: {path} has {n_channels} channel(s); "
            f"valid range 0..{n_channels - 1}"
        )
    return int(channel)


def _block_shape(
    chunks: Any, shape: tuple[int, ...], dtype: np.dtype, native: Sequence[int]
) -> tuple[tuple[int, ...], ...]:
    if chunks is None:
        # Whole multiples of the file's chunks, so no task decodes a chunk another also needs.
        return da.core.normalize_chunks("auto", shape, dtype=dtype, previous_chunks=tuple(native))
    ok = (
        isinstance(chunks, Sequence)
        and not isinstance(chunks, str)
        and len(chunks) == len(shape)
        and all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and c > 0
                for c in chunks)
    )  # fmt: skip
    if not ok:
        raise ParameterError(
            f"`chunks` must be {len(shape)} positive ints (one per spatial axis of shape "
            f"{shape}), got {chunks!r}"
        )
    return da.core.normalize_chunks(tuple(int(c) for c in chunks), shape)


# ----------------------------------------------------------------------------- writers


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
    """Write an image, and optionally label images, as OME-Zarr (NGFF 0.4, zarr format 2).

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
    root = zarr.open_group(path, mode="w", zarr_format=2)
    sources = [image.rechunk(zchunks)]
    targets = [_create_level(root, image.shape, zchunks, image.dtype, axes, scale, unit, name)]
    if label_arrays:
        group = root.create_group("labels")
        group.attrs["labels"] = list(label_arrays)
        for key, arr in label_arrays.items():
            sub = group.create_group(key)
            targets.append(
                _create_level(sub, arr.shape, zchunks, arr.dtype, axes, scale, unit, key)
            )
            sources.append(arr.rechunk(zchunks))
            # "../../" is the image group, relative to labels/<name> (NGFF image-label spec).
            sub.attrs["image-label"] = {"version": "0.4", "source": {"image": "../../"}}
    # Blocks match storage chunks, so each block writes whole chunks: no lock is needed.
    da.store(sources, targets, lock=False, compute=True)


def create_label_zarr(
    path: str | os.PathLike[str],
    shape: Sequence[int],
    chunks: Sequence[int],
    voxel_size: Sequence[float] | None,
    *,
    axes: str | None = None,
    dtype: str | np.dtype = "uint64",
    overwrite: bool = False,
) -> zarr.Array:
    """Create an empty (all 0) OME-Zarr label image for workers to fill in parallel.

    The root group holds ``multiscales`` (one dataset ``"0"``) and ``image-label`` metadata
    (NGFF 0.4, zarr format 2, readable by ome-zarr-py and napari). Chunks that are never
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
    dt = np.dtype(dtype)
    if dt.kind not in "ui":
        raise DtypeError(f"`dtype` {dt} is not an integer type; label images need e.g. uint64")
    _prepare_output(path, overwrite)
    root = zarr.open_group(path, mode="w", zarr_format=2)
    arr = _create_level(root, shape, chunks, dt, axes, scale, unit, "labels")
    root.attrs["image-label"] = {"version": "0.4"}
    return arr


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
    out = list(arr.chunksize)
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
) -> zarr.Array:
    """Create dataset "0" of ``group`` and the group's NGFF 0.4 multiscales metadata."""
    arr = group.create_array(
        "0",
        shape=tuple(shape),
        chunks=tuple(chunks),
        dtype=dtype,
        fill_value=0,
        # NGFF 0.4 requires "/" as the v2 dimension separator.
        chunk_key_encoding={"name": "v2", "separator": "/"},
        config={"write_empty_chunks": False},
    )
    axes_meta = [{"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in axes]
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "name": name,
            "axes": axes_meta,
            "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}
            ],
        }
    ]
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
