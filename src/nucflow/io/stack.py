"""``Stack``, the opened image, and ``open_stack``, which makes one from any registered format.

The axis policy lives here: whatever the format, a Stack holds the spatial axes of one time
point (0 unless asked) of one channel, in µm when the file says so; ``Stack.at(t)`` is the same
stack at another time point.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from nucflow.errors import DtypeError, FormatError, ParameterError, ShapeError
from nucflow.io.formats import read_image
from nucflow.io.source import SUPPORTED_DTYPES, Computing, Cropped, Image, Selection, Source

__all__ = ["Stack", "open_stack"]


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
    n_timepoints : int
        Number of time points in the file (1 if it has no time axis).
    timepoint : int
        The time point ``data`` holds (0-based index along the file's time axis).
    time_interval_s : float or None
        Seconds between time points, when the metadata says (OME-Zarr time scale with a unit,
        OME-TIFF ``TimeIncrement``, ImageJ ``finterval``).
    """

    data: da.Array
    voxel_size: tuple[float, ...]
    axes: str
    voxel_size_known: bool
    path: str
    n_channels: int
    n_timepoints: int = 1
    timepoint: int = 0
    time_interval_s: float | None = None
    # Reads ``data``'s voxels from the file: a Selection of the file's source, or a Cropped one.
    _selection: Selection | Cropped | None = field(default=None, repr=False, compare=False)
    #: The file's own chunk shape over all its axes (a read decompresses whole chunks).
    native_chunks: tuple[int, ...] = ()
    #: The reader that opened it (a registered format's description; "" for a computed stack).
    format: str = ""

    @property
    def reader(self) -> Source:
        """A small picklable object: ``reader[region]`` reads those voxels of ``data`` from the
        file directly (as each task of ``data`` does), as a numpy array, without a dask graph."""
        return self._selection if self._selection is not None else Computing(self.data)

    @property
    def origin(self) -> tuple[int, ...]:
        """Where ``data[0, ...]`` lies in the file's spatial axes (not 0 for a crop)."""
        origin = [0] * self.data.ndim
        selection: object = self._selection
        while isinstance(selection, Cropped):
            origin = [o + b.start for o, b in zip(origin, selection.box, strict=True)]
            selection = selection.source
        return tuple(origin)

    @property
    def uncropped_shape(self) -> tuple[int, ...]:
        """The spatial shape of the file's stack that ``data`` was cropped from (if it was)."""
        selection: object = self._selection
        while isinstance(selection, Cropped):
            if not isinstance(selection.source, Cropped):
                return tuple(selection.source.shape)
            selection = selection.source
        return tuple(self.data.shape)

    def at(self, timepoint: int) -> Stack:
        """This stack at another time point: same channel, blocks, crop and voxel size.

        Parameters
        ----------
        timepoint : int
            0-based index along the file's time axis.

        Returns
        -------
        Stack
            Lazy and picklable as this one.

        Raises
        ------
        ParameterError
            ``timepoint`` is not in ``0..n_timepoints - 1``.
        """
        _check_timepoint(timepoint, self.n_timepoints, self.path)
        if timepoint == self.timepoint:
            return self
        reader = _reader_at(self.reader, int(timepoint))
        name = "open_stack-" + tokenize(self.data.name, timepoint)
        data = da.from_array(
            reader, chunks=self.data.chunks, name=name, meta=self.data._meta, asarray=True
        )
        return dataclasses.replace(self, data=data, timepoint=int(timepoint), _selection=reader)

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
        return dataclasses.replace(self, data=self.data[box], _selection=Cropped(self.reader, box))

    def data_region(self) -> tuple[slice, ...] | None:
        """The bounding box of the stored chunks, in voxels of ``data``.

        A zarr store holds only the chunks that were written; the others read as the fill
        value without touching the disk. This lists the store (no pixel is read) and returns
        the box around the written chunks of this channel and time point, or None if there
        are none. Sources that cannot list their chunks (``ChunkListing``), such as TIFF,
        hold data everywhere: the whole stack.

        Returns
        -------
        tuple of slice or None
        """
        if isinstance(self._selection, Selection):
            return self._selection.stored_region()
        return tuple(slice(0, n) for n in self.data.shape)  # a crop, or a computed array


