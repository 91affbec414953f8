"""Vendor files through bioio and its plugins: Zeiss CZI (``bioio-czi``), Nikon ND2
(``bioio-nd2``), Leica LIF (``bioio-lif``); each an optional extra (``nucflow[czi]``, ...).

bioio's readers give each file as a lazy dask array (T, C, Z, Y, X) whose chunks are the
file's planes; a task opens the file by path (once per thread) and computes only the planes its
block touches, so no block reads the whole file. A CZI is read with pylibCZIrw (Zeiss's
library, which bioio-czi installs) region by region: only the subblocks a block's y/x box
meets, so blocks narrower than the plane do not read it whole. A file with several scenes or
positions opens scene 0; ``FILE.czi#2`` (an index) or ``FILE.czi#Name`` (a scene id) picks another.
Voxel sizes are bioio's ``physical_pixel_sizes`` (µm).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from nucflow.errors import FormatError, NucflowError, ParameterError
from nucflow.io.source import SCENE_SUFFIXES, Image, Key, file_token, one_line, split_scene

__all__ = ["VENDOR_SUFFIXES", "VendorFormat", "VendorSource"]

#: File suffix -> (bioio plugin module, nucflow extra that installs it).
VENDOR_SUFFIXES: dict[str, tuple[str, str]] = {
    ".czi": ("bioio_czi", "nucflow[czi]"),
    ".nd2": ("bioio_nd2", "nucflow[nd2]"),
    ".lif": ("bioio_lif", "nucflow[lif]"),
}
assert tuple(VENDOR_SUFFIXES) == SCENE_SUFFIXES  # split_scene knows the same files
# One dask chunk per plane: bioio-czi's default is a whole z stack per chunk, which every
# block of that channel would read in full. (nd2's chunks are its frames already.)
_OPTIONS: dict[str, dict[str, Any]] = {"bioio_czi": {"chunk_dims": ["Y", "X"]}}
_LOCAL = threading.local()
_KEEP = 4


class VendorFormat:
    """A CZI, ND2 or LIF file, read through bioio and the plugin made for it."""

    description = "CZI/ND2/LIF through bioio (extras)"
    folder_marker = None

    def claims(self, path: str) -> bool:
        file, _ = split_scene(path)
        return os.path.isfile(file) and file.lower().endswith(tuple(VENDOR_SUFFIXES))

    def read(self, path: str, level: int) -> Image:
        file, scene = split_scene(path)
        if level != 0:
            raise ParameterError(
                f"`level` {level} is out of range: {file} is read at full resolution only "
                "(valid range 0..0)"
            )
        image = _open(file)
        index = _scene_index(image, scene, file)
        try:
            image.set_scene(index)
            data = image.get_image_dask_data("TCZYX")
            sizes = image.physical_pixel_sizes
            origin = _czi_origin(file, index)
        except NucflowError:
            raise
        except Exception as e:
            raise FormatError(
                f"{file} cannot be read by bioio ({type(e).__name__}: {one_line(e)}); the file is "
                "damaged or of a variant its plugin does not read: re-export it"
            ) from e
        source = VendorSource(
            file,
            index,
            tuple(int(n) for n in data.shape),
            np.dtype(data.dtype),
            origin,
        )
        z_role = "s" if data.shape[2] > 1 else "d"  # a single plane is a 2D image
        scale = (None, None, *(_um(s) for s in (sizes.Z, sizes.Y, sizes.X)))
        chunks = tuple(int(c[0]) for c in data.chunks)
        return Image(
            source,
            "tc" + z_role + "ss",
            scale,
            chunks,
            (*file_token(file), index),
            None,
            "bioio physical_pixel_sizes",
        )


def _um(value: Any) -> float | None:
    return None if value is None else float(value)


def _open(file: str) -> Any:
    """The file's BioImage with the plugin its suffix calls for, cached per thread."""
    plugin, extra = VENDOR_SUFFIXES[os.path.splitext(file)[1].lower()]
    try:
        import importlib

        from bioio import BioImage

        reader = importlib.import_module(plugin).Reader
    except ImportError as e:
        raise FormatError(
            f"reading {file} needs bioio and {plugin.replace('_', '-')}; pip install '{extra}'"
        ) from e
    key = file_token(file)
    cache: OrderedDict[Any, Any] | None = getattr(_LOCAL, "open", None)
    if cache is None:
        cache = _LOCAL.open = OrderedDict()
    image = cache.pop(key, None)
    if image is None:
        while len(cache) >= _KEEP:
            cache.popitem(last=False)
        try:
            image = BioImage(file, reader=reader, **_OPTIONS.get(plugin, {}))
        except Exception as e:
            raise FormatError(
                f"{file} cannot be opened by {plugin.replace('_', '-')} ({type(e).__name__}: "
                f"{one_line(e)}); the file is damaged or not a {os.path.splitext(file)[1]} file: "
                "re-copy or re-export it"
            ) from e
    cache[key] = image
    return image


