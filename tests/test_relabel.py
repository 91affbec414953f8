"""``output.relabel: sequential``: labels 1..N in every level of labels.ome.zarr and in the
table, the seed-derived id kept as ``seed_label``; everything else as a run without it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from nucflow import io, pyramid
from nucflow.cli import main


def test_sequential_ids_map_the_seed_ids_in_order(stack3d, run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(pyramid, "MAX_PLANE", 40)  # two coarser levels on the 40x128x128 stack
    plain, renumbered = tmp_path / "plain", tmp_path / "renumbered"
    run_cli(stack3d[0], plain)
    run_cli(stack3d[0], renumbered, "--set", "output.relabel=sequential")
    seed_table = pd.read_parquet(plain / "nuclei.parquet")
    table = pd.read_parquet(renumbered / "nuclei.parquet")
    n = len(seed_table)
    assert list(table.columns) == ["label", "seed_label", *seed_table.columns[1:]]
    np.testing.assert_array_equal(table["label"], np.arange(1, n + 1))
    np.testing.assert_array_equal(table["seed_label"], seed_table["label"])
    assert table["label"].dtype == table["seed_label"].dtype == seed_table["label"].dtype
    pd.testing.assert_frame_equal(
        table.drop(columns=["label", "seed_label"]), seed_table.drop(columns="label")
    )
    csv = pd.read_csv(renumbered / "nuclei.csv")
    np.testing.assert_array_equal(csv[["label", "seed_label"]], table[["label", "seed_label"]])
    # every level: a seed id replaced by its rank + 1 (0 stays 0)
    rank = dict(zip(seed_table["label"], table["label"], strict=True)) | {0: 0}
    group, seed_group = (zarr.open_group(str(p / "labels.ome.zarr"), mode="r") for p in
                         (renumbered, plain))  # fmt: skip
    paths = [d["path"] for d in io.ome_metadata(group)["multiscales"][0]["datasets"]]
    assert paths == ["0", "1", "2"]
    for path in paths:
        seeds = np.asarray(seed_group[path])
        expected = np.vectorize(rank.__getitem__, otypes=[seeds.dtype])(seeds)
        np.testing.assert_array_equal(np.asarray(group[path]), expected)
    record = json.loads((renumbered / "run.json").read_text())
    assert record["relabel"] == f"sequential: 1..{n}, seed ids in seed_label"
    # the write stage planned its passes (one per level), and ran them
    passes = record["progress"]["stages"]["write"]["passes"]
    assert [p["label"] for p in passes] == ["relabel", "relabel level 1", "relabel level 2"]
    assert record["progress"]["plan"]["write"] == 3


def test_sequential_ids_on_a_time_lapse_exit_2(tmp_path, capsys):
    movie = tmp_path / "movie.tif"
    frames = np.zeros((2, 8, 32, 32), np.uint16)
    tifffile.imwrite(movie, frames, imagej=True, metadata={"axes": "TZYX"})
    out = tmp_path / "out"
    argv = ["run", "--input", str(movie), "--output", str(out), "--diameter", "4"]
    assert main([*argv, "--set", "output.relabel=sequential"]) == 2
    assert capsys.readouterr().err.endswith(
        "`output.relabel` sequential is not available for time-lapses yet (each time point "
        "would need its own numbering); drop --set output.relabel=sequential\n"
    )
    assert not out.exists()


@pytest.mark.parametrize("value", ["seq", "true"])
def test_relabel_takes_none_or_sequential(stack3d, tmp_path, capsys, value):
    out = tmp_path / "out"
    argv = ["run", "--input", str(stack3d[0]), "--output", str(out)]
    assert main([*argv, "--set", f"output.relabel={value}"]) == 2
    assert "`output.relabel` must be none or sequential" in capsys.readouterr().err
