"""nucflow.filters: every dask result equals the whole-array scipy/scikit-image result."""

from __future__ import annotations

import itertools

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.filters
import skimage.morphology as morph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.interpolate import RegularGridInterpolator

from nucflow import components, filters, resample
from nucflow.errors import DtypeError, ParameterError, ShapeError

SHAPE_3D = (23, 41, 37)
SHAPE_2D = (41, 37)
# Uneven chunkings; the last ones are smaller than most halos used below.
CHUNKS_3D = [(7, 13, 11), (23, 5, 37), (10, 41, 9), (6, 3, 37)]
CHUNKS_2D = [(13, 11), (5, 37), (41, 9), (3, 4)]
CASES = [(SHAPE_3D, c) for c in CHUNKS_3D] + [(SHAPE_2D, c) for c in CHUNKS_2D]
IDS = [f"{len(s)}d-{'x'.join(map(str, c))}" for s, c in CASES]
# dask_image's global labelling graph grows faster than the block count (140 blocks take
# ~50 s), so the global operations use chunkings with at most ~25 blocks.
GLOBAL_CASES = [(SHAPE_3D, c) for c in [(12, 21, 19), (23, 8, 37), (10, 41, 9)]] + [
    (SHAPE_2D, c) for c in [(13, 11), (5, 37), (41, 9)]
]
GLOBAL_IDS = [f"{len(s)}d-{'x'.join(map(str, c))}" for s, c in GLOBAL_CASES]


def _noise(shape, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape).astype(dtype)
    return rng.integers(0, 200, shape).astype(dtype)


def _blobs(shape, seed=0, fraction=0.35):
    """Smooth random blobs: objects and holes of many sizes that span chunks."""
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random(shape), 2) > np.quantile(
        ndi.gaussian_filter(rng.random(shape), 2), 1 - fraction
    )


def _aniso(ndim):
    return (0.7, 1.5, 2.2)[-ndim:]


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="sync"):
        yield


def _no_compute(*args, **kwargs):
    raise AssertionError("something was computed while building the graph")


# --------------------------------------------------------------------------- local filters


