"""BigDataViewer datasets: the SpimData XML with its HDF5 file or N5 container (BigStitcher).

The XML says where the pixels are (``ImageLoader`` ``bdv.hdf5`` or ``bdv.n5``, a path relative
to the XML's folder and ``BasePath``), which view setups and time points exist, and each
setup's voxel size and unit. nucflow reads setups as channels (in the order of their ids:
``--channel 1`` is the second setup) and time points as ``t``; ``level`` picks a resolution
of the pyramid (its voxel size is the XML's times the level's downsampling factors).

HDF5 layout (BDV's): ``t{T:05d}/s{S:02d}/{L}/cells`` (z, y, x), ``s{S:02d}/resolutions``
(x, y, z factors per level); unsigned 16-bit data is stored as signed int16 and read back as
uint16, as BigDataViewer does. N5 layout: ``setup{S}/timepoint{T}/s{L}``, the factors in
``setup{S}``'s ``downsamplingFactors``. Every view the XML lists is checked when opening (it
exists, with the setup's size), so a missing setup is one line, not a failed block.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import numpy as np

from nucflow.errors import FormatError, NucflowError
from nucflow.io.containers import container_version, open_hdf5, open_n5
from nucflow.io.source import UM_PER_UNIT, Image, Key, check_level, file_token, one_line

__all__ = ["BdvFormat", "BdvSource", "pixel_files"]

_LOADERS = {"bdv.hdf5": "hdf5", "bdv.n5": "n5"}


class BdvFormat:
    """A BigDataViewer XML whose image loader is bdv.hdf5 or bdv.n5."""

    description = "BigDataViewer XML + HDF5/N5"
    folder_marker = None

    def claims(self, path: str) -> bool:
        if not (os.path.isfile(path) and path.lower().endswith(".xml")):
            return False
        with open(path, "rb") as f:
            return b"<SpimData" in f.read(4096)

    def read(self, path: str, level: int) -> Image:
        views = _parse_xml(path)
        try:
            return _read_bdv(views, path, level)
        except NucflowError:
            raise
        except (KeyError, ValueError, TypeError, IndexError, OSError, RuntimeError) as e:
            # h5py and z5py say a damaged container in many ways
            raise FormatError(
                f"{views.container} (the pixels of {path}) cannot be read ({type(e).__name__}: "
                f"{one_line(e)}); the file is damaged: re-copy or re-export it"
            ) from e


def pixel_files(path: str) -> list[str]:
    """The container holding the pixels of the BigDataViewer XML ``path`` ([] for any other
    path, or an XML that names none): what an output must stay out of, and what ``--resume``
    must see change."""
    if not BdvFormat().claims(path):
        return []
    try:
        return [_parse_xml(path).container]
    except NucflowError:
        return []  # opening the input says what is wrong with it


@dataclass(frozen=True)
class _Views:
    """What the XML says: where the pixels are and which views exist."""

    kind: str  # "hdf5" or "n5"
    container: str
    setups: tuple[int, ...]
    timepoints: tuple[int, ...]
    size_zyx: tuple[int, int, int]
    voxel_zyx: tuple[float, float, float] | None  # µm; None when the unit is unknown


def _read_bdv(views: _Views, path: str, level: int) -> Image:
    if not os.path.exists(views.container):
        raise FormatError(
            f"{path} names its pixels {views.container}, which does not exist; keep the "
            f"{views.kind.upper()} {'file' if views.kind == 'hdf5' else 'folder'} where the XML "
            "says (beside it, as exported) or fix the path in its ImageLoader"
        )
    factors = _level_factors(views, path)
    check_level(level, len(factors), path)
    full = tuple(
        _dataset(views.kind, views.container, views.timepoints[0], views.setups[0], 0).shape
    )
    if full != views.size_zyx:
        raise FormatError(
            f"{path} says its setups are {views.size_zyx} (z, y, x) but {views.container} holds "
            f"{full}; the XML is not this dataset's: re-export it"
        )
    shape_zyx, dtype, chunks = _check_views(views, level, path)
    source = BdvSource(
        views.kind,
        views.container,
        views.setups,
        views.timepoints,
        level,
        (len(views.timepoints), len(views.setups), *shape_zyx),
        dtype,
    )
    scale: tuple[float | None, ...] = (None, None, None, None, None)
    if views.voxel_zyx is not None:
        scale = (None, None, *(v * f for v, f in zip(views.voxel_zyx, factors[level], strict=True)))
    token = (*file_token(path), views.container, container_version(views.container), level)
    return Image(
        source, "tcsss", scale, (1, 1, *chunks), token, None, "BigDataViewer XML voxelSize"
    )


def _parse_xml(path: str) -> _Views:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise FormatError(
            f"{path} is not well-formed XML ({one_line(e)}); re-export the BigDataViewer XML"
        ) from e
    try:
        return _views_of(root, path)
    except NucflowError:
        raise
    except (AttributeError, ValueError, TypeError, IndexError) as e:
        raise FormatError(
            f"{path} is not a valid BigDataViewer XML ({type(e).__name__}: {one_line(e)}); "
            "re-export it from BigDataViewer or BigStitcher"
        ) from e


def _views_of(root: ET.Element, path: str) -> _Views:
    if root.tag != "SpimData":
        raise FormatError(
            f"{path} is XML but not a BigDataViewer SpimData file (root <{root.tag}>); "
            "pass the dataset's .xml"
        )
    loader = root.find("SequenceDescription/ImageLoader")
    fmt = loader.get("format", "") if loader is not None else ""
    if loader is None or fmt not in _LOADERS:
        raise FormatError(
            f"{path}: image loader {fmt or 'missing'!r} is not supported; nucflow reads "
            "bdv.hdf5 and bdv.n5 (resave the dataset as HDF5 or N5 in BigDataViewer)"
        )
    kind = _LOADERS[fmt]
    node = loader.find(kind)
    if node is None or not (node.text or "").strip():
        raise FormatError(f"{path}: the ImageLoader names no <{kind}> file; re-export the XML")
    container = _resolve(node, root, path)
    setups = root.findall("SequenceDescription/ViewSetups/ViewSetup")
    if not setups:
        raise FormatError(f"{path} lists no ViewSetup; re-export the BigDataViewer XML")
    by_id = sorted(setups, key=lambda s: int(_text(s, "id", path)))
    sizes = {tuple(int(v) for v in _text(s, "size", path).split()) for s in by_id}
    if len(sizes) != 1:
        raise FormatError(
            f"{path}: its setups differ in size ({', '.join(map(str, sorted(sizes)))} x y z); "
            "nucflow reads setups as the channels of one stack: export the setups separately"
        )
    x, y, z = next(iter(sizes))
    return _Views(
        kind,
        container,
        tuple(int(_text(s, "id", path)) for s in by_id),
        _timepoints(root.find("SequenceDescription/Timepoints"), path),
        (z, y, x),
        _voxel(by_id[0]),
    )


def _text(node: ET.Element, tag: str, path: str) -> str:
    found = node.find(tag)
    if found is None or not (found.text or "").strip():
        raise FormatError(f"{path}: a <{node.tag}> has no <{tag}>; re-export the XML")
    return (found.text or "").strip()


def _resolve(node: ET.Element, root: ET.Element, path: str) -> str:
    """The container's path: absolute, or relative to the XML's folder and its BasePath."""
    name = (node.text or "").strip()
    if node.get("type", "relative") == "absolute":
        return name
    base = root.find("BasePath")
    base_dir = (base.text or ".").strip() if base is not None else "."
    folder = os.path.dirname(os.path.abspath(path))
    if base is not None and base.get("type", "relative") == "absolute":
        folder = base_dir
    else:
        folder = os.path.join(folder, base_dir)
    return os.path.normpath(os.path.join(folder, name))


def _timepoints(node: ET.Element | None, path: str) -> tuple[int, ...]:
    """The XML's time points: a range, a list, or an integer pattern such as ``0-9,20``."""
    if node is None:
        return (0,)
    kind = node.get("type", "range")
    if kind == "range":
        first, last = int(_text(node, "first", path)), int(_text(node, "last", path))
        return tuple(range(first, last + 1))
    if kind in ("pattern", "list"):
        text = _text(node, "integerpattern" if kind == "pattern" else "list", path)
        found: list[int] = []
        for part in text.replace(" ", ",").split(","):
            if "-" in part.strip("-"):
                a, b = part.split("-", 1)
                found.extend(range(int(a), int(b) + 1))
            elif part:
                found.append(int(part))
        return tuple(found)
    raise FormatError(f"{path}: Timepoints of type {kind!r} are not supported; re-export the XML")


