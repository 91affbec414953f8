"""Object-level properties equal their whole-array references on every chunking, through
`nucflow run` (labels it made) and `nucflow measure` (any label image, any channel)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr
from scipy import ndimage
from skimage.measure import marching_cubes, mesh_surface_area, regionprops_table

from nucflow import io, objects
from nucflow.cli import main
from nucflow.measure import table_columns
from nucflow.synth import make_nuclei

ALL_3D = [
    "solidity", "extent", "area_convex", "feret_diameter_max", "euler_number", "area_bbox",
    "area_filled", "inertia_tensor_eigvals", "centroid_weighted", "surface_area", "sphericity",
    "intensity_median", "intensity_percentile", "shell_intensity_mean", "neighbours", "area",
    "intensity_mean",
]  # fmt: skip
ALL_2D = [
    "solidity", "extent", "area_convex", "feret_diameter_max", "euler_number", "eccentricity",
    "orientation", "perimeter", "perimeter_crofton", "centroid_weighted", "intensity_median",
    "intensity_percentile", "shell_intensity_mean", "neighbours",
]  # fmt: skip
PERCENTILES = [5, 25, 75, 95]
SHELL = 1.2  # µm
NEAR = 9.0  # µm

# regionprops name -> this table's column (the unit suffix; in 3D "area" reads "volume")
RP_3D = {
    "solidity": "solidity",
    "extent": "extent",
    "area_convex": "volume_convex_um3",
    "feret_diameter_max": "feret_diameter_max_um",
    "euler_number": "euler_number",
    "area_bbox": "volume_bbox_um3",
    "area_filled": "volume_filled_um3",
    "inertia_tensor_eigvals-0": "inertia_tensor_eigvals_0_um2",
    "inertia_tensor_eigvals-1": "inertia_tensor_eigvals_1_um2",
    "inertia_tensor_eigvals-2": "inertia_tensor_eigvals_2_um2",
    # today's columns, unchanged
    "area": "volume_um3",
    "equivalent_diameter_area": "equivalent_diameter_um",
    "axis_major_length": "major_axis_length_um",
    "axis_minor_length": "minor_axis_length_um",
}
RP_2D = {
    "solidity": "solidity",
    "extent": "extent",
    "area_convex": "area_convex_um2",
    "feret_diameter_max": "feret_diameter_max_um",
    "euler_number": "euler_number",
    "eccentricity": "eccentricity",
    "orientation": "orientation",
    "perimeter": "perimeter_um",
    "perimeter_crofton": "perimeter_crofton_um",
    "area": "area_um2",
    "equivalent_diameter_area": "equivalent_diameter_um",
}


def _settings(*extra: str) -> list[str]:
    return [
        f"measure.percentiles={PERCENTILES}",
        f"measure.shell_width={SHELL}",
        f"measure.neighbour_distance={NEAR}",
        *extra,
    ]


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def reference(labels, channels, voxel, suffixes=("",)) -> pd.DataFrame:
    """Every column, computed on the whole arrays (one label at a time where regionprops has
    no such property), indexed by label."""
    ndim = labels.ndim
    axes = "zyx"[-ndim:]
    image = np.stack(channels, -1)
    names = RP_3D if ndim == 3 else RP_2D
    rp = [n.split("-")[0] for n in names]
    found = regionprops_table(
        labels,
        image,
        spacing=voxel,
        properties=["label", "centroid", "centroid_weighted", "intensity_mean", *dict.fromkeys(rp)],
    )
    ref = pd.DataFrame({col: found[name] for name, col in names.items()}, index=found["label"])
    for c, s in enumerate(suffixes):
        ref[f"intensity_mean{s}"] = found[f"intensity_mean-{c}"]
        for i, a in enumerate(axes):
            ref[f"centroid_weighted_{a}_um{s}"] = found[f"centroid_weighted-{i}-{c}"]
    centroids = np.stack([found[f"centroid-{i}"] for i in range(ndim)], 1)
    distance = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)
    np.fill_diagonal(distance, np.inf)
    ref["neighbours_count"] = (distance <= NEAR).sum(1)
    nearest = distance.min(1)
    ref["neighbours_nearest_um"] = np.where(nearest <= NEAR, nearest, np.nan)
    for label in ref.index:
        inside = labels == label
        volume = inside.sum() * np.prod(voxel)
        if ndim == 3:
            verts, faces, _, _ = marching_cubes(
                np.pad(inside, 1).astype(np.float32), 0.5, spacing=voxel
            )
            area = mesh_surface_area(verts, faces)
            ref.loc[label, "surface_area_um2"] = area
            ref.loc[label, "sphericity"] = np.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area
        band = (ndimage.distance_transform_edt(~inside, sampling=voxel) <= SHELL) & (labels == 0)
        for channel, s in zip(channels, suffixes, strict=True):
            values = channel[inside]
            ref.loc[label, f"intensity_median{s}"] = np.median(values)
            for q in PERCENTILES:
                ref.loc[label, f"intensity_percentile_{q}{s}"] = np.percentile(values, q)
            ref.loc[label, f"shell_intensity_mean{s}"] = channel[band].mean()
    return ref


def _assert_equal(table: pd.DataFrame, ref: pd.DataFrame) -> None:
    table = table.set_index("label").loc[ref.index.to_numpy(np.uint64)]
    assert len(table) == len(ref)
    for column in ref.columns:
        np.testing.assert_allclose(
            table[column].to_numpy(np.float64),
            ref[column].to_numpy(np.float64),
            rtol=1e-9,
            atol=1e-9,
            err_msg=column,
        )


@pytest.fixture(scope="module")
def small3d(tmp_path_factory):
    made = make_nuclei((24, 64, 64), n_nuclei=16, seed=11)
    path = tmp_path_factory.mktemp("objects") / "small3d.ome.zarr"
    io.write_ome_zarr(path, made.image, made.voxel_size, labels={"truth": made.truth})
    return path, made


@pytest.fixture(scope="module")
def small2d(tmp_path_factory):
    made = make_nuclei((96, 96), n_nuclei=20, seed=12)
    path = tmp_path_factory.mktemp("objects") / "small2d.ome.zarr"
    io.write_ome_zarr(path, made.image, made.voxel_size, labels={"truth": made.truth})
    return path, made


def _labels(out) -> np.ndarray:
    return np.asarray(zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r"))


@pytest.mark.parametrize(
    ("ndim", "chunks"),
    [
        (3, (24, 64, 64)),
        (3, (7, 20, 23)),
        (3, (12, 13, 64)),
        (2, (96, 96)),
        (2, (17, 29)),
        (2, (40, 13)),
    ],
)
def test_run_adds_properties_equal_to_the_whole_array_references(
    ndim, chunks, small3d, small2d, tmp_path
):
    source, made = small3d if ndim == 3 else small2d
    names = ALL_3D if ndim == 3 else ALL_2D
    out = tmp_path / "out"
    argv = ["run", "--input", str(source), "--output", str(out), "--chunks", *map(str, chunks)]
    props = "measure.properties=[" + ",".join(names) + "]"
    assert main([*argv, *_sets(_settings(props))]) == 0
    table = pd.read_parquet(out / "nuclei.parquet")
    labels = _labels(out)
    assert len(table) > 8  # nuclei cut by the blocks, several touching
    spec = objects.Spec.of(names, ndim=ndim, voxel_size=made.voxel_size)
    assert list(table.columns) == table_columns(ndim) + spec.columns()
    _assert_equal(table, reference(labels, [made.image], made.voxel_size))
    assert (table["neighbours_count"] > 0).any() and table["neighbours_nearest_um"].isna().any()


def test_default_properties(small3d, tmp_path):
    source, made = small3d
    out = tmp_path / "out"
    argv = ["run", "--input", str(source), "--output", str(out), "--chunks", "9", "30", "30"]
    assert main(argv) == 0
    table = pd.read_parquet(out / "nuclei.parquet")
    added = ["extent", "euler_number"]
    assert list(table.columns) == table_columns(3) + added
    assert list(pd.read_csv(out / "nuclei.csv").columns) == list(table.columns)
    _assert_equal(table, reference(_labels(out), [made.image], made.voxel_size)[added])


def _two_channels(tmp_path, made) -> str:
    """The stack with a second channel (czyx, float64), as a plain zarr array with no voxel
    size."""
    second = made.image * 0.37 + np.arange(made.image.shape[-1])
    path = tmp_path / "two.zarr"
    data = np.stack([made.image.astype(np.float64), second])
    array = zarr.create_array(
        str(path),
        shape=data.shape,
        dtype=data.dtype,
        dimension_names=list("c" + "zyx"[-made.image.ndim :]),
    )
    array[:] = data
    return str(path), second


def _paired(truth: np.ndarray, voxel) -> np.ndarray:
    """Truth labels with each nucleus and its nearest unpaired neighbour sharing one label:
    disconnected labels, not numbered like nucflow's, as another tool might write them."""
    ids = np.unique(truth)[1:]
    centre = np.array(ndimage.center_of_mass(truth > 0, truth, ids)) * voxel
    lut = np.zeros(truth.max() + 1, np.uint32)
    free = set(ids.tolist())
    for i, label in enumerate(ids):
        if label not in free:
            continue
        free.discard(label)
        others = [j for j, o in enumerate(ids) if o in free]
        lut[label] = 3 * label + 5
        if others:
            j = min(others, key=lambda j: np.linalg.norm(centre[j] - centre[i]))
            if np.linalg.norm(centre[j] - centre[i]) < 12:
                lut[ids[j]] = lut[label]
                free.discard(ids[j])
    return lut[truth]


