"""A run killed with SIGKILL resumes with --resume and ends with the uninterrupted outputs;
with other parameters it ends with the fresh run's outputs, and on another input it is refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from nucflow import io, synth
from nucflow.cli import main


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
    actions = {name: s["action"] for name, s in record["stages"].items()}
    assert actions.pop("pyramid") == "computed"  # the kill came before the pyramid began
    assert set(actions.values()) == {"reused"}
    pd.testing.assert_frame_equal(table, reference_run[0])
    np.testing.assert_array_equal(labels, reference_run[1])


# --- resuming with other parameters or another input: the fresh result, or a refusal -------

CHUNK_GRID = 5 * 4 * 4  # blocks of stack3d on the run_cli grid
STAGES = (  # in flow order
    "smoothed",
    "cells",
    "background",
    "preprocessed",
    "threshold",
    "opened",
    "filled",
    "mask",
    "segment",
    "pyramid",
)


def _record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def _said(recwarn: pytest.WarningsRecorder, needle: str) -> list[str]:
    """The warnings holding ``needle`` (in-process, pytest records the CLI's warning lines)."""
    return [str(w.message) for w in recwarn if needle in str(w.message)]


def _kill_when(proc: subprocess.Popen, condition, what: str, log: Path) -> None:
    """SIGKILL the run's process group once ``condition()`` holds (before it completes)."""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None and not condition():
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert condition(), f"the run never reached {what}: {log.read_text()[-2000:]}"


@pytest.fixture(scope="module")
def killed_in_segmentation(stack3d, run_cli, tmp_path_factory) -> tuple[Path, int]:
    """A default run (diameter 8, Otsu) SIGKILLed while blocks are being segmented, and its
    PID; tests resume copies of it."""
    folder = tmp_path_factory.mktemp("killed")
    out, log = folder / "out", folder / "stderr.log"
    proc = run_cli.start(stack3d[0], out, stderr=log)
    blocks = out / ".work" / "blocks"

    def segmenting() -> bool:
        return (out / ".work" / "segment.fingerprint.json").exists() and any(blocks.iterdir())

    _kill_when(proc, segmenting, "segmentation", log)
    assert len(list(blocks.glob("*.parquet"))) < CHUNK_GRID
    assert _record(out)["status"] == "running"
    return out, proc.pid


@pytest.fixture(scope="module")
def fresh_diameter_10(stack3d, run_cli, tmp_path_factory) -> tuple[pd.DataFrame, np.ndarray]:
    return run_cli(stack3d[0], tmp_path_factory.mktemp("fresh10") / "out", "--diameter", "10")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("spec", ["threads", pytest.param("local", marks=pytest.mark.slow)])
def test_resume_with_another_diameter_recomputes_everything(
    killed_in_segmentation, fresh_diameter_10, stack3d, run_cli, tmp_path, capsys, recwarn, spec
):
    killed, killed_pid = killed_in_segmentation
    out = tmp_path / "out"
    shutil.copytree(killed, out)
    extra = ["--cluster", spec, *(["--jobs", "2"] if spec == "local" else [])]
    capsys.readouterr()
    code = main(run_cli.args(stack3d[0], out, "--resume", "--diameter", "10", *extra))
    err = capsys.readouterr().err

    assert code == 0, err
    # The killed run's lock is stale (its PID is gone) and is taken over, saying so once.
    takeover = _said(recwarn, "taking over the lock")
    assert len(takeover) == 1 and f"(PID {killed_pid} on " in takeover[0], takeover
    assert "is no longer running on this host" in takeover[0]
    # The first stage whose parameters changed is named once, with the change.
    said = _said(recwarn, "--resume: recomputing")
    assert len(said) == 1, said
    assert re.fullmatch(
        r"--resume: recomputing smoothed and every stage after it: "
        r"parameters changed: sigma 0\.64 -> 0\.8, background_radius 6\.0 -> 7\.5.*",
        said[0],
    ), said[0]
    record = _record(out)
    assert record["status"] == "complete"
    assert {k: v["action"] for k, v in record["stages"].items()} == dict.fromkeys(
        STAGES, "computed"
    )
    assert record["blocks"] == {"total": CHUNK_GRID, "computed": CHUNK_GRID}
    table = pd.read_parquet(out / "nuclei.parquet")
    labels = np.asarray(zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r"))
    pd.testing.assert_frame_equal(table, fresh_diameter_10[0], check_exact=True)
    np.testing.assert_array_equal(labels, fresh_diameter_10[1])


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("setting", "first", "change"),
    [
        ("threshold.method=li", "threshold", "threshold_method 'local' -> 'li'"),
        ("detect.fraction=0.4", "threshold", "fraction 0.5 -> 0.4"),
        ("segment.min_radius=1.5", "segment", "min_radius 1.2 -> 1.5"),
    ],
    ids=["threshold", "detect", "segment"],
)
def test_resume_with_another_later_parameter_reuses_the_stages_before(
    killed_in_segmentation, stack3d, run_cli, tmp_path, capsys, recwarn, setting, first, change
):
    out = tmp_path / "out"
    shutil.copytree(killed_in_segmentation[0], out)
    capsys.readouterr()
    code = main(run_cli.args(stack3d[0], out, "--resume", "--set", setting))
    err = capsys.readouterr().err

    assert code == 0, err
    assert _said(recwarn, "--resume: recomputing") == [
        f"--resume: recomputing {first} and every stage after it: parameters changed: {change}"
    ]
    stages = _record(out)["stages"]
    before, after = STAGES[: STAGES.index(first)], STAGES[STAGES.index(first) :]
    assert [stages[s]["action"] for s in before] == ["reused"] * len(before)
    assert [stages[s]["action"] for s in after] == ["computed"] * len(after)
    assert all(stages[s]["reason"] == f"{first} was recomputed" for s in after[1:])
    # the killed run's block parts and labels were of the old parameters: all redone
    assert _record(out)["blocks"] == {"total": CHUNK_GRID, "computed": CHUNK_GRID}
    fresh = run_cli(stack3d[0], tmp_path / "fresh", "--set", setting)
    for fact in ("threshold", "noise"):  # the global pass's result
        assert _record(out).get(fact) == _record(tmp_path / "fresh").get(fact)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "nuclei.parquet"), fresh[0])
    labels = np.asarray(zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r"))
    np.testing.assert_array_equal(labels, fresh[1])


@pytest.mark.timeout(300)
def test_resume_remakes_the_block_histograms_a_stored_stack_lacks(
    killed_in_segmentation, stack3d, run_cli, tmp_path, capsys
):
    """The noise estimate sums the block histograms the preprocessing pass stored beside its
    stack; when one is missing, a pass makes them all again from the stored stack: the same
    noise level, to the last bit."""
    out = tmp_path / "out"
    shutil.copytree(killed_in_segmentation[0], out)
    stored = out / ".work" / "preprocessed.histogram"
    files = sorted(stored.iterdir())
    assert len(files) == CHUNK_GRID
    files[0].unlink()
    capsys.readouterr()
    lines = ["--set", "progress.interval_s=0"]  # every pass ends with a line (a short run)
    code = main(run_cli.args(stack3d[0], out, "--resume", "--set", "detect.fraction=0.4", *lines))
    err = capsys.readouterr().err
    assert code == 0, err
    assert _record(out)["stages"]["preprocessed"]["action"] == "reused"
    assert f"histograms {CHUNK_GRID}/{CHUNK_GRID} blocks (100%)" in err  # the pass that made them
    assert _record(out)["noise"] == _record(killed_in_segmentation[0])["noise"]


@pytest.mark.timeout(300)
def test_resume_on_a_changed_input_is_refused(stack3d, run_cli, tmp_path, capsys):
    source = tmp_path / "input.ome.zarr"
    shutil.copytree(stack3d[0], source)
    out, log = tmp_path / "out", tmp_path / "stderr.log"
    proc = run_cli.start(source, out, stderr=log)
    _kill_when(proc, (out / ".work" / "preprocessed.fingerprint.json").exists, "preprocess", log)
    # Same path, shape and dtype; other nuclei.
    other = synth.make_nuclei((40, 128, 128), n_nuclei=60, diameter=8.0, seed=11)
    io.write_ome_zarr(source, other.image, other.voxel_size, overwrite=True)

    for given, why in [(source, "its files were modified since"), (stack3d[0], "path was ")]:
        capsys.readouterr()
        code = main(run_cli.args(given, out, "--resume"))
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err
        last = err.rstrip("\n").split("\n")[-1]
        assert re.fullmatch(
            rf"nucflow run: error: --resume: the input {re.escape(str(given))} is not the one "
            rf"the run in {re.escape(str(out))} read \({why}.*\); rerun with --overwrite to "
            "start over",
            last,
        ), last
        assert _record(out)["status"] == "running"  # the killed run's, never "complete"
        assert not (out / "nuclei.parquet").exists()
    # --overwrite starts over: the fresh run's result on the new input.
    table, labels = run_cli(source, out, "--overwrite")
    fresh = run_cli(source, tmp_path / "fresh")
    pd.testing.assert_frame_equal(table, fresh[0])
    np.testing.assert_array_equal(labels, fresh[1])
