"""One time point of a label image with a leading time axis, read and written as a 3D/2D one.

A time-lapse run writes its labels into ``labels.ome.zarr`` of shape ``(T, Z, Y, X)`` (or
``(T, Y, X)``), stored in chunks of one time point. Each time point is segmented as if it were
a stack of its own: its stages see a :class:`TimePoint`, which slices and assigns like the
spatial label array a single-time-point run writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

__all__ = ["TimePoint", "clear_timepoint"]


@dataclass(frozen=True)
class TimePoint:
    """The spatial axes of ``array[t]``: sliced and assigned in spatial coordinates.

    Picklable (a zarr array pickles as its store and metadata), so workers write through it.
    """

    array: zarr.Array
    t: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(self.array.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _key(self, key: Any) -> tuple[Any, ...]:
        return (self.t, *(key if isinstance(key, tuple) else (key,)))

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.array[self._key(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        self.array[self._key(key)] = value


def clear_timepoint(array: zarr.Array, t: int) -> None:
    """Delete every stored chunk of time point ``t`` of ``array`` (it reads as 0 again).

    ``array`` must be chunked by one time point (as ``create_label_zarr(timepoints=...)``
    makes it); only the chunks of ``t`` are touched, never read.
    """
    if array.chunks[0] != 1:
        raise ValueError(f"`array` must be stored in chunks of one time point, got {array.chunks}")
    key = array.metadata.encode_chunk_key((t,) + (0,) * (array.ndim - 1))
    # "3/0/0/0" (v2, "/") or "c/3/0/0/0" (v3): the folder of time point 3 is the key without
    # its spatial part.
    parts = key.split("/")
    if len(parts) < array.ndim:
        raise ValueError(f"`array` must use '/' as its chunk key separator, got {key!r}")
    prefix = "/".join(parts[: len(parts) - (array.ndim - 1)])
    store_path = array.store_path
    sync(store_path.store.delete_dir(f"{store_path.path}/{prefix}".lstrip("/")))
