"""Shared fixtures: small synthetic stacks written to disk as OME-Zarr."""

from __future__ import annotations

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
