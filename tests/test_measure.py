"""Block sums combine into the measurements of scikit-image regionprops on the whole image."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from skimage.measure import regionprops_table

from nucflow.measure import block_stats, combine, empty_table, finalize, table_columns
from nucflow.synth import make_nuclei


def _blockwise_table(labels, intensity, voxel, chunks):
    parts = []
    for starts in itertools.product(
        *(range(0, n, c) for n, c in zip(labels.shape, chunks, strict=True))
    ):
        box = tuple(
            slice(s, min(s + c, n)) for s, c, n in zip(starts, chunks, labels.shape, strict=True)
        )
        parts.append(
            block_stats(
                labels[box],
                np.zeros(labels[box].shape, np.float32),
                {"": intensity[box]},
                origin=starts,
            )
        )
    return finalize(combine(parts), voxel_size=voxel, shape=labels.shape, max_radius=100.0)


@pytest.mark.parametrize("chunks", [(7, 30, 41), (40, 96, 96), (13, 5, 96)])
def test_blockwise_measurements_equal_regionprops(chunks):
    made = make_nuclei((40, 96, 96), n_nuclei=40, seed=5)
    labels = made.truth.astype(np.uint64) * 7 + 1000  # sparse, large label values
    labels[made.truth == 0] = 0
    table = _blockwise_table(labels, made.image, made.voxel_size, chunks)
    props = regionprops_table(
        labels.astype(np.int64),
        made.image,
        spacing=made.voxel_size,
        properties=(
            "label",
            "centroid",
            "bbox",
            "num_pixels",
            "area",
            "equivalent_diameter_area",
            "axis_major_length",
            "axis_minor_length",
            "intensity_mean",
            "intensity_min",
            "intensity_max",
            "intensity_std",
        ),
    )
    assert list(table.columns) == table_columns(3)
    np.testing.assert_array_equal(table["label"], props["label"])
    voxel = np.array(made.voxel_size)
    for i, axis in enumerate("zyx"):
        # regionprops' centroid with spacing is physical; ours has both
        np.testing.assert_allclose(table[f"centroid_{axis}_um"], props[f"centroid-{i}"], rtol=1e-12)
        np.testing.assert_allclose(
            table[f"centroid_{axis}"], props[f"centroid-{i}"] / voxel[i], rtol=1e-12
        )
        np.testing.assert_array_equal(table[f"bbox_min_{axis}"], props[f"bbox-{i}"])
        np.testing.assert_array_equal(table[f"bbox_max_{axis}"], props[f"bbox-{i + 3}"])
    np.testing.assert_array_equal(table["n_voxels"], props["num_pixels"])
    np.testing.assert_allclose(table["volume_um3"], props["area"], rtol=1e-12)
    np.testing.assert_allclose(
        table["equivalent_diameter_um"], props["equivalent_diameter_area"], rtol=1e-12
    )
    np.testing.assert_allclose(table["major_axis_length_um"], props["axis_major_length"], rtol=1e-9)
    np.testing.assert_allclose(table["minor_axis_length_um"], props["axis_minor_length"], rtol=1e-9)
    for stat in ("mean", "min", "max", "std"):
        np.testing.assert_allclose(
            table[f"intensity_{stat}"], props[f"intensity_{stat}"], rtol=1e-9
        )
    sums = [made.image[labels == v].sum() for v in props["label"]]
    np.testing.assert_array_equal(table["intensity_sum"], sums)
    lo = table[[f"bbox_min_{a}" for a in "zyx"]].to_numpy()
    hi = table[[f"bbox_max_{a}" for a in "zyx"]].to_numpy()
    np.testing.assert_array_equal(
        table["touches_border"], (lo == 0).any(1) | (hi == labels.shape).any(1)
    )


def test_2d_columns_and_area():
    made = make_nuclei((96, 96), n_nuclei=15, seed=6)
    labels = made.truth.astype(np.uint64)
    table = _blockwise_table(labels, made.image, made.voxel_size, (40, 33))
    assert list(table.columns) == table_columns(2)
    assert "area_um2" in table and "centroid_z" not in table
    props = regionprops_table(
        labels.astype(np.int64),
        spacing=made.voxel_size,
        properties=("area", "axis_major_length", "axis_minor_length"),
    )
    np.testing.assert_allclose(table["area_um2"], props["area"])
    np.testing.assert_allclose(table["major_axis_length_um"], props["axis_major_length"], rtol=1e-9)
    np.testing.assert_allclose(table["minor_axis_length_um"], props["axis_minor_length"], rtol=1e-9)


def test_empty_table_has_every_column_and_types():
    table = empty_table(3, ("", "_c1"))
    assert len(table) == 0
    assert list(table.columns) == table_columns(3, ("", "_c1"))
    assert "intensity_mean_c1" in table
    assert table["label"].dtype == np.uint64 and table["truncated"].dtype == bool
