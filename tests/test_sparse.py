"""Empty space: chunks never written to a zarr store are not data, and cost nothing."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import zarr

from nucflow import io
from nucflow.cli import main

STORE_CHUNKS = (20, 64, 64)
OFFSET = (40, 128, 256)  # where the data sits in the large stack, on the store's chunk grid
LARGE = (160, 512, 640)


def _run(source, out, *extra: str) -> tuple[pd.DataFrame, zarr.Array, dict]:
    args = ["run", "--input", str(source), "--output", str(out), "--chunks", "20", "64", "64"]
    assert main([*args, *extra]) == 0
    labels = zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r")
    return (
        pd.read_parquet(out / "nuclei.parquet"),
        labels,
        json.loads((out / "run.json").read_text()),
    )


@pytest.fixture(scope="module")
def sparse_stack(stack3d, tmp_path_factory):
    """stack3d placed inside a 27x larger stack whose other chunks were never written."""
    _, made = stack3d
    region = tuple(slice(o, o + n) for o, n in zip(OFFSET, made.image.shape, strict=True))
    large = da.zeros(LARGE, dtype=made.image.dtype, chunks=STORE_CHUNKS)
    large[region] = made.image  # zero chunks are not written (zarr skips empty chunks)
    path = tmp_path_factory.mktemp("sparse") / "sparse.ome.zarr"
    io.write_ome_zarr(path, large, made.voxel_size, chunks=STORE_CHUNKS)
    return path, region


def test_the_store_holds_only_the_data_region(sparse_stack, stack3d):
    path, region = sparse_stack
    assert io.open_stack(path).data_region() == region
    n_chunks = np.prod([n // c for n, c in zip(stack3d[1].image.shape, STORE_CHUNKS, strict=True)])
    stored = [p for p in (path / "0").rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert len([p for p in stored if p.name != "zarr.json"]) == n_chunks


@pytest.mark.parametrize(
    "extra",
    [
        [],
        # blocks off the store's grid: the region starts inside a block of the stack's grid,
        # and tasks on processes write labels concurrently (each must own whole chunks)
        ["--chunks", "13", "48", "56", "--cluster", "processes"],
    ],
    ids=["store-grid", "off-grid-processes"],
)
def test_sparse_stack_gives_the_table_of_its_data_region_alone(
    sparse_stack, stack3d, tmp_path, extra
):
    path, region = sparse_stack
    alone, alone_labels, alone_record = _run(stack3d[0], tmp_path / "alone", *extra)
    table, labels, record = _run(path, tmp_path / "sparse", *extra)

    assert record["data_region"] == [[s.start, s.stop] for s in region]
    assert len(table) == len(alone) > 50
    shifted = alone.copy()
    for axis, offset, um in zip("zyx", OFFSET, stack3d[1].voxel_size, strict=True):
        for column in (f"centroid_{axis}", f"bbox_min_{axis}", f"bbox_max_{axis}"):
            shifted[column] += offset
        shifted[f"centroid_{axis}_um"] += offset * um
    # Labels are 1 + the seed's linear index in the whole stack, so they differ; all else agrees.
    by_position = ["centroid_z", "centroid_y", "centroid_x"]
    got = table.drop(columns="label").sort_values(by_position).reset_index(drop=True)
    want = shifted.drop(columns="label").sort_values(by_position).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-9)

    # The label image holds the same nuclei in the data region and nothing elsewhere.
    inside = np.asarray(labels[region])
    pairs = np.unique(np.stack([inside.ravel(), np.asarray(alone_labels).ravel()]), axis=1)
    assert len(pairs.T) == len(table) + 1  # a one-to-one relabeling, background included
    assert np.unique(pairs[0]).size == np.unique(pairs[1]).size == pairs.shape[1]
    assert set(table["label"]) == set(np.unique(inside)) - {0}
    written = io.open_stack(tmp_path / "sparse" / "labels.ome.zarr").data_region()
    chunks = labels.chunks  # the region, grown to whole chunks of the label image
    assert all(
        w.start >= r.start // c * c and w.stop <= -(-r.stop // c) * c
        for w, r, c in zip(written, region, chunks, strict=True)
    )
    # QC pictures show the data region: the windows are the region-alone run's, shifted
    dy, dx = OFFSET[1:]
    assert record["qc_outline_windows_yx"] == [
        [[y0 + dy, y1 + dy], [x0 + dx, x1 + dx]]
        for (y0, y1), (x0, x1) in alone_record["qc_outline_windows_yx"]
    ]


def test_a_store_without_any_chunk_gives_an_empty_table(tmp_path):
    path = tmp_path / "empty.zarr"
    zarr.create_array(str(path), shape=(64, 1024, 1024), chunks=(16, 256, 256), dtype="uint16")
    assert io.open_stack(path).data_region() is None
    out = tmp_path / "out"
    assert main(["run", "--input", str(path), "--output", str(out), "--diameter", "8"]) == 0
    assert len(pd.read_parquet(out / "nuclei.parquet")) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def _plan(source, capsys) -> dict[str, str]:
    assert main(["plan", "--input", str(source), "--chunks", "20", "64", "64"]) == 0
    return dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())


def test_plan_covers_only_the_data_region_and_calibrates_on_a_block(sparse_stack, stack3d, capsys):
    path, region = sparse_stack
    lines = _plan(path, capsys)
    share = np.prod([s.stop - s.start for s in region]) / np.prod(LARGE)
    assert lines["data"].startswith(f"[40:80, 128:256, 256:384] ({share:.2%} of the stack")
    assert lines["blocks"] == "8 of (20, 64, 64) voxels"  # 2 x 2 x 2 in the data region only
    assert lines["halo"].startswith("(21, 41, 41) voxels")
    assert float(lines["one"].split()[1]) > 0  # "block  S s on one thread, ..."
    assert lines["time"].startswith("about ")
    # the unwritten 26/27 of the stack add no block tasks (only the crop of the region)
    alone = _plan(stack3d[0], capsys)
    assert int(lines["tasks"].split()[0]) < 1.05 * int(alone["tasks"].split()[0])
