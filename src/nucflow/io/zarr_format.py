"""zarr v2/v3 arrays and groups, OME-Zarr 0.4/0.5 images (and bioformats2raw exports).

zarr arrays pickle (store and metadata), so a ``ZarrSource`` travels to workers as it is. A
zarr store holds only the chunks that were written: ``ZarrSource`` lists them
(``ChunkListing``), which lets a run skip the empty space of a sparse stack.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from nucflow.errors import FormatError, NucflowError
from nucflow.io.source import UM_PER_UNIT, Image, Key, check_level, is_url, one_line, seconds

__all__ = ["ZARR_MARKERS", "ZarrFormat", "ZarrSource", "read_zarr"]

ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup", ".zattrs")


@dataclass(frozen=True)
class ZarrSource:
    """Pixels of one zarr array."""

    array: zarr.Array  # zarr arrays pickle (store + metadata), so workers reopen nothing

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(self.array.dtype)

    @property
    def chunk_grid(self) -> tuple[int, ...]:
        # Shards are the unit of storage in zarr v3: present or absent as a whole.
        return tuple(self.array.shards or self.array.chunks)

    def __getitem__(self, key: Key) -> np.ndarray:
        return np.asarray(self.array[key])

    def stored_chunks(self) -> np.ndarray:
        """Grid coordinates (K, ndim) of the chunks (or shards) present in the array's store."""
        from zarr.core.sync import collect_aiterator  # zarr 3 lists stores asynchronously

        arr = self.array
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


class ZarrFormat:
    """A folder with zarr metadata: an array, a single-array group or an OME-Zarr image."""

    description = "zarr v2/v3 array or single-array group, OME-Zarr 0.4/0.5"
    folder_marker = "zarr metadata"

    def claims(self, path: str) -> bool:
        return os.path.isdir(path) and _has_zarr_metadata(path)

    def read(self, path: str, level: int) -> Image:
        return read_zarr(path, level)


def _has_zarr_metadata(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, m)) for m in ZARR_MARKERS)


_MALFORMED = (TypeError, ValueError, KeyError, AttributeError, IndexError)


def read_zarr(path: str, level: int) -> Image:
    """Read the zarr array, group or OME-Zarr image at ``path`` (a folder, or an fsspec URL
    whose store the caller has checked: ``remote.UrlFormat``) at pyramid ``level``."""
    try:
        node = zarr.open(path, mode="r")
    except Exception as e:
        raise FormatError(
            f"{path} has zarr metadata but cannot be opened ({one_line(e)}); "
            "check that it is a complete zarr v2/v3 store"
        ) from e
    try:
        return _read_zarr_node(node, path, level)
    except NucflowError:
        raise
    except _MALFORMED as e:  # metadata of an unexpected type or shape: damaged, not a bug
        raise FormatError(
            f"{path} has malformed zarr/OME-Zarr metadata ({type(e).__name__}: {one_line(e)}); "
            "the store is damaged: re-copy or re-export it"
        ) from e


def _read_zarr_node(node: Any, path: str, level: int) -> Image:
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
        return read_zarr(path.rstrip("/") + "/0", level)  # series 0 of a bioformats2raw export
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


def _dataset_of_ome_zarr(arr: zarr.Array, path: str, level: int) -> Image | None:
    """Read ``image.ome.zarr/0`` with the axes and scale of its parent's metadata."""
    parent, name = os.path.split(os.path.normpath(path))
    if level != 0 or not _has_zarr_metadata(parent):
        return None
    try:
        group = zarr.open_group(parent, mode="r")
    except Exception:
        return None  # a parent that is not a zarr group has no metadata to offer
    attrs: dict[str, Any] = group.attrs.asdict()  # untrusted JSON: see _MALFORMED
    ms = (attrs.get("ome", attrs).get("multiscales") or [{}])[0]
    paths = [d.get("path") for d in ms.get("datasets", [])]
    if name not in paths:
        return None
    return _ome_zarr(group, ms, path, paths.index(name))


def _zarr_token(path: str, arr: zarr.Array) -> tuple[Any, ...]:
    # the metadata is only a cache key: zarr's warnings about unstable dtypes are not the user's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = json.dumps(arr.metadata.to_dict(), sort_keys=True, default=str)
    if is_url(path):  # no mtime to ask for: remote.UrlFormat adds the metadata's ETag
        return (path, arr.path, meta)
    return (os.path.abspath(path), arr.path, meta, os.stat(path).st_mtime_ns)


def _plain_zarr(arr: zarr.Array, path: str, level: int) -> Image:
    check_level(level, 1, path)
    names: Any = getattr(arr.metadata, "dimension_names", None) or arr.attrs.get(
        "_ARRAY_DIMENSIONS"
    )
    roles = None
    if names and len(names) == arr.ndim and all(str(n).lower() in "tczyx" for n in names if n):
        roles = "".join(_role_from_name(str(n)) for n in names)
    source = ZarrSource(arr)
    return Image(source, roles, (None,) * arr.ndim, source.chunk_grid, _zarr_token(path, arr))


def _role_from_name(name: str) -> str:
    name = name.lower()
    if name in ("t", "time"):
        return "t"
    if name in ("c", "ch", "channel"):
        return "c"
    return "s" if name in ("z", "y", "x") else "?"


def _ome_zarr(group: zarr.Group, ms: Mapping[str, Any], path: str, level: int) -> Image:
    datasets = ms.get("datasets") or []
    check_level(level, len(datasets), path)
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
            f"{one_line(e)}); the OME-Zarr is damaged: re-copy or re-export it"
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
            factor = UM_PER_UNIT.get((units[i] or "micrometer").lower())
            um[i] = None if factor is None else scale[i] * factor
    # A time axis' scale is the interval between time points, if it has a unit of time.
    times = [i for i, r in enumerate(roles or "") if r == "t"]
    interval = seconds(scale[times[0]], units[times[0]]) if times else None
    source = ZarrSource(arr)
    key = "OME-Zarr multiscales coordinateTransformations scale"
    return Image(source, roles, tuple(um), source.chunk_grid, _zarr_token(path, arr), interval, key)


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