@pytest.mark.parametrize(
    ("ndim", "chunks"),
    [(3, (24, 64, 64)), (3, (12, 20, 23)), (3, (8, 32, 17)), (2, (31, 22)), (2, (96, 96))],
)
def test_measure_any_label_image_and_channels(ndim, chunks, small3d, small2d, tmp_path):
    source, made = small3d if ndim == 3 else small2d
    labels = _paired(made.truth, made.voxel_size)
    assert len(np.unique(labels)) < len(np.unique(made.truth))  # some labels are two pieces
    labels_path = tmp_path / "labels.zarr"
    zarr.save_array(str(labels_path), labels, zarr_format=2)
    image, second = _two_channels(tmp_path, made)
    names = ALL_3D if ndim == 3 else ALL_2D
    out = tmp_path / "measured"
    argv = ["measure", "--labels", str(labels_path), "--input", image, "--output", str(out)]
    voxel = "voxel_size=[" + ",".join(map(str, made.voxel_size)) + "]"
    props = "measure.properties=[" + ",".join(names) + "]"
    chunk = "chunks=[" + ",".join(map(str, chunks)) + "]"
    extra = _sets(_settings(props, voxel, chunk, "measure.channels=[1]"))
    assert main([*argv, "--channel", "0", *extra]) == 0
    table = pd.read_parquet(out / "nuclei.parquet")
    assert sorted(table["label"]) == sorted(np.unique(labels)[1:])
    # --channel 0: the columns say so (_c0), as measure.channels' channel 1 says _c1
    suffixes = ("_c0", "_c1")
    ref = reference(labels, [made.image.astype(np.float64), second], made.voxel_size, suffixes)
    _assert_equal(table, ref)
    expected = [second[labels == label].std() for label in ref.index]
    measured = table.set_index("label").loc[ref.index, "intensity_std_c1"]
    np.testing.assert_allclose(measured, expected, rtol=1e-9)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["counts"]["nuclei"] == len(ref)
    assert not table["truncated"].any()


