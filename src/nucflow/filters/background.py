"""Background subtraction: a smooth background larger than a radius (µm), at full or reduced
resolution, equal on every chunking."""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import numpy as np

from nucflow import resample
from nucflow.components import again
from nucflow.errors import ParameterError
from nucflow.filters._checks import _as_image, _per_axis, _positive, _spacing
from nucflow.filters.footprints import _voxel_radii, box_size, ellipsoid
from nucflow.filters.overlap import chain
from nucflow.filters.steps import Step

_BACKGROUNDS = ("tophat", "median", "gaussian")


def subtract_background(
    image: da.Array,
    *,
    method: str = "tophat",
    radius: float,
    voxel_size: Sequence[float] | None = None,
    downsample: int | Sequence[int] = 1,
) -> da.Array:
    """Remove a smooth background larger than `radius`.

    Parameters
    ----------
    image : (M, N[, P]) dask array
    method : {"tophat", "median", "gaussian"}, optional
        ``"tophat"``: white top-hat of ``image.astype(float32)`` with
        ``ellipsoid(radius, voxel_size, decomposition="sequence")`` (the fast polyhedral
        approximation; small radii use the exact ellipsoid), the opening taken on the image
        extended beyond its faces by its edge values: ``skimage.morphology.white_tophat``
        except near a face where the background rises towards it (there scikit-image leaves
        a layer as thick as the radius; see the ``extended_opening`` step).
        ``"median"``: ``image - median_filter(image, size)`` clipped at 0, with
        ``size_i = 2 * floor(radius / voxel_size_i) + 1`` (a box of the radius).
        ``"gaussian"``: ``image - gaussian_filter(image, sigma=radius / voxel_size)``
        clipped at 0.
    radius : float
        Background scale, in the units of `voxel_size` (voxels when it is None), > 0.
    voxel_size : sequence of float, optional
        One per axis; default isotropic 1.
    downsample : int or sequence of int, optional
        Estimate the background on cells of this many voxels per axis (default 1: full
        resolution). The background is then the method applied to the cell minima
        (:func:`nucflow.resample.min_pool`) with the radius in cells, interpolated back
        linearly (:func:`nucflow.resample.upsample_linear`), and the result is
        ``max(image - background, 0)``. Much faster for large radii; an approximation of the
        full-resolution result, still identical on every chunking.

    Returns
    -------
    out : (M, N[, P]) dask array of float32
    """
    image = _as_image(image)
    if method not in _BACKGROUNDS:
        raise ParameterError(f"`method` must be one of {_BACKGROUNDS}, got {method!r}")
    radius = _positive(radius, "radius")
    factors = _per_axis(downsample, image.ndim, "downsample", integer=True)
    spacing = _spacing(voxel_size, image.ndim)
    data = image.astype(np.float32)
    if max(factors) > 1:
        cells = resample.min_pool(data, factors)
        cell_size = [v * f for v, f in zip(spacing, factors, strict=True)]
        low = _background(cells, method, radius, cell_size)
        background = resample.upsample_linear(low, factors, data.shape)
        # A block's background needs its neighbours' cells only: no need to wait for all of it.
        data = again(data, "background").rechunk(background.chunks)
    else:
        background = _background(data, method, radius, spacing)
    return da.maximum(data - background, np.float32(0))


def _background(data: da.Array, method: str, radius: float, spacing: Sequence[float]) -> da.Array:
    """The background estimate of ``subtract_background`` (float32 in, float32 out)."""
    return chain(data, background_steps(method, radius, spacing))


def background_steps(method: str, radius: float, spacing: Sequence[float]) -> list[Step]:
    """The :func:`chain` steps estimating the background of ``subtract_background``.

    Parameters
    ----------
    method : {"tophat", "median", "gaussian"}
        As :func:`subtract_background` (``"tophat"`` gives the opening it subtracts).
    radius : float
        Background scale in the units of ``spacing``.
    spacing : sequence of float
        Voxel (or cell) size per axis.

    Returns
    -------
    list of (str, dict)
    """
    radii = _voxel_radii(radius, spacing, len(spacing))
    if method == "tophat":  # the opening follows a background rising to a face (see its doc)
        unit = [radius / r for r in radii]
        footprint = ellipsoid(radius, unit, decomposition="sequence")
        return [("extended_opening", {"footprint": footprint})]
    if method == "median":
        return [("median", {"size": box_size(radius, spacing)})]
    return [("gaussian", {"sigma": tuple(radii)})]
