"""Footprints and lengths: the one place where physical lengths become voxels.

Units: the filter functions take voxels (``gaussian``'s ``sigma``, ``median``'s ``size``, as
the scipy calls they equal); :func:`ellipsoid` and the ``radius`` of ``subtract_background``
take lengths in the units of the voxel size (µm). :func:`box_size` is the one rounding of a
radius to a box, and :func:`in_voxels` translates a ``filter.steps`` entry, whose lengths
are all µm, into the voxel parameters of its step.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import skimage.morphology

from nucflow.errors import ParameterError
from nucflow.filters._checks import _per_axis, _positive, _spacing
from nucflow.filters.steps import STEPS

Footprint = np.ndarray | Sequence[tuple[np.ndarray, int]]


def ellipsoid(
    radius_um: float,
    voxel_size: Sequence[float],
    *,
    decomposition: str | None = None,
) -> Footprint:
    """Flat ellipsoid (3D) or ellipse (2D) footprint with a physical radius.

    Parameters
    ----------
    radius_um : float
        Radius in the units of `voxel_size` (µm), > 0.
    voxel_size : (2,) or (3,) sequence of float
        Voxel size per axis; its length sets the footprint ndim.
    decomposition : {None, "sequence"}, optional
        None: the exact footprint. ``"sequence"``: a skimage-style sequence of
        ``(3x3[x3] array, n_repeats)`` whose successive dilation approximates the ellipsoid,
        much faster for large radii (cost ~ radius instead of ~ radius**ndim).

    Returns
    -------
    footprint : uint8 ndarray or sequence of (uint8 ndarray, int)
        Exact shape: with ``r_i = radius_um / voxel_size[i]`` and ``h_i = floor(r_i)``, the
        array has shape ``(2 h_i + 1, ...)`` and holds offset ``d`` iff
        ``sum((d_i / r_i) ** 2) <= 1`` (axes with ``r_i < 1`` have extent 1). For an isotropic
        integer radius it equals ``skimage.morphology.ball(r)`` / ``disk(r)``.

        Sequence: ``R = max h_i``; start from ``ball(R, decomposition="sequence")`` (``disk``
        in 2D), expand it into R unit steps, and keep axis ``i`` extended in ``h_i`` of them
        (evenly spread, Bresenham); the other steps use the footprint's projection along
        that axis (extent 1), i.e. the step scaled by 0 on that axis. The result has half-extent
        exactly ``h_i`` per axis and equals skimage's sequence when isotropic. It is an outer
        polyhedral approximation:
        skimage's isotropic sequence is ~1.2x the ball's volume; the anisotropic one is larger
        (e.g. ~1.7x for radii (4, 12, 15)), because each unit step is either full or projected
        on an axis instead of scaled by the radius ratio.
    """
    radius = _positive(radius_um, "radius_um")
    if np.ndim(voxel_size) != 1 or len(voxel_size) not in (2, 3):
        raise ParameterError(f"`voxel_size` must have 2 or 3 values, got {voxel_size!r}")
    if decomposition not in (None, "sequence"):
        raise ParameterError(f"`decomposition` must be None or 'sequence', got {decomposition!r}")
    radii = _voxel_radii(radius, voxel_size, len(voxel_size))
    half = [_half_extent(r) for r in radii]
    if decomposition is None or max(half) < 2:
        return _ellipsoid_exact(radii, half)
    return _ellipsoid_sequence(half)


def _ellipsoid_exact(radii: list[float], half: list[int]) -> np.ndarray:
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    dist = np.zeros((1,) * len(grids))
    for g, r in zip(grids, radii, strict=True):
        dist = dist + (g / r) ** 2
    return (dist <= 1 + 1e-9).astype(np.uint8)


def _ellipsoid_sequence(half: list[int]) -> list[tuple[np.ndarray, int]]:
    big = max(half)
    base = (skimage.morphology.disk if len(half) == 2 else skimage.morphology.ball)(
        big, decomposition="sequence"
    )
    units = [np.asarray(a) for a, n in base for _ in range(int(n))]
    out: list[tuple[np.ndarray, int]] = []
    for j, unit in enumerate(units):
        for axis, h in enumerate(half):
            # Bresenham: step j keeps this axis extended iff it crosses an integer.
            if (j + 1) * h // len(units) == j * h // len(units):
                # Projecting is scaling that axis by 0: the other extents survive.
                unit = np.asarray(unit.any(axis=axis, keepdims=True), np.uint8)
        if out and out[-1][0].shape == unit.shape and np.array_equal(out[-1][0], unit):
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((unit, 1))
    return out


def _voxel_radii(radius: float, voxel_size: Sequence[float] | None, ndim: int) -> list[float]:
    return [radius / v for v in _spacing(voxel_size, ndim)]


def _half_extent(radius_voxels: float) -> int:
    # The tiny tolerance keeps e.g. 0.3 / 0.1 = 2.9999999999999996 at 3 voxels.
    return math.floor(radius_voxels + 1e-9)


def box_size(radius: float, voxel_size: Sequence[float]) -> tuple[int, ...]:
    """Edge lengths (voxels) of the box that holds a ball of `radius` (µm).

    Parameters
    ----------
    radius : float
        Radius in the units of `voxel_size`, > 0.
    voxel_size : sequence of float
        Voxel size per axis.

    Returns
    -------
    size : tuple of int
        ``2 * floor(radius / voxel_size_i) + 1`` per axis, with the rounding of
        :func:`ellipsoid` (0.3 µm at 0.1 µm voxels is 3 voxels: size 7), so the box and the
        ellipsoid of the same radius have the same extent.
    """
    radii = _voxel_radii(_positive(radius, "radius"), voxel_size, len(voxel_size))
    return tuple(2 * _half_extent(r) + 1 for r in radii)


def in_voxels(name: str, params: Mapping[str, Any], voxel_size: Sequence[float]) -> dict[str, Any]:
    """A ``filter.steps`` entry, lengths in µm, as the voxel parameters of step `name`.

    Parameters
    ----------
    name : str
        A key of :data:`~nucflow.filters.STEPS`.
    params : mapping
        The entry's parameters. The step's lengths (:attr:`StepKind.lengths`: ``gaussian``'s
        ``sigma``, ``bilateral``'s ``sigma_spatial``) are µm, scalar or per axis, and become
        voxels per axis. ``radius`` (µm) becomes ``ellipsoid(radius, voxel_size,
        decomposition="sequence")`` for a step that takes a footprint, or ``size =
        box_size(radius, voxel_size)`` for one that takes a size. ``size: [Z, Y, X]`` is a box
        in voxels (for a footprint step: a footprint of ones). Everything else (counts of
        voxels such as ``nl_means``' ``patch_size``, intensities such as ``h``) passes as is.
    voxel_size : sequence of float
        Voxel size per axis (µm).

    Returns
    -------
    params : dict
        Keyword arguments of the step (checked by :func:`~nucflow.filters.chain` later).
    """
    if name not in STEPS:
        raise ParameterError(f"step name must be one of {sorted(STEPS)}, got {name!r}")
    spacing = _spacing(voxel_size, len(voxel_size))
    out = dict(params)
    for key in STEPS[name].lengths:
        if key in out and out[key] is not None:
            lengths = _per_axis(out[key], len(spacing), key, integer=False)
            out[key] = tuple(x / v for x, v in zip(lengths, spacing, strict=True))
    takes = inspect.signature(STEPS[name].check).parameters
    if "footprint" in takes and "size" in out:
        out["footprint"] = np.ones(tuple(out.pop("size")), bool)
    if "radius" in out:
        radius = out.pop("radius")
        if "footprint" in takes:
            out["footprint"] = ellipsoid(radius, spacing, decomposition="sequence")
        else:
            out["size"] = box_size(radius, spacing)
    return out
