"""Seam-free instance segmentation of a binary nuclei mask, one block at a time.

Every rule below depends only on a bounded neighbourhood of a voxel and breaks every tie by global
coordinates, so a block processed with the halo from :meth:`SegmentParams.halo` gives its core
exactly the labels that one block holding the whole stack would give:

1. **Distance.** Squared Euclidean distance to the background, in integer units of
   ``min(voxel_size) / 8`` (per-axis integer weights ≈ the voxel size ratios, so the anisotropic
   distance is an exact integer, identical in every block), capped at ``max_radius``: a capped
   distance needs only ``max_radius`` of context to be exact.
2. **Seeds.** A foreground voxel is a seed when its distance is the maximum of the box of
   half-width ``peak_radius`` around it, is at least ``min_radius``, and no other such voxel in the
   box has a smaller global linear index (plateaus resolve by global position, never by position in
   the block).
3. **Partition.** Each foreground voxel goes to the seed with the smallest power distance
   ``|x − s|² − r_s²`` (``r_s``: the seed's distance value, the radius of the largest ball inside
   the nucleus) among the seeds it is connected to through foreground within ``max_radius`` of the
   seed; ties go to the lowest seed id. For touching round nuclei the power distance splits them
   exactly at the plane through the circle where their surfaces meet — where a distance-transform
   watershed puts the neck — but, unlike flooding, it is a local rule.
4. **Ids from seeds.** A nucleus' label is ``1 +`` the global linear index of its seed voxel.

A nucleus with a voxel at ``max_radius`` from its seed may continue beyond it: it is reported as
truncated (see :mod:`nucflow.measure`).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import edt
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from nucflow.blockpass import padded
from nucflow.components import label
from nucflow.errors import ParameterError

__all__ = [
    "SegmentParams",
    "whole_voxels",
    "within_voxels",
    "distance_squared",
    "find_seeds",
    "box_maxima",
    "partition",
    "segment_block",
]

_WEIGHT_PER_MIN_VOXEL = 8  # integer distance units per smallest voxel edge


@dataclass(frozen=True)
class SegmentParams:
    """Segmentation parameters, all lengths in µm.

    Parameters
    ----------
    voxel_size : tuple of float
        Voxel size per spatial axis.
    peak_radius : float
        Half-width of the box in which a seed must be the distance maximum; about the smallest
        distance between the centres of two touching nuclei, halved.
    min_radius : float
        Smallest inscribed radius of a nucleus; thinner foreground gets no seed of its own.
    max_radius : float
        Largest distance from a seed to a voxel of its nucleus.
    """

    voxel_size: tuple[float, ...]
    peak_radius: float
    min_radius: float
    max_radius: float

    def __post_init__(self) -> None:
        for name in ("peak_radius", "min_radius", "max_radius"):
            if not getattr(self, name) > 0:
                raise ParameterError(f"`{name}` must be > 0 µm, got {getattr(self, name)}")
        if any(not v > 0 for v in self.voxel_size):
            raise ParameterError(f"`voxel_size` must be > 0 µm per axis, got {self.voxel_size}")

    @property
    def distance_unit(self) -> float:
        """Length in µm of one integer distance unit."""
        return min(self.voxel_size) / _WEIGHT_PER_MIN_VOXEL

    @property
    def distance_weights(self) -> tuple[int, ...]:
        """Integer edge length of a voxel along each axis, in distance units."""
        return tuple(max(1, round(v / self.distance_unit)) for v in self.voxel_size)

    def squared_units(self, length_um: float) -> int:
        """A length in µm as a squared integer distance, rounded down."""
        return math.floor((length_um / self.distance_unit) ** 2)

    def voxels(self, length_um: float) -> tuple[int, ...]:
        """A length in µm as a whole number of voxels per axis (at least 1)."""
        return whole_voxels(length_um, self.voxel_size)

    def halo(self) -> tuple[int, ...]:
        """Context per axis, in voxels, that makes a block's core exact.

        A label depends on seeds within ``max_radius``; a seed on distances within
        ``2 * peak_radius`` (its box and its neighbours' boxes); a distance on the mask within
        ``max_radius`` (the cap); and a seed's connected region reaches ``max_radius`` beyond it.
        """
        seed_context = self.max_radius + 2 * self.peak_radius + self.max_radius
        reach = max(seed_context, 2 * self.max_radius)
        return tuple(n + 1 for n in self.voxels(reach))


def whole_voxels(length_um: float, voxel_size: tuple[float, ...]) -> tuple[int, ...]:
    """A length in µm as a whole number of voxels per axis, rounded up (at least 1)."""
    return tuple(max(1, math.ceil(length_um / v - 1e-9)) for v in voxel_size)


def within_voxels(length_um: float, voxel_size: tuple[float, ...]) -> tuple[int, ...]:
    """The most whole voxels per axis no longer than a length in µm (at least 1).

    The half-width of a seed's box: rounded up, a 2 µm z-step stretched a 2.3 µm
    ``peak_radius`` to 4 µm along z, so a nucleus lying on another's top lost its seed as soon
    as the diameter passed 8 µm (F1 fell from 0.996 to 0.931 at 1.33x the diameter); rounded
    down, the box never reaches farther than ``peak_radius``.
    """
    return tuple(max(1, math.floor(length_um / v + 1e-9)) for v in voxel_size)


def _smallest_int(limit: int) -> type:
    """int32 when every value up to ``limit`` fits: half the memory traffic of int64 filters."""
    return np.int32 if limit < np.iinfo(np.int32).max else np.int64


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: the CPUs this process may run on
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


_EDT_THREADS = min(4, _usable_cpus())


def distance_squared(mask: np.ndarray, params: SegmentParams) -> np.ndarray:
    """Capped squared distance to the background, in integer units.

    Parameters
    ----------
    mask : (M, N[, P]) ndarray of bool
    params : SegmentParams

    Returns
    -------
    (M, N[, P]) ndarray of int32 (int64 if the cap needs it)
        0 on the background.
    """
    cap = params.squared_units(params.max_radius)
    # edt holds the GIL: on one thread it stalls the pass's other threads for its whole run,
    # on several it ends sooner (the same exact distances)
    squared = edt.edtsq(
        mask.view(np.uint8), anisotropy=params.distance_weights, parallel=_EDT_THREADS
    )
    np.minimum(squared, cap, out=squared)  # in place: a block's float copies add up
    return np.rint(squared, out=squared).astype(_smallest_int(cap))


def find_seeds(
    dist_sq: np.ndarray,
    params: SegmentParams,
    *,
    origin: tuple[int, ...],
    global_shape: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Seeds: box maxima of the distance, ties broken by global linear index.

    Parameters
    ----------
    dist_sq : (M, N[, P]) ndarray of int
        Output of :func:`distance_squared`.
    params : SegmentParams
    origin : tuple of int
        Global coordinates of ``dist_sq[0, 0(, 0)]``.
    global_shape : tuple of int
        Shape of the whole stack.

    Returns
    -------
    coords : (K, ndim) ndarray of int64
        Local coordinates of the seeds, sorted by global id.
    ids : (K,) ndarray of int64
        Global linear index of each seed voxel (its nucleus' label minus one).
    """
    half = within_voxels(params.peak_radius, params.voxel_size)
    box = tuple(2 * n + 1 for n in half)
    min_sq = max(params.squared_units(params.min_radius), 1)
    whole = tuple(slice(0, n) for n in dist_sq.shape)
    # Two candidates in each other's box are both box maxima, so they tie; the first in C order
    # (the order of global linear indices: they compare like coordinates) keeps the seed.
    coords = box_maxima(dist_sq, whole, half, dist_sq >= min_sq)  # C order: sorted by global id
    if len(coords) <= _MAX_PAIRWISE:
        coords = coords[~_tied_with_earlier(coords, half)]
    else:  # plateaus everywhere: a minimum filter of the order costs less than the pairs
        no_seed = dist_sq.size  # above every local index
        order: np.ndarray = np.full(dist_sq.shape, no_seed, _smallest_int(no_seed))
        order[tuple(coords.T)] = np.arange(len(coords))
        is_seed = order == ndimage.minimum_filter(order, size=box, mode="reflect")
        is_seed[order == no_seed] = False
        coords = np.argwhere(is_seed)
    return coords, global_ids(tuple(coords.T), origin, global_shape)


def box_maxima(
    values: np.ndarray, region: tuple[slice, ...], half: tuple[int, ...], candidate: np.ndarray
) -> np.ndarray:
    """Voxels of ``region`` where ``candidate`` holds and ``values`` is the maximum of the box of
    half-width ``half`` around the voxel (the box clipped to ``values``).

    Equal to ``candidate & (values[region] == maximum_filter(values[around], 2 * half + 1,
    mode="reflect")[inside])`` (reflecting repeats values inside the box, so it equals clipping),
    at a fraction of the cost: a box maximum is at least its 6 face neighbours, a cheap test
    that leaves few voxels, whose boxes are then read directly.

    Parameters
    ----------
    values : (M, N[, P]) ndarray
    region : tuple of slice
        With explicit starts and stops.
    half : tuple of int
        Box half-width per axis, at least 1.
    candidate : ndarray of bool
        Shaped like ``values[region]``.

    Returns
    -------
    (K, ndim) ndarray of int64
        Coordinates in ``values``, in C order.
    """
    start = np.array([s.start for s in region])
    if np.count_nonzero(candidate) <= candidate.size // _SPARSE_CANDIDATES:
        # few candidates (a threshold well above the noise): test only their neighbours
        local = np.argwhere(candidate)
        local = local[_not_below_neighbours_at(values, local + start)]
    else:
        local = np.argwhere(candidate & _not_below_neighbours(values, region))
    if len(local) > candidate.size // _DENSE_CANDIDATES:  # plateaus: the filter costs less
        around = padded(region, half, values.shape)
        inside = tuple(
            slice(s.start - a.start, s.stop - a.start) for s, a in zip(region, around, strict=True)
        )
        box = tuple(2 * h + 1 for h in half)
        peak = ndimage.maximum_filter(values[around], size=box, mode="reflect")[inside]
        return np.argwhere(candidate & (values[region] == peak)) + start
    coords = local + start
    keep = np.zeros(len(coords), bool)
    for first in range(0, len(coords), _BATCH):
        batch = coords[first : first + _BATCH]
        keep[first : first + _BATCH] = values[tuple(batch.T)] >= _box_max(values, batch, half)
    return coords[keep]


# Beyond one candidate per this many voxels, box_maxima uses scipy's maximum filter; and it
# reads the boxes of this many candidates at a time (~13 MB of indices for a 5x9x9 box).
_DENSE_CANDIDATES, _BATCH = 32, 4096
# Up to one candidate per this many voxels, their face neighbours are read one by one: six
# whole-array comparisons cost more.
_SPARSE_CANDIDATES = 16


def _not_below_neighbours(values: np.ndarray, region: tuple[slice, ...]) -> np.ndarray:
    """Per voxel of ``region``: is it >= each of its face neighbours inside ``values``?"""
    keep = np.ones(tuple(s.stop - s.start for s in region), bool)
    for axis, (s, n) in enumerate(zip(region, values.shape, strict=True)):
        for step in (-1, 1):
            lo, hi = max(s.start, -step), min(s.stop, n - step)  # neighbour inside values
            if hi <= lo:
                continue
            own = list(region)
            own[axis] = slice(lo, hi)
            other = list(region)
            other[axis] = slice(lo + step, hi + step)
            out = [slice(None)] * len(region)
            out[axis] = slice(lo - s.start, hi - s.start)
            keep[tuple(out)] &= values[tuple(own)] >= values[tuple(other)]
    return keep


def _not_below_neighbours_at(values: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Per coordinate: is ``values`` there >= each of its face neighbours inside ``values``?

    Each comparison is made for the coordinates that passed the ones before (fewer and fewer:
    on a smooth image one in a few voxels is not below its two neighbours along an axis)."""
    alive = np.arange(len(coords))
    index = [coords[:, axis] for axis in range(values.ndim)]
    own = values[tuple(index)]
    for axis in reversed(range(values.ndim)):  # the last axis first: contiguous reads
        for step in (-1, 1):
            moved = list(index)
            moved[axis] = np.clip(index[axis] + step, 0, values.shape[axis] - 1)  # outside: itself
            passed = own >= values[tuple(moved)]
            alive, own = alive[passed], own[passed]
            index = [i[passed] for i in index]
    keep = np.zeros(len(coords), bool)
    keep[alive] = True
    return keep


def _box_max(values: np.ndarray, coords: np.ndarray, half: tuple[int, ...]) -> np.ndarray:
    """Maximum of ``values`` over the box of half-width ``half`` around each coordinate,
    the box clipped to ``values`` (clipped indices repeat voxels inside the box)."""
    ndim = values.ndim
    index = []
    for axis, (h, n) in enumerate(zip(half, values.shape, strict=True)):
        shape = [len(coords)] + [1] * ndim
        shape[axis + 1] = 2 * h + 1
        offsets = coords[:, axis, None] + np.arange(-h, h + 1)
        index.append(np.clip(offsets, 0, n - 1).reshape(shape))
    return values[tuple(index)].reshape(len(coords), -1).max(axis=1)


# Candidates up to which ties are found by pairs (a k-d tree) instead of a minimum filter.
_MAX_PAIRWISE = 20_000


def _tied_with_earlier(coords: np.ndarray, half: tuple[int, ...]) -> np.ndarray:
    """Per candidate (C-ordered rows): is an earlier one within ``half`` on every axis?"""
    # Scale each axis to a common integer box half-width, so the Chebyshev test is exact.
    width = math.lcm(*half)
    scaled = coords * np.array([width // n for n in half])
    pairs = cKDTree(scaled).query_pairs(width, p=np.inf, output_type="ndarray")
    tied = np.zeros(len(coords), bool)
    tied[pairs.max(axis=1)] = True  # rows are in C order: the later of a pair loses
    return tied


def global_ids(local: tuple[np.ndarray, ...], origin, global_shape) -> np.ndarray:
    """Global linear index (C order) of local coordinates."""
    shifted = tuple(c.astype(np.int64) + o for c, o in zip(local, origin, strict=True))
    return np.ravel_multi_index(shifted, global_shape).astype(np.int64)


def partition(
    mask: np.ndarray,
    dist_sq: np.ndarray,
    seeds: np.ndarray,
    seed_ids: np.ndarray,
    region: tuple[slice, ...],
    params: SegmentParams,
) -> tuple[np.ndarray, np.ndarray]:
    """Assign the foreground voxels of ``region`` to seeds by connected power distance.

    Parameters
    ----------
    mask : (M, N[, P]) ndarray of bool
    dist_sq : (M, N[, P]) ndarray of int64
    seeds : (K, ndim) ndarray of int64
        Local seed coordinates, sorted by ``seed_ids`` (lowest id first wins ties).
    seed_ids : (K,) ndarray of int64
    region : tuple of slice
        The part of ``mask`` to label (a block's core), with explicit starts and stops.
    params : SegmentParams

    Returns
    -------
    labels : ndarray of uint64
        Labels of ``region`` (seed id + 1, 0 for background or out of reach).
    seed_distance : ndarray of float32
        Distance in µm from each labelled voxel to its seed.
    """
    start = np.array([s.start for s in region])
    stop = np.array([s.stop for s in region])
    labels = np.zeros(tuple(stop - start), np.uint64)
    seed_distance = np.zeros(labels.shape, np.float32)
    best = np.full(labels.shape, np.inf)
    reach = np.array(params.voxels(params.max_radius))
    boxes = _seed_box(tuple(map(int, reach)), tuple(params.voxel_size), params.max_radius)
    d_sq_box, within_box, distance_box = boxes
    unit_sq = params.distance_unit**2
    for seed, seed_id in zip(seeds, seed_ids, strict=True):
        lo = np.maximum(seed - reach, 0)
        hi = np.minimum(seed + reach + 1, mask.shape)
        cut_lo, cut_hi = np.maximum(lo, start), np.minimum(hi, stop)
        if np.any(cut_hi <= cut_lo):
            continue
        # the seed's box, clipped at the mask's faces, within the box around any seed
        at = tuple(slice(a, b) for a, b in zip(lo - seed + reach, hi - seed + reach, strict=True))
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        connected = _connected_to_seed(mask[box] & within_box[at], seed - lo)
        inner = tuple(slice(a, b) for a, b in zip(cut_lo - lo, cut_hi - lo, strict=True))
        out = tuple(slice(a, b) for a, b in zip(cut_lo - start, cut_hi - start, strict=True))
        score = d_sq_box[at][inner] - float(dist_sq[tuple(seed)]) * unit_sq
        wins = connected[inner] & (score < best[out])
        np.copyto(best[out], score, where=wins)
        np.copyto(labels[out], np.uint64(seed_id) + np.uint64(1), where=wins)
        np.copyto(seed_distance[out], distance_box[at][inner], where=wins)
    return labels, seed_distance


@functools.lru_cache(maxsize=8)
def _seed_box(
    reach: tuple[int, ...], voxel: tuple[float, ...], max_radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Over the box of ``reach`` voxels around a seed: squared physical distance to it (the
    per-axis squares summed in a fixed order), whether within ``max_radius``, the distance."""
    offsets = [np.arange(-r, r + 1) for r in reach]
    total = np.zeros((1,) * len(reach))
    for axis, (offset, v) in enumerate(zip(offsets, voxel, strict=True)):
        shape = [1] * len(reach)
        shape[axis] = len(offset)
        total = total + ((offset * v) ** 2).reshape(shape)
    boxes = total, total <= max_radius**2, np.sqrt(total).astype(np.float32)
    for box in boxes:  # shared by every call (and thread) with this geometry
        box.setflags(write=False)
    return boxes


def _connected_to_seed(allowed: np.ndarray, seed_local: np.ndarray) -> np.ndarray:
    components, _ = label(allowed)
    return components == components[tuple(seed_local)]


def segment_block(
    mask: np.ndarray,
    params: SegmentParams,
    *,
    origin: tuple[int, ...],
    global_shape: tuple[int, ...],
    core: tuple[slice, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Label the core of a padded mask block.

    Parameters
    ----------
    mask : (M, N[, P]) ndarray of bool
        The block with its halo (clipped at the image border).
    params : SegmentParams
    origin : tuple of int
        Global coordinates of ``mask[0, 0(, 0)]``.
    global_shape : tuple of int
        Shape of the whole stack.
    core : tuple of slice
        The block's core within ``mask``.

    Returns
    -------
    labels, seed_distance : ndarray
        See :func:`partition`; shaped like the core.
    """
    if not mask[core].any():
        shape = tuple(s.stop - s.start for s in core)
        return np.zeros(shape, np.uint64), np.zeros(shape, np.float32)
    dist_sq = distance_squared(mask, params)
    # Only seeds within max_radius of the core matter; each needs 2 * peak_radius of context.
    margin = [
        r + 2 * p
        for r, p in zip(
            params.voxels(params.max_radius), params.voxels(params.peak_radius), strict=True
        )
    ]
    near = tuple(
        slice(max(0, c.start - m), min(n, c.stop + m))
        for c, m, n in zip(core, margin, mask.shape, strict=True)
    )
    corner = np.array([s.start for s in near])
    seeds, seed_ids = find_seeds(
        dist_sq[near],
        params,
        origin=tuple(o + c for o, c in zip(origin, corner, strict=True)),
        global_shape=global_shape,
    )
    return partition(mask, dist_sq, seeds + corner, seed_ids, core, params)
