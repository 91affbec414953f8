"""A run killed with SIGKILL resumes with --resume and ends with the uninterrupted outputs."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pandas as pd
import pytest


@pytest.mark.timeout(300)
def test_resume_after_kill_redoes_only_unfinished_blocks(stack3d, reference_run, run_cli, tmp_path):
    source, made = stack3d
    out = tmp_path / "killed"
    # The kill takes the run's whole process group (start() gives it a session of its own):
    # otherwise a worker that outlives the driver can still finish a block after the count below.
    proc = run_cli.start(source, out, "--cluster", "processes")
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

    table, labels = run_cli(source, out, "--resume")
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["blocks"] == {"total": total, "computed": total - done_before}
    pd.testing.assert_frame_equal(table, reference_run[0])
    np.testing.assert_array_equal(labels, reference_run[1])