def test_measure_reproduces_the_run_on_its_own_labels(small3d, tmp_path):
    source, _ = small3d
    run = tmp_path / "run"
    chunks = ["8", "24", "24"]
    cut = ["--set", "segment.max_radius=3"]  # some nuclei reach it: flagged truncated
    assert (
        main(["run", "--input", str(source), "--output", str(run), "--chunks", *chunks, *cut]) == 0
    )
    out = tmp_path / "measured"
    argv = ["measure", "--labels", str(run / "labels.ome.zarr"), "--input", str(source)]
    assert main([*argv, "--output", str(out), "--set", "chunks=[10,17,40]"]) == 0
    ran = pd.read_parquet(run / "nuclei.parquet")
    measured = pd.read_parquet(out / "nuclei.parquet")
    assert list(measured.columns) == list(ran.columns)
    # truncated too: the run's flags, from the table it stored in labels.ome.zarr/tables/
    assert ran["truncated"].any()
    pd.testing.assert_frame_equal(measured, ran, rtol=1e-12)
    # the table's Parquet metadata says where the labels came from
    meta = json.loads(pq.read_schema(out / "nuclei.parquet").metadata[b"nucflow"])
    assert meta["labels"] == str(run / "labels.ome.zarr") and meta["unit"] == "micrometer"


