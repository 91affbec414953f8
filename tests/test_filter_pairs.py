"""Every valid chain of two filter steps runs and equals the whole-array calls (issue 27, item 14).

Each ordered pair ``(a, b)`` of the registered steps (:data:`nucflow.filters.STEPS`, read at
collection time, so a new step is paired with every other one automatically) is run the way the
preprocess flow runs ``filter.steps``: :func:`nucflow.filters.chain` on an unevenly chunked dask
array, one overlapped pass with the summed halo, whole-stack values (noise level, colour sigma)
estimated on the step's own input. The result must equal ``reference_b(reference_a(x))``, the
scipy / scikit-image calls (or a direct evaluation) on the whole array, with the whole-stack
values computed from the whole intermediate array. ``STEP_CASES`` holds small valid parameters
and the reference of every step; a registered step without an entry fails the test.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.filters
import skimage.morphology as morph
import skimage.restoration as restoration

from nucflow import filters, io
from nucflow.cli import main

VOXEL = (1.0, 0.5, 0.5)  # µm, for the footprints (z coarser than y and x, as in a real stack)
SHAPE = {3: (12, 40, 40), 2: (40, 40)}
# Uneven chunkings, some smaller than the summed halos (the engine merges those); pair number i
# runs on chunking i % len(...), so every chunking meets every step.
CHUNKS = {3: [(5, 17, 23), (12, 7, 40), (3, 40, 9)], 2: [(17, 23), (7, 40), (40, 9)]}


@dataclass(frozen=True)
class StepCase:
    """Parameters of one step for an ``ndim``-D image, and its whole-array reference."""

    params: Callable[[int], dict[str, Any]]
    reference: Callable[[np.ndarray, dict[str, Any]], np.ndarray]
    exact: bool  # the chunked result equals the reference bit for bit on float32 input


def _axes(values: tuple, ndim: int) -> tuple:
    return values[-ndim:]


def _footprint(radius: float, *, sequence: bool = False) -> Callable[[int], dict[str, Any]]:
    def params(ndim: int) -> dict[str, Any]:
        decomposition = "sequence" if sequence else None
        return {"footprint": filters.ellipsoid(radius, VOXEL[-ndim:], decomposition=decomposition)}

    return params


def _morphology(name: str) -> Callable[[np.ndarray, dict[str, Any]], np.ndarray]:
    return lambda x, p: getattr(morph, name)(x, p["footprint"])


def _extended_opening(x: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """Opening of the image extended by its edge values beyond the halo, then cropped."""
    depth = filters.depth_of("extended_opening", ndim=x.ndim, footprint=p["footprint"])
    opened = morph.opening(np.pad(x, [(d, d) for d in depth], mode="edge"), p["footprint"])
    return opened[tuple(slice(d, d + n) for d, n in zip(depth, x.shape, strict=True))]


def _nl_means(x: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """skimage's non-local means with the noise estimated once on the whole input."""
    sigma = restoration.estimate_sigma(x.astype(np.float64))
    out = restoration.denoise_nl_means(
        x, **p, h=0.8 * sigma, sigma=sigma, fast_mode=True, preserve_range=True
    )
    return out.astype(np.float32)


def _bilateral(x: np.ndarray, p: dict[str, Any], truncate: float = 3.0) -> np.ndarray:
    """Direct float64 evaluation of the bilateral definition (reflect edges), colour sigma the
    whole input's standard deviation."""
    x = x.astype(np.float64)
    sigma_color = x.std()
    sigma = p["sigma_spatial"]
    radius = [int(np.ceil(truncate * s)) for s in sigma]
    padded = np.pad(x, [(r, r) for r in radius], mode="symmetric")  # scipy's "reflect"
    total = np.zeros_like(x)
    weights = np.zeros_like(x)
    for offset in itertools.product(*(range(-r, r + 1) for r in radius)):
        where = tuple(
            slice(r + o, r + o + n) for r, o, n in zip(radius, offset, x.shape, strict=True)
        )
        neighbour = padded[where]
        spatial = np.exp(-0.5 * sum((o / s) ** 2 for o, s in zip(offset, sigma, strict=True)))
        weight = spatial * np.exp(-0.5 * (neighbour - x) ** 2 / sigma_color**2)
        total += weight * neighbour
        weights += weight
    return (total / weights).astype(np.float32)


