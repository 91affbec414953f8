"""Static checks, run with the tests so that the README's one test command (and CI) runs them:
mypy on src/ with the configuration in pyproject.toml, and ruff's lint and format checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


@pytest.mark.timeout(600)
def test_mypy_finds_no_type_errors_in_src():
    done = _run("mypy", "--config-file", "pyproject.toml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("Success: no issues found in"), done.stdout


@pytest.mark.parametrize(
    "check",
    [("check", "src", "tests", "benchmarks"), ("format", "--check", "src", "tests", "benchmarks")],
    ids=["lint", "format"],
)
def test_ruff_is_clean(check):
    done = _run("ruff", *check)
    assert done.returncode == 0, done.stdout + done.stderr
