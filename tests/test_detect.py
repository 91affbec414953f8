"""Local detection: its rules against whole-array references, seam-free on realistic stacks,
and accurate where a global threshold is not (dim, deep and unevenly lit nuclei)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr
from scipy import ndimage

from nucflow import detect, io, synth
from nucflow.cli import main
from nucflow.detect import (
    DetectParams,
    blob_response,
    foreground,
    least_gain,
    noise_gain,
    noise_level,
)
from nucflow.evaluate import accuracy_report

VOXEL_3D = (2.0, 0.5, 0.5)  # light-sheet-like: z four times coarser than y and x


def _params(voxel=VOXEL_3D, noise=1.0, **given) -> DetectParams:
    values = {"blob_radius": 2.4, "peak_radius": 2.0, "max_radius": 8.0, "snr": 4.0}
    values.update(given)
    return DetectParams(voxel_size=voxel, fraction=0.5, noise=noise, **values)


def test_blob_response_is_the_scale_normalized_laplacian_of_gaussian():
    """-s^2 times the central-difference Laplacian of scipy's Gaussian (µm units), within 3 %
    of the response's range of scipy's exact gaussian_laplace on isotropic voxels."""
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.normal(size=(30, 40, 50)), 1.0).astype(np.float32)
    params = _params(voxel=(1.0, 0.5, 0.5))
    smooth = np.pad(ndimage.gaussian_filter(image, params.scale), 1, mode="symmetric")
    inner = (slice(1, -1),) * 3
    laplacian = sum(
        (np.roll(smooth, 1, axis) - 2 * smooth + np.roll(smooth, -1, axis))[inner] / v**2
        for axis, v in enumerate(params.voxel_size)
    )
    s_um2 = params.blob_radius**2 / 3
    response = blob_response(image, params)
    np.testing.assert_allclose(response, -s_um2 * laplacian, rtol=1e-4, atol=1e-5)

    iso = _params(voxel=(0.5, 0.5, 0.5))
    exact = -(iso.scale[0] ** 2) * ndimage.gaussian_laplace(image, iso.scale[0])
    found = blob_response(image, iso)
    assert np.abs(found - exact).max() <= 0.03 * np.ptp(exact)


@pytest.mark.parametrize("shape", [(30, 40, 50), (40, 50)])
def test_blob_gaussian_is_scipys_gaussian_exactly(shape):
    """The blob response's Gaussian (filtered with the slowest axis moved last, cut to a
    region axis by axis) equals scipy's gaussian_filter of the whole float32 image there."""
    image = np.random.default_rng(5).normal(100, 10, size=shape).astype(np.float32)
    sigma = (2.3, 4.6, 4.6)[-len(shape) :]
    keep = tuple(slice(3, n - 4) for n in shape)
    expected = ndimage.gaussian_filter(image, sigma, mode="reflect", truncate=detect._TRUNCATE)
    np.testing.assert_array_equal(detect._gaussian_within(image, sigma, keep), expected[keep])


@pytest.mark.parametrize(
    "region",
    [
        (slice(5, 25), slice(10, 30), slice(0, 50)),  # touches the x faces
        (slice(0, 30), slice(0, 1), slice(49, 50)),  # one voxel at two faces
        (slice(7, 9), slice(12, 33), slice(20, 31)),
    ],
)
def test_blob_response_of_a_region_is_the_whole_response_there(region):
    """The cropped Gaussian passes and differences give exactly the whole response's voxels."""
    rng = np.random.default_rng(3)
    image = rng.normal(100, 10, size=(30, 40, 50)).astype(np.float32)
    params = _params(voxel=(1.0, 0.5, 0.5))
    whole = blob_response(image, params)
    np.testing.assert_array_equal(blob_response(image, params, region), whole[region])


def test_noise_level_is_the_background_spread_whatever_the_nuclei():
    """Gaussian background noise of sd 3 under 30 % bright nuclei: the estimate is within 5 %."""
    rng = np.random.default_rng(1)
    values = rng.normal(100, 3, 1_000_000)
    values[:300_000] += rng.uniform(20, 400, 300_000)
    counts, edges = np.histogram(values, bins=1 << 16, range=(values.min(), values.max()))
    assert noise_level(counts, edges) == pytest.approx(3.0, rel=0.05)


