"""What every format reader produces: a ``Source`` of pixels and what its file says about them.

A source is a small picklable object with ``shape``, ``dtype`` and ``__getitem__`` that reads a
region on demand; ``da.from_array`` turns it into one task per block, and each task opens the
file by path, so the graph runs on process, LocalCluster and SLURM workers. A source whose
store knows which chunks were ever written also implements ``ChunkListing``: nucflow then
skips the empty space around the data (``Stack.data_region``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import dask.array as da
import numpy as np

from nucflow.errors import CorruptDataError, InputPathError, NucflowError, ParameterError

__all__ = [
    "SUPPORTED_DTYPES",
    "UM_PER_UNIT",
    "ChunkListing",
    "Computing",
    "Cropped",
    "Image",
    "Key",
    "Selection",
    "Source",
    "check_level",
    "file_token",
    "is_url",
    "split_scene",
    "natural_key",
    "one_line",
    "seconds",
]

SUPPORTED_DTYPES = "unsigned/signed integers, float32, float64"

# Micrometres per unit; keys are lower case (OME-Zarr names, OME-TIFF symbols, ImageJ spellings).
UM_PER_UNIT = {
    "angstrom": 1e-4, "å": 1e-4, "picometer": 1e-6, "pm": 1e-6,
    "nanometer": 1e-3, "nm": 1e-3,
    "micrometer": 1.0, "micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "μm": 1.0,
    "\\u00b5m": 1.0,
    "millimeter": 1e3, "mm": 1e3, "centimeter": 1e4, "cm": 1e4, "meter": 1e6, "m": 1e6,
    "inch": 25400.0, "in": 25400.0,
}  # fmt: skip

# Seconds per unit of time; keys are lower case (OME-Zarr names, OME-TIFF symbols, ImageJ units).
SECONDS_PER_UNIT = {
    "second": 1.0, "s": 1.0, "sec": 1.0, "seconds": 1.0,
    "millisecond": 1e-3, "ms": 1e-3, "msec": 1e-3, "microsecond": 1e-6, "µs": 1e-6, "us": 1e-6,
    "nanosecond": 1e-9, "ns": 1e-9,
    "minute": 60.0, "min": 60.0, "minutes": 60.0, "hour": 3600.0, "h": 3600.0, "hr": 3600.0,
    "hours": 3600.0, "day": 86400.0, "d": 86400.0,
}  # fmt: skip

#: A region of a source: one int (axis fixed and dropped) or slice per axis, as numpy indexes.
Key = tuple[int | slice, ...]


class Source(Protocol):
    """Pixels of one image, read region by region; picklable, so tasks carry it to workers."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype[Any]: ...

    def __getitem__(self, key: Key) -> np.ndarray: ...


@runtime_checkable
class ChunkListing(Protocol):
    """A source whose store lists the chunks that were written (others read as fill value)."""

    @property
    def chunk_grid(self) -> tuple[int, ...]:
        """Shape of the storage unit that is present or absent as a whole (chunk or shard)."""
        ...

    def stored_chunks(self) -> np.ndarray:
        """Grid coordinates (K, ndim) of the chunks present in the store; no pixel is read."""
        ...


@dataclass(frozen=True)
class Image:
    """What a format reader found, before the axis policy (``stack.py``) is applied."""

    source: Source
    roles: str | None  # per axis: t, c, s (space) or ? (unknown); None: no axis metadata
    scale: tuple[float | None, ...]  # µm per voxel per axis, None where unknown
    native_chunks: tuple[int, ...]  # the file's own chunking, to align dask blocks with it
    token: tuple[Any, ...]  # identifies the file version, for deterministic dask keys
    time_interval_s: float | None = None  # seconds between time points, when the file says
    scale_key: str = "metadata"  # where ``scale`` came from, for error messages
    format: str = ""  # the registered format that read it (its description), set by read_image


