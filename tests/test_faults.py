"""Faults during a whole run, with real processes, real files and real Slurm jobs (no mocks).

- A worker process SIGKILLed, or a Slurm worker job cancelled, while blocks are being
  segmented: the run completes and its table and label image equal the uninterrupted run's.
- A damaged input chunk: exit 2, one error line naming the file and the region, run.json
  ``failed``, no table, and not one byte of the input changed.
- A block that fails on every attempt (its label chunk cannot be written; a chunk of the
  mask intermediate cannot be decoded): exit 1, the run fails naming the block's voxel
  region, run.json ``failed``, no table.

The Slurm test needs the one-node cluster of .ci/slurm-up.sh (see tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import psutil
import pytest
import zarr

from nucflow.cli import main

#: Blocks of ``stack3d`` on the ``run_cli`` grid (8, 32, 32): 5 x 4 x 4.
GRID = (5, 4, 4)
BLOCKS = int(np.prod(GRID))

REGION = r"\[(\d+):(\d+), (\d+):(\d+), (\d+):(\d+)\]"


# --- helpers -----------------------------------------------------------------------------


def _parts(out: Path) -> list[Path]:
    """Table parts of the blocks segmented so far (one file per finished block)."""
    return sorted((out / ".work" / "blocks").glob("*.parquet"))


def _wait_for(condition, *, stop: threading.Event | None = None, timeout: float = 120) -> bool:
    """Poll ``condition()`` until it holds; False on timeout or when ``stop`` is set."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def _spawned_children(exclude: set[int]) -> list[psutil.Process]:
    """Processes this one started with multiprocessing's spawn (dask workers under a Nanny),
    leaving out ``exclude``; multiprocessing's resource tracker does not call spawn_main."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.pid not in exclude and "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
    return found


def _dead(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _squeue(*args: str) -> list[str]:
    proc = subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, check=True)
    return proc.stdout.split()


def _final_state(job_id: str, timeout: float = 30) -> str:
    """Slurm's state of a job once it is no longer running (squeue keeps ended jobs a while)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = " ".join(_squeue("--states=all", "-j", job_id, "-o", "%T"))
        if state and state not in ("RUNNING", "PENDING", "COMPLETING", "CONFIGURING"):
            break
        time.sleep(0.5)
    return state


def _tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def _core(index: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks, strict=True))


def _fmt(region: tuple[slice, ...]) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in region) + "]"


def _overlap(a: tuple[slice, ...], b: tuple[slice, ...]) -> bool:
    return all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b, strict=True))


# --- 1. a worker process killed mid-run --------------------------------------------------


@pytest.mark.timeout(240)
def test_local_worker_killed_mid_run_leaves_outputs_unchanged(
    stack3d, reference_run, run_cli, tmp_path
):
    out = tmp_path / "out"
    earlier = {p.pid for p in psutil.Process().children(recursive=True)}
    finished = threading.Event()
    seen: dict = {}

    def kill_a_worker() -> None:
        if not _wait_for(lambda: len(_parts(out)) >= 5, stop=finished):
            return
        workers = _spawned_children(earlier)
        seen["workers"] = len(workers)
        seen["parts"] = len(_parts(out))
        if not workers:
            return
        victim = workers[0]
        victim.kill()  # SIGKILL: no goodbye to the scheduler
        seen["killed"] = victim
        # The worker's Nanny notices the death and starts a new worker process.
        seen["replaced"] = _wait_for(
            lambda: bool(_spawned_children(earlier | {w.pid for w in workers})), stop=finished
        )

    killer = threading.Thread(target=kill_a_worker, name="worker-killer")
    killer.start()
    try:
        table, labels = run_cli(stack3d[0], out, "--cluster", "local", "--jobs", "2")
    finally:
        finished.set()
        killer.join(timeout=30)

    assert "killed" in seen, f"no worker was killed: {seen}"
    assert seen["workers"] == 2  # the two LocalCluster workers, and nothing else
    assert 5 <= seen["parts"] < BLOCKS, "the kill must land while blocks are being segmented"
    assert _dead(seen["killed"])
    assert seen["replaced"], "no new worker process was started after the kill"
    record = _record(out)
    assert record["status"] == "complete"
    assert record["blocks"] == {"total": BLOCKS, "computed": BLOCKS}
    pd.testing.assert_frame_equal(table, reference_run[0], check_exact=True)
    np.testing.assert_array_equal(labels, reference_run[1])


