"""The TIFF family: TIFF/BigTIFF/OME-TIFF/ImageJ TIFF files, and stacks of 2D TIFF slices.

Tasks read pages or tiles through tifffile's zarr view of one series level, so a block
decodes only the pages/tiles it touches; open files are cached per worker thread.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import threading
import warnings
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tifffile
import zarr

from nucflow.errors import FormatError, NucflowError, NucflowWarning, ShapeError
from nucflow.io.source import (
    UM_PER_UNIT,
    Image,
    Key,
    check_level,
    file_token,
    is_url,
    natural_key,
    one_line,
    seconds,
)

__all__ = ["SliceSource", "TiffFormat", "TiffSlicesFormat", "TiffSource", "read_tiff_file"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_TIFF_SUFFIXES = (".tif", ".tiff")


class TiffFormat:
    """One TIFF file (any TIFF flavour tifffile reads): series 0, pages or tiles."""

    description = "TIFF/BigTIFF/OME-TIFF/ImageJ TIFF"
    folder_marker = None

    def claims(self, path: str) -> bool:
        return os.path.isfile(path) and _is_tiff(path)

    def read(self, path: str, level: int) -> Image:
        return read_tiff_file(path, level)


class TiffSlicesFormat:
    """A folder, or a glob pattern, of 2D TIFF slices: one per z, in natural order."""

    description = "a folder or glob pattern of 2D TIFF slices"
    folder_marker = ".tif/.tiff files"

    def claims(self, path: str) -> bool:
        if os.path.isdir(path):
            return bool(_tiffs_in(path))
        return not os.path.exists(path) and glob.has_magic(path) and not is_url(path)

    def read(self, path: str, level: int) -> Image:
        if os.path.isdir(path):
            files = _tiffs_in(path)
            if len(files) == 1:
                return read_tiff_file(files[0], level)
            return _read_slices(files, path, level)
        matches = sorted(glob.glob(path), key=natural_key)
        bad = [m for m in matches if not (os.path.isfile(m) and _is_tiff(m))]
        if bad:
            raise FormatError(
                f"pattern {path} matches {bad[0]}, which is not a TIFF file; a pattern must "
                "match only 2D TIFF slices"
            )
        return _read_slices(matches, path, level)


def _tiffs_in(folder: str) -> list[str]:
    files = sorted(
        (os.path.join(folder, f) for f in os.listdir(folder)
         if f.lower().endswith(_TIFF_SUFFIXES) and not f.startswith(".")),
        key=natural_key,
    )  # fmt: skip
    return [f for f in files if os.path.isfile(f)]


def _is_tiff(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in _TIFF_MAGIC


class _OpenTiffs(OrderedDict[tuple[str, int, int], tifffile.TiffFile]):
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
    if is_url(path):  # a remote file has no stat: its version is checked when it is opened
        key = (path, 0, 0)
    else:
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
    cache = getattr(_TIFF_CACHE, "files", None)
    if cache is None:
        cache = _TIFF_CACHE.files = _OpenTiffs()
    tif = cache.pop(key, None)
    if tif is None:
        while len(cache) >= 4:
            cache.popitem(last=False)[1].close()
        tif = _open_tiff(path)
    cache[key] = tif
    return tif


def _open_tiff(path: str) -> tifffile.TiffFile:
    """A TiffFile of a local path, or of a URL through fsspec (range requests, read-ahead
    blocks of fsspec's default size)."""
    if not is_url(path):
        return tifffile.TiffFile(path)
    import fsspec

    return tifffile.TiffFile(fsspec.open(path, "rb").open(), name=path.rsplit("/", 1)[-1])


def _read_tiff(path: str, series: int, level: int, key: Key, shape: tuple[int, ...]) -> np.ndarray:
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
class TiffSource:
    """Pixels of one level of one series of a TIFF file."""

    path: str
    series: int
    level: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    def __getitem__(self, key: Key) -> np.ndarray:
        return _read_tiff(self.path, self.series, self.level, key, self.shape)


@dataclass(frozen=True)
class SliceSource:
    """A stack of 2D TIFF files, one per z."""

    files: tuple[str, ...]
    shape: tuple[int, int, int]
    dtype: np.dtype[Any]

    def __getitem__(self, key: Key) -> np.ndarray:
        zkey, yx = key[0], tuple(key[1:])
        if not isinstance(zkey, slice):
            return _read_tiff(self.files[int(zkey)], 0, 0, yx, self.shape[1:])
        planes = [_read_tiff(self.files[i], 0, 0, yx, self.shape[1:]) for i in
                  range(len(self.files))[zkey]]  # fmt: skip
        if not planes:
            return np.empty((0, *np.empty(self.shape[1:])[yx].shape), self.dtype)
        return np.stack(planes)


def read_tiff_file(path: str, level: int) -> Image:
    """Read the metadata of series 0 of the TIFF at ``path`` (a file, or a URL whose object
    the caller has checked: ``remote.UrlFormat``) at pyramid ``level``."""
    try:
        with _tiff_log(path), _open_tiff(path) as tif:
            series = tif.series[0]
            check_level(level, len(series.levels), path)
            s = series.levels[level]
            page = s.keyframe
            native = (page.tilelength, page.tilewidth) if page.is_tiled else page.shape[:2]
            roles = "".join(_TIFF_ROLES.get(a, "?") for a in s.axes)
            sizes = _tiff_physical_sizes(tif)
            _is_ome = bool(tif.is_ome and tif.ome_metadata)
            interval = _tiff_interval(tif) if "T" in s.axes else None
            scale = _tiff_scale(s.axes, sizes, series.shape, s.shape)
            native_full = tuple(
                native[0] if a == "Y" else native[1] if a == "X" else 1 for a in s.axes
            )
            source = TiffSource(path, 0, level, tuple(s.shape), np.dtype(s.dtype))
    except NucflowError:
        raise
    except Exception as e:
        raise FormatError(
            f"{path} cannot be read as TIFF ({one_line(e)}); check that the file is complete"
        ) from e
    key = "OME-TIFF PhysicalSizeX/Y/Z" if _is_ome else "ImageJ resolution and spacing"
    token = (path,) if is_url(path) else file_token(path)
    return Image(source, roles, scale, native_full, (*token, level), interval, key)


def _tiff_interval(tif: tifffile.TiffFile) -> float | None:
    """Seconds between time points: OME ``TimeIncrement`` or ImageJ ``finterval``."""
    if tif.is_ome and tif.ome_metadata:
        try:
            pixels = ET.fromstring(tif.ome_metadata).find(".//{*}Image/{*}Pixels")
        except ET.ParseError:
            return None
        if pixels is None:
            return None
        # "s" is the OME schema's default unit of TimeIncrement.
        return seconds(pixels.get("TimeIncrement"), pixels.get("TimeIncrementUnit", "s"))
    meta = tif.imagej_metadata if tif.is_imagej else None
    if meta and "finterval" in meta:
        return seconds(meta["finterval"], meta.get("tunit", "sec"))  # ImageJ's default: sec
    return None


_TIFF_ROLES = {"T": "t", "C": "c", "S": "c", "Z": "s", "Y": "s", "X": "s"}
# tifffile logs these and goes on with the pages it could read: the stack would come out
# silently shorter (a truncated 3D file opens as one 2D page).
_TIFF_DAMAGE = ("invalid page offset", "failed to reshape", "invalid tag", "invalid value offset")


class _TiffLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(one_line(record.getMessage()))


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
        warnings.warn(f"{path}: tifffile: {message}", stacklevel=3, category=NucflowWarning)


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
        factor = UM_PER_UNIT.get(str(meta.get("unit", "")).lower())
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
        factor = UM_PER_UNIT.get(unit.lower())
        if value is not None and factor is not None:
            sizes[axis] = float(value) * factor
    return sizes


def _read_slices(files: Sequence[str], path: str, level: int) -> Image:
    check_level(level, 1, path)
    first = read_tiff_file(files[0], 0)
    shape = first.source.shape
    if len(shape) != 2 or first.roles != "ss":
        raise ShapeError(
            f"{files[0]} in {path} has shape {shape}; a folder or pattern must hold 2D "
            "single-channel TIFF slices, one per z"
        )
    last = read_tiff_file(files[-1], 0)
    if last.source.shape != shape or last.source.dtype != first.source.dtype:
        raise ShapeError(
            f"{files[-1]} has shape {last.source.shape} and dtype {last.source.dtype} but "
            f"{files[0]} has {shape} and {first.source.dtype}; all slices must match"
        )
    source = SliceSource(tuple(files), (len(files), *shape), first.source.dtype)
    # z spacing of a slice folder is known only if the first slice carries ImageJ spacing.
    with tifffile.TiffFile(files[0]) as tif:
        z = _tiff_physical_sizes(tif).get("Z")
    token = (tuple(files), first.token, last.token)
    return Image(
        source, "sss", (z, *first.scale), (1, *first.native_chunks), token, None, first.scale_key
    )