@pytest.mark.parametrize(("shape", "chunks"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_gaussian_exact(shape, chunks, dtype):
    x = _noise(shape, dtype)
    sigma = _aniso(len(shape))
    with dask.config.set(scheduler=_no_compute):
        out = filters.gaussian(da.from_array(x, chunks=chunks), sigma)
    assert out.dtype == np.float32
    expected = ndi.gaussian_filter(x.astype(np.float32), sigma)
    np.testing.assert_array_equal(out.compute(), expected)


@pytest.mark.parametrize("mode", ["nearest", "constant", "mirror"])
def test_gaussian_modes_and_truncate(mode):
    x = _noise(SHAPE_3D)
    out = filters.gaussian(da.from_array(x, chunks=(7, 13, 11)), 1.3, truncate=2.5, mode=mode)
    expected = ndi.gaussian_filter(x, 1.3, truncate=2.5, mode=mode)
    np.testing.assert_array_equal(out.compute(), expected)


@pytest.mark.parametrize(("shape", "chunks"), CASES, ids=IDS)
def test_uniform(shape, chunks):
    size = (3, 5, 4)[-len(shape) :]
    # Integer-valued input: scipy's running sum is exact, so equality is bitwise.
    xi = _noise(shape, np.uint8)
    out = filters.uniform(da.from_array(xi, chunks=chunks), size)
    expected = ndi.uniform_filter(xi.astype(np.float32), size)
    np.testing.assert_array_equal(out.compute(), expected)
    # Real-valued input: the running sum starts elsewhere, so allow ~1 ulp.
    xf = _noise(shape)
    out = filters.uniform(da.from_array(xf, chunks=chunks), size)
    expected = ndi.uniform_filter(xf, size)
    np.testing.assert_allclose(out.compute(), expected, rtol=2e-7, atol=0)


@pytest.mark.parametrize(("shape", "chunks"), CASES, ids=IDS)
def test_median(shape, chunks):
    x = _noise(shape, np.uint16)
    size = (3, 6, 5)[-len(shape) :]
    out = filters.median(da.from_array(x, chunks=chunks), size)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out.compute(), ndi.median_filter(x, size))


@pytest.mark.parametrize(("shape", "chunks"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_sobel(shape, chunks, dtype):
    x = _noise(shape, dtype)
    out = filters.sobel(da.from_array(x, chunks=chunks))
    expected = skimage.filters.sobel(x)
    assert out.dtype == expected.dtype
    np.testing.assert_array_equal(out.compute(), expected)


OPS = ["erosion", "dilation", "opening", "closing", "white_tophat", "black_tophat"]


@pytest.mark.parametrize(("shape", "chunks"), CASES, ids=IDS)
@pytest.mark.parametrize("op", OPS)
def test_morphology_anisotropic(shape, chunks, op):
    x = _noise(shape, np.uint16)
    footprint = filters.ellipsoid(2.0, _aniso(len(shape)))
    out = getattr(filters, op)(da.from_array(x, chunks=chunks), footprint)
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(out.compute(), getattr(morph, op)(x, footprint))


@pytest.mark.parametrize("op", OPS)
def test_morphology_decomposed_and_even(op):
    x = _noise(SHAPE_3D)
    dx = da.from_array(x, chunks=(7, 13, 11))
    sequence = filters.ellipsoid(4.0, (2.0, 1.0, 1.0), decomposition="sequence")
    np.testing.assert_array_equal(
        getattr(filters, op)(dx, sequence).compute(), getattr(morph, op)(x, sequence)
    )
    even = np.ones((2, 4, 3), bool)  # skimage pads even footprints; the halo must cover it
    np.testing.assert_array_equal(
        getattr(filters, op)(dx, even).compute(), getattr(morph, op)(x, even)
    )


BOOL_FOOTPRINTS = {  # footprint, and whether the numpy shifts (not scikit-image) apply
    "disk": (morph.disk(2), True),
    "anisotropic ellipsoid": (filters.ellipsoid(2.0, (2.0, 1.0, 1.0)), True),
    "1x3x3 box (the mask's opening)": (np.ones((1, 3, 3), bool), True),
    "even box": (np.ones((2, 4, 3), bool), False),
    "ring": (morph.disk(2).astype(bool) & ~np.pad(morph.disk(1), 1).astype(bool), False),
}


@pytest.mark.parametrize("name", BOOL_FOOTPRINTS)
@pytest.mark.parametrize("op", ["erosion", "dilation", "opening", "closing"])
def test_morphology_bool(name, op):
    """Binary masks take numpy shifts where the footprint's lines are centred intervals: the
    same as scikit-image's whole-array call, at the image's faces too."""
    from nucflow.filters.local import _centred_intervals

    footprint, shifts = BOOL_FOOTPRINTS[name]
    assert (_centred_intervals(footprint) is not None) == shifts
    x = _blobs(SHAPE_2D if footprint.ndim == 2 else SHAPE_3D)
    chunks = (5, 37) if x.ndim == 2 else (7, 13, 11)
    out = getattr(filters, op)(da.from_array(x, chunks=chunks), footprint)
    np.testing.assert_array_equal(out.compute(), getattr(morph, op)(x, footprint))


# --------------------------------------------------------------------------- chain and depth


@pytest.mark.parametrize(("shape", "chunks"), CASES[:3] + CASES[4:5], ids=IDS[:3] + IDS[4:5])
def test_chain_equals_sequential(shape, chunks):
    x = _noise(shape, np.uint16)
    fp = filters.ellipsoid(2.0, _aniso(len(shape)))
    steps = [
        ("median", {"size": 3}),
        ("gaussian", {"sigma": 1.0}),
        ("white_tophat", {"footprint": fp}),
    ]
    out = filters.chain(da.from_array(x, chunks=chunks), steps)
    expected = morph.white_tophat(ndi.gaussian_filter(ndi.median_filter(x, 3).astype("f4"), 1), fp)
    np.testing.assert_array_equal(out.compute(), expected)
    # One map_overlap: the summed depth, not three separate halos.
    depth = [filters.depth_of(name, ndim=len(shape), **params) for name, params in steps]
    assert tuple(map(sum, zip(*depth, strict=True))) == tuple(
        1 + 4 + 2 * h for h in (fp.shape[i] // 2 for i in range(len(shape)))
    )


@pytest.mark.parametrize(("shape", "chunks"), CASES, ids=IDS)
def test_chain_read_equals_chain_on_the_region(shape, chunks):
    """Blocks that read their own halo from the source give the chained whole-array result,
    on the whole image and on a region of it (whose edges act as the image edges)."""
    x = _noise(shape, np.uint16)
    fp = filters.ellipsoid(2.0, _aniso(len(shape)), decomposition="sequence")
    steps = [("gaussian", {"sigma": 1.0}), ("white_tophat", {"footprint": fp})]
    region = tuple(slice(2, n - 3) for n in shape)
    for where in (None, region):
        part = x if where is None else x[where]
        expected = filters.chain(da.from_array(part, chunks=part.shape), steps).compute()
        out = filters.chain_read(x, steps, chunks=chunks, region=where)
        assert out.chunks == da.core.normalize_chunks(chunks, part.shape)
        np.testing.assert_array_equal(out.compute(), expected)


def test_chain_read_checks_each_blocks_own_voxels():
    x = _noise(SHAPE_2D)
    x[20, 30] = np.nan
    seen = []

    def refuse_nan(core, where):
        seen.append(where)
        if np.isnan(core).any():
            raise ParameterError(f"NaN in {where}")

    out = filters.chain_read(x, [("gaussian", {"sigma": 1.0})], chunks=(13, 11), check=refuse_nan)
    with pytest.raises(ParameterError, match=r"NaN in \(slice\(13, 26, None\), slice\(22, 33"):
        out.compute(scheduler="sync")
    assert all(w[0].stop - w[0].start <= 13 and w[1].stop - w[1].start <= 11 for w in seen)


def test_depth_of():
    assert filters.depth_of("gaussian", sigma=(0.5, 1.0, 2.2)) == (2, 4, 9)
    assert filters.depth_of("gaussian", sigma=2, truncate=3.0, ndim=2) == (6, 6)
    assert filters.depth_of("median", size=(3, 4, 7)) == (1, 2, 3)
    assert filters.depth_of("sobel", ndim=2) == (1, 1)
    fp = np.ones((3, 7, 5), bool)
    assert filters.depth_of("erosion", footprint=fp) == (1, 3, 2)
    assert filters.depth_of("white_tophat", footprint=fp) == (2, 6, 4)
    ball = morph.ball(15, decomposition="sequence")
    assert filters.depth_of("dilation", footprint=ball) == (15, 15, 15)
    assert filters.depth_of("closing", footprint=ball) == (30, 30, 30)


def test_chunks_smaller_than_halo_and_axis():
    # sigma 4 -> depth 16 on every axis; chunks of 3 and an axis (23) shorter than 2 halos.
    x = _noise(SHAPE_3D)
    out = filters.gaussian(da.from_array(x, chunks=3), 4.0)
    np.testing.assert_array_equal(out.compute(), ndi.gaussian_filter(x, 4.0))
    fp = np.ones((1, 1, 31), bool)  # depth 30 on x for closing: longer than the whole axis
    out = filters.closing(da.from_array(x, chunks=(7, 13, 11)), fp)
    np.testing.assert_array_equal(out.compute(), morph.closing(x, fp))


# --------------------------------------------------------------------------- composites


@pytest.mark.parametrize(("shape", "chunks"), CASES[:3] + CASES[4:6], ids=IDS[:3] + IDS[4:6])
def test_normalized_convolution(shape, chunks):
    x = _noise(shape, np.uint16)
    mask = _blobs(shape, seed=1, fraction=0.6)
    out = filters.normalized_convolution(
        da.from_array(x, chunks=chunks), da.from_array(mask, chunks=chunks), 1.5
    )
    m = mask.astype(np.float32)
    num = ndi.gaussian_filter(x.astype(np.float32) * m, 1.5)
    den = ndi.gaussian_filter(m, 1.5)
    expected = np.zeros(shape, np.float32)
    expected[mask] = num[mask] / den[mask]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.compute(), expected)


def _extended_opening(x: np.ndarray, footprint) -> np.ndarray:
    """scikit-image's opening of ``x`` edge-padded by the footprint's reach, cropped back."""
    reach = [2 * sum(n * (a.shape[i] // 2) for a, n in footprint) for i in range(x.ndim)]
    padded = np.pad(x, [(r, r) for r in reach], mode="edge")
    inner = tuple(slice(r, r + n) for r, n in zip(reach, x.shape, strict=True))
    return morph.opening(padded, footprint)[inner]


def test_extended_opening_follows_a_background_rising_to_the_face():
    """A linear ramp is its own opening when extended by its edges; the mirrored opening
    leaves a layer at the bright face (what made false nuclei at a stack's top)."""
    ramp = np.broadcast_to(np.linspace(100, 40, 30, dtype=np.float32)[:, None], (30, 40)).copy()
    fp = filters.ellipsoid(4.0, (1.0, 1.0), decomposition="sequence")
    out = filters.subtract_background(
        da.from_array(ramp, chunks=(7, 11)), radius=4.0, voxel_size=(1.0, 1.0)
    ).compute()
    np.testing.assert_allclose(out, 0, atol=1e-4)
    assert morph.white_tophat(ramp, fp)[0].min() > 5  # scikit-image's own, for contrast


@pytest.mark.parametrize("method", ["tophat", "median", "gaussian"])
def test_subtract_background(method):
    x = _noise(SHAPE_3D, np.uint16)
    voxel = (2.0, 0.5, 0.5)
    out = filters.subtract_background(
        da.from_array(x, chunks=(7, 13, 11)), method=method, radius=2.0, voxel_size=voxel
    )
    xf = x.astype(np.float32)
    if method == "tophat":
        fp = filters.ellipsoid(2.0, voxel, decomposition="sequence")
        expected = np.maximum(xf - _extended_opening(xf, fp), 0)
    elif method == "median":
        expected = np.maximum(xf - ndi.median_filter(xf, (3, 9, 9)), 0)
    else:
        expected = np.maximum(xf - ndi.gaussian_filter(xf, (1.0, 4.0, 4.0)), 0)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.compute(), expected)


def _pooled_reference(x: np.ndarray, factors) -> np.ndarray:
    """Cell minima with numpy: edge-pad to whole cells, reshape, min."""
    pad = [(0, -n % f) for n, f in zip(x.shape, factors, strict=True)]
    padded = np.pad(x, pad, mode="edge")
    split = [v for n, f in zip(padded.shape, factors, strict=True) for v in (n // f, f)]
    return padded.reshape(split).min(axis=tuple(range(1, 2 * x.ndim, 2)))


def _upsampled_reference(low: np.ndarray, factors, shape) -> np.ndarray:
    """Linear through the cell centres, extrapolated up to half a cell past the edge ones
    (scipy's RegularGridInterpolator with ``fill_value=None``); a single cell is constant."""
    grid = [
        np.clip((np.arange(n) + 0.5) / f - 0.5, -0.5, m - 0.5)
        for n, f, m in zip(shape, factors, low.shape, strict=True)
    ]
    low = low.astype(np.float64)
    for axis, m in enumerate(low.shape):
        if m == 1:  # two equal cells: the same constant, and an interpolator can be built
            low = np.concatenate([low, low], axis=axis)
    points = [np.arange(m, dtype=np.float64) for m in low.shape]
    coords = np.stack(np.meshgrid(*grid, indexing="ij"), axis=-1)
    interpolate = RegularGridInterpolator(points, low, bounds_error=False, fill_value=None)
    return interpolate(coords)


@pytest.mark.parametrize(("shape", "chunks"), CASES, ids=IDS)
def test_min_pool_and_linear_upsampling(shape, chunks):
    factors = (2, 4, 3)[-len(shape) :]
    x = _noise(shape)
    low = resample.min_pool(da.from_array(x, chunks=chunks), factors)
    expected_low = _pooled_reference(x, factors)
    np.testing.assert_array_equal(low.compute(), expected_low)
    up = resample.upsample_linear(low, factors, shape)
    assert up.shape == shape and up.dtype == np.float32
    expected = _upsampled_reference(expected_low, factors, shape)
    np.testing.assert_allclose(up.compute(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["tophat", "median", "gaussian"])
def test_subtract_background_at_reduced_resolution(method):
    """Equals the whole-array recipe (numpy pooling, skimage/scipy filter, linear interpolation)
    and is bit-identical on every chunking."""
    x = _noise(SHAPE_3D, np.uint16).astype(np.float32)
    voxel, radius, factors = (2.0, 0.5, 0.5), 4.0, (1, 3, 3)
    outs = [
        filters.subtract_background(
            da.from_array(x, chunks=c),
            method=method,
            radius=radius,
            voxel_size=voxel,
            downsample=factors,
        ).compute()
        for c in CHUNKS_3D
    ]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    cells = _pooled_reference(x, factors)
    cell_size = [v * f for v, f in zip(voxel, factors, strict=True)]
    radii = [radius / c for c in cell_size]
    if method == "tophat":
        fp = filters.ellipsoid(radius, [radius / r for r in radii], decomposition="sequence")
        low = _extended_opening(cells, fp)
    elif method == "median":
        low = ndi.median_filter(cells, [2 * int(r) + 1 for r in radii])
    else:
        low = ndi.gaussian_filter(cells, radii)
    expected = np.maximum(x - _upsampled_reference(low, factors, x.shape), 0)
    np.testing.assert_allclose(outs[0], expected, rtol=1e-5, atol=1e-3)


def test_reduced_resolution_background_recomputed_for_large_images(monkeypatch):
    """Above the hold size the image blocks are recomputed after the background: same result."""
    x = da.from_array(_noise(SHAPE_3D, np.uint16), chunks=(7, 13, 11))
    kwargs = {"radius": 4.0, "voxel_size": (2.0, 0.5, 0.5), "downsample": (1, 3, 3)}
    held = filters.subtract_background(x, **kwargs)
    monkeypatch.setattr(components, "HOLD_BYTES", 0)
    recomputed = filters.subtract_background(x, **kwargs)
    assert len(recomputed.dask) > len(held.dask)  # the image's graph appears twice
    np.testing.assert_array_equal(recomputed.compute(), held.compute())


def test_global_masks_recomputed_for_large_masks(monkeypatch):
    """Above the hold size, the second pass recomputes the mask after the join: same result."""
    mask = da.from_array(_blobs(SHAPE_3D), chunks=(12, 21, 19)) > 0
    held = (filters.fill_holes(mask), filters.remove_small_objects(mask, 30))
    monkeypatch.setattr(components, "HOLD_BYTES", 0)
    recomputed = (filters.fill_holes(mask), filters.remove_small_objects(mask, 30))
    for a, b in zip(held, recomputed, strict=True):
        assert len(b.dask) > len(a.dask)
        np.testing.assert_array_equal(b.compute(), a.compute())


def test_global_masks_summarize_each_block_once(monkeypatch):
    """The join's inputs (components, face pairs) come from one summary per block: no block is
    labelled twice in the first pass."""
    calls = []
    summarize = components._summarize

    def counted(block, *, grid, connectivity, block_id):
        calls.append(block_id)
        return summarize(block, grid=grid, connectivity=connectivity, block_id=block_id)

    monkeypatch.setattr(components, "_summarize", counted)
    mask = _blobs(SHAPE_3D) > 0
    chunked = da.from_array(mask, chunks=(12, 21, 19))
    out = filters.remove_small_objects(chunked, 30).compute(scheduler="sync")
    np.testing.assert_array_equal(out, morph.remove_small_objects(mask, max_size=30))
    assert sorted(calls) == sorted(itertools.product(*map(range, chunked.numblocks)))


def test_downsample_must_be_positive_integers():
    with pytest.raises(ParameterError, match="`downsample` must be a positive integer per axis"):
        filters.subtract_background(da.zeros((8, 8), chunks=4), radius=2.0, downsample=(0, 2))


@pytest.mark.parametrize("downsample", [1, 2])
@pytest.mark.parametrize(
    ("voxel_size", "message"),
    [
        ((1.0, 1.0, 1.0), r"^`voxel_size` must have 2 values, got \(1\.0, 1\.0, 1\.0\)$"),
        (0.5, r"^`voxel_size` must have 2 values, got 0\.5$"),
        ((1.0, 0.0), r"^`voxel_size` must be a positive number, got 0\.0$"),
    ],
)
def test_subtract_background_refuses_a_bad_voxel_size(downsample, voxel_size, message):
    """With or without reduced resolution: a ParameterError naming `voxel_size`, never a
    bare ValueError/TypeError from zip or tuple()."""
    with pytest.raises(ParameterError, match=message):
        filters.subtract_background(
            da.zeros((8, 8), chunks=4), radius=2.0, voxel_size=voxel_size, downsample=downsample
        )


def test_box_size_is_the_ellipsoid_extent():
    """One rounding of a radius to voxels: 0.3 µm at 0.1 µm voxels is 3 voxels (size 7), for
    the box, the ellipsoid, the median background and a `filter.steps` radius alike."""
    assert filters.box_size(0.3, (0.1, 0.1)) == (7, 7)
    assert filters.box_size(1.0, (2.0, 0.5, 0.3)) == (1, 5, 7)
    assert filters.ellipsoid(0.3, (0.1, 0.1)).shape == (7, 7)
    assert filters.background_steps("median", 0.3, (0.1, 0.1)) == [("median", {"size": (7, 7)})]
    assert filters.in_voxels("median", {"radius": 0.3}, (0.1, 0.1)) == {"size": (7, 7)}
    footprint = filters.in_voxels("opening", {"radius": 0.3}, (0.1, 0.1))["footprint"]
    assert filters.depth_of("dilation", footprint=footprint) == (3, 3)
    assert filters.in_voxels("closing", {"size": [5, 3]}, (0.1, 0.1))["footprint"].shape == (5, 3)


# --------------------------------------------------------------------------- global masks


@pytest.mark.parametrize(("shape", "chunks"), GLOBAL_CASES, ids=GLOBAL_IDS)
@pytest.mark.parametrize("connectivity", [1, 2])
def test_remove_small_objects(shape, chunks, connectivity):
    mask = _blobs(shape, seed=2, fraction=0.3) | (np.random.default_rng(3).random(shape) > 0.97)
    with dask.config.set(scheduler=_no_compute):
        out = filters.remove_small_objects(
            da.from_array(mask, chunks=chunks), 20, connectivity=connectivity
        )
    expected = morph.remove_small_objects(mask, max_size=20, connectivity=connectivity)
    assert 0 < expected.sum() < mask.sum()  # both kinds of objects are present
    np.testing.assert_array_equal(out.compute(), expected)


def test_remove_small_objects_inclusive_size():
    mask = np.zeros((10, 30), bool)
    mask[1:4, 1:4] = True  # 9 voxels: removed when max_size == 9 (skimage 0.26: <=)
    mask[5:9, 1:29] = True  # spans all chunks
    out = filters.remove_small_objects(da.from_array(mask, chunks=(4, 7)), 9)
    np.testing.assert_array_equal(out.compute(), morph.remove_small_objects(mask, max_size=9))
    assert not out[2, 2].compute() and out[6, 20].compute()


@pytest.mark.parametrize(("shape", "chunks"), GLOBAL_CASES, ids=GLOBAL_IDS)
def test_fill_holes(shape, chunks):
    mask = ~_blobs(shape, seed=4, fraction=0.35)  # background blobs become holes
    with dask.config.set(scheduler=_no_compute):
        out = filters.fill_holes(da.from_array(mask, chunks=chunks))
    expected = ndi.binary_fill_holes(mask)
    assert expected.sum() > mask.sum()
    np.testing.assert_array_equal(out.compute(), expected)


def test_fill_holes_spanning_many_chunks():
    mask = np.zeros((40, 40), bool)
    mask[2:38, 2:38] = True
    mask[5:35, 5:35] = False  # one hole over all 25 chunks
    mask[20, 0:3] = False  # a background channel from the border is not a hole...
    mask[20, 3:6] = False  # ...and it opens into the big hole, so that is not one either
    mask[37:40, 10] = False
    out = filters.fill_holes(da.from_array(mask, chunks=(8, 8)))
    np.testing.assert_array_equal(out.compute(), ndi.binary_fill_holes(mask))


# --------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("method", ["otsu", "yen", "triangle"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_threshold_exact(method, dtype):
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(50, 10, 3000), rng.normal(150, 30, 6000)]).reshape(30, 300)
    x = np.clip(x, 0, 255).astype(dtype)
    if dtype == np.int16:
        x = x - 100
    value = filters.threshold(da.from_array(x, chunks=(7, 41)), method)
    assert isinstance(value, float)
    assert value == float(getattr(skimage.filters, f"threshold_{method}")(x))
    # a known range, passed as Python numbers (as the pipeline keeps it in JSON), changes nothing
    known = (x.min().item(), x.max().item())
    assert filters.threshold(da.from_array(x, chunks=(7, 41)), method, value_range=known) == value


@pytest.mark.parametrize("dtype", [np.uint16, np.int16])
def test_threshold_li_integer_exact(dtype):
    x = _noise(SHAPE_3D, dtype) * 3 - (50 if dtype == np.int16 else 0)
    x = x.astype(dtype)
    value = filters.threshold(da.from_array(x, chunks=(7, 13, 11)), "li")
    assert value == float(skimage.filters.threshold_li(x))


def test_threshold_li_float_within_tolerance():
    x = _noise(SHAPE_3D, np.float32) ** 2
    value = filters.threshold(da.from_array(x, chunks=(7, 13, 11)), "li")
    span = float(x.max() - x.min())
    # Documented: the float branch stops at (max - min) * 2**-20 instead of skimage's gap.
    assert abs(value - float(skimage.filters.threshold_li(x))) <= 1e-5 * span


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.float64])
@pytest.mark.parametrize("percentile", [0, 3.7, 50, 99.5, 100])
def test_threshold_percentile(dtype, percentile):
    x = _noise(SHAPE_3D, dtype)
    x[:10] = x.flat[0]  # a heavy constant background inside one histogram bin
    value = filters.threshold(
        da.from_array(x, chunks=(7, 13, 11)), "percentile", percentile=percentile
    )
    assert value == float(np.percentile(x, percentile))


@pytest.mark.parametrize(
    "values",
    [
        [0.0] * 10 + [1.0] + [10.0] * 5,  # the k-th ends its bin: the next is found by one pass
        [0.0] * 10 + [1.0, 1.0] + [10.0] * 6,  # both in one bin
        [1.0] * 3 + [2.0] * 3,  # a bin of ties
        list(np.random.default_rng(3).integers(0, 7, 40) / 3.0),
    ],
)
def test_order_pair_equals_sorting(values):
    from nucflow.filters.thresholds import _order_pair

    x = np.array(values, np.float32).reshape(2, -1)
    ordered = np.sort(x.ravel())
    image = da.from_array(x, chunks=(1, 3))
    for k in range(x.size - 1):
        assert _order_pair(image, k, x.min(), x.max()) == (ordered[k], ordered[k + 1])


def test_threshold_constant_image():
    x = da.full((10, 12), 7, dtype=np.uint8, chunks=5)
    for method in ["otsu", "yen", "triangle", "li"]:
        assert filters.threshold(x, method) == 7.0
    assert filters.threshold(x, "percentile", percentile=30) == 7.0


# --------------------------------------------------------------------------- footprints


def test_ellipsoid_isotropic_is_ball_and_disk():
    np.testing.assert_array_equal(filters.ellipsoid(3, (1, 1, 1)), morph.ball(3))
    np.testing.assert_array_equal(filters.ellipsoid(1.0, (0.25, 0.25)), morph.disk(4))


def test_ellipsoid_anisotropic_shape():
    fp = filters.ellipsoid(1.0, (2.0, 0.3, 0.5))  # radii 0.5, 3.33, 2 voxels
    assert fp.shape == (1, 7, 5)
    assert fp.dtype == np.uint8
    assert fp[0, 3, 0] == 1 and fp[0, 0, 2] == 1 and fp[0, 0, 0] == 0


def test_ellipsoid_sequence_isotropic_matches_skimage():
    x = np.zeros((41, 41, 41), np.uint8)
    x[20, 20, 20] = 1
    ours = morph.dilation(x, filters.ellipsoid(6, (1, 1, 1), decomposition="sequence"))
    theirs = morph.dilation(x, morph.ball(6, decomposition="sequence"))
    np.testing.assert_array_equal(ours, theirs)


def test_ellipsoid_sequence_anisotropic_extent():
    x = np.zeros((41, 61, 61), np.uint8)
    x[20, 30, 30] = 1
    seq = filters.ellipsoid(12.0, (3.0, 1.0, 0.8), decomposition="sequence")
    grown = morph.dilation(x, seq)
    exact = filters.ellipsoid(12.0, (3.0, 1.0, 0.8))
    extent = [int(np.ptp(np.nonzero(grown)[i])) + 1 for i in range(3)]
    assert extent == list(exact.shape)  # same half-extents: 4, 12, 15
    # An outer approximation (documented): skimage's isotropic sequence is already ~1.2x.
    assert 1.0 <= grown.sum() / exact.sum() < 1.8
    assert np.all(grown[20 - 4 : 21 + 4, 30 - 12 : 31 + 12, 30 - 15 : 31 + 15][exact > 0])


# --------------------------------------------------------------------------- property test


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(4, 20), st.integers(4, 20), st.integers(1, 12)),
    chunks=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
    sigma=st.tuples(*[st.floats(0, 3) for _ in range(3)]),
    radius=st.floats(0.5, 3.0),
    seed=st.integers(0, 2**16),
)
def test_property_chain_any_chunking(shape, chunks, sigma, radius, seed):
    x = _noise(shape, np.float32, seed)
    fp = filters.ellipsoid(radius, (1.5, 1.0, 1.0))
    steps = [("gaussian", {"sigma": sigma}), ("black_tophat", {"footprint": fp})]
    with dask.config.set(scheduler="threads"):
        out = filters.chain(da.from_array(x, chunks=chunks), steps).compute()
    np.testing.assert_array_equal(out, morph.black_tophat(ndi.gaussian_filter(x, sigma), fp))


# --------------------------------------------------------------------------- errors


IMG = da.zeros((3, 5), dtype=np.float32, chunks=2)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: filters.gaussian(IMG, -1), ParameterError, r"`sigma` must be finite and >= 0"),
        (lambda: filters.gaussian(IMG, (1, 2, 3)), ParameterError, r"`sigma` .* 2 values"),
        (lambda: filters.gaussian(IMG, 1, mode="wrap"), ParameterError, r"`mode` must be"),
        (lambda: filters.uniform(IMG, 0), ParameterError, r"`size` must be a positive integer"),
        (lambda: filters.median(IMG, 2.5), ParameterError, r"`size` must be a positive integer"),
        (
            lambda: filters.erosion(IMG, morph.ball(1)),
            ShapeError,
            r"`footprint` \(ndim 3\) must have the ndim of `image` \(ndim 2\)",
        ),
        (lambda: filters.dilation(IMG, "disk"), ParameterError, r"`footprint` must be"),
        (
            lambda: filters.normalized_convolution(IMG, da.ones((3, 4), bool), 1),
            ShapeError,
            r"`mask` \(shape \(3, 4\)\) must have the shape of `image` \(shape \(3, 5\)\)",
        ),
        (lambda: filters.remove_small_objects(IMG, 3), DtypeError, r"`mask` must have a bool"),
        (lambda: filters.fill_holes(IMG > 0), None, None),
        (lambda: filters.fill_holes(IMG), DtypeError, r"`mask` must have a bool.*float32"),
        (
            lambda: filters.remove_small_objects(IMG > 0, 3, connectivity=3),
            ParameterError,
            r"`connectivity` must be an integer in 1..2, got 3",
        ),
        (lambda: filters.remove_small_objects(IMG > 0, -1), ParameterError, r"`max_size`"),
        (lambda: filters.threshold(IMG, "magic"), ParameterError, r"`method` must be one of"),
        (
            lambda: filters.threshold(IMG, "percentile", percentile=120),
            ParameterError,
            r"`percentile` must be a number in \[0, 100\], got 120",
        ),
        (lambda: filters.threshold(IMG, "otsu", nbins=3), ParameterError, r"accepts keywords"),
        (
            lambda: filters.gaussian(da.zeros((3, 5), dtype=complex), 1),
            DtypeError,
            r"`image` must have a integer or float dtype, got complex128",
        ),
        (lambda: filters.gaussian(da.zeros(5), 1), ShapeError, r"`image` must be 2D or 3D, got 1D"),
        (lambda: filters.chain(IMG, [("blur", {})]), ParameterError, r"step name must be one of"),
        (lambda: filters.chain(IMG, [("median", {"sigma": 1})]), ParameterError, r"'median'"),
        (
            lambda: filters.subtract_background(IMG, method="rolling", radius=3),
            ParameterError,
            r"`method` must be one of",
        ),
        (
            lambda: filters.subtract_background(IMG, radius=3, voxel_size=(1, 1, 1)),
            ParameterError,
            r"`voxel_size` must have 2 values",
        ),
        (lambda: filters.ellipsoid(0, (1, 1)), ParameterError, r"`radius_um` must be a positive"),
        (lambda: filters.ellipsoid(2, (1,)), ParameterError, r"`voxel_size` must have 2 or 3"),
        (
            lambda: filters.ellipsoid(2, (1, 1), decomposition="crosses"),
            ParameterError,
            r"`decomposition` must be None or 'sequence'",
        ),
    ],
)
def test_errors(call, error, match):
    if error is None:
        call()  # a valid call in the middle of the table, as a control
        return
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("ndim,connectivity", [(2, 1), (2, 2), (3, 1), (3, 2), (3, 3), (1, 1)])
def test_component_labels_are_ndimage_labels(ndim, connectivity):
    """components.label (cc3d in 2D and 3D) numbers components exactly as ndimage.label, for
    any memory layout (cc3d alone numbers Fortran-ordered arrays in their own order, and
    mislabels bool input in 8- and 26-connectivity) and down to one-voxel-thin arrays."""
    rng = np.random.default_rng(ndim + connectivity)
    structure = ndi.generate_binary_structure(ndim, connectivity)
    shapes = {1: [(500,)], 2: [(120, 90), (1, 9), (7, 1)], 3: [(30, 40, 50), (1, 6, 5)]}[ndim]
    for shape in shapes * 20:
        mask = rng.random(shape) < rng.uniform(0.3, 0.6)
        for layout in (mask, np.asfortranarray(mask), mask[..., ::-1]):
            expected, count = ndi.label(layout, structure=structure)
            labels, found = components.label(layout, connectivity)
            assert found == count
            np.testing.assert_array_equal(labels, expected)