# --- 2. a Slurm worker job cancelled mid-run ---------------------------------------------


@pytest.mark.slurm
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_worker_job_cancelled_mid_run_leaves_outputs_unchanged(
    stack3d, reference_run, run_cli, slurm_jobqueue, tmp_path
):
    logs = slurm_jobqueue
    out = tmp_path / "out"
    finished = threading.Event()
    seen: dict = {}

    def cancel_the_worker_job() -> None:
        if not _wait_for(lambda: len(_parts(out)) >= 5, stop=finished, timeout=240):
            return
        # Running jobs of this run: they write their logs into this test's folder.
        ours = [
            job
            for job in _squeue("--states=RUNNING", "-o", "%i")
            if (logs / f"dask-worker-{job}.err").exists()
        ]
        seen["jobs"] = ours
        seen["parts"] = len(_parts(out))
        if ours:
            subprocess.run(["scancel", ours[0]], check=True)
            seen["cancelled"] = ours[0]

    killer = threading.Thread(target=cancel_the_worker_job, name="job-canceller")
    killer.start()
    try:
        # A lost worker is dropped from the cluster after this delay (default 15 s); then
        # adapt(1, 1) submits a replacement job.
        with dask.config.set({"distributed.deploy.lost-worker-timeout": "2s"}):
            table, labels = run_cli(stack3d[0], out, "--cluster", "slurm", "--adapt", "1:1")
    finally:
        finished.set()
        killer.join(timeout=60)

    assert "cancelled" in seen, f"no job was cancelled: {seen}"
    assert len(seen["jobs"]) == 1  # adapt 1:1 runs one worker job at a time
    assert 5 <= seen["parts"] < BLOCKS, "the scancel must land while blocks are being segmented"
    cancelled = seen["cancelled"]
    assert _final_state(cancelled) == "CANCELLED"
    # A replacement job, submitted after the cancelled one, started a worker.
    later = [
        int(m.group(1))
        for p in logs.iterdir()
        if (m := re.fullmatch(r"dask-worker-(\d+)\.err", p.name))
        and int(m.group(1)) > int(cancelled)
        and "Start worker" in p.read_text()
    ]
    assert later, sorted(p.name for p in logs.iterdir())
    record = _record(out)
    assert record["status"] == "complete"
    pd.testing.assert_frame_equal(table, reference_run[0], check_exact=True)
    np.testing.assert_array_equal(labels, reference_run[1])


# --- 3. a damaged input chunk ------------------------------------------------------------


@pytest.fixture
def damaged_input(stack3d, tmp_path) -> tuple[Path, tuple[slice, ...]]:
    """A copy of ``stack3d`` with one chunk of its level-0 array overwritten with garbage;
    returns the copy and that chunk's voxel region."""
    copy = tmp_path / "damaged.ome.zarr"
    shutil.copytree(stack3d[0], copy)
    level0 = zarr.open_array(str(copy / "0"), mode="r")
    metadata = {".zarray", ".zattrs", ".zgroup", "zarr.json"}
    chunk_files = sorted(
        p for p in (copy / "0").rglob("*") if p.is_file() and p.name not in metadata
    )
    assert chunk_files, "stack3d has no chunk files"
    victim = chunk_files[-1]
    key = victim.relative_to(copy / "0").parts
    key = key[1:] if key[0] == "c" else key  # zarr v3 keys start with "c"
    key = key[0].split(".") if len(key) == 1 else key  # zarr v2 "0.1.2" keys
    index = tuple(int(k) for k in key)
    region = tuple(
        slice(i * c, min((i + 1) * c, n))
        for i, c, n in zip(index, level0.chunks, level0.shape, strict=True)
    )
    victim.write_bytes(bytes(range(256)) * 16)
    return copy, region