def test_noise_gain_is_the_measured_noise_of_the_response_near_faces():
    """White noise, smoothed as preprocessing does, then the blob response: its standard
    deviation on the faces and next to them, relative to the interior, is what noise_gain says
    (within 3 %; 30 stacks give ~120,000 voxels per position)."""
    shape, smoothing = (30, 96, 96), (0.5, 1.0, 1.0)
    params = _params(voxel=(1.0, 0.5, 0.5), stack_shape=shape, smoothing=smoothing)
    rng = np.random.default_rng(3)
    responses = np.stack(
        [
            blob_response(ndimage.gaussian_filter(rng.normal(size=shape), smoothing), params)
            for _ in range(30)
        ]
    )
    inner = slice(16, -16)  # far from the faces of the other axes
    deep = np.std(responses[:, 10:20, inner, inner])
    for axis, position in [(0, 0), (0, 1), (0, 2), (0, 29), (1, 0), (1, 1), (1, 95)]:
        where = [slice(None), slice(10, 20), inner, inner]
        where[1 + axis] = slice(position, position + 1)
        measured = np.std(responses[tuple(where)]) / deep
        at = np.array([[15, 48, 48]])
        at[0, axis] = position
        assert noise_gain(params, at)[0] == pytest.approx(measured, rel=0.03), (axis, position)
    assert noise_gain(params, np.array([[0, 48, 48]]))[0] > 1.2  # the face itself is noisier
    assert noise_gain(params, np.array([[15, 48, 48]]))[0] == 1.0


@pytest.mark.parametrize(
    ("shape", "voxel", "smoothing"),
    [
        ((30, 96, 96), (1.0, 0.5, 0.5), (0.5, 1.0, 1.0)),
        ((7, 50, 44), (2.0, 0.5, 0.5), ()),
        ((60, 50), (0.5, 0.5), ()),
    ],
)
def test_least_gain_is_the_smallest_noise_gain_of_every_stack_position(shape, voxel, smoothing):
    """The seeds' candidate test uses it in place of the gain at each voxel: it must never
    exceed the gain anywhere (else a seed would be lost), and is attained somewhere."""
    params = _params(voxel=voxel, stack_shape=shape, smoothing=smoothing)
    everywhere = np.argwhere(np.ones(shape, bool))
    assert least_gain(params) == noise_gain(params, everywhere).min()


@pytest.mark.parametrize("faces", ["noise gain at faces", "no stack shape"])
def test_a_block_with_its_halo_gives_the_whole_stack_foreground(faces):
    made = synth.make_nuclei(
        (24, 96, 96), n_nuclei=40, voxel_size=VOXEL_3D, conditions=synth.LIGHTSHEET, seed=2
    )
    image = ndimage.gaussian_filter(made.image.astype(np.float32), (0.3, 1.2, 1.2)) - 100
    noise = float(np.std(image[made.truth == 0]))
    if faces == "no stack shape":
        params = _params(noise=noise)
    else:
        params = _params(noise=noise, stack_shape=image.shape, smoothing=(0.3, 1.2, 1.2))
    whole = foreground(image, params, tuple(slice(0, n) for n in image.shape), origin=(0, 0, 0))
    assert whole.any() and not whole.all()
    halo = params.halo()
    for core in [
        (slice(5, 13), slice(30, 61), slice(0, 40)),
        (slice(0, 24), slice(70, 96), slice(50, 90)),
    ]:
        read = tuple(
            slice(max(0, c.start - h), min(n, c.stop + h))
            for c, h, n in zip(core, halo, image.shape, strict=True)
        )
        inner = tuple(
            slice(c.start - r.start, c.stop - r.start) for c, r in zip(core, read, strict=True)
        )
        found = foreground(image[read], params, inner, origin=tuple(r.start for r in read))
        np.testing.assert_array_equal(found, whole[core])


