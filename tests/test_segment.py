"""The block rule: any tiling with the derived halo gives the whole-array labels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from nucflow import segment
from nucflow.errors import ParameterError
from nucflow.segment import SegmentParams, distance_squared, find_seeds, segment_block
from nucflow.synth import make_nuclei


def _params(voxel_size, diameter=8.0) -> SegmentParams:
    return SegmentParams(voxel_size, 0.3 * diameter, 0.15 * diameter, diameter)


def _tiled(mask: np.ndarray, params: SegmentParams, chunks) -> np.ndarray:
    out = np.zeros(mask.shape, np.uint64)
    halo = params.halo()
    for starts in itertools.product(
        *(range(0, n, c) for n, c in zip(mask.shape, chunks, strict=True))
    ):
        stop = [min(n, s + c) for s, c, n in zip(starts, chunks, mask.shape, strict=True)]
        lo = [max(0, s - h) for s, h in zip(starts, halo, strict=True)]
        hi = [min(n, e + h) for e, h, n in zip(stop, halo, mask.shape, strict=True)]
        padded = mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        core = tuple(slice(s - a, e - a) for s, e, a in zip(starts, stop, lo, strict=True))
        labels, _ = segment_block(
            padded, params, origin=tuple(lo), global_shape=mask.shape, core=core
        )
        out[tuple(slice(s, e) for s, e in zip(starts, stop, strict=True))] = labels
    return out


def _whole(mask: np.ndarray, params: SegmentParams) -> np.ndarray:
    core = tuple(slice(0, n) for n in mask.shape)
    return segment_block(mask, params, origin=(0,) * mask.ndim, global_shape=mask.shape, core=core)[
        0
    ]


@pytest.mark.parametrize("chunks", [(9, 31, 50), (40, 17, 23), (5, 64, 7)])
def test_tiling_equals_whole_array_3d(chunks):
    made = make_nuclei((40, 96, 96), n_nuclei=60, seed=11)
    params = _params(made.voxel_size)
    mask = made.truth > 0
    whole = _whole(mask, params)
    assert len(np.unique(whole)) - 1 == made.truth.max()  # every true nucleus found once
    np.testing.assert_array_equal(_tiled(mask, params, chunks), whole)


@pytest.mark.parametrize("chunks", [(33, 70), (128, 19), (10, 10)])
def test_tiling_equals_whole_array_2d(chunks):
    made = make_nuclei((128, 128), n_nuclei=40, seed=12)
    params = _params(made.voxel_size)
    mask = made.truth > 0
    np.testing.assert_array_equal(_tiled(mask, params, chunks), _whole(mask, params))


def test_plateau_ties_break_by_global_index():
    # a flat-topped ridge: every voxel on the plateau has the same distance
    mask = np.zeros((9, 30), bool)
    mask[2:7, 3:27] = True
    params = SegmentParams((1.0, 1.0), peak_radius=30.0, min_radius=1.0, max_radius=40.0)
    dist_sq = distance_squared(mask, params)
    coords, ids = find_seeds(dist_sq, params, origin=(5, 100), global_shape=(20, 200))
    assert len(ids) == 1
    plateau = np.argwhere(dist_sq == dist_sq.max())
    first = plateau[np.lexsort(plateau.T[::-1])][0]  # lowest row-major position
    np.testing.assert_array_equal(coords[0], first)
    assert ids[0] == np.ravel_multi_index(tuple(first + (5, 100)), (20, 200))


def test_tie_breaking_by_pairs_equals_the_minimum_filter(stack3d, monkeypatch):
    """The k-d tree shortcut and the minimum-filter fallback pick the same seeds."""
    made = stack3d[1]
    params = _params(made.voxel_size)
    # A coarse voxel grid makes many plateaus (ties) among the candidates.
    dist_sq = distance_squared(made.truth[:, ::2, ::2] > 0, params)
    seeds = find_seeds(dist_sq, params, origin=(3, 4, 5), global_shape=(99, 99, 99))
    monkeypatch.setattr(segment, "_MAX_PAIRWISE", -1)
    fallback = find_seeds(dist_sq, params, origin=(3, 4, 5), global_shape=(99, 99, 99))
    assert len(seeds[1]) > 20
    np.testing.assert_array_equal(seeds[0], fallback[0])
    np.testing.assert_array_equal(seeds[1], fallback[1])


def test_touching_spheres_split_at_their_contact_plane():
    z, y, x = np.ogrid[:30, :30, :50]
    left = (z - 15) ** 2 + (y - 15) ** 2 + (x - 15) ** 2 <= 10**2
    right = (z - 15) ** 2 + (y - 15) ** 2 + (x - 32) ** 2 <= 8**2
    params = SegmentParams((1.0, 1.0, 1.0), peak_radius=4.0, min_radius=2.0, max_radius=16.0)
    labels = _whole(left | right, params)
    values = [v for v in np.unique(labels) if v]
    assert len(values) == 2
    # the power-distance plane of the two spheres: x where |x-15|²-100 == |x-32|²-64
    plane = (32**2 - 15**2 - 64 + 100) / (2 * (32 - 15))
    big = labels[15, 15, 15]
    assert np.all(labels[15, 15, 6 : int(np.floor(plane)) + 1] == big)
    assert np.all(labels[15, 15, int(np.ceil(plane)) : 40] != big)


def test_bad_parameters_are_named():
    with pytest.raises(ParameterError, match="`max_radius` must be > 0"):
        SegmentParams((1.0, 1.0), 1.0, 1.0, 0.0)
    with pytest.raises(ParameterError, match="`voxel_size` must be > 0"):
        SegmentParams((1.0, -1.0), 1.0, 1.0, 2.0)


@pytest.mark.parametrize(
    ("shape", "region", "half", "levels"),
    [
        ((20, 40, 40), (slice(0, 20), slice(0, 40), slice(0, 40)), (2, 4, 4), 2),  # plateaus
        ((20, 40, 40), (slice(0, 20), slice(0, 40), slice(0, 40)), (2, 4, 4), 200),  # few ties
        ((20, 40, 40), (slice(3, 17), slice(0, 25), slice(30, 40)), (2, 4, 4), 200),
        ((20, 40, 40), (slice(5, 15), slice(9, 31), slice(9, 31)), (1, 3, 2), 0),  # floats
        ((30, 50), (slice(0, 30), slice(10, 50)), (3, 3), 0),
        ((30, 50), (slice(0, 30), slice(0, 50)), (2, 5), 2),
        ((30, 50), (slice(0, 30), slice(10, 50)), (2, 5), 200),
    ],
)
@pytest.mark.parametrize("share", [50, 3])  # % of candidates: whole-array or one-by-one tests
def test_box_maxima_equals_the_maximum_filter(shape, region, half, levels, share):
    """Every path (many candidates: whole-array neighbour tests; few: one by one; then direct
    boxes, or scipy's filter on plateaus) gives the voxels where the maximum filter of the
    region with its clipped box context equals the value."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    values = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 1.5)
    if levels:  # integer plateaus, as capped distances have
        scaled = (values - values.min()) / (values.max() - values.min())
        values = np.floor(scaled * levels).astype(np.int32)
    candidate = values[region] >= np.percentile(values, 100 - share)
    if levels != 2:  # two levels: half the voxels tie at the top, never few candidates
        few = np.count_nonzero(candidate) * segment._SPARSE_CANDIDATES <= candidate.size
        assert few == (share == 3)
    around = tuple(
        slice(max(0, s.start - h), min(n, s.stop + h))
        for s, h, n in zip(region, half, shape, strict=True)
    )
    box = tuple(2 * h + 1 for h in half)
    peak = ndimage.maximum_filter(values[around], size=box, mode="reflect")
    inside = tuple(
        slice(s.start - a.start, s.stop - a.start) for s, a in zip(region, around, strict=True)
    )
    expected = np.argwhere(candidate & (values[region] == peak[inside])) + [s.start for s in region]
    found = segment.box_maxima(values, region, half, candidate)
    np.testing.assert_array_equal(found, expected)
    assert len(expected) > 0
