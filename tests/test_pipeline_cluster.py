"""The nuclei flow gives the same table on every kind of scheduler, SLURM included."""

from __future__ import annotations

import os
import re
import sys

import dask
import numpy as np
import pandas as pd
import pytest
import zarr

from nucflow.cli import main


def _run(source, out, *extra) -> tuple[pd.DataFrame, np.ndarray]:
    assert (
        main(
            [
                "run",
                "--input",
                str(source),
                "--output",
                str(out),
                "--chunks",
                "20",
                "64",
                "64",
                *extra,
            ]
        )
        == 0
    )
    labels = np.asarray(zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r"))
    return pd.read_parquet(out / "nuclei.parquet"), labels


@pytest.fixture(scope="module")
def threaded(stack3d, tmp_path_factory):
    return _run(stack3d[0], tmp_path_factory.mktemp("threads") / "out")


@pytest.mark.parametrize("spec", ["processes", "local"])
def test_schedulers_give_identical_outputs(stack3d, threaded, tmp_path, spec):
    table, labels = _run(stack3d[0], tmp_path / "out", "--cluster", spec)
    pd.testing.assert_frame_equal(table, threaded[0], check_exact=False, rtol=1e-12)
    np.testing.assert_array_equal(labels, threaded[1])


@pytest.mark.slurm
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_run_gives_identical_outputs_from_real_jobs(stack3d, threaded, tmp_path):
    logs = tmp_path / "logs"
    # the conventional dask-jobqueue configuration, as a user's ~/.config/dask/jobqueue.yaml
    # would give it (DASK_JOBQUEUE__SLURM__* variables are read when dask is imported)
    jobqueue = {
        "cores": 1,
        "memory": "2GiB",
        "walltime": "00:20:00",
        "log-directory": str(logs),
        "python": sys.executable,
    }
    with dask.config.set({f"jobqueue.slurm.{k}": v for k, v in jobqueue.items()}):
        table, labels = _run(stack3d[0], tmp_path / "out", "--cluster", "slurm", "--jobs", "2")
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
