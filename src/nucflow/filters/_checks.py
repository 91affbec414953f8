"""Argument checks shared by the filters: each raises a :class:`~nucflow.errors.NucflowError`
that names the argument, what was expected and what came."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np

from nucflow.errors import DtypeError, ParameterError, ShapeError


def _as_image(image: Any, name: str = "image", kinds: str = "uif") -> da.Array:
    image = da.asarray(image)
    if image.ndim not in (2, 3):
        raise ShapeError(f"`{name}` must be 2D or 3D, got {image.ndim}D (shape {image.shape})")
    if image.dtype.kind not in kinds:
        expected = {"b": "boolean", "uif": "integer or float", "buif": "boolean or numeric"}
        raise DtypeError(
            f"`{name}` must have a {expected.get(kinds, kinds)} dtype, got {image.dtype}"
        )
    return image


def _per_axis(value: Any, ndim: int, name: str, *, integer: bool) -> tuple:
    """Broadcast a scalar or check a per-axis sequence; `name` is used in messages."""
    values = tuple(np.ravel(value).tolist()) if np.ndim(value) else (value,) * ndim
    if len(values) != ndim:
        raise ParameterError(f"`{name}` must be a scalar or have {ndim} values, got {value!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float | np.number):
            raise ParameterError(f"`{name}` must be numeric, got {value!r}")
        if integer and (int(v) != v or v <= 0):
            raise ParameterError(f"`{name}` must be a positive integer per axis, got {value!r}")
        if not integer and not (math.isfinite(v) and v >= 0):
            raise ParameterError(f"`{name}` must be finite and >= 0, got {value!r}")
    return tuple(int(v) for v in values) if integer else tuple(float(v) for v in values)


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ParameterError(f"`{name}` must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ParameterError(f"`{name}` must be a positive number, got {value!r}")
    return float(value)


def _as_footprint(footprint: Any, ndim: int) -> tuple[tuple[np.ndarray, int], ...]:
    """Normalise an ndarray or skimage-style sequence to ``((array, n_repeats), ...)``."""
    if isinstance(footprint, np.ndarray):
        parts = [(footprint, 1)]
    elif isinstance(footprint, Sequence) and footprint and not isinstance(footprint, str):
        parts = list(footprint)
    else:
        raise ParameterError(
            f"`footprint` must be an ndarray or a sequence of (ndarray, n_repeats), "
            f"got {type(footprint).__name__}"
        )
    out = []
    for part in parts:
        if not (isinstance(part, tuple) and len(part) == 2):
            raise ParameterError(f"`footprint` entries must be (ndarray, n_repeats), got {part!r}")
        array, n = np.asarray(part[0]), part[1]
        if array.ndim != ndim:
            raise ShapeError(
                f"`footprint` (ndim {array.ndim}) must have the ndim of `image` (ndim {ndim})"
            )
        if array.size == 0 or not np.any(array):
            raise ParameterError("`footprint` must contain at least one True element")
        if int(n) != n or n < 1:
            raise ParameterError(f"`footprint` n_repeats must be a positive integer, got {n!r}")
        out.append((array, int(n)))
    return tuple(out)


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float | np.number)


def _spacing(voxel_size: Any, ndim: int) -> tuple[float, ...]:
    """A checked voxel size with ``ndim`` positive values (isotropic 1 when None)."""
    if voxel_size is None:
        return (1.0,) * ndim
    values = tuple(np.ravel(voxel_size).tolist()) if np.ndim(voxel_size) == 1 else None
    if values is None or len(values) != ndim:
        raise ParameterError(f"`voxel_size` must have {ndim} values, got {voxel_size!r}")
    return tuple(_positive(v, "voxel_size") for v in values)
