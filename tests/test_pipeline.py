"""The nuclei flow end to end: seam-free across chunkings, accurate, complete outputs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from scipy import ndimage

from nucflow import io
from nucflow.cli import main
from nucflow.evaluate import match_instances
from nucflow.measure import table_columns
from nucflow.objects import default_columns


def run_flow(source, out, *extra: str) -> tuple[pd.DataFrame, np.ndarray]:
    assert main(["run", "--input", str(source), "--output", str(out), *extra]) == 0
    table = pd.read_parquet(out / "nuclei.parquet")
    labels = np.asarray(zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r"))
    return table, labels


@pytest.fixture(scope="module")
def one_block(stack3d, tmp_path_factory):
    source, made = stack3d
    out = tmp_path_factory.mktemp("runs") / "one-block"
    return run_flow(source, out, "--chunks", *map(str, made.image.shape))


def _corner_chunks(made) -> list[str]:
    """Chunks whose first block corner sits inside a nucleus (at its rounded centroid)."""
    centre = ndimage.center_of_mass(made.truth > 0, made.truth, 10)
    return [str(max(1, round(c))) for c in centre]


@pytest.mark.parametrize(
    "chunks", [["13", "37", "41"], ["40", "50", "29"], ["7", "128", "23"], "corner"]
)
def test_any_chunking_gives_the_one_block_result(stack3d, one_block, tmp_path, chunks):
    source, made = stack3d
    chunks = _corner_chunks(made) if chunks == "corner" else chunks
    table, labels = run_flow(source, tmp_path / "out", "--chunks", *chunks)
    expected_table, expected_labels = one_block
    np.testing.assert_array_equal(labels, expected_labels)  # same ids: no relabeling needed
    pd.testing.assert_frame_equal(table, expected_table, check_exact=False, rtol=1e-12)


def test_full_resolution_background_is_seam_free_too(stack3d, tmp_path):
    """With ``background_downsample=1`` the exact top-hat runs inside the one overlap pass."""
    source, made = stack3d
    exact = ["--set", "preprocess.background_downsample=1"]
    whole = run_flow(source, tmp_path / "whole", "--chunks", *map(str, made.image.shape), *exact)
    split = run_flow(source, tmp_path / "split", "--chunks", "13", "37", "41", *exact)
    np.testing.assert_array_equal(split[1], whole[1])
    pd.testing.assert_frame_equal(split[0], whole[0], check_exact=False, rtol=1e-12)
    record = json.loads((tmp_path / "split" / "run.json").read_text())
    assert record["derived"]["background_downsample"] == [1, 1, 1]


def _stages_on(source, out, chunks, *overrides):
    """Preprocess and mask stages of a run on ``chunks``, on threads; the stored stacks."""
    from nucflow import cluster, config, pipeline

    conf = config.load(None, options={"chunks": list(chunks)}, overrides=list(overrides))
    stack = io.open_stack(source)
    params = config.resolve(conf, shape=stack.data.shape, voxel_size=stack.voxel_size)
    with cluster.connect("threads", progress=False) as runner:
        run = pipeline.open_run(stack, params, out, runner=runner, config=conf)
        image = pipeline.preprocess(run)
        mask = pipeline.clean_mask(run, pipeline.foreground(run, image))
        return params, np.asarray(image), run.facts, np.asarray(mask)


def _whole_array_steps(image, params, background, threshold):
    """The stored passes' whole-array counterparts: preprocessed image, opened, filled and
    cleaned masks."""
    import math

    import dask.array as da
    import skimage.morphology as morph

    from nucflow import filters

    whole = da.from_array(image, chunks=image.shape)
    sigma = tuple(params.preprocess.sigma / v for v in params.voxel_size)
    expected = filters.subtract_background(
        filters.gaussian(whole, sigma),
        method=background,
        radius=params.preprocess.background_radius,
        voxel_size=params.voxel_size,
        downsample=params.preprocess.background_downsample,
    ).compute()
    opened = expected > threshold
    if params.mask.opening_radius > 0:
        opened = morph.opening(
            opened, filters.ellipsoid(params.mask.opening_radius, params.voxel_size)
        )
    min_voxels = int(params.mask.min_volume / math.prod(params.voxel_size))
    filled = ndimage.binary_fill_holes(opened)
    return expected, opened, filled, morph.remove_small_objects(filled, max_size=min_voxels)


@pytest.mark.parametrize("background", ["tophat", "median", "gaussian"])
def test_stored_passes_equal_the_whole_array_steps(stack3d, tmp_path, background):
    """Each stage's passes read blocks and halos from the stage before: the stored stacks equal
    the whole-array scipy/scikit-image steps (the reduced-resolution background as
    ``filters.subtract_background`` on one block, itself tested against scipy)."""
    import dask.array as da

    from nucflow import filters

    source, made = stack3d
    setting = f"preprocess.background={background}"
    params, image, facts, mask = _stages_on(
        source, tmp_path / "a", (13, 37, 41), setting, "threshold.method=otsu"
    )
    threshold = facts["threshold"]
    expected, opened, filled, clean = _whole_array_steps(made.image, params, background, threshold)
    np.testing.assert_array_equal(image, expected)
    assert threshold == pytest.approx(float(filters.threshold(da.from_array(expected))))
    np.testing.assert_array_equal(mask, clean)
    # a selection that changes nothing stores nothing (its result is its source)
    work = tmp_path / "a" / ".work"
    for name, before, after in (("filled", opened, filled), ("mask", filled, clean)):
        unchanged = np.array_equal(before, after)
        assert (work / f"{name}.same").exists() == unchanged, name
        assert (work / f"{name}.zarr").exists() == (not unchanged), name


def test_component_selections_that_change_a_few_blocks_equal_the_whole_array(stack3d, tmp_path):
    """A hollow nucleus (a hole to fill) and specks (objects too small) in a few of 64 blocks:
    both selections store their result, the other blocks are kept as they are, and the mask
    equals the whole-array steps."""
    _, made = stack3d
    image = made.image.copy()
    bright = image.max()
    z, y, x = np.ogrid[tuple(slice(0, n) for n in image.shape)]
    vz, vy, vx = made.voxel_size
    radius = np.sqrt(((z - 20) * vz) ** 2 + ((y - 64) * vy) ** 2 + ((x - 20) * vx) ** 2)
    image[radius <= 6.0] = bright  # a shell 2 µm thick around a dark core
    image[radius <= 4.0] = 0
    for speck in ((5, 100, 100), (30, 20, 110)):  # 2 x 2 x 2 voxels
        image[tuple(slice(c, c + 2) for c in speck)] = bright
    source = tmp_path / "holes.ome.zarr"
    io.write_ome_zarr(source, image, made.voxel_size)
    settings = ("threshold.method=otsu", "mask.opening_radius=0")
    params, _, facts, mask = _stages_on(source, tmp_path / "a", (13, 37, 41), *settings)
    _, opened, filled, clean = _whole_array_steps(image, params, "tophat", facts["threshold"])
    assert not np.array_equal(opened, filled) and not np.array_equal(filled, clean)
    np.testing.assert_array_equal(mask, clean)
    work = tmp_path / "a" / ".work"
    for name in ("filled", "mask"):
        assert (work / f"{name}.zarr").exists() and not (work / f"{name}.same").exists()


def test_component_selections_that_keep_everything_store_nothing(stack3d, tmp_path):
    """With the local detection no hole is left to fill and no object is too small: each
    selection keeps every component, so its result is its source (marked ``.same``), and the
    pass that would copy it is skipped."""
    import math

    source, made = stack3d
    out = tmp_path / "a"
    params, _, _, mask = _stages_on(source, out, (13, 37, 41))
    work = out / ".work"
    opened = np.asarray(zarr.open_array(str(work / "opened.zarr"), mode="r"))
    np.testing.assert_array_equal(mask, opened)
    np.testing.assert_array_equal(ndimage.binary_fill_holes(opened), opened)
    components, count = ndimage.label(opened)
    smallest = np.bincount(components.ravel())[1:].min()
    assert count and smallest > int(params.mask.min_volume / math.prod(params.voxel_size))
    for name in ("filled", "mask"):
        assert (work / f"{name}.same").exists() and (work / f"{name}.done").exists()
        assert not (work / f"{name}.zarr").exists()


def test_accuracy_3d(stack3d, one_block):
    _, made = stack3d
    table, labels = one_block
    score = match_instances(labels, made.truth)
    assert score["f1"] >= 0.95, score
    assert len(table) == len(np.unique(labels)) - 1


@pytest.mark.parametrize(("method", "lowest_f1"), [("local", 0.93), ("otsu", 0.95)])
def test_accuracy_2d(stack2d, tmp_path, method, lowest_f1):
    """Even, bright nuclei: either detection. (Local merges two touching pairs more.)"""
    source, made = stack2d
    setting = f"threshold.method={method}"
    table, labels = run_flow(source, tmp_path / "out2d", "--chunks", "70", "90", "--set", setting)
    score = match_instances(labels, made.truth)
    assert score["f1"] >= lowest_f1, score
    assert list(table.columns) == table_columns(2) + default_columns(2)


def test_outputs_agree_with_the_label_image(stack3d, one_block, tmp_path):
    source, made = stack3d
    table, labels = one_block
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    np.testing.assert_array_equal(table["label"].to_numpy(), values)  # one row per label
    np.testing.assert_array_equal(table["n_voxels"].to_numpy(), counts)
    means = ndimage.mean(made.image, labels, values)
    np.testing.assert_allclose(table["intensity_mean"].to_numpy(), means, rtol=1e-12)
    assert list(table.columns) == table_columns(3) + default_columns(3)


def test_run_directory_is_complete_and_readable(stack3d, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    source, made = stack3d
    out = tmp_path / "out"
    table, labels = run_flow(source, out, "--chunks", "20", "64", "64")
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    # README: level 0 in half a block per axis where the side is even and >= 64
    level0 = zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r")
    assert level0.chunks == (20, 32, 32)
    assert level0.dtype == np.uint32  # every label of a stack this small fits (README)
    # the table's label is of the image's dtype (a join needs no cast), in Parquet and pandas
    assert table["label"].dtype == level0.dtype
    assert pd.read_parquet(out / "nuclei.parquet")["label"].dtype == np.uint32
    assert record["counts"] == {"nuclei": len(table), "truncated": int(table["truncated"].sum())}
    assert not (out / ".work").exists()
    # background cells: background_radius (0.75 x diameter) / voxel / 3, at least 1
    radius = 0.75 * 8.0
    assert record["derived"]["background_downsample"] == [
        max(1, int(radius / v / 3)) for v in made.voxel_size
    ]
    csv = pd.read_csv(out / "nuclei.csv")
    np.testing.assert_array_equal(csv["label"].to_numpy(np.uint64), table["label"].to_numpy())
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(out / "nuclei.parquet").metadata[b"nucflow"])
    assert meta["voxel_size"] == list(made.voxel_size) and meta["unit"] == "micrometer"
    # NGFF 0.5, its source image the input: ome-zarr-py reads the input, then the labels over
    # it (no warning: the autouse fixture of conftest.py checks every read)
    path = out / "labels.ome.zarr"
    nodes = {Path(n.zarr.subpath()): n for n in Reader(parse_url(str(path)))()}
    assert list(nodes)[0] == Path(source).resolve()  # the image first, then its labels
    assert io.ome_metadata(zarr.open_group(str(path), mode="r"))["image-label"] == {
        "source": {"image": os.path.relpath(source, path)}
    }
    np.testing.assert_array_equal(np.asarray(nodes[path.resolve()].data[0]), labels)
    qc = sorted(p.name for p in (out / "qc").iterdir())
    assert qc == ["depth.png", "distributions.png", "outlines.png", "report.html"]
    _check_outlines(out / "qc" / "outlines.png", record["qc_outline_windows_yx"], labels)


def _check_outlines(path, windows, labels):
    """outlines.png: one panel per recorded window under its title, enlarged to at least 1000
    pixels in all, outlines exactly where the enlarged labels' max projection has boundaries."""
    import imagecodecs
    from skimage.segmentation import find_boundaries

    from nucflow.qc import HEADER

    picture = imagecodecs.png_decode(path.read_bytes())
    widths = [x1 - x0 for _, (x0, x1) in windows]
    zoom = (picture.shape[1] - 4 * (len(windows) - 1)) // sum(widths)
    assert zoom == min(8, max(1, -(-1000 // sum(widths))))
    height = max(y1 - y0 for (y0, y1), _ in windows) * zoom + HEADER
    assert picture.shape == (height, sum(widths) * zoom + 4 * (len(windows) - 1), 3)
    left = 0
    for ((y0, y1), (x0, x1)), width in zip(windows, widths, strict=True):
        panel = picture[HEADER : HEADER + (y1 - y0) * zoom, left : left + width * zoom]
        flat = labels[:, y0:y1, x0:x1].max(axis=0)
        edges = find_boundaries(np.kron(flat, np.ones((zoom, zoom), flat.dtype)), mode="inner")
        assert edges.any()
        np.testing.assert_array_equal((panel == (255, 140, 0)).all(axis=-1), edges)
        title = picture[:HEADER, left : left + width * zoom]
        assert (title < 128).any()  # its title in black
        left += width * zoom + 4


def test_labels_are_uint32_up_to_the_largest_stack_whose_labels_fit():
    """A label is 1 + a voxel's linear index: uint32 holds them up to 2**32 - 1 voxels."""
    from nucflow.pipeline import label_dtype

    assert label_dtype((1, 65535, 65537)) == np.uint32  # 2**32 - 1 voxels
    assert label_dtype((2, 65536, 32768)) == np.uint64  # 2**32 voxels
    assert label_dtype((2048, 16384, 16384)) == np.uint64


def test_measures_other_channels(tmp_path):
    from nucflow.synth import make_nuclei

    made = make_nuclei((24, 64, 64), n_nuclei=12, seed=8)
    second = (made.image // 2 + 7).astype(np.uint16)
    path = tmp_path / "two.zarr"
    data = np.stack([made.image, second])
    array = zarr.create_array(
        str(path), shape=data.shape, dtype=data.dtype, dimension_names=list("czyx")
    )
    array[:] = data
    out = tmp_path / "out"
    table, labels = run_flow(
        path,
        out,
        "--channel",
        "0",
        "--voxel-size",
        *map(str, made.voxel_size),
        "--set",
        "measure.channels=[1]",
    )
    values = table["label"].to_numpy()
    np.testing.assert_allclose(
        table["intensity_mean_c1"], ndimage.mean(second, labels, values), rtol=1e-12
    )
    np.testing.assert_allclose(table["intensity_max_c1"], ndimage.maximum(second, labels, values))


@pytest.mark.parametrize("value", [0, 500])
def test_blank_stacks_give_an_empty_table(tmp_path, value):
    path = tmp_path / "blank.zarr"
    zarr.save_array(str(path), np.full((16, 40, 40), value, np.uint16), zarr_format=2)
    table, labels = run_flow(path, tmp_path / "out")
    assert len(table) == 0 and list(table.columns) == table_columns(3) + default_columns(3)
    assert not labels.any()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "complete"


def test_existing_output_is_refused_then_overwritten(stack2d, tmp_path, capsys):
    source, _ = stack2d
    out = tmp_path / "out"
    run_flow(source, out)
    before = (out / "nuclei.csv").read_bytes()
    assert main(["run", "--input", str(source), "--output", str(out)]) == 2
    assert "pass --resume to continue it or --overwrite to replace it" in capsys.readouterr().err
    assert (out / "nuclei.csv").read_bytes() == before
    run_flow(source, out, "--overwrite")
    assert (out / "nuclei.csv").read_bytes() == before


def test_overwrite_never_deletes_a_foreign_directory(stack2d, tmp_path, capsys):
    source, _ = stack2d
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    assert main(["run", "--input", str(source), "--output", str(foreign), "--overwrite"]) == 2
    assert "is not a nucflow output" in capsys.readouterr().err
    assert (foreign / "chapter1.tex").read_text() == "precious"


def test_input_is_never_written(stack2d, tmp_path):
    source, _ = stack2d
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    run_flow(source, tmp_path / "out")
    after = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    assert before == after


def test_preprocess_flow_equals_whole_array_filters(stack2d, tmp_path):
    from skimage import morphology

    source, made = stack2d
    out = tmp_path / "filtered"
    steps = "filter.steps=[{closing: {size: [5, 5]}}, {opening: {size: [2, 2]}}]"
    assert (
        main(
            [
                "run",
                "--flow",
                "preprocess",
                "--input",
                str(source),
                "--output",
                str(out),
                "--chunks",
                "50",
                "70",
                "--set",
                steps,
            ]
        )
        == 0
    )
    result = io.open_stack(out / "filtered.ome.zarr")
    expected = morphology.opening(
        morphology.closing(made.image, np.ones((5, 5), bool)), np.ones((2, 2), bool)
    )
    np.testing.assert_array_equal(result.data.compute(), expected)
    assert result.voxel_size == made.voxel_size
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_preprocess_flow_denoisers_equal_whole_array_calls(stack2d, tmp_path):
    """`filter.steps` with the bilateral filter (sigma_spatial in µm) then non-local means
    (noise estimated once, on the bilateral's whole output) equals the whole-array calls."""
    from skimage import restoration

    from nucflow import filters

    source, made = stack2d
    out = tmp_path / "denoised"
    steps = (
        "filter.steps=[{bilateral: {sigma_spatial: 1.0, sigma_color: 30.0}},"
        " {nl_means: {patch_size: 3, patch_distance: 4}}]"
    )
    argv = ["run", "--flow", "preprocess", "--input", str(source), "--output", str(out)]
    assert main([*argv, "--chunks", "50", "70", "--set", steps]) == 0
    result = io.open_stack(out / "filtered.ome.zarr").data.compute()
    sigma_voxels = tuple(1.0 / v for v in made.voxel_size)
    smooth = filters.denoise._block_bilateral(
        made.image, sigma_spatial=sigma_voxels, sigma_color=30.0, truncate=3.0, mode="reflect"
    )
    noise = restoration.estimate_sigma(smooth.astype(np.float64))
    expected = restoration.denoise_nl_means(
        smooth, patch_size=3, patch_distance=4, h=0.8 * noise, sigma=noise, preserve_range=True
    )
    # Float32 rounding only: skimage's fast mode sums in running integral images (1 ulp).
    np.testing.assert_allclose(result, expected.astype(np.float32), rtol=1e-6, atol=0)


@pytest.mark.parametrize("downsample", [1, 2])
def test_tissue_mask_preprocessing_equals_the_whole_array_steps(stack3d, tmp_path, downsample):
    """Normalized convolution inside a tissue mask, then the background (the exact top-hat
    in the same pass, or on cells): equal to the lazy filters on one block."""
    import dask.array as da

    from nucflow import filters

    source, made = stack3d
    tissue = np.ones(made.image.shape, bool)
    tissue[:, :40, :] = False
    mask_path = tmp_path / "tissue.ome.zarr"
    io.write_ome_zarr(mask_path, tissue.astype(np.uint8), made.voxel_size)
    settings = [
        f"preprocess.tissue_mask={mask_path}",
        f"preprocess.background_downsample={downsample}",
    ]
    params, image, _, _ = _stages_on(source, tmp_path / "a", (13, 37, 41), *settings)
    whole = da.from_array(made.image, chunks=made.image.shape)
    sigma = tuple(params.preprocess.sigma / v for v in params.voxel_size)
    smoothed = filters.normalized_convolution(whole, da.from_array(tissue), sigma)
    if downsample == 1:  # the exact top-hat, as skimage.morphology.white_tophat
        ball = filters.ellipsoid(
            params.preprocess.background_radius, params.voxel_size, decomposition="sequence"
        )
        expected = filters.white_tophat(smoothed, ball).compute()
    else:
        expected = filters.subtract_background(
            smoothed,
            radius=params.preprocess.background_radius,
            voxel_size=params.voxel_size,
            downsample=params.preprocess.background_downsample,
        ).compute()
    np.testing.assert_array_equal(image, expected)


def test_tune_reads_the_tissue_mask_over_its_region(stack3d, tmp_path):
    """`nucflow tune --region` with a tissue mask of the whole stack: the region of the mask
    goes with the region of the image (as a run on both regions cut out as files of their own)."""
    source, made = stack3d
    tissue = np.ones(made.image.shape, np.uint8)
    tissue[:, :60, :] = 0  # the mask's edge runs through the region
    mask = tmp_path / "tissue.ome.zarr"
    io.write_ome_zarr(mask, tissue, made.voxel_size)
    region = (slice(0, 40), slice(30, 110), slice(20, 120))
    cut, cut_mask = tmp_path / "cut.ome.zarr", tmp_path / "cut-tissue.ome.zarr"
    io.write_ome_zarr(cut, made.image[region], made.voxel_size)
    io.write_ome_zarr(cut_mask, tissue[region], made.voxel_size)
    common = ["--chunks", "8", "32", "32", "--set"]
    tuned, whole = tmp_path / "tuned", tmp_path / "cut-run"
    box = [f"{s.start}:{s.stop}" for s in region]
    argv = ["tune", "--input", str(source), "--output", str(tuned), "--region", *box]
    assert main([*argv, *common, f"preprocess.tissue_mask={mask}"]) == 0
    argv = ["run", "--input", str(cut), "--output", str(whole)]
    assert main([*argv, *common, f"preprocess.tissue_mask={cut_mask}"]) == 0
    table = pd.read_parquet(tuned / "nuclei.parquet")
    assert len(table) > 0
    pd.testing.assert_frame_equal(table, pd.read_parquet(whole / "nuclei.parquet"))
    labels = [
        zarr.open_array(str(d / "labels.ome.zarr" / "0"), mode="r")[:] for d in (tuned, whole)
    ]
    np.testing.assert_array_equal(*labels)


@pytest.mark.parametrize("stack", ["stack3d", "stack2d"])
def test_the_readmes_preprocess_example_runs_on_3d_and_2d(stack, request, tmp_path):
    """The README's `--flow preprocess` example (it once was 2D-only: `size: [5, 5]` exited 2
    on a 3D stack) equals the whole-array scikit-image calls with its µm footprints."""
    from skimage import morphology

    from nucflow import filters

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    steps = re.search(r"--flow preprocess .*\n\s+--set '(filter\.steps=[^']+)'", readme).group(1)
    source, made = request.getfixturevalue(stack)
    out = tmp_path / "filtered"
    chunks = ["13", "50", "70"][-made.image.ndim :]
    argv = ["run", "--flow", "preprocess", "--input", str(source), "--output", str(out)]
    assert main([*argv, "--chunks", *chunks, "--set", steps]) == 0
    closing, opening = (
        filters.ellipsoid(radius, made.voxel_size, decomposition="sequence")
        for radius in (1.0, 0.5)
    )
    assert "{closing: {radius: 1.0}}, {opening: {radius: 0.5}}" in steps
    expected = morphology.opening(morphology.closing(made.image, closing), opening)
    result = io.open_stack(out / "filtered.ome.zarr").data.compute()
    np.testing.assert_array_equal(result, expected)