def _measure(capsys, *argv) -> str:
    assert main(["measure", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # one line says what is wrong (progress lines may come before it, from passes that ran)
    assert lines[-1].startswith("nucflow measure: error: "), lines
    assert not any("error" in line for line in lines[:-1]), lines
    return lines[-1]


def _measure_labels(capsys, labels: np.ndarray, source, tmp_path, *sets: str) -> str:
    """``nucflow measure`` of ``labels`` (saved as zarr) on ``source``, expected to fail."""
    path = tmp_path / "labels.zarr"
    zarr.save_array(str(path), labels, zarr_format=2)
    out = str(tmp_path / "o")
    given = [a for s in sets for a in ("--set", s)]
    return _measure(capsys, "--labels", str(path), "--input", str(source), "--output", out,
                    *given)  # fmt: skip


def test_measure_refuses_bad_inputs(small3d, tmp_path, capsys):
    source, made = small3d
    truth = f"{source}/labels/truth"
    out = str(tmp_path / "out")
    wrong_shape = tmp_path / "wrong.zarr"
    zarr.save_array(str(wrong_shape), made.image[:, :32], zarr_format=2)
    err = _measure(capsys, "--labels", truth, "--input", str(wrong_shape), "--output", out)
    assert "has shape (24, 32, 64) but --labels" in err and "(24, 64, 64)" in err
    coarse = tmp_path / "coarse.ome.zarr"
    io.write_ome_zarr(coarse, made.image, (2.0, 0.5, 0.5))
    err = _measure(capsys, "--labels", truth, "--input", str(coarse), "--output", out)
    assert "has voxel size [2.0, 0.5, 0.5] µm but --labels" in err
    floats = tmp_path / "floats.zarr"
    zarr.save_array(str(floats), made.image.astype(np.float32), zarr_format=2)
    err = _measure(capsys, "--labels", str(floats), "--input", str(source), "--output", out)
    assert "holds float32 values, not labels" in err
    err = _measure(
        capsys, "--labels", truth, "--input", str(source), "--output", out,
        "--set", "measure.properties=[solidty]",
    )  # fmt: skip
    assert "unknown property 'solidty'; did you mean 'solidity'?" in err
    err = _measure(capsys, "--labels", truth, "--input", str(source), "--output", str(source))
    assert "contains --labels" in err
    assert not (tmp_path / "out").exists()


def test_measure_refuses_2d_only_and_3d_only_properties(small2d, tmp_path, capsys):
    source, _ = small2d
    truth = f"{source}/labels/truth"
    err = _measure(
        capsys, "--labels", truth, "--input", str(source), "--output", str(tmp_path / "o"),
        "--set", "measure.properties=[surface_area]",
    )  # fmt: skip
    assert "'surface_area' exists for 3D stacks only" in err and "use perimeter" in err


def test_measure_refuses_a_label_larger_than_its_reach(small3d, tmp_path, capsys):
    source, made = small3d
    labels = made.truth.astype(np.uint16)
    labels[3:5, 2:60, 1:63] = 999  # a sheet across the stack, not a nucleus
    err = _measure_labels(capsys, labels, source, tmp_path, "chunks=[8,8,8]")
    assert "label 999 spans 2 x 58 x 62 voxels (ZYX): each task would read" in err
    assert "(limit 64)" in err and "--set chunks=" in err


def test_measure_refuses_an_existing_output_then_resumes_and_overwrites(small3d, tmp_path, capsys):
    source, _ = small3d
    truth = f"{source}/labels/truth"
    out = tmp_path / "out"
    argv = ["measure", "--labels", truth, "--input", str(source), "--output", str(out)]
    assert main(argv) == 0
    before = (out / "nuclei.csv").read_bytes()
    err = _measure(capsys, *argv[1:])
    assert "pass --resume to continue it or --overwrite to replace it" in err
    assert main([*argv, "--resume"]) == 0
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "nuclei.csv").read_bytes() == before


def test_flat_nuclei_have_the_hull_of_their_plane():
    """scikit-image gives a 3D object one voxel thick an empty hull (solidity inf, and
    feret_diameter_max fails); nucflow takes the hull in the object's own plane."""
    made = make_nuclei((40, 40), n_nuclei=1, seed=1)
    flat = (made.truth == 1)[None]  # (1, Y, X)
    labels = flat.astype(np.uint8)
    image = np.where(flat, 100.0, 0.0)
    rows = pd.DataFrame({"label": [1]})
    for a, where in zip("zyx", ndimage.find_objects(labels)[0], strict=True):
        rows[f"bbox_min_{a}"], rows[f"bbox_max_{a}"] = where.start, where.stop
    spec = objects.Spec.of(
        ["solidity", "area_convex", "feret_diameter_max", "surface_area"], ndim=3,
        voxel_size=(2.0, 0.5, 0.5),
    )  # fmt: skip
    found = objects.measure_rows(
        rows, labels=labels, intensities={"": image}, spec=spec, shape=labels.shape
    )
    plane = regionprops_table(labels[0], spacing=(0.5, 0.5), properties=["solidity", "area_convex"])
    assert found["solidity"][0] == pytest.approx(plane["solidity"][0], rel=1e-12)
    assert found["volume_convex_um3"][0] == pytest.approx(2.0 * plane["area_convex"][0])
    assert 0 < found["feret_diameter_max_um"][0] < np.inf


def test_measure_refuses_a_label_in_pieces_no_block_sees_together(small3d, tmp_path, capsys):
    source, made = small3d
    labels = np.zeros(made.truth.shape, np.uint16)
    labels[2:4, 2:6, 2:6] = 7  # two pieces of one label, far apart, neither crossing a face
    labels[20:22, 50:54, 50:54] = 7
    labels[10:14, 30:36, 14:18] = 3  # one label across a block face
    err = _measure_labels(capsys, labels, source, tmp_path, "chunks=[8,16,16]")
    assert "label 7 is in pieces farther apart than any label that crosses a block face" in err


@pytest.mark.parametrize("single_file_rows", [1, 3])
def test_measure_refuses_a_label_in_pieces_in_a_partitioned_table(
    single_file_rows, small3d, tmp_path, capsys
):
    """Above measure.single_file_rows the check runs over hash buckets of the labels (here
    2 or 6 buckets of 1-3 labels each), not over the whole table at once."""
    source, made = small3d
    labels = np.zeros(made.truth.shape, np.uint16)
    labels[2:4, 2:6, 2:6] = 7
    labels[20:22, 50:54, 50:54] = 7
    labels[10:14, 30:36, 14:18] = 3
    labels[4:6, 40:44, 40:44] = 2**16 - 1
    labels[14:18, 2:6, 50:54] = 12
    err = _measure_labels(
        capsys, labels, source, tmp_path, "chunks=[8,16,16]",
        f"measure.single_file_rows={single_file_rows}",
    )  # fmt: skip
    assert err.endswith(
        "label 7 is in pieces farther apart than any label that crosses a block face; make "
        "each label one connected object, or pass blocks that hold each label whole: "
        "--set chunks=[...]"
    )


def test_measure_checks_a_partitioned_table_and_writes_it(small3d, tmp_path):
    """The bucketed check passes a label image whose labels are each one object (and pieces
    within reach), and the partitioned table holds each label once."""
    source, made = small3d
    labels = _paired(made.truth, made.voxel_size)
    path = tmp_path / "labels.zarr"
    zarr.save_array(str(path), labels, zarr_format=2)
    out = tmp_path / "o"
    argv = ["measure", "--labels", str(path), "--input", str(source), "--output", str(out)]
    assert main([*argv, "--set", "chunks=[12,20,23]", "--set", "measure.single_file_rows=2"]) == 0
    assert (out / "nuclei.parquet").is_dir() and not (out / "nuclei.csv").exists()
    table = pd.read_parquet(out / "nuclei.parquet")
    assert sorted(table["label"]) == sorted(np.unique(labels)[1:])


class _Unread:
    """A channel reader that must not be read."""

    def __getitem__(self, where):
        raise AssertionError(f"a shape property read the channel at {where}")


def test_shape_properties_read_no_channel():
    """Properties of the shape alone (the defaults) equal regionprops without decompressing a
    channel; a per-channel property reads it."""
    made = make_nuclei((20, 48, 48), n_nuclei=6, seed=3)
    labels = made.truth
    rows = pd.DataFrame({"label": np.unique(labels)[1:]})
    boxes = ndimage.find_objects(labels)
    for k, a in enumerate("zyx"):
        rows[f"bbox_min_{a}"] = [boxes[i - 1][k].start for i in rows["label"]]
        rows[f"bbox_max_{a}"] = [boxes[i - 1][k].stop for i in rows["label"]]
    shape_only = ["extent", "euler_number", "solidity"]
    spec = objects.Spec.of(shape_only, ndim=3, voxel_size=(2.0, 0.5, 0.5))
    found = objects.measure_rows(
        rows, labels=labels, intensities={"": _Unread()}, spec=spec, shape=labels.shape
    )
    expected = regionprops_table(labels, spacing=(2.0, 0.5, 0.5), properties=shape_only)
    for name in shape_only:
        np.testing.assert_array_equal(found[name].to_numpy(), expected[name])
    spec = objects.Spec.of(["intensity_median"], ndim=3, voxel_size=(2.0, 0.5, 0.5))
    with pytest.raises(AssertionError, match="read the channel"):
        objects.measure_rows(
            rows, labels=labels, intensities={"": _Unread()}, spec=spec, shape=labels.shape
        )