def open_stack(
    path: str | os.PathLike[str],
    *,
    channel: int | None = None,
    level: int = 0,
    chunks: Sequence[int] | None = None,
    timepoint: int = 0,
    voxel_size: Sequence[float] | None = None,
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
        pattern holding a single file opens that file. Also a BigDataViewer XML (+ HDF5 or
        N5: setups are channels), an Imaris ``.ims``, a CZI/ND2/LIF file (``FILE.czi#S``
        for scene ``S``; extras), or an fsspec URL (``s3://``, ``gs://``, ``https://``) of a
        zarr/OME-Zarr store or a TIFF file.
    channel : int, optional
        Index along the channel axis (OME ``c``, ImageJ ``C``, TIFF samples). Required when
        the image has more than one channel.
    level : int, optional
        Pyramid level of an OME-Zarr, pyramidal TIFF, BigDataViewer dataset or Imaris file
        (0 = full resolution).
    chunks : sequence of int, optional
        Block shape of ``data``, one positive int per spatial axis. Default: multiples of
        the file's own chunks (pages, tiles) of about dask's ``array.chunk-size``.
    timepoint : int, optional
        Index along the time axis (OME ``t``, ImageJ/OME-TIFF ``T``); ``n_timepoints`` says
        how many there are. Default 0 (also the only valid value without a time axis).
    voxel_size : sequence of float, optional
        µm per voxel, one per spatial axis: replaces the metadata's (``--voxel-size``), which
        is then not checked.

    Returns
    -------
    Stack
        ``data`` is a (Z, Y, X) or (Y, X) dask array holding ``timepoint`` of ``channel``;
        ``voxel_size`` is in µm, from OME-Zarr scale, OME-TIFF PhysicalSize or ImageJ
        resolution/spacing. If any spatial axis lacks a physical size, all are 1.0 and
        ``voxel_size_known`` is False (units are then pixels).

    Raises
    ------
    InputPathError
        ``path`` does not exist (or a pattern matches nothing).
    FormatError
        ``path`` is not a supported image, a group holds several arrays, or the metadata's
        voxel size is not finite and positive (and ``voxel_size`` is not given).
    ShapeError
        The image is 1D or has more than 3 spatial axes, or ``channel`` is missing.
    DtypeError
        The pixel type is not an integer or float32/float64.
    ParameterError
        ``channel``, ``level``, ``chunks`` or ``timepoint`` is invalid.
    """
    _check_index("level", level)
    _check_index("timepoint", timepoint)
    if channel is not None:
        _check_index("channel", channel, allow_negative=True)
    name = os.fspath(path)
    if not isinstance(name, str):
        raise ParameterError(f"`path` must be a str path, got {name!r}")
    image = read_image(name, level)
    return _to_stack(image, name, channel, chunks, timepoint, voxel_size)


def _to_stack(
    image: Image,
    path: str,
    channel: int | None,
    chunks: Any,
    timepoint: int = 0,
    voxel_size: Sequence[float] | None = None,
) -> Stack:
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
    time_axes = [i for i, r in enumerate(roles) if r == "t"]
    n_timepoints = math.prod(shape[i] for i in time_axes)
    if len(time_axes) > 1:
        raise ShapeError(
            f"{path} has shape {shape} with {len(time_axes)} time axes; nucflow supports one"
        )
    _check_timepoint(timepoint, n_timepoints, path)
    index = tuple({"t": int(timepoint), "c": chan, "d": 0}.get(r) for r in roles)
    spatial = [i for i, r in enumerate(roles) if r == "s"]
    sel = Selection(image.source, index, path, roles)
    blocks = _block_shape(chunks, sel.shape, dtype, [image.native_chunks[i] for i in spatial])
    name = "open_stack-" + tokenize(image.token, index, blocks)
    data = da.from_array(
        sel, chunks=blocks, name=name, meta=np.empty((0,) * len(spatial), dtype), asarray=True
    )
    voxel, known = _voxel_size([image.scale[i] for i in spatial], voxel_size, image, path)
    axes = "zyx"[-len(spatial) :]
    interval = image.time_interval_s if n_timepoints > 1 else None
    return Stack(
        data,
        voxel,
        axes,
        known,
        path,
        n_channels,
        n_timepoints,
        int(timepoint),
        interval,
        sel,
        native_chunks=_chunk_shape(image.native_chunks),
        format=image.format,
    )


def _chunk_shape(native: Sequence[Any]) -> tuple[int, ...]:
    """The file's chunk shape, or () when its metadata gives none usable (a damaged header)."""
    ok = all(isinstance(n, numbers.Integral) and int(n) > 0 for n in native)
    return tuple(int(n) for n in native) if ok else ()


def _voxel_size(
    sizes: list[float | None], given: Sequence[float] | None, image: Image, path: str
) -> tuple[tuple[float, ...], bool]:
    """µm per voxel and whether it is known: ``given``, else the metadata's (checked)."""
    if given is not None:
        if len(given) != len(sizes):
            raise ParameterError(
                f"`voxel_size` has {len(given)} values but the stack has {len(sizes)} axes; "
                f"pass {' '.join('ZYX'[-len(sizes) :])}"
            )
        if not all(_finite_positive(s) for s in given):
            raise ParameterError(f"`voxel_size` must be numbers > 0, got {list(given)!r}")
        return tuple(float(s) for s in given), True
    if not all(s is None or _finite_positive(s) for s in sizes):
        shown = ", ".join("none" if s is None else f"{s:g}" for s in sizes)
        raise FormatError(
            f"{path}: the voxel size in its metadata ({image.scale_key}) is ({shown}) µm, "
            f"which is not finite and positive; fix the metadata or pass --voxel-size "
            f"{' '.join('ZYX'[-len(sizes) :])} in µm"
        )
    if any(s is None for s in sizes):
        return (1.0,) * len(sizes), False
    return tuple(float(s) for s in sizes if s is not None), True


def _finite_positive(value: Any) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value) and float(value) > 0


def _reader_at(reader: Source, timepoint: int) -> Selection | Cropped:
    """``reader`` (a Selection, or a crop of one) reading another time point."""
    if isinstance(reader, Cropped):
        return Cropped(_reader_at(reader.source, timepoint), reader.box)
    if not isinstance(reader, Selection):
        raise ParameterError("`Stack.at` needs a stack opened by open_stack, not a computed one")
    roles_t = [i for i, r in enumerate(reader.roles) if r == "t"]
    index = list(reader.index)
    index[roles_t[0]] = timepoint
    return dataclasses.replace(reader, index=tuple(index))


def _check_timepoint(timepoint: Any, n_timepoints: int, path: str) -> None:
    _check_index("timepoint", timepoint)
    if timepoint >= n_timepoints:
        raise ParameterError(
            f"`timepoint` {timepoint} is out of range: {path} has {n_timepoints} time point(s); "
            f"valid range 0..{n_timepoints - 1}"
        )


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
        and all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and int(c) > 0
                for c in chunks)
    )  # fmt: skip
    if not ok:
        raise ParameterError(
            f"`chunks` must be {len(shape)} positive ints (one per spatial axis of shape "
            f"{shape}), got {chunks!r}"
        )
    return da.core.normalize_chunks(tuple(int(c) for c in chunks), shape)
