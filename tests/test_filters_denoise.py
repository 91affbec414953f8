"""nucflow.filters denoisers: non-local means and the bilateral filter equal their whole-array
computations on every chunking, with the noise level estimated once for the whole stack."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import pywt
import scipy.ndimage as ndi
import skimage.restoration as restoration

from nucflow import filters
from nucflow.errors import ParameterError
from nucflow.filters import denoise

# Uneven chunkings, some smaller than the halo (merged by the engine).
CASES = [
    ((41, 37), (13, 11)),
    ((41, 37), (5, 37)),
    ((41, 37), (3, 4)),
    ((19, 33, 29), (7, 13, 11)),
    ((19, 33, 29), (19, 5, 29)),
]
IDS = [f"{len(s)}d-{'x'.join(map(str, c))}" for s, c in CASES]


def _assert_nl_means_equal(actual, expected):
    """Equal up to float32 rounding: skimage's fast mode sums squared differences in running
    integral images, whose rounding depends on where the array starts (1 voxel in ~65,000
    differs by 1 ulp in the flow test; most inputs are bit-identical)."""
    np.testing.assert_allclose(actual, expected.astype(np.float32), rtol=1e-6, atol=0)


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="sync"):
        yield


def _noisy(shape, seed=0):
    """Bright and dark boxes plus Gaussian noise (sd 20), with a zero (saturated-dark) corner
    so that the noise estimate has to skip exactly-zero wavelet coefficients."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).sum(axis=0)
    image = 100.0 + 200.0 * (grid % 32 > 16) + rng.normal(0, 20, shape)
    image[(slice(0, 6),) * len(shape)] = 0
    return np.clip(image, 0, None).astype(np.float32)


def test_db2_filter_is_pywavelets():
    assert denoise._DB2_HIGH == tuple(pywt.Wavelet("db2").dec_hi)


@pytest.mark.parametrize(("shape", "chunks"), CASES, ids=IDS)
def test_noise_sigma_equals_whole_array_estimate(shape, chunks):
    x = _noisy(shape)
    sigma = filters.noise_sigma(da.from_array(x, chunks=chunks))
    assert sigma == restoration.estimate_sigma(x.astype(np.float64))
    assert 15 < sigma < 25  # the noise put in: sd 20


def test_noise_sigma_of_integer_and_constant_images():
    x = np.random.default_rng(1).integers(0, 4000, (40, 50)).astype(np.uint16)
    assert filters.noise_sigma(da.from_array(x, chunks=(9, 14))) == restoration.estimate_sigma(
        x.astype(np.float64)
    )
    constant = filters.noise_sigma(da.full((20, 30), 7, chunks=8))
    assert constant == restoration.estimate_sigma(np.full((20, 30), 7.0)) < 1e-30  # rounding
    assert filters.noise_sigma(da.zeros((20, 30), chunks=8)) == 0.0  # no non-zero coefficient


@pytest.mark.parametrize(("shape", "chunks"), CASES, ids=IDS)
def test_nl_means_exact(shape, chunks):
    x = _noisy(shape)
    kwargs = {"patch_size": 3, "patch_distance": 3, "h": 15.0, "sigma": 18.0}
    out = filters.nl_means(da.from_array(x, chunks=chunks), **kwargs)
    assert out.dtype == np.float32
    expected = restoration.denoise_nl_means(x, **kwargs, preserve_range=True)
    _assert_nl_means_equal(out.compute(), expected)


def test_nl_means_integer_image_keeps_its_intensity_units():
    """uint16 in: h and sigma in raw counts (preserve_range), float32 out."""
    x = (_noisy((41, 37)) * 10).astype(np.uint16)
    kwargs = {"patch_size": 3, "patch_distance": 3, "h": 150.0, "sigma": 180.0}
    out = filters.nl_means(da.from_array(x, chunks=(9, 16)), **kwargs)
    expected = restoration.denoise_nl_means(x, **kwargs, preserve_range=True)
    assert expected.max() > 1000  # not rescaled to [0, 1]
    _assert_nl_means_equal(out.compute(), expected)


