"""``segment.method: python:MODULE:FUNCTION``: a user's function run per padded block equals the
same function on the whole array (up to ids) on chunkings that cut its objects, one table row
per label; bad methods exit 2 in one line before the output is claimed."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from scipy import ndimage

from nucflow import config, histogram, io, segmenters, synth
from nucflow.cli import main

SEGMENTERS = textwrap.dedent(
    '''
    """Two segmenters of bounded support, as a user would write them."""
    import numpy as np
    from scipy import ndimage
    import skimage.measure
    import skimage.segmentation


    def components(block, voxel_size, *, level):
        """A fixed threshold, then connected components."""
        return skimage.measure.label(block > level)


    def watershed(block, voxel_size, *, level, sigma=1.0, size=5):
        """Seeded watershed: maxima of the smoothed image flood it inside the threshold."""
        smooth = ndimage.gaussian_filter(block.astype(np.float32), sigma)
        mask = smooth > level
        peaks = (ndimage.maximum_filter(smooth, size=size) == smooth) & mask
        markers, _ = ndimage.label(peaks)
        return skimage.segmentation.watershed(-smooth, markers, mask=mask)


    def wrong_shape(block, voxel_size):
        return np.zeros(block.shape[:-1] + (block.shape[-1] - 1,), np.uint16)


    def wrong_dtype(block, voxel_size):
        return block > 0


    def fails(block, voxel_size):
        raise RuntimeError("no model here")
    '''
)
LEVEL = 1000.0
#: reach of ``watershed`` beyond an object: the Gaussian's 4 sigma, the maximum filter's 2
SUPPORT = 4 + 2


@pytest.fixture(scope="module")
def user_module(tmp_path_factory) -> tuple[str, object]:
    """The module file in a folder of its own (on no path: nucflow finds it from the
    current directory, workers from the folder the driver found it in)."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "my_segmenters.py").write_text(SEGMENTERS)
    sys.path.insert(0, str(folder))
    try:
        import my_segmenters  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(folder))
    return str(folder), my_segmenters


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> tuple[Path, np.ndarray]:
    made = synth.make_nuclei((32, 96, 96), n_nuclei=25, diameter=8.0, seed=5, cluster_fraction=0.2)
    path = tmp_path_factory.mktemp("data") / "nuclei.ome.zarr"
    io.write_ome_zarr(path, made.image, made.voxel_size)
    return path, made.image


def _halo_um(whole: np.ndarray, support: int) -> float:
    """The smallest halo (µm; voxels 1 x 0.5 x 0.5 µm) every object fits in with the
    function's support: the precondition of the promise, so the test can fail."""
    boxes = [box for box in ndimage.find_objects(whole) if box is not None]
    extents = np.array([[s.stop - s.start for s in box] for box in boxes])
    needed = extents.max(0) + support + 1
    return float(max(needed[0] * 1.0, needed[1] * 0.5, needed[2] * 0.5))