STEP_CASES: dict[str, StepCase] = {
    "gaussian": StepCase(
        lambda n: {"sigma": _axes((0.6, 1.0, 1.3), n)},
        lambda x, p: ndi.gaussian_filter(x.astype(np.float32), p["sigma"]),
        exact=True,
    ),
    "uniform": StepCase(
        lambda n: {"size": _axes((3, 4, 5), n)},
        lambda x, p: ndi.uniform_filter(x.astype(np.float32), p["size"]),
        exact=False,  # the running sum starts elsewhere in a block: ~1 ulp
    ),
    "median": StepCase(
        lambda n: {"size": _axes((3, 3, 4), n)},
        lambda x, p: ndi.median_filter(x, p["size"]),
        exact=True,
    ),
    "sobel": StepCase(lambda n: {}, lambda x, p: skimage.filters.sobel(x), exact=True),
    "erosion": StepCase(_footprint(1.0), _morphology("erosion"), exact=True),
    "dilation": StepCase(_footprint(1.0, sequence=True), _morphology("dilation"), exact=True),
    "opening": StepCase(_footprint(1.0), _morphology("opening"), exact=True),
    "closing": StepCase(_footprint(1.0, sequence=True), _morphology("closing"), exact=True),
    "white_tophat": StepCase(_footprint(1.0), _morphology("white_tophat"), exact=True),
    "black_tophat": StepCase(_footprint(1.0), _morphology("black_tophat"), exact=True),
    "extended_opening": StepCase(_footprint(1.5, sequence=True), _extended_opening, exact=True),
    # h and sigma left out: estimated on the step's own (filtered) input, as in filter.steps
    "nl_means": StepCase(
        lambda n: {"patch_size": 3, "patch_distance": 2},
        _nl_means,
        exact=False,  # skimage's running integral images round by where the array starts
    ),
    # sigma_color left out: the standard deviation of the step's own input
    "bilateral": StepCase(
        lambda n: {"sigma_spatial": _axes((0.5, 0.6, 0.6), n)},
        _bilateral,
        exact=False,  # float32 kernel against the float64 definition
    ),
}

PAIRS = list(itertools.product(filters.STEPS, repeat=2))
# 2D, the cheap subset: every pair of steps without a whole-stack estimate, and the estimating
# steps (noise level, colour sigma: several reductions each) paired among themselves only.
_ESTIMATING = {name for name, kind in filters.STEPS.items() if kind.resolve is not None}
PAIRS_2D = [(a, b) for a, b in PAIRS if (a in _ESTIMATING) == (b in _ESTIMATING)]
CASES = [(a, b, 3) for a, b in PAIRS] + [(a, b, 2) for a, b in PAIRS_2D]


def _case(name: str) -> StepCase:
    if name not in STEP_CASES:
        pytest.fail(
            f"registered filter step {name!r} has no entry in STEP_CASES of {__name__}: "
            "give it small valid parameters and its whole-array reference"
        )
    return STEP_CASES[name]


def _image(ndim: int) -> np.ndarray:
    """Bright and dark boxes plus noise (sd 20) and a zero corner, float32."""
    shape = SHAPE[ndim]
    rng = np.random.default_rng(27)
    grid = np.indices(shape).sum(axis=0)
    image = 100.0 + 200.0 * (grid % 16 > 8) + rng.normal(0, 20, shape)
    image[(slice(0, 4),) * ndim] = 0
    return np.clip(image, 0, None).astype(np.float32)


