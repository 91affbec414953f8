"""Fingerprints: the input identity sees changes; a stage fingerprint sees what it depends on."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import tifffile
import zarr

from nucflow import config, fingerprint, io


def _resolved() -> config.Params:
    loaded = config.load(None, options={"diameter": 8.0, "chunks": [8, 32, 32]})
    return config.resolve(loaded, shape=(16, 64, 64), voxel_size=(1.0, 0.5, 0.5))


def _params(**changes) -> dict:
    flat = _resolved().flat()
    assert set(changes) <= set(flat), set(changes) - set(flat)
    return fingerprint._plain({**flat, **changes})


def _chain(params: dict, stages=("preprocessed", "threshold", "mask", "segment")) -> dict:
    lineage = fingerprint.Lineage({"path": "/data/x.zarr"}, params)
    out = {}
    for stage in stages:
        out[stage] = lineage.fingerprint(stage)
        lineage.previous = out[stage]
    return out


def test_stage_params_name_real_parameters():
    """A misspelt key would make a stage ignore a parameter it depends on."""
    fields = set(_resolved().flat())
    for stage, keys in fingerprint.STAGE_PARAMS.items():
        assert set(keys) <= fields, (stage, set(keys) - fields)


def test_a_changed_parameter_changes_its_stage_and_every_later_one():
    base = _chain(_params())
    assert _chain(_params()) == base  # deterministic
    threshold = _chain(_params(threshold_method="li"))
    assert threshold["preprocessed"] == base["preprocessed"]  # does not depend on it
    for stage in ("threshold", "mask", "segment"):
        assert threshold[stage] != base[stage]
    sigma = _chain(_params(sigma=1.0))
    assert all(sigma[s] != base[s] for s in base)
    # a parameter only segmentation reads reaches only segmentation (not listed: all params)
    radius = _chain(_params(min_radius=2.0))
    assert [s for s in base if radius[s] != base[s]] == ["segment"]
    # the local detection's reach is segment.max_radius: it reaches back to the threshold stage
    reach = _chain(_params(max_radius=12.0))
    assert [s for s in base if reach[s] != base[s]] == ["threshold", "mask", "segment"]


def test_another_version_changes_every_fingerprint():
    params = _params()
    old = fingerprint.Lineage({"path": "/data/x.zarr"}, params, version="0.0.1")
    new = fingerprint.Lineage({"path": "/data/x.zarr"}, params)
    assert old.fingerprint("preprocessed") != new.fingerprint("preprocessed")


def test_zarr_identity_is_stable_and_sees_a_rewritten_chunk(tmp_path):
    path = tmp_path / "x.zarr"
    arr = zarr.create_array(str(path), shape=(8, 32, 32), chunks=(4, 16, 16), dtype="uint16")
    arr[:] = np.arange(8 * 32 * 32, dtype="uint16").reshape(8, 32, 32)
    first = fingerprint.input_identity(io.open_stack(path))
    assert fingerprint.input_identity(io.open_stack(path)) == first
    assert first["shape"] == [8, 32, 32] and first["layout"] == [4, 16, 16]
    # the same values written again: zarr replaces the chunk file, so the input counts as changed
    arr[4:8, 16:32, 16:32] = arr[4:8, 16:32, 16:32]
    assert fingerprint.input_identity(io.open_stack(path))["files"] != first["files"]


def test_tiff_identity_sees_changed_bytes_under_an_unchanged_time(tmp_path):
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, np.zeros((6, 32, 32), "uint16"), metadata={"axes": "ZYX"})
    first = fingerprint.input_identity(io.open_stack(path))
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a pixel in the last 64 KiB
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint.input_identity(io.open_stack(path))["files"] != first["files"]


def test_a_changed_tissue_mask_changes_the_preprocessing_fingerprint(tmp_path):
    image, mask = tmp_path / "image.zarr", tmp_path / "mask.zarr"
    for path in (image, mask):
        zarr.create_array(str(path), shape=(16, 64, 64), chunks=(8, 32, 32), dtype="uint8")[:] = 1
    stack = io.open_stack(image)

    def preprocessed() -> str:
        params = config.resolve(
            config.load(
                None, options={"diameter": 8.0}, overrides=[f"preprocess.tissue_mask={mask}"]
            ),
            shape=stack.data.shape,
            voxel_size=stack.voxel_size,
        )
        run = SimpleNamespace(stack=stack, params=params, config={}, resume=False, facts={})
        fingerprint.start(run, None)
        return run.lineage.fingerprint("preprocessed")

    first = preprocessed()
    assert preprocessed() == first
    zarr.open_array(str(mask), mode="r+")[0:8, 0:32, 0:32] = 0
    assert preprocessed() != first
