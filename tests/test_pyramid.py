"""Multiscale outputs: label pyramids equal the strided level 0 on any chunking, image
pyramids are cell means, the NGFF metadata reads back in ome-zarr-py and validates with
ome-zarr-models, a leading time axis is never downsampled, and --resume skips finished blocks."""

from __future__ import annotations

import json
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import expect_no_parent

from nucflow import io, pyramid
from nucflow.cli import main


class Threads:
    """The runner interface ``pyramid.build`` uses, on dask's threads."""

    def __init__(self) -> None:
        self.passes: list[str] = []

    def compute(self, *collections, label: str = "") -> tuple:
        self.passes.append(label)
        return dask.compute(*collections, scheduler="threads")


def _strided(level0: np.ndarray, factors: list[tuple[int, ...]], k: int) -> np.ndarray:
    step = np.prod(np.array(factors[:k]), axis=0) if k else np.ones(level0.ndim, int)
    return level0[tuple(slice(None, None, int(s)) for s in step)]


def _labels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random blobs of labels (runs of equal values, like nuclei) with large uint64 ids."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 40, tuple(-(-n // 3) for n in shape)).astype(np.uint64)
    lab = coarse.repeat(3, 0).repeat(3, 1)
    if len(shape) == 3:
        lab = lab.repeat(3, 2)
    lab = lab[tuple(slice(0, n) for n in shape)]
    return np.where(lab > 0, lab + np.uint64(2**40), 0).astype(np.uint64)


@pytest.mark.parametrize(
    ("shape", "voxel", "expected"),
    [
        ((20, 70, 90), (2.0, 0.5, 0.5), [(1, 2, 2), (1, 2, 2), (2, 2, 2)]),  # z catches up
        ((20, 70, 90), (0.5, 0.5, 0.5), [(2, 2, 2), (2, 2, 2), (2, 2, 2)]),  # isotropic
        ((1, 70, 90), (1.0, 1.0, 1.0), [(1, 2, 2), (1, 2, 2), (1, 2, 2)]),  # single slice
        ((70, 90), (0.5, 0.5), [(2, 2), (2, 2), (2, 2)]),  # 2D
        ((3, 20, 70, 90), (2.0, 0.5, 0.5), [(1, 1, 2, 2), (1, 1, 2, 2), (1, 2, 2, 2)]),  # TZYX
        ((20, 16, 16), (1.0, 1.0, 1.0), []),  # fits already
    ],
)
def test_levels_halve_yx_and_z_once_no_coarser(shape, voxel, expected):
    assert pyramid.level_factors(shape, voxel, max_plane=16) == expected


def test_default_limit_is_a_1024_plane():
    assert pyramid.level_factors((4, 1024, 1024), (1, 1, 1)) == []
    assert pyramid.level_factors((4, 1025, 1024), (1, 1, 1)) == [(2, 2, 2)]
    assert pyramid.level_factors((4, 10, 2049), (1, 1, 1)) == [(2, 2, 2), (2, 2, 2)]


@pytest.mark.parametrize("chunks", [(7, 16, 24), (20, 70, 90), (3, 5, 11), (8, 32, 32)])
def test_label_levels_equal_strided_level_0_on_any_chunking(tmp_path, chunks):
    lab = _labels((20, 70, 90))
    path = tmp_path / "labels.ome.zarr"
    io.create_label_zarr(path, lab.shape, chunks, (2.0, 0.5, 0.5))[...] = lab
    factors = pyramid.level_factors(lab.shape, (2.0, 0.5, 0.5), max_plane=16)
    shapes = pyramid.build(Threads(), path, factors, method="nearest")
    group = zarr.open_group(str(path), mode="r")
    present = set(np.unique(lab).tolist())
    assert len(shapes) == 4
    for k in range(1, len(shapes)):
        level = group[str(k)][...]
        np.testing.assert_array_equal(level, _strided(lab, factors, k))
        assert set(np.unique(level).tolist()) <= present  # label-safe
        assert level.dtype == np.uint64


