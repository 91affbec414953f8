"""Imaris ``.ims`` files (HDF5): channels, time points and resolution levels.

Layout (Imaris 5.5 file format): pixels in ``DataSet/ResolutionLevel L/TimePoint T/Channel
C/Data`` (z, y, x); the image's extent in µm in ``DataSetInfo/Image`` (``ExtMin0..2``,
``ExtMax0..2`` for x, y, z, with the sizes ``X``, ``Y``, ``Z`` and ``Unit``), so the voxel
size of level L is the extent over that level's size. Imaris pads each ``Data`` dataset to
whole chunks; the true size of each level is the channel group's ``ImageSizeX/Y/Z``, and
nucflow reads only that part. Attributes are stored as arrays of one-byte strings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from nucflow.errors import FormatError, NucflowError
from nucflow.io.containers import open_hdf5
from nucflow.io.source import UM_PER_UNIT, Image, Key, check_level, file_token, one_line

__all__ = ["ImarisFormat", "ImarisSource"]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


class ImarisFormat:
    """An Imaris .ims file (HDF5 inside)."""

    description = "Imaris .ims"
    folder_marker = None

    def claims(self, path: str) -> bool:
        return os.path.isfile(path) and path.lower().endswith(".ims")

    def read(self, path: str, level: int) -> Image:
        with open(path, "rb") as f:
            if f.read(8) != _HDF5_MAGIC:
                raise FormatError(
                    f"{path} is not an HDF5 file (an Imaris .ims is one); the file is damaged "
                    "or not an Imaris file: re-copy or re-export it"
                )
        f = open_hdf5(path, what="Imaris file")
        try:
            return _read_ims(f, path, level)
        except NucflowError:
            raise
        except (KeyError, ValueError, TypeError, IndexError, OSError) as e:
            raise FormatError(
                f"{path} is not a complete Imaris file ({type(e).__name__}: {one_line(e)}); "
                "re-export it from Imaris"
            ) from e


def attr_text(node: Any, name: str) -> str:
    """An Imaris attribute (an array of one-byte strings, or a plain string) as text."""
    value = node.attrs[name]
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("latin-1")
    if isinstance(value, str):
        return value
    return b"".join(bytes(v) for v in np.asarray(value).ravel()).decode("latin-1")


def _read_ims(f: Any, path: str, level: int) -> Image:
    if "DataSet" not in f:
        raise FormatError(f"{path} has no DataSet group: it is HDF5 but not an Imaris file")
    levels = sorted(
        (k for k in f["DataSet"] if k.startswith("ResolutionLevel ")),
        key=lambda k: int(k.split()[-1]),
    )
    check_level(level, len(levels), path)
    group = f["DataSet"][f"ResolutionLevel {level}"]
    times = sorted(
        (k for k in group if k.startswith("TimePoint ")), key=lambda k: int(k.split()[-1])
    )
    if not times:
        raise FormatError(f"{path} has no time point at resolution level {level}; re-export it")
    channels = sorted(
        (k for k in group[times[0]] if k.startswith("Channel ")), key=lambda k: int(k.split()[-1])
    )
    if not channels:
        raise FormatError(f"{path} has no channel at resolution level {level}; re-export it")
    for t in times:
        for c in channels:
            if c not in group[t] or "Data" not in group[t][c]:
                raise FormatError(
                    f"{path} has no {t}/{c} at resolution level {level}; the file is incomplete: "
                    "re-export it"
                )
    first = group[times[0]][channels[0]]
    size = tuple(int(attr_text(first, f"ImageSize{a}")) for a in "ZYX")
    data = first["Data"]
    if any(s > n for s, n in zip(size, data.shape, strict=True)):
        raise FormatError(
            f"{path}: ImageSizeZ/Y/X {size} exceed its Data {tuple(data.shape)}; the file is "
            "damaged: re-export it"
        )
    source = ImarisSource(
        path,
        level,
        tuple(int(t.split()[-1]) for t in times),
        tuple(int(c.split()[-1]) for c in channels),
        (len(times), len(channels), *size),
        np.dtype(data.dtype),
    )
    chunks = tuple(data.chunks or data.shape)
    scale = (None, None, *_voxel_size(f, size, path))
    token = (*file_token(path), level)
    return Image(
        source,
        "tcsss",
        scale,
        (1, 1, *chunks),
        token,
        None,
        "Imaris DataSetInfo/Image ExtMin/ExtMax",
    )


def _voxel_size(f: Any, size: tuple[int, ...], path: str) -> tuple[float | None, ...]:
    """µm per voxel (z, y, x) of a level of ``size``: the extent over the voxel count."""
    if "DataSetInfo/Image" not in f:
        return (None, None, None)
    info = f["DataSetInfo/Image"]
    try:
        lo = [float(attr_text(info, f"ExtMin{i}")) for i in (2, 1, 0)]
        hi = [float(attr_text(info, f"ExtMax{i}")) for i in (2, 1, 0)]
    except (KeyError, ValueError):
        return (None, None, None)
    unit = attr_text(info, "Unit").strip().lower() if "Unit" in info.attrs else "um"
    factor = UM_PER_UNIT.get(unit or "um")
    if factor is None:
        return (None, None, None)
    return tuple((b - a) / n * factor for a, b, n in zip(lo, hi, size, strict=True))


@dataclass(frozen=True)
class ImarisSource:
    """One resolution level of an .ims file as a (t, c, z, y, x) array, padding cropped."""

    path: str
    level: int
    timepoints: tuple[int, ...]
    channels: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    def __getitem__(self, key: Key) -> np.ndarray:
        t_key, c_key, *space = key
        ts = np.arange(len(self.timepoints))[t_key]
        cs = np.arange(len(self.channels))[c_key]
        # Slices are resolved against the cropped size, so the padding is never read.
        box = tuple(
            k if isinstance(k, int) else slice(*k.indices(n)[:2])
            for k, n in zip(space, self.shape[2:], strict=True)
        )
        f = open_hdf5(self.path, what="Imaris file")
        group = f["DataSet"][f"ResolutionLevel {self.level}"]
        planes = [
            [
                np.asarray(
                    group[f"TimePoint {self.timepoints[int(t)]}"][
                        f"Channel {self.channels[int(c)]}"
                    ]["Data"][box]
                )
                for c in np.atleast_1d(cs)
            ]
            for t in np.atleast_1d(ts)
        ]
        out = np.asarray(planes)
        return out[(0 if np.ndim(ts) == 0 else slice(None), 0 if np.ndim(cs) == 0 else slice(None))]
