"""Shared fixtures: small synthetic stacks written to disk as OME-Zarr, whole CLI runs on them
(in this process or another), and real Slurm."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import zarr

from nucflow import io, synth
from nucflow.cli import main

#: The block grid of the fault and resume tests: 5 x 4 x 4 = 80 blocks of the 40x128x128
#: ``stack3d``, so a run has many blocks in flight when something is done to it.
FINE_CHUNKS = (8, 32, 32)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def ome_zarr_reads_warn_nothing():
    """Every ome-zarr-py read in the suite is warning-free: it once logged "version mismatch:
    detected: FormatV04, requested: FormatV05" and "no parent found for <Label ...>" on every
    read of a run's labels.ome.zarr (NGFF 0.4, no source image). A test that reads NGFF 0.4
    on purpose passes the reader its format (``parse_url(path, fmt=FormatV04())``)."""
    handler = _Records()  # a test expecting a warning takes it: ``expect_no_parent``
    logger = logging.getLogger("ome_zarr")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
    said = [f"{r.name}: {r.getMessage()}" for r in handler.records]
    assert not said, f"ome-zarr-py warned: {said}"


def expect_no_parent(handler: _Records) -> None:
    """The one warning a label image alone gets (no source image: labels of a TIFF input, or
    written by a test), taken off the fixture's list."""
    said = [r.getMessage() for r in handler.records]
    assert said and all(m.startswith("no parent found for <ome_zarr.reader.Label") for m in said)
    handler.records.clear()


@pytest.fixture(scope="session")
def stack3d(tmp_path_factory) -> tuple[Path, synth.SyntheticStack]:
    """A 3D stack with touching nuclei, anisotropic voxels, as OME-Zarr with ground truth."""
    made = synth.make_nuclei((40, 128, 128), n_nuclei=70, diameter=8.0, seed=3)
    path = tmp_path_factory.mktemp("data") / "nuclei3d.ome.zarr"
    io.write_ome_zarr(path, made.image, made.voxel_size, labels={"truth": made.truth})
    return path, made


@pytest.fixture(scope="session")
def stack2d(tmp_path_factory) -> tuple[Path, synth.SyntheticStack]:
    made = synth.make_nuclei((256, 256), n_nuclei=70, diameter=8.0, seed=4)
    path = tmp_path_factory.mktemp("data") / "nuclei2d.ome.zarr"
    io.write_ome_zarr(path, made.image, made.voxel_size, labels={"truth": made.truth})
    return path, made


# --- whole runs through the CLI ---------------------------------------------------------


