"""The table at scale: rows made final by the block owning each seed, a partitioned dataset
above `measure.single_file_rows`, and a driver that holds counts and a bounded sample."""

from __future__ import annotations

import json

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import nucflow
from nucflow import table as table_stage
from nucflow.blockpass import Grid
from nucflow.cli import main

CHUNKS = ["13", "37", "41"]


@pytest.fixture(scope="module")
def single_file(stack3d, tmp_path_factory):
    source, made = stack3d
    out = tmp_path_factory.mktemp("table") / "one-block"
    assert (
        main(
            [
                "run",
                "--input",
                str(source),
                "--output",
                str(out),
                "--chunks",
                *map(str, made.image.shape),
            ]
        )
        == 0
    )
    return pd.read_parquet(out / "nuclei.parquet")


def test_a_large_table_is_a_partitioned_dataset_with_the_same_rows(
    stack3d, single_file, tmp_path, monkeypatch
):
    monkeypatch.setattr(table_stage, "QC_SAMPLE_ROWS", 20)
    out = tmp_path / "out"
    args = ["run", "--input", str(stack3d[0]), "--output", str(out), "--chunks", *CHUNKS]
    assert main([*args, "--set", "measure.single_file_rows=10"]) == 0

    dataset = out / "nuclei.parquet"
    parts = sorted(p.name for p in dataset.iterdir())
    assert dataset.is_dir() and "_common_metadata" in parts and len(parts) > 2
    assert not (out / "nuclei.csv").exists()
    record = json.loads((out / "run.json").read_text())
    assert "partitioned dataset" in record["table"] and "no nuclei.csv" in record["table"]
    assert record["counts"]["nuclei"] == len(single_file)

    # pandas and pyarrow read the folder as one table: the one-block rows, grouped by block
    rows = pd.read_parquet(dataset)
    assert rows["label"].is_unique  # each nucleus' row is made by exactly one block
    by_label = rows.sort_values("label", ignore_index=True)
    pd.testing.assert_frame_equal(by_label, single_file, check_exact=False, rtol=1e-12)
    assert ds.dataset(dataset, format="parquet").count_rows() == len(single_file)
    lazy = dd.read_parquet(dataset)
    assert list(lazy.columns) == list(single_file.columns)
    assert len(lazy.compute(scheduler="sync")) == len(single_file)
    meta = json.loads(pq.read_schema(dataset / "_common_metadata").metadata[b"nucflow"])
    assert meta["voxel_size"] == list(stack3d[1].voxel_size) and meta["unit"] == "micrometer"

    # the Python API reads either form, eagerly or lazily, with the metadata
    read = nucflow.read_table(out).sort_values("label", ignore_index=True)
    pd.testing.assert_frame_equal(read, single_file, check_exact=False, rtol=1e-12)
    assert read.attrs["nucflow"]["unit"] == "micrometer"
    assert len(nucflow.read_table(out, lazy=True).compute(scheduler="sync")) == len(single_file)

    # the driver held a sample of about QC_SAMPLE_ROWS rows (one per block at least)
    n_blocks = int(
        np.prod([-(-n // int(c)) for n, c in zip(stack3d[1].image.shape, CHUNKS, strict=True)])
    )
    assert record["qc_sample_rows"] <= max(20, n_blocks) < len(single_file)


def test_a_small_table_is_one_file_sorted_by_label_with_its_csv(stack3d, single_file, tmp_path):
    out = tmp_path / "out"
    args = ["run", "--input", str(stack3d[0]), "--output", str(out), "--chunks", *CHUNKS]
    assert main(args) == 0
    assert (out / "nuclei.parquet").is_file()
    rows = pd.read_parquet(out / "nuclei.parquet")
    pd.testing.assert_frame_equal(rows, single_file, check_exact=False, rtol=1e-12)
    pd.testing.assert_frame_equal(nucflow.read_table(out), rows)
    csv = pd.read_csv(out / "nuclei.csv")
    np.testing.assert_array_equal(csv["label"].to_numpy(np.uint64), rows["label"].to_numpy())


def test_sums_are_filed_by_the_block_owning_each_seed(tmp_path):
    """A block keeps the sums of the nuclei it owns and sends the others' to their owner's
    folder: each table task then reads what is addressed to it, once."""
    # a region starting at stack row 5, on the stack's grid of 10 x 10 blocks (phase 5)
    full_shape, offset = (25, 20), (5, 0)
    grid = Grid((20, 20), (10, 10), phase=(5, 0))
    seeds = {(0, 0): (7, 3), (1, 0): (12, 3), (2, 1): (24, 15), (0, 1): (9, 10)}
    labels = [np.ravel_multi_index(s, full_shape) + 1 for s in seeds.values()]
    stats = pd.DataFrame({"n": [1, 2, 3, 4]}, index=pd.Index(labels, name="label", dtype="u8"))
    table_stage.write_sums(stats, tmp_path, (0, 1), grid, offset=offset, full_shape=full_shape)

    def read(path):
        return pd.read_parquet(path)["n"].tolist()

    assert read(tmp_path / "0_1.parquet") == [4]  # its own, in the usual place
    assert read(tmp_path / "0_0.in" / "0_1.parquet") == [1]
    assert read(tmp_path / "1_0.in" / "0_1.parquet") == [2]
    assert read(tmp_path / "2_1.in" / "0_1.parquet") == [3]  # short first block: 3 of them
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["0_0.in", "0_1.parquet", "1_0.in", "2_1.in"]