@pytest.fixture(scope="module")
def lightsheet3d(tmp_path_factory):
    """The hard case: 5x brightness spread, 3x attenuation, uneven light, irregular nuclei."""
    made = synth.make_nuclei(
        (32, 160, 160),
        n_nuclei=110,
        voxel_size=VOXEL_3D,
        cluster_fraction=0.5,
        conditions=synth.LIGHTSHEET,
        seed=7,
    )
    path = tmp_path_factory.mktemp("data") / "lightsheet3d.ome.zarr"
    io.write_ome_zarr(path, made.image, made.voxel_size, labels={"truth": made.truth})
    return path, made


def _run(source, out, *extra) -> tuple[pd.DataFrame, np.ndarray]:
    assert main(["run", "--input", str(source), "--output", str(out), *extra]) == 0
    labels = np.asarray(zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r"))
    return pd.read_parquet(out / "nuclei.parquet"), labels


@pytest.mark.slow
def test_realistic_stack_is_seam_free_on_any_chunking(lightsheet3d, tmp_path):
    """Dim seeds, claims across block borders, attenuation: labels and table as one block."""
    source, made = lightsheet3d
    table, labels = _run(source, tmp_path / "one", "--chunks", *map(str, made.image.shape))
    for chunks in (("9", "37", "50"), ("32", "23", "160")):
        split_table, split_labels = _run(source, tmp_path / "_".join(chunks), "--chunks", *chunks)
        np.testing.assert_array_equal(split_labels, labels)
        pd.testing.assert_frame_equal(split_table, table, check_exact=False, rtol=1e-12)


def test_local_detection_finds_the_dim_and_deep_nuclei_a_global_threshold_loses(
    lightsheet3d, tmp_path
):
    source, made = lightsheet3d
    _, local = _run(source, tmp_path / "local", "--chunks", "16", "80", "80")
    _, otsu = _run(source, tmp_path / "otsu", "--set", "threshold.method=otsu")
    ours = accuracy_report(local, made.truth, made.brightness)
    theirs = accuracy_report(otsu, made.truth, made.brightness)
    assert ours["f1_iou50"] >= 0.9, ours
    assert ours["recall_by_brightness"][0] >= 0.8, ours
    assert ours["recall_by_depth"][2] >= 0.85, ours  # the deepest third, 3x attenuated
    assert min(ours["recall_by_depth"]) >= 0.8, ours
    # the global threshold loses most of the dim third: the difference is the point
    assert theirs["recall_by_brightness"][0] <= ours["recall_by_brightness"][0] - 0.3, theirs


def test_local_detection_in_2d(tmp_path):
    made = synth.make_nuclei(
        (320, 320), n_nuclei=110, cluster_fraction=0.5, conditions=synth.LIGHTSHEET, seed=3
    )
    source = tmp_path / "lightsheet2d.ome.zarr"
    io.write_ome_zarr(source, made.image, made.voxel_size, labels={"truth": made.truth})
    _, labels = _run(source, tmp_path / "out", "--chunks", "100", "130")
    report = accuracy_report(labels, made.truth, made.brightness)
    assert report["f1_iou50"] >= 0.85, report
    assert report["recall_by_brightness"][0] >= 0.75, report


def test_tune_runs_the_flow_on_a_region_as_if_it_were_the_stack(lightsheet3d, tmp_path, capsys):
    """`nucflow tune --region` = `nucflow run` on that region saved alone, plus its pictures."""
    source, made = lightsheet3d
    box = (slice(8, 32), slice(20, 120), slice(40, 160))
    alone = tmp_path / "region.ome.zarr"
    io.write_ome_zarr(alone, made.image[box], made.voxel_size)
    expected, expected_labels = _run(alone, tmp_path / "alone")
    region = [f"{s.start}:{s.stop}" for s in box]
    out = tmp_path / "tune"
    capsys.readouterr()
    assert main(["tune", "--input", str(source), "--output", str(out), "--region", *region]) == 0
    said = capsys.readouterr().out
    table = pd.read_parquet(out / "nuclei.parquet")
    labels = np.asarray(zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r"))
    pd.testing.assert_frame_equal(table, expected)
    np.testing.assert_array_equal(labels, expected_labels)
    assert said.startswith(f"nucflow tune: region {' '.join(region)}: {len(table)} nuclei")
    for picture in ("outlines.png", "depth.png", "distributions.png"):
        assert (out / "qc" / picture).stat().st_size > 1000