def _voxel(setup: ET.Element) -> tuple[float, float, float] | None:
    node = setup.find("voxelSize")
    if node is None:
        return None
    unit = (node.findtext("unit") or "").strip().lower()
    factor = UM_PER_UNIT.get(unit)
    size = (node.findtext("size") or "").split()
    if factor is None or len(size) != 3:
        return None  # pixels: the XML gives no physical size nucflow understands
    x, y, z = (float(v) * factor for v in size)
    return (z, y, x)


def _level_factors(views: _Views, path: str) -> list[tuple[float, float, float]]:
    """Downsampling factors (z, y, x) of each level of the first setup."""
    setup = views.setups[0]
    if views.kind == "hdf5":
        f = open_hdf5(views.container, what="BigDataViewer HDF5 file")
        name = f"s{setup:02d}/resolutions"
        if name not in f:
            raise FormatError(
                f"{views.container} has no {name} (the XML {path} lists setup {setup}); the "
                "HDF5 file is incomplete or not this XML's: re-export it"
            )
        rows = np.asarray(f[name])
    else:
        attrs = open_n5(views.container)[f"setup{setup}"].attrs
        rows = np.asarray(attrs.get("downsamplingFactors", [[1, 1, 1]]))
    return [tuple(float(v) for v in row[::-1]) for row in rows]  # type: ignore[misc]


