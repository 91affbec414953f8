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
        "channel_of_suffix": {"": None},  # the input's only channel
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


def test_measure_says_which_channel_it_measured(stack2d, tmp_path):
    """`nucflow measure --channel 1` wrote unsuffixed intensity columns and `'channels': []`:
    its columns now end in `_c1` (as `nucflow run` names channel 1), the metadata maps each
    suffix to its channel, and `label` is of the label image's dtype (uint32 here)."""
    import ome_zarr.writer
    from scipy import ndimage

    made, _, _ = stack2d
    second = (made.image // 2 + 7).astype(made.image.dtype)
    source = tmp_path / "two.ome.zarr"
    ome_zarr.writer.write_image(
        np.stack([made.image, second]),
        zarr.open_group(str(source), mode="w"),
        axes="cyx",
        scale_factors=[],
        scale={"c": 1.0, "y": made.voxel_size[0], "x": made.voxel_size[1]},
        axes_units={"y": "micrometer", "x": "micrometer"},
    )
    labels = tmp_path / "labels.zarr"
    zarr.save_array(str(labels), made.truth.astype(np.uint32), zarr_format=2)
    out = tmp_path / "measured"
    argv = ["measure", "--labels", str(labels), "--input", str(source), "--output", str(out)]
    assert main([*argv, "--channel", "1", "--set", "measure.channels=[0]"]) == 0
    table = nucflow.read_table(out)
    intensity = [c for c in table.columns if c.startswith("intensity_")]
    assert intensity == [f"intensity_{s}_c{c}" for c in (1, 0) for s in STATS]
    assert _meta(out)["channel_of_suffix"] == {"_c1": 1, "_c0": 0}
    values = table["label"].to_numpy()
    for channel, image in (("_c1", second), ("_c0", made.image)):
        expected = ndimage.mean(image, made.truth, values)
        np.testing.assert_allclose(table[f"intensity_mean{channel}"], expected, rtol=1e-12)
    assert table["label"].dtype == np.uint32


STATS = ("mean", "min", "max", "std", "sum")
