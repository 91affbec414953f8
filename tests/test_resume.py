"""A run killed with SIGKILL resumes with --resume and ends with the uninterrupted outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import zarr

from nucflow.cli import main

CLI = [sys.executable, "-c", "from nucflow.cli import main; raise SystemExit(main())"]


@pytest.mark.timeout(300)
def test_resume_after_kill_redoes_only_unfinished_blocks(stack3d, tmp_path):
    source, made = stack3d
    chunks = ["8", "32", "32"]
    reference = tmp_path / "reference"
    assert (
        main(["run", "--input", str(source), "--output", str(reference), "--chunks", *chunks]) == 0
    )

    out = tmp_path / "killed"
    args = [
        "run",
        "--input",
        str(source),
        "--output",
        str(out),
        "--chunks",
        *chunks,
        "--cluster",
        "processes",
    ]
    # A session of its own, so the kill takes the worker processes too: otherwise a worker that
    # outlives the driver can still finish a block after the count below.
    proc = subprocess.Popen(
        [*CLI, *args],
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    blocks = out / ".work" / "blocks"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(blocks.glob("*.parquet"))) < 5:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(blocks.glob("*.parquet")))
    total = 5 * 4 * 4
    assert 5 <= done_before < total, "the kill must land while blocks are being segmented"
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # never looks complete
    assert not (out / "nuclei.parquet").exists()

    assert main([*args[:-2], "--resume"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["blocks"] == {"total": total, "computed": total - done_before}
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "nuclei.parquet"), pd.read_parquet(reference / "nuclei.parquet")
    )
    labels = zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r")
    expected = zarr.open_array(str(reference / "labels.ome.zarr" / "0"), mode="r")
    np.testing.assert_array_equal(np.asarray(labels), np.asarray(expected))