def test_label_levels_cover_only_the_region_given(tmp_path):
    lab = np.zeros((20, 70, 90), np.uint64)
    lab[5:12, 30:61, 41:77] = _labels((7, 31, 36))
    path = tmp_path / "labels.ome.zarr"
    io.create_label_zarr(path, lab.shape, (4, 8, 8), (1.0, 1.0, 1.0))[...] = lab
    factors = pyramid.level_factors(lab.shape, (1, 1, 1), max_plane=16)
    region = (slice(5, 12), slice(30, 61), slice(41, 77))
    runner = Threads()
    pyramid.build(runner, path, factors, method="nearest", region=region)
    group = zarr.open_group(str(path), mode="r")
    for k in range(1, len(factors) + 1):
        np.testing.assert_array_equal(group[str(k)][...], _strided(lab, factors, k))
    # Level 1 (10, 35, 45) in chunks of (4, 8, 8): the region's image z 2:6, y 15:31, x 20:39
    # meets chunks z 0-1, y 1-3, x 2-4, and only those are written (the rest is never read).
    written = {
        tuple(int(i) for i in f.relative_to(path / "1" / "c").parts)
        for f in (path / "1" / "c").glob("*/*/*")
    }  # fmt: skip (zarr 3: c/z/y/x)
    assert written
    assert written <= {(z, y, x) for z in (0, 1) for y in (1, 2, 3) for x in (2, 3, 4)}
    assert len(runner.passes) == len(factors)


def test_ome_zarr_reads_every_level_with_its_scale_and_models_validate(
    tmp_path, ome_zarr_reads_warn_nothing
):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image_label import ImageLabel

    lab = _labels((20, 70, 90))
    path = tmp_path / "labels.ome.zarr"
    io.create_label_zarr(path, lab.shape, (8, 32, 32), (2.0, 0.5, 0.5))[...] = lab
    factors = pyramid.level_factors(lab.shape, (2.0, 0.5, 0.5), max_plane=16)
    pyramid.build(Threads(), path, factors, method="nearest")

    (node, *_) = Reader(parse_url(str(path)))()
    expect_no_parent(ome_zarr_reads_warn_nothing)  # labels alone: no source image given
    assert [tuple(a.shape) for a in node.data] == [(20, 70, 90), (20, 35, 45), (20, 18, 23),
                                                  (10, 9, 12)]  # fmt: skip
    transforms = node.metadata["coordinateTransformations"]
    assert transforms == [
        [{"type": "scale", "scale": [2.0, 0.5, 0.5]}],
        [{"type": "scale", "scale": [2.0, 1.0, 1.0]}],
        [{"type": "scale", "scale": [2.0, 2.0, 2.0]}],
        [{"type": "scale", "scale": [4.0, 4.0, 4.0]}],
    ]
    np.testing.assert_array_equal(np.asarray(node.data[3]), lab[::2, ::8, ::8])
    model = ImageLabel.from_zarr(zarr.open_group(str(path), mode="r"))
    assert [d.path for d in model.attributes.ome.multiscales[0].datasets] == ["0", "1", "2", "3"]