def test_nl_means_slow_mode_and_even_patch_2d():
    x = _noisy((41, 37))
    kwargs = {"patch_size": 4, "patch_distance": 2, "h": 20.0, "sigma": 0.0, "fast_mode": False}
    out = filters.nl_means(da.from_array(x, chunks=(6, 10)), **kwargs)
    expected = restoration.denoise_nl_means(x, **kwargs, preserve_range=True)
    _assert_nl_means_equal(out.compute(), expected)


@pytest.mark.parametrize(("shape", "chunks"), [CASES[0], CASES[3]], ids=[IDS[0], IDS[3]])
def test_nl_means_estimates_sigma_once_for_the_whole_stack(shape, chunks):
    """Default sigma: the whole-array estimate (not a per-block one); h = 0.8 sigma."""
    x = _noisy(shape)
    out = filters.nl_means(da.from_array(x, chunks=chunks), patch_size=3, patch_distance=2)
    sigma = restoration.estimate_sigma(x.astype(np.float64))
    expected = restoration.denoise_nl_means(
        x, patch_size=3, patch_distance=2, h=0.8 * sigma, sigma=sigma, preserve_range=True
    )
    _assert_nl_means_equal(out.compute(), expected)


def test_nl_means_in_a_chain_estimates_on_its_own_input():
    """After a Gaussian, the noise is estimated on the smoothed image, still in one pass."""
    x = _noisy((41, 37))
    steps = [("gaussian", {"sigma": 0.7}), ("nl_means", {"patch_size": 3, "patch_distance": 2})]
    out = filters.chain(da.from_array(x, chunks=(13, 11)), steps)
    smooth = ndi.gaussian_filter(x, 0.7)
    sigma = restoration.estimate_sigma(smooth.astype(np.float64))
    expected = restoration.denoise_nl_means(
        smooth, patch_size=3, patch_distance=2, h=0.8 * sigma, sigma=sigma, preserve_range=True
    )
    _assert_nl_means_equal(out.compute(), expected)


def _bilateral_reference(x, sigma_spatial, sigma_color, truncate=3.0):
    """Direct evaluation, one window at a time (scipy's generic_filter, mode reflect)."""
    radius = [int(np.ceil(truncate * s)) for s in sigma_spatial]
    offsets = np.stack(
        np.meshgrid(*(np.arange(-r, r + 1) for r in radius), indexing="ij"), -1
    ).reshape(-1, len(radius))
    spatial = np.exp(-0.5 * (((offsets / np.asarray(sigma_spatial)) ** 2).sum(axis=1)))
    centre = len(spatial) // 2

    def window(values):
        weight = spatial * np.exp(-0.5 * (values - values[centre]) ** 2 / sigma_color**2)
        return (weight * values).sum() / weight.sum()

    size = tuple(2 * r + 1 for r in radius)
    return ndi.generic_filter(x.astype(np.float64), window, size=size, mode="reflect")


@pytest.mark.parametrize(
    ("shape", "chunks", "sigma_spatial"),
    [
        ((41, 37), (13, 11), (1.0, 1.0)),
        ((41, 37), (3, 4), (0.6, 1.4)),
        ((12, 21, 17), (5, 8, 6), (0.5, 1.0, 1.0)),
        ((12, 21, 17), (12, 4, 17), (0.5, 1.0, 1.0)),
    ],
)
def test_bilateral_equals_direct_evaluation(shape, chunks, sigma_spatial):
    x = _noisy(shape)
    out = filters.bilateral(
        da.from_array(x, chunks=chunks), sigma_spatial=sigma_spatial, sigma_color=40.0
    ).compute()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _bilateral_reference(x, sigma_spatial, 40.0), rtol=2e-6)
    one_block = filters.bilateral(da.from_array(x), sigma_spatial=sigma_spatial, sigma_color=40.0)
    np.testing.assert_array_equal(out, one_block.compute())  # chunking changes no bit