def _scene_index(image: Any, scene: str | None, file: str) -> int:
    scenes = list(image.scenes)
    if scene is None:
        return 0
    if scene.isdigit() and int(scene) < len(scenes):
        return int(scene)
    if scene in scenes:
        return scenes.index(scene)
    raise ParameterError(
        f"scene {scene!r} of {file} does not exist; it has {len(scenes)} scene(s): "
        f"{', '.join(scenes)} (pass {file}#0..{len(scenes) - 1} or #<scene id>)"
    )


def _czi_origin(file: str, scene: int) -> tuple[int, ...] | None:
    """Where scene ``scene`` of a CZI starts: (t, c, z, y, x) of its first voxel in the file's
    coordinates, for pylibCZIrw's region reads; None when pylibCZIrw is missing (bioio reads)."""
    if not file.lower().endswith(".czi"):
        return None
    try:
        from pylibCZIrw import czi as pyczi
    except ImportError:
        return None
    with pyczi.open_czi(file) as doc:
        box = doc.scenes_bounding_rectangle.get(scene, doc.total_bounding_rectangle)
        starts = {axis: doc.total_bounding_box.get(axis, (0, 1))[0] for axis in "TCZ"}
    return (starts["T"], starts["C"], starts["Z"], box.y, box.x)


class _CziReaders(OrderedDict[tuple[str, int, int], Any]):
    """Open pylibCZIrw readers of one thread; closed when the thread goes away."""

    def __del__(self) -> None:
        for reader in self.values():
            reader.close()


_CZI = threading.local()


def _czi_reader(path: str) -> Any:
    from pylibCZIrw import czi as pyczi

    key = file_token(path)
    cache = getattr(_CZI, "open", None)
    if cache is None:
        cache = _CZI.open = _CziReaders()
    reader = cache.pop(key, None)
    if reader is None:
        while len(cache) >= _KEEP:
            cache.popitem(last=False)[1].close()
        reader = pyczi.CziReader(path)
    cache[key] = reader
    return reader


@dataclass(frozen=True)
class VendorSource:
    """One scene of a vendor file as (t, c, z, y, x).

    A CZI read with pylibCZIrw at hand reads the region's subblocks only (Zeiss's own region
    read, plane by plane); otherwise bioio computes the planes the region touches, whole.
    """

    path: str
    scene: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    czi_origin: tuple[int, ...] | None = None  # (t, c, z, y, x) of the scene's first voxel

    def __getitem__(self, key: Key) -> np.ndarray:
        if self.czi_origin is not None:
            return self._czi_region(key)
        image = _open(self.path)
        image.set_scene(self.scene)
        region = image.get_image_dask_data("TCZYX")[key]
        return np.asarray(region.compute(scheduler="sync"))

    def _czi_region(self, key: Key) -> np.ndarray:
        assert self.czi_origin is not None
        ranges = [
            range(*k.indices(n)) if isinstance(k, slice) else range(k, k + 1)
            for k, n in zip(key, self.shape, strict=True)
        ]
        t0, c0, z0, y0, x0 = self.czi_origin
        ys, xs = ranges[3], ranges[4]
        if ys.step != 1 or xs.step != 1:
            raise ValueError(f"a CZI region is read with unit steps, got {key!r}")
        roi = (x0 + xs.start, y0 + ys.start, len(xs), len(ys))
        reader = _czi_reader(self.path)
        out = np.empty([len(r) for r in ranges], self.dtype)
        for i, t in enumerate(ranges[0]):
            for j, c in enumerate(ranges[1]):
                for k, z in enumerate(ranges[2]):
                    plane = {"T": t0 + t, "C": c0 + c, "Z": z0 + z}
                    out[i, j, k] = reader.read(roi=roi, plane=plane, scene=self.scene)[..., 0]
        # an int index drops its axis, as numpy would
        return out[tuple(0 if not isinstance(k, slice) else slice(None) for k in key)]