@dataclass(frozen=True)
class Selection:
    """A view of a source with the t/c axes fixed, so the dask graph covers only the view.

    It also turns what a read raises into nucflow's errors: a damaged file is a
    ``CorruptDataError``, a path a worker cannot see an ``InputPathError``.
    """

    source: Source
    index: tuple[int | None, ...]  # int: axis fixed at that index and dropped; None: kept
    path: str
    roles: str = ""  # per axis of the source: t, c, s or d (see stack._resolve_roles)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(n for n, i in zip(self.source.shape, self.index, strict=True) if i is None)

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(self.source.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: Key | int | slice) -> np.ndarray:
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
                    f"cannot read region {_fmt_key(full)} of {self.path} ({one_line(e)}); "
                    "the file is damaged: re-copy or re-export it"
                ) from e
            raise InputPathError(
                f"cannot read {self.path} on this worker ({one_line(e)}); the input must be "
                "readable at the same path on every worker"
            ) from e
        except Exception as e:
            raise CorruptDataError(
                f"cannot decode region {_fmt_key(full)} of {self.path} "
                f"({type(e).__name__}: {one_line(e)}); the file is damaged: re-copy or "
                "re-export it"
            ) from e

    def stored_region(self) -> tuple[slice, ...] | None:
        """The box around the stored chunks of this view, or None if none is stored.

        A source that cannot list its chunks holds data everywhere: the whole view.
        """
        whole = tuple(slice(0, n) for n in self.shape)
        if not isinstance(self.source, ChunkListing):
            return whole
        grid = self.source.chunk_grid
        coords = self.source.stored_chunks()
        keep = np.ones(len(coords), bool)
        for axis, i in enumerate(self.index):
            if i is not None:
                keep &= coords[:, axis] == i // grid[axis]
        spatial = [axis for axis, i in enumerate(self.index) if i is None]
        coords = coords[keep][:, spatial]
        if not len(coords):
            return None
        step = np.array([grid[a] for a in spatial])
        lo, hi = coords.min(axis=0) * step, (coords.max(axis=0) + 1) * step
        return tuple(
            slice(int(a), int(min(b, n))) for a, b, n in zip(lo, hi, self.shape, strict=True)
        )


@dataclass(frozen=True)
class Cropped:
    """``reader`` of a cropped Stack: reads ``box`` of ``source`` in the crop's coordinates."""

    source: Source
    box: tuple[slice, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b.stop - b.start for b in self.box)

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(self.source.dtype)

    def __getitem__(self, key: Key) -> np.ndarray:
        shifted = []
        for k, b, n in zip(key, self.box, self.shape, strict=True):
            if not isinstance(k, slice):
                raise TypeError(f"a cropped stack is read by slices, got {k!r}")
            start, stop, _ = k.indices(n)
            shifted.append(slice(b.start + start, b.start + stop))
        return self.source[tuple(shifted)]


@dataclass(frozen=True)
class Computing:
    """``reader`` of a Stack built around an arbitrary dask array."""

    data: da.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(self.data.dtype)

    def __getitem__(self, key: Key) -> np.ndarray:
        return np.asarray(self.data[key].compute(scheduler="sync"))


def one_line(e: object) -> str:
    """``str(e)`` on one line, for error messages that quote another library's."""
    return " ".join(str(e).split())


def _fmt_key(key: Key) -> str:
    parts = [f"{k.start or 0}:{k.stop}" if isinstance(k, slice) else str(k) for k in key]
    return "[" + ", ".join(parts) + "]"


def natural_key(name: str) -> list[int | str]:
    """Sort key that puts ``z2`` before ``z10``."""
    # re.split with a group alternates text and digits, so items at equal positions compare.
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL for fsspec (``s3://…``, ``https://…``), not a local path.

    ``file://`` URLs count as URLs too: fsspec reads them like any other.
    """
    return bool(_URL.match(path))


#: Files whose scenes ``FILE#S`` selects (``bioio_format``).
SCENE_SUFFIXES = (".czi", ".nd2", ".lif")


def split_scene(path: str) -> tuple[str, str | None]:
    """``FILE.czi#S`` -> (``FILE.czi``, ``S``); any other path (or a file so named) -> (path,
    None)."""
    base, sep, scene = path.rpartition("#")
    if sep and base.lower().endswith(SCENE_SUFFIXES) and not os.path.exists(path):
        return base, scene
    return path, None


def file_token(path: str) -> tuple[str, int, int]:
    """Identity of one file's version: its absolute path, modification time and size."""
    st = os.stat(path)
    return (os.path.abspath(path), st.st_mtime_ns, st.st_size)


def seconds(value: Any, unit: Any) -> float | None:
    """``value`` in ``unit`` as seconds: None unless both are known and the interval positive."""
    factor = SECONDS_PER_UNIT.get(str(unit).lower())
    try:
        interval = float(value) * factor if factor is not None else None
    except (TypeError, ValueError):
        return None
    return interval if interval is not None and np.isfinite(interval) and interval > 0 else None


def check_level(level: int, n_levels: int, path: str) -> None:
    """Refuse a pyramid ``level`` the image does not have."""
    if level >= n_levels:
        raise ParameterError(
            f"`level` {level} is out of range: {path} has {n_levels} level(s); "
            f"valid range 0..{n_levels - 1}"
        )