def test_bilateral_default_sigma_color_is_the_whole_stack_std():
    x = _noisy((41, 37))
    out = filters.bilateral(da.from_array(x, chunks=(13, 11)), sigma_spatial=1.0)
    std = float(x.astype(np.float64).std())
    expected = denoise._block_bilateral(
        x, sigma_spatial=(1.0, 1.0), sigma_color=std, truncate=3.0, mode="reflect"
    )
    np.testing.assert_allclose(out.compute(), expected, rtol=1e-6)
    resolved = denoise._resolve_bilateral(da.from_array(x, chunks=(13, 11)), {"sigma_color": None})
    assert resolved["sigma_color"] == pytest.approx(std, rel=1e-12)


def test_depths_derive_from_the_parameters():
    assert filters.depth_of("nl_means", patch_size=5, patch_distance=6, ndim=2) == (8, 8)
    assert filters.depth_of("nl_means", patch_size=4, patch_distance=2) == (4, 4, 4)
    assert filters.depth_of("bilateral", sigma_spatial=(0.5, 1.0, 2.0)) == (2, 3, 6)


def test_stored_source_needs_the_whole_stack_values():
    x = _noisy((41, 37))
    with pytest.raises(
        ParameterError,
        match=r"^step 'nl_means' on a stored source needs \['h', 'sigma'\] given: a block cannot "
        r"estimate whole-stack values \(chain\(\) on a dask array estimates them\)$",
    ):
        filters.chain_read(x, [("nl_means", {})], chunks=(13, 11))
    given = [("nl_means", {"patch_size": 3, "patch_distance": 2, "h": 15.0, "sigma": 18.0})]
    _assert_nl_means_equal(
        filters.chain_read(x, given, chunks=(13, 11)).compute(),
        filters.chain(da.from_array(x), given).compute(),
    )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: filters.nl_means(x, patch_size=0), r"`patch_size` must be an integer >= 1"),
        (lambda x: filters.nl_means(x, patch_distance=2.5), r"`patch_distance` must be an int"),
        (lambda x: filters.nl_means(x, h=-1.0), r"`h` must be a positive number, got -1.0"),
        (lambda x: filters.nl_means(x, sigma=0.0), r"`h` must be given: the image has no"),
        (lambda x: filters.bilateral(x, mode="wrap"), r"`mode` must be one of \('reflect',"),
        (lambda x: filters.bilateral(x, sigma_color=0), r"`sigma_color` must be a positive"),
        (lambda x: filters.bilateral(x, sigma_spatial=(1, 1, 1)), r"`sigma_spatial` must be a"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ParameterError, match=match):
        call(da.zeros((8, 9), chunks=4))


def test_in_voxels_translates_lengths_only():
    voxel = (2.0, 0.5, 0.5)
    assert filters.in_voxels("bilateral", {"sigma_spatial": 1.0, "sigma_color": 9}, voxel) == {
        "sigma_spatial": (0.5, 2.0, 2.0),
        "sigma_color": 9,
    }
    nlm = {"patch_size": 5, "patch_distance": 6, "h": 3.0, "sigma": 4.0}
    assert filters.in_voxels("nl_means", nlm, voxel) == nlm  # counts and intensities as is
    assert filters.in_voxels("gaussian", {"sigma": [1.0, 0.5, 0.5]}, voxel) == {
        "sigma": (0.5, 1.0, 1.0)
    }


def test_every_offset_is_weighted_once():
    """The window loop visits each offset of the box exactly once (a flat image stays flat
    and a single bright voxel spreads as the spatial Gaussian times the colour weight)."""
    x = np.zeros((9, 9), np.float32)
    x[4, 4] = 1.0
    out = denoise._block_bilateral(
        x, sigma_spatial=(1.0, 1.0), sigma_color=1e6, truncate=1.0, mode="constant"
    )
    kernel = np.exp(-0.5 * np.array([[2, 1, 2], [1, 0, 1], [2, 1, 2]], float))
    np.testing.assert_allclose(out[3:6, 3:6], kernel / kernel.sum(), rtol=1e-6)
