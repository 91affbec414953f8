"""Shared fixtures: small synthetic stacks written to disk as OME-Zarr."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nucflow import io, synth


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