#: What else a failing run may print on stderr: progress (bars on a terminal, dated lines
#: otherwise) and the dashboard address.
_PROGRESS = re.compile(
    r"[\w ]+: \[[# ]*\] \| \d+% Completed \| .*"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d nucflow: ([\w ]+ \d+/\d+ blocks|stage \w+ done ).*"
    r"|nucflow: dask dashboard at \S+( \(elsewhere: ssh -L [\d:.]+ \S+\))?"
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("spec", ["threads", "processes", "local"])
def test_damaged_input_chunk_fails_with_one_line_and_input_untouched(
    damaged_input, run_cli, tmp_path, capsys, spec
):
    source, damaged = damaged_input
    before = _tree_digest(source)
    out = tmp_path / "out"
    extra = ["--cluster", spec, *(["--jobs", "2"] if spec == "local" else [])]
    capsys.readouterr()
    code = main(run_cli.args(source, out, *extra))
    err = capsys.readouterr().err

    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in re.split(r"[\r\n]", err) if line]
    # One error line, the last; before it at most progress bars (a stage that ran longer than
    # 0.5 s draws one, so even with threads a loaded machine shows one) and the dashboard.
    assert err.endswith("\n") and all(_PROGRESS.fullmatch(line) for line in lines[:-1]), err
    message = re.fullmatch(
        rf"nucflow run: error: cannot decode region {REGION} of {re.escape(str(source))} "
        r"\(\w+: .+\); the file is damaged: re-copy or re-export it",
        lines[-1],
    )
    assert message, lines[-1]
    bounds = [int(v) for v in message.groups()]
    named = tuple(slice(a, b) for a, b in zip(bounds[::2], bounds[1::2], strict=True))
    assert _overlap(named, damaged), f"{_fmt(named)} is not in the damaged chunk {_fmt(damaged)}"

    # Refused while reading the input, before any stage was stored: the new output is
    # withdrawn, so the same command runs once the file is re-copied.
    assert not out.exists()
    assert _tree_digest(source) == before  # not one byte of the input changed


# --- 4. a block that fails on every attempt ----------------------------------------------


@pytest.fixture(scope="module")
def interrupted_run(stack3d, run_cli, tmp_path_factory) -> Path:
    """A run SIGKILLed once its mask (.work/mask.zarr) is on disk and blocks are being
    segmented; tests resume copies of it."""
    folder = tmp_path_factory.mktemp("interrupted")
    out, log = folder / "out", folder / "stderr.log"
    proc = run_cli.start(stack3d[0], out, stderr=log)

    def segmenting() -> bool:
        return (out / ".work" / "mask.done").exists() and bool(_parts(out))

    try:
        _wait_for(lambda: segmenting() or proc.poll() is not None)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert segmenting(), f"the run never reached segmentation: {log.read_text()[-2000:]}"
    assert len(_parts(out)) < BLOCKS, "the kill must land while blocks are being segmented"
    assert _record(out)["status"] == "running"
    return out


def _unfinished_blocks(out: Path) -> list[tuple[int, ...]]:
    done = {p.stem for p in _parts(out)}
    return [
        index
        for index in itertools.product(*map(range, GRID))
        if "_".join(map(str, index)) not in done
    ]


