"""``nucflow status`` of an interrupted run (issue 27): a real ``nucflow run`` sent SIGINT or
SIGTERM while it segments reads ``interrupted`` (exit code 1), not ``failed``, and its block
counts are those on disk; a run.json of an older nucflow (``failed``, ``KeyboardInterrupt: ``)
reads the same. No nucflow internals are mocked: run.json is edited only to stand for what an
older nucflow, or a progress record written before the last blocks, left."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nucflow.cli import main

#: The console script of this interpreter's environment (``nucflow.cli`` has no __main__).
NUCFLOW = Path(sys.executable).with_name("nucflow")
SHAPE = (32, 128, 128)
CHUNKS = (8, 32, 32)
BLOCKS = 4 * 4 * 4


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "stack.zarr"
    shape = [str(n) for n in SHAPE]
    assert main(["synth", "--shape", *shape, "--nuclei", "40", "--seed", "5", str(path)]) == 0
    return path


def _parts(out: Path) -> int:
    """Segmentation parts on disk: one per finished block."""
    return len(list((out / ".work" / "blocks").glob("*.parquet")))


def _interrupt(stack: Path, out: Path, sig: signal.Signals) -> tuple[int, str]:
    """``nucflow run`` in a process of its own, sent ``sig`` once its first segmentation
    blocks are on disk; its exit code and stderr."""
    err = out.with_name(out.name + ".err")
    argv = [str(NUCFLOW), "run", "--input", str(stack), "--output", str(out), "--chunks"]
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [*argv, *map(str, CHUNKS)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not _parts(out) and proc.poll() is None:
            assert time.monotonic() < deadline, "no segmentation block within 120 s"
            time.sleep(0.01)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.read_text()


def _status(out: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["status", str(out)])
    return code, capsys.readouterr().out


def _edit(out: Path, change) -> None:
    path = out / "run.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.fixture(scope="module")
def interrupted(stack, tmp_path_factory) -> Path:
    """A run Ctrl-C'd while segmenting (kept as it is: tests copy it)."""
    out = tmp_path_factory.mktemp("interrupted") / "out"
    code, err = _interrupt(stack, out, signal.SIGINT)
    assert code == 130, err[-2000:]
    return out


def _check_interrupted(out: Path, text: str, code: int, sig: str) -> None:
    parts = _parts(out)
    assert 0 < parts < BLOCKS, "the signal must land while segmenting"
    assert code == 1, text
    assert text.startswith(f"nucflow status {out}: interrupted ({sig})"), text
    stage = rf"\n  stage     segment \(pass 1/1\): segment {parts}/{BLOCKS} blocks( on disk)? \("
    assert re.search(stage, text), text
    assert re.search(r"\n  stages    .*mask done \S+, segment interrupted \S+, table -", text)
    assert f", segment blocks {parts}/{BLOCKS}\n" in text
    assert f"\n  resume    would redo segment ({BLOCKS - parts} of {BLOCKS} blocks), " in text
    assert not re.search(r"\bfailed\b|\berror\b", text.replace(str(out), "OUT")), text


@pytest.mark.timeout(240)
def test_sigint_while_segmenting_reads_interrupted(interrupted, capsys):
    record = json.loads((interrupted / "run.json").read_text())
    assert (record["status"], record.get("signal")) == ("interrupted", "SIGINT")
    assert "error" not in record
    code, text = _status(interrupted, capsys)
    _check_interrupted(interrupted, text, code, "SIGINT")


@pytest.mark.timeout(240)
def test_sigterm_while_segmenting_reads_interrupted(stack, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _interrupt(stack, out, signal.SIGTERM)
    assert code == 143, err[-2000:]  # 128 + SIGTERM, as a shell reports it
    record = json.loads((out / "run.json").read_text())
    assert (record["status"], record.get("signal")) == ("interrupted", "SIGTERM")
    code, text = _status(out, capsys)
    _check_interrupted(out, text, code, "SIGTERM")


def test_blocks_on_disk_outnumber_the_progress_record(interrupted, tmp_path, capsys):
    """The record is rewritten every few seconds: the issue's ``segment 0/64 blocks``."""
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)

    def older(record: dict) -> None:
        record.update(status="interrupted", signal="SIGINT")
        record["progress"]["pass"]["done"] = 0
        record["progress"]["stages"]["segment"]["passes"][-1]["done"] = 0

    _edit(out, older)
    code, text = _status(out, capsys)
    parts = _parts(out)
    assert f": segment {parts}/{BLOCKS} blocks on disk ({100 * parts // BLOCKS}%)" in text
    _check_interrupted(out, text, code, "SIGINT")

    def before_the_pass(record: dict) -> None:  # saved as the stage began: no pass yet
        record["progress"]["pass"] = None
        record["progress"]["stages"]["segment"]["passes"] = []

    _edit(out, before_the_pass)
    code, text = _status(out, capsys)
    assert f"  stage     segment (pass 0/1): segment {parts}/{BLOCKS} blocks on disk (" in text


@pytest.mark.parametrize(
    ("error", "sig"),
    [("KeyboardInterrupt: ", "SIGINT"), ("Terminated: ", "SIGTERM")],
)
def test_an_older_nucflows_failed_keyboard_interrupt_reads_interrupted(
    interrupted, tmp_path, capsys, error, sig
):
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)

    def older(record: dict) -> None:
        record.pop("signal", None)
        record.update(status="failed", error=error)

    _edit(out, older)
    code, text = _status(out, capsys)
    _check_interrupted(out, text, code, sig)


def test_another_error_still_reads_failed(interrupted, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)

    def failed(record: dict) -> None:
        record.pop("signal", None)
        record.update(status="failed", error="MemoryError: out of memory")

    _edit(out, failed)
    code, text = _status(out, capsys)
    assert code == 1
    assert text.startswith(f"nucflow status {out}: failed\n"), text
    assert "\n  error     MemoryError: out of memory\n" in text
    assert "segment failed" in text and "interrupted" not in text
    assert re.search(rf": segment {_parts(out)}/{BLOCKS} blocks( on disk)? \(", text), text