def test_image_levels_are_cell_means_with_a_half_cell_translation(tmp_path):
    from ome_zarr_models.v05.image import Image

    rng = np.random.default_rng(1)
    image = rng.random((12, 40, 64), dtype=np.float32) * 1000
    path = tmp_path / "image.ome.zarr"
    io.write_ome_zarr(path, image, (0.5, 0.25, 0.25), chunks=(5, 16, 16))
    factors = pyramid.level_factors(image.shape, (0.5, 0.25, 0.25), max_plane=10)
    assert factors == [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    pyramid.build(Threads(), path, factors, method="mean")
    group = zarr.open_group(str(path), mode="r")
    level1 = image.reshape(12, 20, 2, 32, 2).astype(np.float64).mean(axis=(2, 4))
    np.testing.assert_allclose(group["1"][...], level1, rtol=1e-6)
    level2 = level1.reshape(6, 2, 10, 2, 16, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(group["2"][...], level2, rtol=1e-6)
    datasets = io.ome_metadata(group)["multiscales"][0]["datasets"]
    # level 2 voxel (0,0,0) averages level-0 voxels z 0..1, y 0..3, x 0..3: its centre lies at
    # voxel (0.5, 1.5, 1.5) of level 0, i.e. (0.25, 0.375, 0.375) µm
    assert datasets[2]["coordinateTransformations"] == [
        {"type": "scale", "scale": [1.0, 1.0, 1.0]},
        {"type": "translation", "translation": [0.25, 0.375, 0.375]},
    ]
    Image.from_zarr(group)  # valid NGFF 0.5


def _tzyx_label_group(path: Path, lab: np.ndarray, chunks: tuple[int, ...]) -> None:
    """A TZYX label image written here with zarr (nucflow writes ZYX labels today)."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.create_array("0", data=lab, chunks=chunks, chunk_key_encoding={"name": "v2",
                      "separator": "/"})  # fmt: skip
    axes = [{"name": "t", "type": "time"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"
    ]
    scale = [1.0, 2.0, 0.5, 0.5]
    root.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": axes,
            "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}
            ],  # fmt: skip
        }
    ]
    root.attrs["image-label"] = {"version": "0.4"}


def test_a_leading_time_axis_is_never_downsampled(tmp_path, ome_zarr_reads_warn_nothing):
    """On an NGFF 0.4 group (zarr 2) the levels are added as 0.4."""
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v04.image_label import ImageLabel

    lab = np.stack([_labels((20, 70, 90), seed=s) for s in range(3)])
    path = tmp_path / "tzyx.ome.zarr"
    _tzyx_label_group(path, lab, (1, 7, 16, 24))
    factors = pyramid.level_factors(lab.shape, (2.0, 0.5, 0.5), max_plane=16)
    assert factors == [(1, 1, 2, 2), (1, 1, 2, 2), (1, 2, 2, 2)]
    pyramid.build(Threads(), path, factors, method="nearest")
    group = zarr.open_group(str(path), mode="r")
    for k in range(1, 4):
        level = group[str(k)][...]
        assert level.shape[0] == 3
        for t in range(3):  # each time point is its own pyramid
            np.testing.assert_array_equal(level[t], _strided(lab[t], [f[1:] for f in factors], k))
    (node, *_) = Reader(parse_url(str(path), fmt=FormatV04()))()
    expect_no_parent(ome_zarr_reads_warn_nothing)
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales == [[1, 2, 0.5, 0.5], [1, 2, 1, 1], [1, 2, 2, 2], [1, 4, 4, 4]]
    assert [tuple(a.shape) for a in node.data][-1] == (3, 10, 9, 12)
    ImageLabel.from_zarr(group)


def test_resume_skips_marked_blocks_and_redoes_the_rest(tmp_path):
    lab = _labels((20, 70, 90))
    path, marks = tmp_path / "labels.ome.zarr", tmp_path / "marks"
    io.create_label_zarr(path, lab.shape, (8, 32, 32), (1.0, 1.0, 1.0))[...] = lab
    factors = pyramid.level_factors(lab.shape, (1, 1, 1), max_plane=16)
    pyramid.build(Threads(), path, factors, method="nearest", marks=marks)
    level1 = zarr.open_array(str(path / "1"), mode="r+")
    assert level1.shape == (10, 35, 45)
    assert len(list((marks / "1").iterdir())) == 2 * 2 * 2  # one mark per chunk of level 1
    # A marked block is not computed again (its stale content stays); an unmarked one is.
    level1[0:8, 0:32, 0:32] = 7
    level1[8:10, 0:32, 0:32] = 7
    (marks / "1" / "8_0_0").unlink()
    pyramid.build(Threads(), path, factors, method="nearest", marks=marks, keep=True)
    assert (level1[0:8, 0:32, 0:32] == 7).all()
    np.testing.assert_array_equal(level1[8:10, 0:32, 0:32], lab[16:20:2, 0:64:2, 0:64:2])
    # Without keep, every level is made anew.
    pyramid.build(Threads(), path, factors, method="nearest", marks=marks, keep=False)
    np.testing.assert_array_equal(level1[...], lab[::2, ::2, ::2])


# --- whole runs --------------------------------------------------------------------------


def _check_run(out: Path, voxel: tuple[float, ...]) -> None:
    """The run's pyramid equals its strided level 0, and its AnnData table its Parquet table."""
    import anndata

    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    group = zarr.open_group(str(out / "labels.ome.zarr"), mode="r")
    level0 = group["0"][...]
    factors = pyramid.level_factors(level0.shape, voxel)
    assert len(factors) >= 2 and record["pyramid_shapes"][0] == list(level0.shape)
    for k in range(1, len(factors) + 1):
        np.testing.assert_array_equal(group[str(k)][...], _strided(level0, factors, k))
    table = pd.read_parquet(out / "nuclei.parquet")
    stored = anndata.read_zarr(str(out / "labels.ome.zarr" / "tables" / "nuclei"))
    back = pd.concat([stored.obs, stored.to_df()], axis=1)
    back.insert(0, "label", back.index.astype(level0.dtype))  # the table keeps its dtype
    back = back.reset_index(drop=True)[table.columns]
    pd.testing.assert_frame_equal(back, table, check_exact=True)
    assert set(table["label"]) == set(np.unique(level0).tolist()) - {0}
    attrs = dict(group["tables"]["nuclei"].attrs)
    assert attrs["type"] == "feature_table" and attrs["instance_key"] == "label"
    assert dict(group["tables"].attrs) == {"tables": ["nuclei"]}


def test_a_run_writes_the_pyramid_and_the_linked_table(stack3d, run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(pyramid, "MAX_PLANE", 40)  # stack3d is 40 x 128 x 128
    out = tmp_path / "out"
    run_cli(stack3d[0], out)
    _check_run(out, stack3d[1].voxel_size)
    progress = json.loads((out / "run.json").read_text())["progress"]
    assert len(progress["stages"]["pyramid"]["passes"]) == 2  # one per level
    ngio = pytest.importorskip("ngio")
    container = ngio.open_ome_zarr_container(str(out / "labels.ome.zarr"))
    read = container.get_table("nuclei").dataframe
    table = pd.read_parquet(out / "nuclei.parquet").set_index("label")
    assert list(read.index) == list(table.index)
    pd.testing.assert_frame_equal(read[table.columns].astype(table.dtypes), table,
                                  check_index_type=False)  # fmt: skip

    # What `nucflow view` opens in napari: input and label pyramid at the voxel size, the
    # linked table as the labels' features.
    from nucflow import view

    (image, image_kw, kind1), (labels, label_kw, kind2) = view.layers(out)
    assert (kind1, kind2) == ("image", "labels")
    assert image_kw["scale"] == label_kw["scale"] == list(stack3d[1].voxel_size)
    assert [a.shape for a in labels] == [(40, 128, 128), (40, 64, 64), (20, 32, 32)]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(stack3d[1].image))
    features = label_kw["features"]
    assert list(features["index"]) == list(table.index)


def test_view_refuses_what_is_not_a_complete_run(tmp_path, capsys):
    assert main(["view", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"nucflow view: error: {tmp_path} has no readable run.json; give a nucflow run's --output"
    ]


@pytest.mark.parametrize("spec", ["threads", "processes"])  # tasks pickle; workers write levels
def test_a_2d_run_writes_the_pyramid_and_the_linked_table(stack2d, tmp_path, monkeypatch, spec):
    monkeypatch.setattr(pyramid, "MAX_PLANE", 64)  # stack2d is 256 x 256
    out = tmp_path / "out"
    code = main(["run", "--input", str(stack2d[0]), "--output", str(out), "--diameter", "8",
                 "--chunks", "96", "80", "--cluster", spec])  # fmt: skip
    assert code == 0
    _check_run(out, stack2d[1].voxel_size)
    shapes = json.loads((out / "run.json").read_text())["pyramid_shapes"]
    assert shapes == [[256, 256], [128, 128], [64, 64]]


def test_a_failed_pyramid_never_looks_complete_and_resume_skips_finished_levels(
    stack3d, run_cli, tmp_path, monkeypatch
):
    # 40 x 128 x 128 at 1 x 0.5 x 0.5 µm: level 1 (40, 64, 64), level 2 (20, 32, 32)
    monkeypatch.setattr(pyramid, "MAX_PLANE", 40)
    real, calls = pyramid._level_task, []

    def level_task(core, *, target, **kw):
        calls.append(target.shape)
        if fail and target.shape == (20, 32, 32):
            raise OSError("disk full")
        return real(core, target=target, **kw)

    monkeypatch.setattr(pyramid, "_level_task", level_task)
    out, fail = tmp_path / "out", True
    assert main(run_cli.args(stack3d[0], out)) == 1
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and "disk full" in record["error"]
    assert not (out / "nuclei.parquet").exists()
    assert calls.count((40, 64, 64)) == 5 * 2 * 2  # level 1 finished: one task per chunk

    calls.clear()
    fail = False
    run_cli(stack3d[0], out, "--resume")
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["stages"]["pyramid"]["action"] == "reused"
    assert calls == [(20, 32, 32)] * 3  # level 1 not computed again; level 2's 3 chunks
    _check_run(out, stack3d[1].voxel_size)


def test_the_preprocess_flow_writes_an_image_pyramid(stack2d, tmp_path, monkeypatch):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    monkeypatch.setattr(pyramid, "MAX_PLANE", 64)  # stack2d is 256 x 256 at 0.5 µm
    out = tmp_path / "out"
    code = main(["run", "--flow", "preprocess", "--input", str(stack2d[0]), "--output", str(out),
                 "--chunks", "96", "80"])  # fmt: skip
    assert code == 0
    (node, *_) = Reader(parse_url(str(out / "filtered.ome.zarr")))()
    level0, level1, level2 = (np.asarray(a) for a in node.data)
    assert level2.shape == (64, 64)
    np.testing.assert_allclose(level1, level0.reshape(128, 2, 128, 2).mean(axis=(1, 3)), rtol=1e-5)
    np.testing.assert_allclose(level2, level1.reshape(64, 2, 64, 2).mean(axis=(1, 3)), rtol=1e-5)
    assert node.metadata["coordinateTransformations"][2] == [
        {"type": "scale", "scale": [2.0, 2.0]},
        {"type": "translation", "translation": [0.75, 0.75]},
    ]


def test_view_without_a_display_says_so(stack2d, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["run", "--input", str(stack2d[0]), "--output", str(out), "--diameter", "8"]) == 0
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    capsys.readouterr()
    assert main(["view", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "nucflow view: error: nucflow view needs a display and DISPLAY is not set; run it on a "
        "desktop or with ssh -X, or open labels.ome.zarr in napari where you have a screen"
    ]


def test_the_linked_table_of_a_partitioned_dataset_in_unaligned_batches(tmp_path, monkeypatch):
    import anndata

    from nucflow import labels_table

    monkeypatch.setattr(labels_table, "BATCH_ROWS", 7)  # parts of 5 rows straddle the chunks
    rng = np.random.default_rng(5)
    folder = tmp_path / "nuclei.parquet"
    folder.mkdir()
    parts = []
    for i in range(5):
        part = pd.DataFrame(
            {
                "label": rng.integers(1, 2**40, 5).astype(np.uint64),
                "centroid_y": rng.random(5),
                "n_voxels": rng.integers(1, 1000, 5),
                "truncated": rng.random(5) > 0.5,
            }
        )
        part.to_parquet(folder / f"part-{i}.parquet")
        parts.append(part)
    pd.DataFrame(parts[0].iloc[:0]).to_parquet(folder / "_common_metadata")
    labels = tmp_path / "labels.ome.zarr"
    io.create_label_zarr(labels, (4, 8, 8), (4, 8, 8), None)
    assert labels_table.write(labels, folder) == 25
    stored = anndata.read_zarr(str(labels / "tables" / "nuclei"))
    assert zarr.open_array(str(labels / "tables" / "nuclei" / "X"), mode="r").chunks == (7, 1)
    back = pd.concat([stored.obs, stored.to_df()], axis=1)
    back.insert(0, "label", back.index.astype(np.uint64))
    expected = pd.concat(parts, ignore_index=True)
    pd.testing.assert_frame_equal(back.reset_index(drop=True)[expected.columns], expected)


def test_a_time_lapse_gets_one_pyramid_over_its_time_axis(tmp_path, monkeypatch):
    """A 2D+t OME-Zarr movie: levels keep every time point (factor 1 on t, its scale kept) and
    each time point's level equals its strided level 0; the table links (t, label)."""
    import ome_zarr.writer

    from nucflow import synth

    frames = [synth.make_nuclei((128, 128), n_nuclei=25, diameter=8.0, seed=s).image
              for s in range(3)]  # fmt: skip
    source = tmp_path / "movie.ome.zarr"
    ome_zarr.writer.write_image(
        np.stack(frames), zarr.open_group(str(source), mode="w"), axes="tyx", scale_factors=[],
        scale={"t": 30.0, "y": 0.5, "x": 0.5}, axes_units={"t": "second", "y": "micrometer",
        "x": "micrometer"}, storage_options={"chunks": (1, 64, 64)},
    )  # fmt: skip
    monkeypatch.setattr(pyramid, "MAX_PLANE", 64)
    out = tmp_path / "out"
    assert main(["run", "--input", str(source), "--output", str(out), "--diameter", "8"]) == 0
    group = zarr.open_group(str(out / "labels.ome.zarr"), mode="r")
    level0, level1 = group["0"][...], group["1"][...]
    assert level0.shape == (3, 128, 128) and level1.shape == (3, 64, 64)
    np.testing.assert_array_equal(level1, level0[:, ::2, ::2])
    datasets = io.ome_metadata(group)["multiscales"][0]["datasets"]
    assert [d["coordinateTransformations"][0]["scale"] for d in datasets] == [
        [30.0, 0.5, 0.5],
        [30.0, 1.0, 1.0],
    ]
    table = pd.read_parquet(out / "nuclei.parquet")
    assert sorted(set(table["t"])) == [0, 1, 2]
    import anndata

    stored = anndata.read_zarr(str(out / "labels.ome.zarr" / "tables" / "nuclei"))
    assert list(stored.obs["t"]) == list(table["t"])
    assert list(stored.obs.index.astype(np.uint64)) == list(table["label"])