def _assert_chain_equal(actual: np.ndarray, expected: np.ndarray, exact: bool) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    if exact:
        np.testing.assert_array_equal(actual, expected)
        return
    # float32 rounding (~1e-6 relative) carried through the second step: values ~ 0..400, and
    # a difference step (sobel, a top-hat) keeps the absolute error of its input near zero.
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="sync"):
        yield


# Whole-array results of every single step, per ndim: each is the input of 13 pairs.
_FIRST: dict[tuple[int, str], np.ndarray] = {}


def _first(ndim: int, name: str) -> np.ndarray:
    if (ndim, name) not in _FIRST:
        case = _case(name)
        _FIRST[ndim, name] = case.reference(_image(ndim), case.params(ndim))
    return _FIRST[ndim, name]


def test_every_registered_step_has_a_case():
    missing = sorted(set(filters.STEPS) - set(STEP_CASES))
    assert not missing, f"add these registered steps to STEP_CASES: {missing}"
    assert len(PAIRS) == len(filters.STEPS) ** 2


@pytest.mark.parametrize(("a", "b", "ndim"), CASES, ids=[f"{n}d-{a}-then-{b}" for a, b, n in CASES])
def test_pair_equals_the_whole_array_calls(a, b, ndim):
    case_a, case_b = _case(a), _case(b)
    x = _image(ndim)
    chunks = CHUNKS[ndim][PAIRS.index((a, b)) % len(CHUNKS[ndim])]
    steps = [(a, case_a.params(ndim)), (b, case_b.params(ndim))]
    out = filters.chain(da.from_array(x, chunks=chunks), steps)
    expected = case_b.reference(_first(ndim, a), case_b.params(ndim))
    assert out.dtype == expected.dtype  # the declared dtype is the blocks' dtype
    _assert_chain_equal(out.compute(), expected, case_a.exact and case_b.exact)


def test_nl_means_keeps_axes_of_length_one():
    """skimage squeezes axes of length 1 out of its result; the step keeps the block's shape
    (the engine's 1-voxel dtype trial crashed the step after it: issue 27, item 14)."""
    x = _image(3)[:1]
    params = {"patch_size": 3, "patch_distance": 2, "h": 15.0, "sigma": 18.0}
    out = filters.nl_means(da.from_array(x, chunks=(1, 17, 23)), **params).compute()
    assert out.shape == x.shape
    expected = restoration.denoise_nl_means(x, **params, preserve_range=True)
    np.testing.assert_allclose(out[0], expected, rtol=1e-6, atol=0)
    one_voxel = filters.STEPS["nl_means"].block(
        np.zeros((1, 1, 1), np.float32), **params, fast_mode=True
    )
    assert one_voxel.shape == (1, 1, 1)


def test_preprocess_flow_runs_nl_means_then_bilateral(tmp_path):
    """The chain of the issue, through ``nucflow run --flow preprocess``: exit 0 and the
    written stack equals the whole-array non-local means then bilateral filter."""
    x = _image(3)
    source, out = tmp_path / "in.ome.zarr", tmp_path / "out"
    io.write_ome_zarr(source, x, VOXEL)
    steps = (
        "filter.steps=[{nl_means: {patch_size: 5, patch_distance: 6}},"
        " {bilateral: {sigma_spatial: 0.5}}]"
    )
    argv = ["run", "--flow", "preprocess", "--input", str(source), "--output", str(out)]
    assert main([*argv, "--chunks", "5", "17", "23", "--set", steps]) == 0
    result = io.open_stack(out / "filtered.ome.zarr").data.compute()
    smooth = _nl_means(x, {"patch_size": 5, "patch_distance": 6})
    sigma_voxels = tuple(0.5 / v for v in VOXEL)  # sigma_spatial is µm in filter.steps
    expected = _bilateral(smooth, {"sigma_spatial": sigma_voxels})
    _assert_chain_equal(result, expected, exact=False)
