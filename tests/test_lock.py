"""The output lock: one holder, owner-only, a heartbeat, stale locks taken over, never stolen."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import zarr

from nucflow import lock
from nucflow.cli import main
from nucflow.errors import OutputError


def _write_lock(out, **fields) -> None:
    record = {
        "token": "someone-else",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": None,
        "started": "2026-11-29T10:00:00+00:00",
        "heartbeat": time.time(),
        **fields,
    }
    (out / lock.LOCK_NAME).write_text(json.dumps(record))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_file_is_owner_only_and_says_who_holds_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    held = lock.acquire(tmp_path)
    try:
        path = tmp_path / lock.LOCK_NAME
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        record = json.loads(path.read_text())
        assert record["host"] == socket.gethostname()
        assert record["pid"] == os.getpid()
        assert record["slurm_job_id"] == "4242"
        assert abs(record["heartbeat"] - time.time()) < 60
        assert record["started"].startswith("20")
        # nothing but the lock is left behind (no private or temporary files)
        assert [p.name for p in tmp_path.iterdir()] == [lock.LOCK_NAME]
    finally:
        held.release()
    assert not (tmp_path / lock.LOCK_NAME).exists()


def test_second_claim_is_refused_naming_the_holder(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    held = lock.acquire(tmp_path)
    try:
        pattern = (
            rf"in use by nucflow run \(PID {os.getpid()} on {socket.gethostname()}, "
            r"SLURM job 77, started .+\); wait for that run"
        )
        with pytest.raises(OutputError, match=pattern):
            lock.acquire(tmp_path)
        assert lock.holder_of(tmp_path).startswith(f"nucflow run (PID {os.getpid()}")
    finally:
        held.release()
    assert lock.holder_of(tmp_path) is None
    lock.acquire(tmp_path).release()  # free again


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    with pytest.warns(UserWarning, match="taking over the lock .* no longer running on this host"):
        held = lock.acquire(tmp_path)
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    held.release()


def test_lock_with_an_old_heartbeat_is_taken_over_from_another_host(tmp_path):
    _write_lock(tmp_path, host="elsewhere", heartbeat=time.time() - lock.STALE_AFTER_S - 5)
    with pytest.warns(UserWarning, match=r"sent no heartbeat for \d+ s \(stale after 300 s\)"):
        lock.acquire(tmp_path).release()


def test_live_lock_of_another_host_is_respected(tmp_path):
    # Its PID means nothing here: only the heartbeat can tell whether that run is alive.
    _write_lock(tmp_path, host="elsewhere", pid=_dead_pid(), heartbeat=time.time() - 60)
    with pytest.raises(OutputError, match="in use by nucflow run .* on elsewhere"):
        lock.acquire(tmp_path)


def test_unreadable_lock_counts_as_held_until_its_file_is_old(tmp_path):
    path = tmp_path / lock.LOCK_NAME
    path.write_bytes(b"\x00garbage")
    with pytest.raises(OutputError, match=r"in use by another nucflow run \(its lock file cannot"):
        lock.acquire(tmp_path)
    old = time.time() - lock.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    with pytest.warns(UserWarning, match="taking over the lock .* sent no heartbeat"):
        lock.acquire(tmp_path).release()


def test_heartbeat_is_refreshed_while_the_run_lives(tmp_path):
    held = lock.acquire(tmp_path, heartbeat=0.05)
    try:
        first = json.loads((tmp_path / lock.LOCK_NAME).read_text())["heartbeat"]
        time.sleep(0.4)
        later = json.loads((tmp_path / lock.LOCK_NAME).read_text())["heartbeat"]
        assert later > first
    finally:
        held.release()


def test_a_lock_taken_over_is_noticed_and_not_released_by_its_old_holder(tmp_path):
    held = lock.acquire(tmp_path, heartbeat=0.05)
    # As if this run had stalled for longer than the timeout and another took the lock over.
    _write_lock(tmp_path, token="the-new-holder", pid=1)
    time.sleep(0.4)
    with pytest.raises(OutputError, match=r"lost its output directory: .* \(PID 1 on"):
        held.check()
    held.release()
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["token"] == "the-new-holder"


def test_racing_claims_give_exactly_one_holder(tmp_path):
    """Twenty threads claim one directory at once, a stale lock in place: exactly one wins."""
    _write_lock(tmp_path, pid=_dead_pid())
    won, refused = [], []
    barrier = threading.Barrier(20)

    def claim() -> None:
        barrier.wait()
        try:
            won.append(lock.acquire(tmp_path))
        except OutputError:
            refused.append(1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the winner's takeover warning, raised in its thread
        threads = [threading.Thread(target=claim) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(won) == 1 and len(refused) == 19
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["token"] == won[0].record["token"]
    won[0].release()
    assert not any(tmp_path.iterdir())  # no guard or private file left behind


# --- whole runs: a second run on a running output ---------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("spec", ["threads", pytest.param("local", marks=pytest.mark.slow)])
def test_second_run_on_a_running_output_is_refused_and_the_first_is_unharmed(
    stack3d, reference_run, run_cli, tmp_path, capsys, spec
):
    out, log = tmp_path / "out", tmp_path / "first.log"
    extra = ["--cluster", spec, *(["--jobs", "2"] if spec == "local" else [])]
    first = run_cli.start(stack3d[0], out, *extra, stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None and not (out / "run.json").exists():
        time.sleep(0.02)
    # Stopped, the first run is a run that stalls but lives: its lock must hold. (Stopping it
    # also makes sure it is still running while the others try.)
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        assert (out / "run.json").exists(), log.read_text()[-2000:]
        for again in (["--resume"], ["--overwrite"], []):
            capsys.readouterr()
            code = main(run_cli.args(stack3d[0], out, *again, *extra))
            err = capsys.readouterr().err
            assert code == 2, err
            assert "Traceback" not in err
            ours = [line for line in err.splitlines() if line.startswith("nucflow run:")]
            assert len(ours) == 1, err
            assert re.fullmatch(
                rf"nucflow run: error: output directory {re.escape(str(out))} is in use by "
                rf"nucflow run \(PID {first.pid} on {re.escape(socket.gethostname())}, "
                r"started [^)]+\); wait for that run to end, or stop it, or choose another "
                "--output",
                ours[0],
            ), ours[0]
            assert json.loads((out / "run.json").read_text())["status"] == "running"
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert first.wait(timeout=180) == 0, log.read_text()[-2000:]

    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    assert not (out / lock.LOCK_NAME).exists()  # released at the end
    table = pd.read_parquet(out / "nuclei.parquet")
    labels = np.asarray(zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r"))
    pd.testing.assert_frame_equal(table, reference_run[0], check_exact=True)
    np.testing.assert_array_equal(labels, reference_run[1])