class CliRunner:
    """``nucflow run`` on the block grid ``chunks``, in this process or as argv for another."""

    def __init__(self, chunks: tuple[int, ...] = FINE_CHUNKS) -> None:
        self.chunks = chunks

    def args(self, source: str | os.PathLike, out: str | os.PathLike, *extra: str) -> list[str]:
        """``run --input SOURCE --output OUT --chunks Z Y X EXTRA...``"""
        chunks = [str(c) for c in self.chunks]
        return ["run", "--input", str(source), "--output", str(out), "--chunks", *chunks, *extra]

    def start(
        self,
        source: str | os.PathLike,
        out: str | os.PathLike,
        *extra: str,
        stderr: str | os.PathLike | None = None,
    ) -> subprocess.Popen:
        """Start the run in a fresh interpreter, in a session of its own (so that
        ``os.killpg(proc.pid, SIGKILL)`` takes its worker processes too); stdout is
        discarded, stderr too unless a file is given."""
        code = "from nucflow.cli import main; raise SystemExit(main())"
        with open(stderr or os.devnull, "wb") as err:
            return subprocess.Popen(
                [sys.executable, "-c", code, *self.args(source, out, *extra)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )

    def __call__(
        self, source: str | os.PathLike, out: str | os.PathLike, *extra: str
    ) -> tuple[pd.DataFrame, np.ndarray]:
        """Run in this process; require exit code 0; return the table and the label image."""
        argv = self.args(source, out, *extra)
        code = main(argv)
        assert code == 0, f"nucflow {' '.join(argv)} exited {code}"
        labels = np.asarray(zarr.open_array(str(Path(out) / "labels.ome.zarr" / "0"), mode="r"))
        return pd.read_parquet(Path(out) / "nuclei.parquet"), labels


@pytest.fixture(scope="session")
def run_cli() -> CliRunner:
    """``run_cli(source, out, *extra)`` runs the CLI on ``FINE_CHUNKS`` (80 blocks of
    ``stack3d``); ``run_cli.args(...)`` is the same command line, for a subprocess."""
    return CliRunner()


@pytest.fixture(scope="session")
def reference_run(stack3d, tmp_path_factory) -> tuple[pd.DataFrame, np.ndarray]:
    """Table and labels of an uninterrupted threaded run of ``stack3d`` on ``FINE_CHUNKS``."""
    return CliRunner()(stack3d[0], tmp_path_factory.mktemp("reference") / "out")


# --- real Slurm (started by .ci/slurm-up.sh) ---------------------------------------------


def _slurm_unavailable() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm client commands not on PATH: run .ci/slurm-up.sh"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        return "sinfo timed out: run .ci/slurm-up.sh"
    if proc.returncode != 0 or not proc.stdout.strip():
        return f"sinfo failed ({proc.stderr.strip()[:100]}): run .ci/slurm-up.sh"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Skip (or, with NUCFLOW_REQUIRE_SLURM=1 as in CI, fail) unless Slurm answers."""
    # Checked lazily: sinfo takes ~10 s to give up on a controller that is not running.
    reason = _slurm_unavailable()
    if reason and os.environ.get("NUCFLOW_REQUIRE_SLURM") == "1":
        pytest.fail(f"NUCFLOW_REQUIRE_SLURM=1 but {reason}")
    if reason:
        pytest.skip(reason)


@pytest.fixture
def slurm_jobqueue(tmp_path) -> Path:
    """dask-jobqueue set up the conventional way, as a user's ~/.config/dask/jobqueue.yaml
    would (DASK_JOBQUEUE__SLURM__* variables are read when dask is imported): one core and
    2 GiB per worker job, this interpreter, job logs in the yielded folder."""
    # Registers dask-jobqueue's defaults first: a dask.config.set of jobqueue.slurm.* before
    # that would, on exit, drop the whole `jobqueue` section, defaults included.
    import dask_jobqueue  # noqa: F401

    logs = tmp_path / "logs"
    jobqueue = {
        "cores": 1,
        "memory": "2GiB",
        "walltime": "00:20:00",
        "log-directory": str(logs),
        "python": sys.executable,
    }
    with dask.config.set({f"jobqueue.slurm.{k}": v for k, v in jobqueue.items()}):
        yield logs


# --- file systems of their own (root only: CI runs as root) ---------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """Mount tmpfs file systems under tmp_path (root only, as in CI); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root (CI runs as root)")
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        target = tmp_path / name
        target.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], check=True)
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)


# --- a real S3 server (moto's, on 127.0.0.1) ------------------------------------------------


class S3Server:
    """moto's S3 server in a process of its own, with authentication on: only ``key`` works."""

    def __init__(self, url: str, key: str, secret: str) -> None:
        self.url, self.key, self.secret = url, key, secret

    def env(self, monkeypatch: pytest.MonkeyPatch, *, key: str | None = None) -> None:
        """Point this process' AWS configuration at the server, as a user's environment would
        (``key``: another access key id, e.g. a wrong one)."""
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses a filesystem per options
        monkeypatch.setenv("AWS_ENDPOINT_URL", self.url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key or self.key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", self.secret)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(name, raising=False)

    def upload(self, local: Path, bucket: str, key: str) -> str:
        """Copy the folder ``local`` to ``s3://bucket/key`` (bucket made if new); its URL."""
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
        )
        if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
            s3.create_bucket(Bucket=bucket)
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            s3.upload_file(str(path), bucket, f"{key}/{path.relative_to(local).as_posix()}")
        return f"s3://{bucket}/{key}"


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    """moto's server on a free port of 127.0.0.1, with IAM authentication after the three
    unauthenticated calls that make its one user and key (a wrong key is then refused)."""
    pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    import json
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        iam = boto3.client(
            "iam", endpoint_url=url, region_name="us-east-1",
            aws_access_key_id="setup", aws_secret_access_key="setup",
        )  # fmt: skip
        iam.create_user(UserName="nucflow")
        made = iam.create_access_key(UserName="nucflow")["AccessKey"]
        policy = {"Version": "2012-10-17",
                  "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}  # fmt: skip
        iam.put_user_policy(UserName="nucflow", PolicyName="all", PolicyDocument=json.dumps(policy))
        yield S3Server(url, made["AccessKeyId"], made["SecretAccessKey"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
