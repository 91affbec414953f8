"""``--diameter auto`` (nucflow.diameter): the estimate on stacks of known diameter, and a run
with it (the estimate printed, recorded in run.json, the run seam-free)."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
from test_cli import assert_refused, cli

from nucflow import io, synth
from nucflow.diameter import estimate


@pytest.mark.parametrize(
    ("shape", "voxel", "diameter"),
    [
        ((384, 384), (0.5, 0.5), 6.0),
        pytest.param(
            (384, 384),
            (0.5, 0.5),
            12.0,
            # known weakness: 7.43 is estimated (noise blobs inside the flat-topped nuclei)
            marks=pytest.mark.xfail(strict=True, reason="auto underestimates large 2D nuclei"),
        ),
        ((40, 160, 160), (2.0, 0.5, 0.5), 8.0),
    ],
)
def test_estimate_lands_near_the_true_diameter(shape, voxel, diameter):
    extent = np.prod(np.multiply(shape, voxel))
    nuclei = int(0.1 * extent / diameter ** len(shape))  # about a tenth covered
    made = synth.make_nuclei(shape, n_nuclei=nuclei, diameter=diameter, voxel_size=voxel, seed=1)
    found = estimate(da.from_array(made.image, chunks=64), made.voxel_size)
    # log-spaced scales 1.3x apart: within 15 % (the F1 sweep is flat over 0.75x-1.33x)
    assert abs(found.diameter / diameter - 1) < 0.15, found
    assert found.blobs >= 5


def test_run_with_auto_is_seam_free_and_recorded(capsys, tmp_path):
    made = synth.make_nuclei((24, 96, 96), n_nuclei=25, diameter=8.0, seed=2)
    source = tmp_path / "in.ome.zarr"
    io.write_ome_zarr(source, made.image, made.voxel_size)
    runs = {}
    for name, chunks in (("one", ["24", "96", "96"]), ("fine", ["8", "32", "32"])):
        out = tmp_path / name
        argv = ["run", "--input", str(source), "--output", str(out), "--chunks", *chunks]
        code, err = cli(capsys, *argv, "--diameter", "auto", "--set", "qc.enabled=false")
        assert code == 0, err
        runs[name] = json.loads((out / "run.json").read_text())
        labels = io.open_stack(out / "labels.ome.zarr").data.compute()
        runs[name]["labels"] = labels
    one, fine = runs["one"], runs["fine"]
    assert one["derived"]["diameter"] == fine["derived"]["diameter"]
    assert abs(one["derived"]["diameter"] / 8.0 - 1) < 0.15
    assert one["config"]["diameter"] == one["derived"]["diameter"]
    # the contract's record: the value used and where it came from
    assert one["diameter"] == one["derived"]["diameter"] and one["diameter_source"] == "auto"
    np.testing.assert_array_equal(one["labels"], fine["labels"])


def test_bad_diameter_is_one_line(capsys, tmp_path):
    argv = ["run", "--input", "x", "--output", str(tmp_path / "o"), "--diameter", "big"]
    code, err = cli(capsys, *argv)
    assert_refused(code, err, r"--diameter: must be a number in µm or auto, got 'big'")
