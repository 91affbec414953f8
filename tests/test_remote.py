"""zarr / OME-Zarr by URL: a real S3 server (moto's, on 127.0.0.1) read through s3fs as a user's
AWS configuration says (``AWS_ENDPOINT_URL``, access keys in the environment). The run on S3
giving the local table is in tests/test_formats.py."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from nucflow import io, synth
from nucflow.cli import main

pytest.importorskip("s3fs")

SHAPE = (24, 96, 96)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 24x96x96 OME-Zarr with 25 nuclei, and its table and labels from a local run."""
    made = synth.make_nuclei(SHAPE, n_nuclei=25, diameter=8.0, seed=7)
    root = tmp_path_factory.mktemp("remote")
    path = root / "stack.ome.zarr"
    io.write_ome_zarr(path, made.image, made.voxel_size, chunks=(12, 48, 48))
    return path, made, root


@pytest.fixture
def on_s3(s3_server, small, monkeypatch):
    s3_server.env(monkeypatch)
    return s3_server.upload(small[0], "lab", f"data/{small[0].name}")


def test_open_stack_by_s3_url_is_lazy_picklable_and_equal(on_s3, small):
    stack = io.open_stack(on_s3)
    assert stack.voxel_size == pytest.approx(small[1].voxel_size)
    assert stack.data.shape == SHAPE and stack.path == on_s3
    again = pickle.loads(pickle.dumps(stack))  # what a process or SLURM worker receives
    np.testing.assert_array_equal(again.data.compute(), small[1].image)
    assert again.data_region() == tuple(slice(0, n) for n in SHAPE)


def _one_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err
    return err


def test_missing_bucket_key_and_refused_credentials_exit_2(
    on_s3, s3_server, tmp_path, capsys, monkeypatch
):
    plan = ["plan", "--input"]
    err = _one_line(capsys, [*plan, "s3://nobucket/stack.ome.zarr"])
    assert (
        "bucket 'nobucket' does not exist or is not visible with these credentials at "
        + (f"{s3_server.url}; check the URL")
        in err
    )
    err = _one_line(capsys, [*plan, "s3://lab/data/other.ome.zarr"])
    assert "error: input s3://lab/data/other.ome.zarr does not exist (no zarr metadata" in err
    s3_server.env(monkeypatch, key="AKIAWRONGWRONGWRONG0")
    err = _one_line(capsys, ["run", "--input", on_s3, "--output", str(tmp_path / "out")])
    assert f"input {on_s3}: access refused" in err and "AWS_ACCESS_KEY_ID" in err
    assert not (tmp_path / "out").exists()


def test_unreachable_endpoint_and_unknown_protocol_exit_2(capsys, monkeypatch, s3_server):
    s3_server.env(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard: nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    err = _one_line(capsys, ["plan", "--input", "s3://lab/data/stack.ome.zarr"])
    assert "the store cannot be reached" in err and "AWS_ENDPOINT_URL" in err
    err = _one_line(capsys, ["plan", "--input", "nosuch://lab/stack.ome.zarr"])
    assert "fsspec knows no protocol 'nosuch'" in err


class _Flaky:
    """A source whose first ``failures`` reads raise ``error`` (a dropped connection, say)."""

    shape, dtype = (4, 4), np.dtype(np.uint16)

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def __getitem__(self, key):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return np.ones((4, 4), np.uint16)[key]


def test_reads_are_retried_on_transfer_errors_only(monkeypatch):
    from nucflow.errors import InputPathError
    from nucflow.io import remote

    monkeypatch.setattr(remote, "_BACKOFF_S", 0.001)
    flaky = _Flaky(2, ConnectionResetError("Connection reset by peer"))
    region = remote.RetryingSource(flaky, "s3://lab/x.zarr", attempts=3)[:2, :2]
    assert region.shape == (2, 2) and flaky.calls == 3
    down = remote.RetryingSource(_Flaky(9, TimeoutError("timed out")), "s3://lab/x.zarr", 3)
    with pytest.raises(InputPathError, match=r"cannot read s3://lab/x.zarr after 3 attempts"):
        down[:1, :1]
    damaged = _Flaky(9, ValueError("blosc: corrupted chunk"))
    with pytest.raises(ValueError, match="corrupted"):  # Selection reports the region damaged
        remote.RetryingSource(damaged, "s3://lab/x.zarr", 3)[:1, :1]
    assert damaged.calls == 1


def test_https_style_url_reads_the_store(small):
    """A plain HTTP server (Python's, on 127.0.0.1) serving the OME-Zarr folder: fsspec's HTTP
    filesystem, as for a public https:// store."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
         "--directory", str(small[2])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        stack = io.open_stack(f"http://127.0.0.1:{port}/{small[0].name}")
        assert stack.voxel_size == pytest.approx(small[1].voxel_size)
        np.testing.assert_array_equal(stack.data.compute(), small[1].image)
    finally:
        server.terminate()
        server.wait()
