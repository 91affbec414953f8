"""Global mask operations: objects and holes joined across blocks by
:func:`nucflow.components.select_components` (two tasks per block, per-component tables
only), equal to the whole-array scikit-image / scipy calls."""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import scipy.ndimage as ndi

from nucflow.components import select_components
from nucflow.errors import ParameterError
from nucflow.filters._checks import _as_image


def _check_mask(mask: Any) -> da.Array:
    return _as_image(mask, "mask", kinds="b")


def remove_small_objects(mask: da.Array, max_size: int, *, connectivity: int = 1) -> da.Array:
    """Remove connected objects of at most `max_size` voxels, across chunks.

    Equal to ``skimage.morphology.remove_small_objects(mask, max_size=max_size,
    connectivity=connectivity)``: in skimage 0.26 objects with ``size <= max_size`` go.

    Parameters
    ----------
    mask : (M, N[, P]) dask array of bool
    max_size : int
        Largest size (voxels) removed, >= 0.
    connectivity : int, optional
        Neighbourhood (1 = faces ... ndim = full), as ``scipy.ndimage.generate_binary_structure``.

    Returns
    -------
    out : (M, N[, P]) dask array of bool

    Notes
    -----
    Objects are joined across blocks by :func:`nucflow.components.select_components` (two
    tasks per block); only per-component sizes are held in memory.
    """
    mask = _check_mask(mask)
    if isinstance(max_size, bool) or not isinstance(max_size, int | np.integer) or max_size < 0:
        raise ParameterError(f"`max_size` must be an integer >= 0, got {max_size!r}")
    _structure(mask.ndim, connectivity)  # validates `connectivity`
    if max_size == 0:
        return mask

    def large(sizes: np.ndarray, _touches_border: np.ndarray) -> np.ndarray:
        return sizes > max_size

    return select_components(mask, large, connectivity=int(connectivity))


def _structure(ndim: int, connectivity: Any) -> np.ndarray:
    if isinstance(connectivity, bool) or connectivity not in range(1, ndim + 1):
        raise ParameterError(
            f"`connectivity` must be an integer in 1..{ndim}, got {connectivity!r}"
        )
    return ndi.generate_binary_structure(ndim, int(connectivity))


def fill_holes(mask: da.Array) -> da.Array:
    """Fill holes, equal to ``scipy.ndimage.binary_fill_holes(mask)``, across chunks.

    Parameters
    ----------
    mask : (M, N[, P]) dask array of bool

    Returns
    -------
    out : (M, N[, P]) dask array of bool

    Notes
    -----
    Background components (face connectivity, scipy's default structure) are joined across
    blocks by :func:`nucflow.components.select_components`; a component is a hole iff none of
    its voxels lies on the image border.
    """
    mask = _check_mask(mask)
    return ~select_components(~mask, lambda _, touches_border: touches_border)
