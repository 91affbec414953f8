"""Flows are tuples of stages: a second flow (``flows/mask.py``) reuses the nuclei flow's first
stages and adds one of its own, and gets the checks, ETA, resume and status from its stages."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import zarr

from nucflow import flowrun, pipeline
from nucflow.cli import main
from nucflow.stages import flow_passes
from nucflow.status import status


def _mask(out) -> np.ndarray:
    return np.asarray(zarr.open_array(str(out / "mask.ome.zarr" / "0"), mode="r"))


@pytest.fixture(scope="module")
def one_block_mask(stack3d, tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("mask") / "whole"
    argv = ["run", "--input", str(stack3d[0]), "--output", str(out), "--flow", "mask"]
    assert main([*argv, "--chunks", "40", "128", "128"]) == 0
    return _mask(out)


@pytest.mark.parametrize("chunks", [(8, 32, 32), (11, 45, 37)])
def test_the_mask_flow_is_seam_free_and_tells_its_stages(stack3d, one_block_mask, tmp_path, chunks):
    out = tmp_path / "out"
    argv = ["run", "--input", str(stack3d[0]), "--output", str(out), "--flow", "mask"]
    assert main([*argv, "--chunks", *map(str, chunks)]) == 0
    mask = _mask(out)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert 0.01 < mask.mean() < 0.5  # nuclei, not all or nothing
    np.testing.assert_array_equal(mask, one_block_mask)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["flow"] == "mask"
    names = [stage.name for stage in flowrun.load_flow("mask").STAGES]
    assert names == ["preprocess", "threshold", "mask", "write"]
    assert list(record["progress"]["plan"]) == names  # the ETA's stages are the flow's
    assert status(out).state == "complete"


def test_resume_of_an_interrupted_mask_flow_reuses_its_stages(stack3d, tmp_path, capsys):
    out = tmp_path / "out"
    flow = tmp_path / "stop_after_mask.py"
    flow.write_text(STOP_AFTER_MASK)
    argv = ["run", "--input", str(stack3d[0]), "--output", str(out), "--chunks", "8", "32", "32"]
    assert main([*argv, "--flow", str(flow)]) == 1  # the write stage fails once
    assert main([*argv, "--resume", "--flow", "mask"]) == 0
    record = json.loads((out / "run.json").read_text())
    actions = {name: entry["action"] for name, entry in record["stages"].items()}
    assert actions and set(actions.values()) == {"reused"}, actions
    assert _mask(out).any()


STOP_AFTER_MASK = """
from nucflow import flowrun, pipeline, stages


def _stop(job, inputs):
    raise RuntimeError("stopped before writing the mask")


STAGES = (*pipeline.NUCLEI[:3], stages.Stage("write", ("mask",), stages.only(), body=_stop))


def run(job):
    return flowrun.run(job, STAGES)
"""


def test_the_plan_counts_a_flows_passes_from_its_stages():
    from nucflow import config

    loaded = config.load(options={"chunks": [8, 32, 32]})
    params = config.resolve(loaded, shape=(40, 128, 128), voxel_size=(1.0, 0.5, 0.5))
    mask_flow = flowrun.load_flow("mask").STAGES
    nuclei = flow_passes(pipeline.NUCLEI, params, (40, 128, 128))
    assert flow_passes(mask_flow, params, (40, 128, 128)) == {
        "preprocess": nuclei["preprocess"],
        "threshold": nuclei["threshold"],
        "mask": nuclei["mask"],
        "write": 1,
    }


def test_a_flow_without_stages_is_refused_in_one_line(stack3d, tmp_path, capsys):
    flow = tmp_path / "old.py"
    flow.write_text("def run(job):\n    return {}\n")
    argv = ["run", "--input", str(stack3d[0]), "--output", str(tmp_path / "out")]
    assert main([*argv, "--flow", str(flow)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"nucflow run: error: --flow '\S+/old\.py': \S+/old\.py defines no STAGES \(a tuple of "
        r"nucflow\.stages\.Stage\) and run\(job\); see flows/mask\.py for a small flow\n",
        err,
    ), err
    assert not (tmp_path / "out").exists()
