"""The table's Parquet metadata (``b"nucflow"``) keeps the voxel size, the unit and the
measurement settings asked for, in a single file and in a partitioned dataset alike."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

import nucflow
from nucflow import io
from nucflow.cli import main
from nucflow.synth import make_nuclei

SETS = [
    "measure.properties=[solidity,intensity_percentile,neighbours]",
    "measure.percentiles=[10,90]",
    "measure.shell_width=0.75",
    "measure.neighbour_distance=20",
    "measure.drop_border=true",
    "qc.enabled=false",
]


@pytest.fixture(scope="module")
def stack2d(tmp_path_factory):
    made = make_nuclei((96, 96), n_nuclei=20, seed=12)
    root = tmp_path_factory.mktemp("meta")
    calibrated = root / "s.ome.zarr"
    io.write_ome_zarr(calibrated, made.image, made.voxel_size)
    plain = root / "plain.zarr"  # no voxel size: lengths in pixels
    zarr.save_array(str(plain), made.image, zarr_format=2)
    return made, calibrated, plain


def _meta(out) -> dict:
    path = out / "nuclei.parquet"
    schema = pq.read_schema(path / "_common_metadata" if path.is_dir() else path)
    return json.loads(schema.metadata[b"nucflow"])


@pytest.mark.parametrize("single_file_rows", [1_000_000, 1])
def test_run_table_metadata(single_file_rows, stack2d, tmp_path):
    made, calibrated, plain = stack2d
    expected = {
        "properties": ["solidity", "intensity_percentile", "neighbours"],
        "channels": [],
        "percentiles": [10.0, 90.0],
        "shell_width_um": 0.75,
        "neighbour_distance_um": 20.0,
        "drop_border": True,
        "nucflow": nucflow.__version__,
    }
    for source, voxel, unit in ((calibrated, list(made.voxel_size), "micrometer"),
                                (plain, [1.0, 1.0], "pixel")):  # fmt: skip
        out = tmp_path / unit
        argv = ["run", "--input", str(source), "--output", str(out), "--chunks", "40", "40"]
        sets = [*SETS, f"measure.single_file_rows={single_file_rows}"]
        assert main([*argv, *[a for s in sets for a in ("--set", s)]]) == 0
        assert (out / "nuclei.parquet").is_dir() == (single_file_rows == 1)
        assert _meta(out) == {"voxel_size": voxel, "unit": unit, **expected}
        assert nucflow.read_table(out).attrs["nucflow"] == _meta(out)


def test_measure_table_metadata_names_the_labels(stack2d, tmp_path):
    made, calibrated, plain = stack2d
    labels = tmp_path / "labels.zarr"  # no voxel size of its own; the input has one
    zarr.save_array(str(labels), made.truth.astype(np.uint32), zarr_format=2)
    out = tmp_path / "measured"
    argv = ["measure", "--labels", str(labels), "--input", str(calibrated), "--output", str(out)]
    assert main([*argv, "--set", "measure.properties=[extent]"]) == 0
    meta = _meta(out)
    assert meta["labels"] == str(labels) and meta["properties"] == ["extent"]
    assert meta["voxel_size"] == list(made.voxel_size) and meta["unit"] == "micrometer"


def test_readme_column_table_names_every_property_column():
    """Each column a `measure.properties` entry can add (2D and 3D; percentiles as Q) is in
    the README's table of columns, with its unit suffix."""
    from pathlib import Path

    from nucflow import objects

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("### Table columns") :]
    table = table[: table.index("\n## ")]
    settings = objects.Settings(percentiles=(50.0,))
    for ndim in (2, 3):
        for name, prop in objects.PROPERTIES.items():
            if ndim not in prop.dims:
                continue
            assert f"`{name}`" in table, name
            for column in objects.property_columns(name, ndim, [""], settings):
                column = column.replace("percentile_50", "percentile_Q")
                assert f"`{column}`" in table, column
