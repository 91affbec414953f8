"""The nuclei flow gives the same table on every kind of scheduler, SLURM included."""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def run_coarse(run_cli):
    """The CLI on eight blocks: enough to spread over workers, few enough for Slurm jobs."""
    return type(run_cli)(chunks=(20, 64, 64))


@pytest.fixture(scope="module")
def threaded(stack3d, run_coarse, tmp_path_factory):
    return run_coarse(stack3d[0], tmp_path_factory.mktemp("threads") / "out")


@pytest.mark.parametrize("spec", ["processes", "local"])
def test_schedulers_give_identical_outputs(stack3d, threaded, run_coarse, tmp_path, spec):
    table, labels = run_coarse(stack3d[0], tmp_path / "out", "--cluster", spec)
    pd.testing.assert_frame_equal(table, threaded[0], check_exact=False, rtol=1e-12)
    np.testing.assert_array_equal(labels, threaded[1])


@pytest.mark.slurm
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_run_gives_identical_outputs_from_real_jobs(
    stack3d, threaded, run_coarse, slurm_jobqueue, tmp_path
):
    logs = slurm_jobqueue
    table, labels = run_coarse(stack3d[0], tmp_path / "out", "--cluster", "slurm", "--jobs", "2")
    pd.testing.assert_frame_equal(table, threaded[0], check_exact=False, rtol=1e-12)
    np.testing.assert_array_equal(labels, threaded[1])
    # the workers were Slurm jobs: each wrote its job log, naming its Slurm job id
    job_logs = sorted(p.name for p in logs.iterdir())
    assert job_logs and all(re.fullmatch(r"dask-worker-\d+\.(out|err)", n) for n in job_logs), (
        job_logs
    )
    assert any(
        "Start worker" in (logs / n).read_text() for n in job_logs if os.path.getsize(logs / n)
    )
    # ... over TLS (issue 19), and no key material reached the logs or run.json
    texts = [(logs / n).read_text() for n in job_logs]
    texts.append((tmp_path / "out" / "run.json").read_text())
    assert any("tls://" in text for text in texts)
    assert not any("PRIVATE KEY" in text or "BEGIN CERTIFICATE" in text for text in texts)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_run_longer_than_a_walltime_completes(
    stack3d, reference_run, run_cli, slurm_jobqueue, tmp_path
):
    """One worker job at a time with a one-minute walltime, several walltimes of work, and no
    worker death allowed (issue 27, 13): each worker retires before Slurm would kill it, with a
    block running; a replacement job starts meanwhile and takes its results; the run equals
    the threaded one."""
    import time

    import dask

    logs = slurm_jobqueue
    start = time.monotonic()
    settings = {
        "jobqueue.slurm.walltime": "00:01:00",
        # A job whose worker left is dropped from the cluster (and replaced) after this delay.
        "distributed.deploy.lost-worker-timeout": "2s",
        # A single task lost to a dying worker fails the run: retiring must not count as one.
        "distributed.scheduler.allowed-failures": 0,
    }
    with dask.config.set(settings):
        # small blocks: many tasks, so that one worker job needs several walltimes
        fine = ("--chunks", "8", "16", "16")
        table, labels = run_cli(stack3d[0], tmp_path / "out", "--cluster", "slurm", *fine)
    elapsed = time.monotonic() - start
    pd.testing.assert_frame_equal(table, reference_run[0], check_exact=False, rtol=1e-12)
    np.testing.assert_array_equal(labels, reference_run[1])
    job_logs = {p.stem: p.read_text() for p in logs.glob("dask-worker-*.err")}
    retired = [job for job, text in job_logs.items() if "worker-lifetime-reached" in text]
    mid_task = [
        job
        for job, text in job_logs.items()
        if re.search(r"retires before its job's walltime: no new tasks; [1-9]\d* running", text)
    ]
    # several worker jobs, one after another, each leaving before its walltime, mid-task
    assert len(job_logs) >= 2 and retired and mid_task, (elapsed, sorted(job_logs))
    assert not any("DUE TO TIME LIMIT" in text for text in job_logs.values())
    print(
        f"walltime run: {elapsed:.0f} s, {len(job_logs)} jobs, {len(retired)} retired, "
        f"{len(mid_task)} mid-task"
    )