def _dataset(views_kind: str, container: str, t: int, s: int, level: int) -> Any:
    if views_kind == "hdf5":
        return open_hdf5(container, what="BigDataViewer HDF5 file")[
            f"t{t:05d}/s{s:02d}/{level}/cells"
        ]
    return open_n5(container)[f"setup{s}/timepoint{t}/s{level}"]


def _check_views(
    views: _Views, level: int, path: str
) -> tuple[tuple[int, ...], np.dtype[Any], tuple[int, ...]]:
    """Every view the XML lists exists with one shape; that shape, the dtype and chunks."""
    found: dict[tuple[int, ...], tuple[int, int]] = {}
    dtype = chunks = None
    for t in views.timepoints:
        for s in views.setups:
            try:
                ds = _dataset(views.kind, views.container, t, s, level)
            except NucflowError:
                raise
            except (KeyError, ValueError, OSError, RuntimeError) as e:
                raise FormatError(
                    f"{views.container} has no view of setup {s} at time point {t} (level "
                    f"{level}) though {path} lists it ({type(e).__name__}: {one_line(e)}); "
                    "re-export the dataset, or remove the setup from the XML"
                ) from e
            found.setdefault(tuple(ds.shape), (t, s))
            dtype, chunks = ds.dtype, tuple(ds.chunks or ds.shape)
    if len(found) != 1:
        shapes = "; ".join(f"{shape} (t {t}, setup {s})" for shape, (t, s) in found.items())
        raise FormatError(
            f"{views.container}: its views differ in shape at level {level} ({shapes}); "
            "nucflow reads setups and time points as axes of one stack"
        )
    assert dtype is not None and chunks is not None
    return next(iter(found)), _stored_dtype(views.kind, np.dtype(dtype)), chunks


def _stored_dtype(kind: str, dtype: np.dtype[Any]) -> np.dtype[Any]:
    # BDV's HDF5 keeps uint16 pixels in int16 datasets (Java has no unsigned types).
    return np.dtype(np.uint16) if kind == "hdf5" and dtype == np.int16 else dtype


@dataclass(frozen=True)
class BdvSource:
    """Pixels of one level of a BDV dataset as a (t, c, z, y, x) array, read view by view."""

    kind: str
    container: str
    setups: tuple[int, ...]
    timepoints: tuple[int, ...]
    level: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    def __getitem__(self, key: Key) -> np.ndarray:
        t_key, c_key, *space = key
        ts = np.arange(len(self.timepoints))[t_key]
        cs = np.arange(len(self.setups))[c_key]
        planes = [
            [self._read(int(t), int(c), tuple(space)) for c in np.atleast_1d(cs)]
            for t in np.atleast_1d(ts)
        ]
        out = np.asarray(planes)
        return out[(0 if np.ndim(ts) == 0 else slice(None), 0 if np.ndim(cs) == 0 else slice(None))]

    def _read(self, t: int, c: int, space: Key) -> np.ndarray:
        ds = _dataset(self.kind, self.container, self.timepoints[t], self.setups[c], self.level)
        region = np.asarray(ds[space])
        return region.view(self.dtype) if region.dtype != self.dtype else region