def _bijection(whole: np.ndarray, labels: np.ndarray) -> None:
    """``labels`` equals ``whole`` up to a one-to-one relabelling."""
    assert np.array_equal(whole > 0, labels > 0)
    pairs = np.unique(np.stack([whole[whole > 0], labels[labels > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
    assert pairs.shape[1] == len(np.unique(whole)) - 1


def _run(source, out, chunks, method, halo_um, *extra) -> tuple[pd.DataFrame, np.ndarray]:
    argv = ["run", "--input", str(source), "--output", str(out), "--chunks"]
    argv += [str(c) for c in chunks]
    argv += ["--set", f"segment.method=python:my_segmenters:{method}"]
    argv += ["--set", f"segment.options.level={LEVEL}", "--set", f"segment.halo_um={halo_um}"]
    assert main([*argv, "--set", "qc.enabled=false", *extra]) == 0
    labels = np.asarray(zarr.open_array(str(Path(out) / "labels.ome.zarr" / "0"), mode="r"))
    return pd.read_parquet(Path(out) / "nuclei.parquet"), labels


@pytest.mark.parametrize("method", ["components", "watershed"])
def test_python_segmenter_equals_the_whole_array_call(
    user_module, stack, tmp_path, monkeypatch, method
):
    folder, module = user_module
    monkeypatch.chdir(folder)  # found from the current directory, as a user's file is
    source, image = stack
    whole = getattr(module, method)(image, (1.0, 0.5, 0.5), level=LEVEL)
    assert whole.max() > 20
    halo_um = _halo_um(whole, SUPPORT if method == "watershed" else 0)
    for chunks in [(8, 32, 32), (12, 40, 56), (32, 48, 40)]:  # each cuts objects
        rows, labels = _run(source, tmp_path / f"{method}{chunks}", chunks, method, halo_um)
        _bijection(whole, labels)
        assert sorted(rows["label"]) == sorted(np.unique(labels[labels > 0]))
        assert not rows["truncated"].any()
        # ids from each object's first voxel in C order
        first = np.unique(labels.ravel(), return_index=True)[1][1:]
        assert np.array_equal(np.sort(rows["label"].to_numpy()), np.sort(first + 1))
        counts = np.bincount(labels.ravel().astype(np.int64))
        assert np.array_equal(rows["n_voxels"], counts[rows["label"].to_numpy(np.int64)])


def test_worker_processes_import_the_module_and_too_small_a_halo_is_flagged(
    user_module, stack, tmp_path, monkeypatch
):
    folder, module = user_module
    monkeypatch.chdir(folder)
    source, image = stack
    whole = module.watershed(image, (1.0, 0.5, 0.5), level=LEVEL)
    halo_um = _halo_um(whole, SUPPORT)
    rows, labels = _run(
        source, tmp_path / "processes", (12, 40, 56), "watershed", halo_um, "--cluster", "processes"
    )
    _bijection(whole, labels)
    rows, _ = _run(source, tmp_path / "small", (12, 40, 56), "watershed", 2.0)
    assert rows["truncated"].any()  # objects larger than a 2 µm halo were cut, and say so


def test_percentile_normalisation_is_global(user_module, stack, tmp_path, monkeypatch):
    folder, module = user_module
    monkeypatch.chdir(folder)
    source, image = stack
    low, high = np.percentile(image, [1.0, 99.8])
    level = 0.5
    whole = module.components((image.astype(np.float32) - low) / (high - low), (), level=level)
    argv = ["run", "--input", str(source), "--chunks", "12", "40", "56", "--set"]
    argv += ["segment.method=python:my_segmenters:components", "--set", "segment.halo_um=20"]
    argv += ["--set", f"segment.options.level={level}", "--set", "segment.normalize=percentile"]
    assert main([*argv, "--output", str(tmp_path / "out"), "--set", "qc.enabled=false"]) == 0
    labels = np.asarray(zarr.open_array(str(tmp_path / "out/labels.ome.zarr/0"), mode="r"))
    used = json.loads((tmp_path / "out/run.json").read_text())["normalize_percentiles"]
    # within a histogram bin (0.8 %) of numpy's percentiles of the whole stack
    assert np.allclose(used, [low, high], rtol=0.008)
    changed = np.count_nonzero((labels > 0) != (whole > 0))
    assert changed < 1e-3 * image.size


def test_histogram_percentiles_follow_numpy():
    rng = np.random.default_rng(0)
    values = rng.normal(100, 20, (20, 50, 50)).astype(np.float32)
    total = histogram.Histogram.of(histogram.encode(values[i : i + 7]) for i in range(0, 20, 7))
    q = [0, 1, 50, 99.8, 100]
    assert np.allclose(total.percentiles(q), np.percentile(values, q), rtol=0.008)


def test_the_function_source_is_in_the_segmentation_fingerprint(stack, tmp_path):
    """``--resume`` reuses a stored stage only if its fingerprint matches: the function's
    source file is part of the segmentation's (and every later stage's)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    module = folder / "resume_segmenter.py"
    module.write_text(SEGMENTERS)
    source, _ = stack
    argv = ["run", "--input", str(source), "--chunks", "16", "48", "48", "--set"]
    argv += ["segment.method=python:resume_segmenter:components", "--set", "qc.enabled=false"]
    argv += ["--set", f"segment.options.level={LEVEL}"]
    found = []
    sys.path.insert(0, str(folder))
    try:
        for name, text in [("a", SEGMENTERS), ("b", SEGMENTERS), ("c", SEGMENTERS + "# v2\n")]:
            module.write_text(text)
            assert main([*argv, "--output", str(tmp_path / name)]) == 0
            found.append(json.loads((tmp_path / name / "run.json").read_text())["stages"])
    finally:
        sys.path.remove(str(folder))
    same, changed = found[0], found[2]
    assert found[1] == same
    assert "mask" not in same  # a python segmenter needs no threshold or mask
    assert changed["segment"]["fingerprint"] != same["segment"]["fingerprint"]


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (
            "python:no_such_segmenter_module:f",
            "`segment.method` python:no_such_segmenter_module:f: cannot import module "
            "no_such_segmenter_module (ModuleNotFoundError: No module named "
            "'no_such_segmenter_module'); put its folder on PYTHONPATH or run nucflow from "
            "that folder",
        ),
        (
            "python:my_segmenters",
            "`segment.method` 'python:my_segmenters' must look like python:MODULE:FUNCTION, "
            "e.g. python:my_segmenter:segment",
        ),
        (
            "python:my_segmenters:missing",
            "has no function 'missing'; name a function defined there",
        ),
        (
            "python:my_segmenters:wrong_shape",
            "`segment.method` python:my_segmenters:wrong_shape returned labels of shape "
            "(32, 32, 31) for a block of shape (32, 32, 32); return an array of the block's "
            "shape",
        ),
        (
            "python:my_segmenters:wrong_dtype",
            "`segment.method` python:my_segmenters:wrong_dtype returned bool labels; return "
            "integer labels (0 = background, any positive ids)",
        ),
        (
            "python:my_segmenters:fails",
            "`segment.method` python:my_segmenters:fails failed on a test block of shape "
            "(32, 32, 32): RuntimeError: no model here; fix the function or its "
            "`segment.options`",
        ),
        ("cellpose", "config `segment.method` must be builtin, stardist or python:MODULE:FUNCTION"),
        (
            "stardist",
            "`segment.method` stardist needs `segment.model`: the folder of a trained StarDist "
            "model (config.json, weights_best.h5)",
        ),
    ],
)
def test_bad_methods_exit_2_in_one_line_before_the_output_is_claimed(
    user_module, stack, tmp_path, monkeypatch, capsys, method, message
):
    folder, _ = user_module
    monkeypatch.chdir(folder)
    source, _ = stack
    out = tmp_path / "out"
    argv = ["run", "--input", str(source), "--output", str(out), "--set"]
    assert main([*argv, f"segment.method={method}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_halo_in_voxels_and_relabel_by_first_voxel():
    assert segmenters.halo_voxels(12.0, (1.0, 0.5, 0.5)) == (12, 24, 24)
    assert segmenters.halo_voxels(1.2, (0.4,)) == (3,)
    labels = np.array([[0, 7, 7, 0], [5, 5, 0, 3]])
    ids, cut = segmenters.relabel(
        labels, origin=(10, 20), full_shape=(100, 100), core=(slice(0, 2), slice(1, 3)),
        outer=[(False, False), (False, True)],
    )  # fmt: skip
    first = {7: 10 * 100 + 21 + 1, 5: 11 * 100 + 20 + 1}
    assert ids.tolist() == [[first[7], first[7]], [first[5], 0]]
    assert cut.tolist() == [[0, 0], [0, 0]]  # 3 touches the cut face but not the core
    assert math.isinf(segmenters.relabel(
        labels, origin=(0, 0), full_shape=(2, 4), core=(slice(0, 2), slice(0, 4)),
        outer=[(False, False), (False, True)],
    )[1][1, 3])  # fmt: skip


def test_preprocessed_input_normalised_is_the_one_block_result(
    user_module, stack, tmp_path, monkeypatch
):
    """``segment.input: preprocessed`` with ``normalize: percentile`` (percentiles from the
    histograms the preprocess pass stored): any chunking equals the run whose one block
    holds the whole stack (the function called once on the whole preprocessed image)."""
    folder, _ = user_module
    monkeypatch.chdir(folder)
    source, image = stack
    extra = ["--set", "segment.input=preprocessed", "--set", "segment.normalize=percentile"]
    extra += ["--set", "segment.options.level=0.3", "--set", "segment.halo_um=20"]
    found = []
    for chunks in [image.shape, (12, 40, 56)]:
        out = tmp_path / f"{chunks[0]}"
        argv = ["run", "--input", str(source), "--output", str(out), "--chunks"]
        argv += [str(c) for c in chunks] + ["--set", "qc.enabled=false"]
        argv += ["--set", "segment.method=python:my_segmenters:watershed", *extra]
        assert main(argv) == 0
        run = json.loads((out / "run.json").read_text())
        found.append(np.asarray(zarr.open_array(str(out / "labels.ome.zarr/0"), mode="r")))
        assert run["counts"]["truncated"] == 0
    assert found[0].max() > 0
    _bijection(found[0], found[1])


def test_the_gpu_example_config_loads():
    path = Path(__file__).resolve().parents[1] / "configs/examples/stardist-slurm-gpu.yaml"
    loaded = config.load(path)
    assert loaded["segment"]["method"] == "stardist"
    assert loaded["cluster"]["job_extra_directives"] == ["--gres=gpu:1"]


def test_everything_after_segmentation_is_the_builtins(user_module, stack, tmp_path, monkeypatch):
    """``drop_border`` and object properties on a python segmenter's labels equal
    scikit-image's ``clear_border`` and ``regionprops_table`` on the whole-array call's."""
    from skimage.measure import regionprops_table
    from skimage.segmentation import clear_border

    folder, module = user_module
    monkeypatch.chdir(folder)
    source, image = stack
    whole = clear_border(module.components(image, (1.0, 0.5, 0.5), level=LEVEL))
    rows, labels = _run(
        source, tmp_path / "out", (12, 40, 56), "components", _halo_um(whole, 0),
        "--set", "measure.drop_border=true", "--set", "measure.properties=[extent]",
    )  # fmt: skip
    _bijection(whole, labels)
    expected = pd.DataFrame(regionprops_table(labels, properties=["label", "extent"]))
    merged = rows.merge(expected, on="label", suffixes=("", "_skimage"))
    assert len(merged) == len(rows) == len(expected)
    assert np.allclose(merged["extent"], merged["extent_skimage"])