@pytest.mark.timeout(180)
def test_block_failing_on_every_attempt_fails_the_run_naming_the_block(
    interrupted_run, reference_run, run_cli, stack3d, tmp_path, capfd
):
    out = tmp_path / "out"
    shutil.copytree(interrupted_run, out)
    chunks = run_cli.chunks
    # An unfinished block that holds nuclei, so it writes its core of the label image...
    index = next(i for i in _unfinished_blocks(out) if reference_run[1][_core(i, chunks)].any())
    block = _fmt(_core(index, chunks))
    # ... where a directory now stands in the way of its chunk file (labels.ome.zarr is zarr
    # 3, chunk keys c/z/y/x): the write fails on every attempt, on any worker.
    in_the_way = out.joinpath("labels.ome.zarr", "0", "c", *map(str, index))
    in_the_way.unlink(missing_ok=True)
    in_the_way.mkdir(parents=True)

    capfd.readouterr()
    # LocalCluster: the client retries a failed task before the run gives up.
    code = main(run_cli.args(stack3d[0], out, "--resume", "--cluster", "local", "--jobs", "2"))
    # file-descriptor level: the worker processes' logs too
    err = capfd.readouterr().err

    assert code == 1, err
    ours = [line for line in err.splitlines() if line.startswith("nucflow run:")]
    assert len(ours) == 1, err
    assert re.fullmatch(
        rf"nucflow run: unexpected error: BlockError: block {re.escape(block)} failed: "
        r"IsADirectoryError: .+; if it ran out of memory, rerun with smaller --chunks "
        r"\(rerun with --debug for a traceback\)",
        ours[0],
    ), ours[0]
    # Each failed attempt is logged by the worker that ran it ("Compute Failed").
    attempts = re.findall(rf"Exception: .BlockError\(.block {re.escape(block)} failed", err)
    assert len(attempts) >= 2, f"the block was not retried: {err[-3000:]}"
    record = _record(out)
    assert record["status"] == "failed"
    assert record["error"].startswith(f"BlockError: block {block} failed: IsADirectoryError")
    assert not (out / "nuclei.parquet").exists()
    assert index in _unfinished_blocks(out)


@pytest.mark.timeout(120)
def test_undecodable_mask_chunk_fails_the_run_naming_a_block_that_reads_it(
    interrupted_run, run_cli, stack3d, tmp_path, capsys
):
    out = tmp_path / "out"
    shutil.copytree(interrupted_run, out)
    chunks = run_cli.chunks
    halo = _record(out)["halo"]
    shape = stack3d[1].image.shape
    # The mask intermediate is stored on the block grid (zarr v3, "c/Z/Y/X" keys), as the
    # pass before it when a component selection kept everything (marked .same)
    work, name = out / ".work", "mask"
    while (work / f"{name}.same").exists():
        name = {"mask": "filled", "filled": "opened"}[name]
    index = _unfinished_blocks(out)[0]
    chunk = work.joinpath(f"{name}.zarr", "c", *map(str, index))
    assert chunk.is_file()
    chunk.write_bytes(bytes(range(256)) * 16)
    damaged = _core(index, chunks)

    capsys.readouterr()
    code = main(run_cli.args(stack3d[0], out, "--resume"))
    err = capsys.readouterr().err

    assert code == 1, err
    ours = [line for line in err.splitlines() if line.startswith("nucflow run:")]
    assert len(ours) == 1 and err.endswith(ours[0] + "\n"), err
    # The segment task reads its padded mask block itself, so the failure names the block.
    message = re.fullmatch(
        rf"nucflow run: unexpected error: BlockError: block {REGION} failed: \w+Error: .+; "
        r"if it ran out of memory, rerun with smaller --chunks "
        r"\(rerun with --debug for a traceback\)",
        ours[0],
    )
    assert message, ours[0]
    record = _record(out)
    assert record["status"] == "failed"
    assert record["error"].startswith("BlockError: block [")
    assert not (out / "nuclei.parquet").exists()
    bounds = [int(v) for v in message.groups()]
    core = tuple(slice(a, b) for a, b in zip(bounds[::2], bounds[1::2], strict=True))
    padded = tuple(
        slice(max(0, c.start - h), min(n, c.stop + h))
        for c, h, n in zip(core, halo, shape, strict=True)
    )
    assert _overlap(padded, damaged), f"block {_fmt(core)} does not read {_fmt(damaged)}"
