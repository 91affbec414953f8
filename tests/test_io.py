"""Tests for nucflow.io: every reader round-trips, is lazy and picklable; writers are NGFF."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import cloudpickle
import dask
import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from conftest import expect_no_parent

from nucflow.errors import (
    CorruptDataError,
    DtypeError,
    FormatError,
    InputPathError,
    OutputError,
    ParameterError,
    ShapeError,
)
from nucflow.io import Stack, create_label_zarr, open_stack, write_ome_zarr

SHAPE = (13, 37, 29)  # uneven on purpose: no axis divides the test chunks
CHUNKS = (5, 16, 11)


@pytest.fixture(scope="module")
def client():
    """One process-based LocalCluster for the whole module (startup dominates the runtime)."""
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def ref() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 1000, SHAPE, dtype=np.uint16)


def channels(ref: np.ndarray, n: int = 3) -> list[np.ndarray]:
    """Distinct channel images, so that selecting the wrong channel shows."""
    return [ref + np.uint16(1000 * c) for c in range(n)]


# ------------------------------------------------------------------ builders
# Each builder writes ``ref`` to disk and returns (path, open_stack kwargs, expected data,
# expected voxel size or None when unknown, expected n_channels).

Built = tuple[str, dict, np.ndarray, tuple | None, int]


def _ngff_write(
    path: Path, levels: list[np.ndarray], axes: list[dict], scales: list[list], fmt: int
) -> str:
    """Write an OME-Zarr by hand: 0.4 for zarr format 2, 0.5 for zarr format 3."""
    root = zarr.open_group(path, mode="w", zarr_format=fmt)
    kw = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if fmt == 2 else {}
    datasets = []
    for i, (arr, scale) in enumerate(zip(levels, scales, strict=True)):
        chunks = (1,) * (arr.ndim - 3) + CHUNKS
        root.create_array(str(i), data=arr, chunks=chunks, **kw)
        datasets.append(
            {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    ms = {"axes": axes, "datasets": datasets, "name": "img"}
    if fmt == 2:
        root.attrs["multiscales"] = [{"version": "0.4", **ms}]
    else:
        root.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    return str(path)


TCZYX = [
    {"name": "t", "type": "time"},
    {"name": "c", "type": "channel"},
    {"name": "z", "type": "space", "unit": "micrometer"},
    {"name": "y", "type": "space", "unit": "nanometer"},
    {"name": "x", "type": "space", "unit": "nanometer"},
]


def _ome_zarr(tmp: Path, ref: np.ndarray, fmt: int) -> Built:
    chans = np.stack(channels(ref))
    full = np.stack([chans, chans + np.uint16(5000)])  # t=1 differs: t=0 must be taken
    levels = [full, full[..., ::2, ::2]]
    scales = [[1, 1, 2.0, 250.0, 250.0], [1, 1, 2.0, 500.0, 500.0]]
    path = _ngff_write(tmp / f"img{fmt}.ome.zarr", levels, TCZYX, scales, fmt)
    return path, {"channel": 1}, chans[1], (2.0, 0.25, 0.25), 3


def build_zarr_v2(tmp: Path, ref: np.ndarray) -> Built:
    zarr.create_array(tmp / "v2.zarr", data=ref, chunks=CHUNKS, zarr_format=2)
    return str(tmp / "v2.zarr"), {}, ref, None, 1


def build_zarr_v3(tmp: Path, ref: np.ndarray) -> Built:
    zarr.create_array(tmp / "v3.zarr", data=ref, chunks=(4, 8, 8), shards=(8, 16, 16))
    return str(tmp / "v3.zarr"), {}, ref, None, 1


def build_zarr_group(tmp: Path, ref: np.ndarray) -> Built:
    group = zarr.open_group(tmp / "group.zarr", mode="w", zarr_format=3)
    group.create_array("raw", data=ref, chunks=CHUNKS)
    return str(tmp / "group.zarr"), {}, ref, None, 1


def build_ome_zarr_04(tmp: Path, ref: np.ndarray) -> Built:
    return _ome_zarr(tmp, ref, 2)


def build_ome_zarr_05(tmp: Path, ref: np.ndarray) -> Built:
    return _ome_zarr(tmp, ref, 3)


def build_tiff(tmp: Path, ref: np.ndarray) -> Built:
    tifffile.imwrite(tmp / "plain.tif", ref)
    return str(tmp / "plain.tif"), {}, ref, None, 1


def build_bigtiff(tmp: Path, ref: np.ndarray) -> Built:
    tifffile.imwrite(tmp / "big.tif", ref, bigtiff=True, tile=(16, 16), compression="zlib")
    return str(tmp / "big.tif"), {}, ref, None, 1


def build_ome_tiff(tmp: Path, ref: np.ndarray) -> Built:
    meta = {
        "axes": "CZYX",
        "PhysicalSizeX": 0.25,
        "PhysicalSizeY": 0.3,
        "PhysicalSizeZ": 1500,
        "PhysicalSizeZUnit": "nm",
    }
    tifffile.imwrite(tmp / "img.ome.tif", np.stack(channels(ref)), ome=True, metadata=meta)
    return str(tmp / "img.ome.tif"), {"channel": 2}, channels(ref)[2], (1.5, 0.3, 0.25), 3


def build_imagej(tmp: Path, ref: np.ndarray) -> Built:
    data = np.stack(channels(ref, 2), axis=1)  # ImageJ hyperstacks are ZCYX
    meta = {"axes": "ZCYX", "spacing": 2.5, "unit": "um"}
    tifffile.imwrite(tmp / "ij.tif", data, imagej=True, resolution=(2.5, 2.0), metadata=meta)
    return str(tmp / "ij.tif"), {"channel": 1}, channels(ref, 2)[1], (2.5, 0.5, 0.4), 2


def build_slices(tmp: Path, ref: np.ndarray) -> Built:
    folder = tmp / "slices"
    folder.mkdir()
    for z, plane in enumerate(ref):
        tifffile.imwrite(folder / f"z{z + 1}.tif", plane)  # z10 sorts before z2 as text
    return str(folder), {}, ref, None, 1


def build_glob(tmp: Path, ref: np.ndarray) -> Built:
    path, kw, expected, vs, n = build_slices(tmp, ref)
    (tmp / "slices" / "notes.txt").write_text("not matched by the pattern")
    return os.path.join(path, "z*.tif"), kw, expected, vs, n


BUILDERS: dict[str, Callable[[Path, np.ndarray], Built]] = {
    "zarr_v2": build_zarr_v2,
    "zarr_v3": build_zarr_v3,
    "zarr_group": build_zarr_group,
    "ome_zarr_04": build_ome_zarr_04,
    "ome_zarr_05": build_ome_zarr_05,
    "tiff": build_tiff,
    "bigtiff": build_bigtiff,
    "ome_tiff": build_ome_tiff,
    "imagej": build_imagej,
    "slices": build_slices,
    "glob": build_glob,
}


@pytest.fixture(params=sorted(BUILDERS))
def built(request, tmp_path, ref) -> Built:
    return BUILDERS[request.param](tmp_path, ref)


# ------------------------------------------------------------------ round trip, laziness


def test_round_trip(built):
    path, kw, expected, voxel, n_channels = built
    stack = open_stack(path, **kw)
    assert isinstance(stack, Stack)
    assert stack.axes == "zyx" and stack.path == path and stack.n_channels == n_channels
    assert stack.data.shape == SHAPE and stack.data.dtype == np.uint16
    np.testing.assert_array_equal(stack.data.compute(scheduler="sync"), expected)
    if voxel is None:
        assert stack.voxel_size == (1.0, 1.0, 1.0) and not stack.voxel_size_known
    else:
        np.testing.assert_allclose(stack.voxel_size, voxel)
        assert stack.voxel_size_known


def test_chunks_pickle_and_process_cluster(built, client):
    path, kw, expected, _, _ = built
    data = open_stack(path, chunks=CHUNKS, **kw).data
    assert data.chunksize == CHUNKS and data.numblocks == (3, 3, 3)
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        np.testing.assert_array_equal(loads(dumps(data)).compute(scheduler="sync"), expected)
    np.testing.assert_array_equal(client.compute(data).result(), expected)


def test_same_file_same_keys(built):
    path, kw, _, _, _ = built
    assert open_stack(path, **kw).data.name == open_stack(path, **kw).data.name


@pytest.mark.parametrize("fmt", ["zarr_v2", "zarr_v3", "ome_zarr_04", "ome_zarr_05"])
def test_zarr_open_reads_no_chunks(fmt, tmp_path, ref):
    path, kw, _, _, _ = BUILDERS[fmt](tmp_path, ref)
    n = 0
    for root, _, files in os.walk(path):
        for f in files:
            if f not in ("zarr.json", ".zarray", ".zattrs", ".zgroup"):
                Path(root, f).write_bytes(b"garbage, not a chunk")
                n += 1
    assert n > 0
    stack = open_stack(path, chunks=CHUNKS, **kw)  # opening must not touch a chunk
    with pytest.raises(CorruptDataError, match="cannot decode region .* re-copy or re-export"):
        stack.data.compute(scheduler="sync")


@pytest.mark.parametrize("fmt", ["tiff", "bigtiff", "ome_tiff", "imagej", "slices", "glob"])
def test_tiff_open_reads_no_pixels(fmt, tmp_path, ref, monkeypatch):
    path, kw, expected, _, _ = BUILDERS[fmt](tmp_path, ref)

    def forbidden(*args, **kwargs):
        raise AssertionError("pixel data read while opening")

    with monkeypatch.context() as m:
        m.setattr(tifffile.FileHandle, "read_segments", forbidden)
        m.setattr(tifffile.FileCache, "read", forbidden)
        m.setattr(tifffile.TiffPage, "asarray", forbidden)
        m.setattr(tifffile.TiffPage, "decode", property(forbidden))
        stack = open_stack(path, **kw)
    np.testing.assert_array_equal(stack.data.compute(scheduler="sync"), expected)


def test_tiff_reads_only_needed_tiles(tmp_path, ref, monkeypatch):
    path = build_bigtiff(tmp_path, ref)[0]  # 16x16 tiles
    with tifffile.TiffFile(path) as tif:
        wanted = tif.pages[4].dataoffsets[0]  # first tile of page 4
    stack = open_stack(path, chunks=(1, 16, 16))
    read = []
    original = tifffile.FileCache.read  # how tifffile's zarr store reads a chunk

    def spy(self, filehandle, offset, bytecount, *args, **kwargs):
        read.append(offset)
        return original(self, filehandle, offset, bytecount, *args, **kwargs)

    monkeypatch.setattr(tifffile.FileCache, "read", spy)
    block = stack.data[4, :16, :16].compute(scheduler="sync")
    np.testing.assert_array_equal(block, ref[4, :16, :16])
    assert read == [wanted]


def test_corrupt_compressed_tiff(tmp_path, ref):
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, ref, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[5]
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * count)
    stack = open_stack(path)
    np.testing.assert_array_equal(stack.data[4].compute(scheduler="sync"), ref[4])
    with pytest.raises(CorruptDataError, match="bad.tif"):
        stack.data.compute(scheduler="sync")


# ------------------------------------------------------------------ levels, channels, axes


@pytest.mark.parametrize("fmt", ["ome_zarr_04", "ome_zarr_05"])
def test_ome_zarr_level(fmt, tmp_path, ref):
    path, _, expected, _, _ = BUILDERS[fmt](tmp_path, ref)
    stack = open_stack(path, channel=1, level=1)
    np.testing.assert_array_equal(stack.data.compute(), expected[:, ::2, ::2])
    assert stack.voxel_size == (2.0, 0.5, 0.5)
    with pytest.raises(
        ParameterError, match=r"`level` 2 is out of range: .* 2 level\(s\); .*0\.\.1"
    ):
        open_stack(path, channel=1, level=2)


def test_pyramidal_ome_tiff_level(tmp_path, ref):
    path = tmp_path / "pyr.ome.tif"
    meta = {"axes": "ZYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25, "PhysicalSizeZ": 1.0}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(ref, subifds=1, tile=(16, 16), metadata=meta)
        tw.write(ref[:, ::2, ::2], subfiletype=1, tile=(16, 16))
    stack = open_stack(path, level=1, chunks=CHUNKS)
    np.testing.assert_array_equal(stack.data.compute(), ref[:, ::2, ::2])
    assert stack.voxel_size == (1.0, 0.5, 0.5)
    with pytest.raises(ParameterError, match="`level` 2"):
        open_stack(path, level=2)


@pytest.mark.parametrize("fmt", ["ome_zarr_04", "ome_zarr_05", "ome_tiff", "imagej"])
def test_channel_selection(fmt, tmp_path, ref):
    path, _, _, _, n = BUILDERS[fmt](tmp_path, ref)
    for c in range(n):
        np.testing.assert_array_equal(open_stack(path, channel=c).data.compute(), ref + 1000 * c)
    with pytest.raises(ShapeError, match=rf"`channel` is required: .* has {n} channels \(c axis\); "
                       rf"pass --channel 0\.\.{n - 1}"):  # fmt: skip
        open_stack(path)
    with pytest.raises(ParameterError, match=rf"`channel` {n} is out of range: .*0\.\.{n - 1}"):
        open_stack(path, channel=n)
    with pytest.raises(ParameterError, match="`channel` -1 is out of range"):
        open_stack(path, channel=-1)


def test_channel_on_single_channel_image(tmp_path, ref):
    path = build_tiff(tmp_path, ref)[0]
    np.testing.assert_array_equal(open_stack(path, channel=0).data.compute(), ref)
    with pytest.raises(ParameterError, match=r"`channel` 1 is out of range: .*0\.\.0"):
        open_stack(path, channel=1)


def test_imagej_time_axis_takes_t0(tmp_path, ref):
    data = np.stack([ref, ref + 1])[:, :, None]  # TZCYX with one channel
    tifffile.imwrite(tmp_path / "t.tif", data, imagej=True, metadata={"axes": "TZCYX"})
    stack = open_stack(tmp_path / "t.tif")
    assert stack.axes == "zyx" and stack.n_channels == 1
    np.testing.assert_array_equal(stack.data.compute(), ref)


def test_zarr_dimension_names(tmp_path, ref):
    data = np.stack(channels(ref, 2), axis=1)
    path = tmp_path / "named.zarr"
    zarr.create_array(path, data=data, chunks=(4, 1, 16, 16), dimension_names=["z", "c", "y", "x"])
    np.testing.assert_array_equal(open_stack(path, channel=1).data.compute(), ref + 1000)


@pytest.mark.parametrize("fmt", ["zarr", "tiff", "ome_zarr"])
def test_2d(fmt, tmp_path, ref):
    plane = ref[0]
    path = tmp_path / "plane"
    if fmt == "zarr":
        zarr.create_array(path, data=plane)
    elif fmt == "tiff":
        path = tmp_path / "plane.tif"
        tifffile.imwrite(path, plane, imagej=True, resolution=(2.0, 2.0), metadata={"unit": "um"})
    else:
        write_ome_zarr(path, plane, (0.5, 0.5))
    stack = open_stack(path)
    assert stack.axes == "yx" and stack.data.shape == plane.shape
    assert stack.voxel_size == ((1.0, 1.0) if fmt == "zarr" else (0.5, 0.5))
    np.testing.assert_array_equal(stack.data.compute(), plane)


def test_ome_zarr_millimeter_and_missing_units(tmp_path, ref):
    axes = [{"name": a, "type": "space", "unit": "millimeter"} for a in "zyx"]
    path = _ngff_write(tmp_path / "mm.zarr", [ref], axes, [[0.002, 0.0005, 0.0005]], 2)
    np.testing.assert_allclose(open_stack(path).voxel_size, (2.0, 0.5, 0.5))
    no_unit = [{"name": a, "type": "space"} for a in "zyx"]
    path = _ngff_write(tmp_path / "ones.zarr", [ref], no_unit, [[1.0, 1.0, 1.0]], 2)
    assert not open_stack(path).voxel_size_known


@pytest.mark.parametrize("fmt", ["ome_zarr_04", "ome_zarr_05"])
def test_ome_zarr_dataset_path_uses_parent_metadata(fmt, tmp_path, ref):
    path, _, expected, _, _ = BUILDERS[fmt](tmp_path, ref)
    stack = open_stack(os.path.join(path, "1"), channel=1)
    assert stack.voxel_size == (2.0, 0.5, 0.5) and stack.n_channels == 3
    np.testing.assert_array_equal(stack.data.compute(), expected[:, ::2, ::2])


def test_rewritten_tiff_is_read_again(tmp_path, ref):
    path = tmp_path / "r.tif"
    tifffile.imwrite(path, ref)
    np.testing.assert_array_equal(open_stack(path).data.compute(scheduler="sync"), ref)
    tifffile.imwrite(path, ref + 1)  # workers cache open files; a new version must not hit it
    np.testing.assert_array_equal(open_stack(path).data.compute(scheduler="sync"), ref + 1)


def test_slices_natural_order(tmp_path, ref):
    path = build_slices(tmp_path, ref)[0]
    files = sorted(os.listdir(path))
    assert files[:3] == ["z1.tif", "z10.tif", "z11.tif"]  # text order would be wrong
    np.testing.assert_array_equal(open_stack(path).data.compute(), ref)


def test_slices_mismatched_shapes(tmp_path, ref):
    folder = tmp_path / "bad"
    folder.mkdir()
    tifffile.imwrite(folder / "a1.tif", ref[0])
    tifffile.imwrite(folder / "a2.tif", ref[1, :10])
    with pytest.raises(ShapeError, match="all slices must match"):
        open_stack(folder)


def test_slices_have_one_level(tmp_path, ref):
    with pytest.raises(ParameterError, match=r"`level` 1 is out of range: .*0\.\.0"):
        open_stack(build_slices(tmp_path, ref)[0], level=1)


def test_folder_with_one_file_opens_it(tmp_path, ref):
    folder = tmp_path / "one"
    folder.mkdir()
    tifffile.imwrite(folder / "stack.tif", ref)
    np.testing.assert_array_equal(open_stack(folder).data.compute(), ref)


# ------------------------------------------------------------------ bad inputs


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.zarr"
    with pytest.raises(InputPathError, match=rf"input {missing} does not exist; check the path"):
        open_stack(missing)
    with pytest.raises(InputPathError, match="matches no files"):
        open_stack(tmp_path / "*.tif")


@pytest.mark.parametrize("name", ["notes.txt", "table.csv"])
def test_not_an_image(tmp_path, name):
    (tmp_path / name).write_text("a,b\n1,2\n")
    with pytest.raises(FormatError, match=rf"{name} is not an image .* supported: zarr .*TIFF"):
        open_stack(tmp_path / name)


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(FormatError, match=rf"{tmp_path} is a folder with no zarr .* supported:"):
        open_stack(tmp_path)


def test_group_with_several_arrays(tmp_path, ref):
    group = zarr.open_group(tmp_path / "multi.zarr", mode="w")
    group.create_array("raw", data=ref)
    group.create_array("mask", data=ref > 5)
    with pytest.raises(
        FormatError, match=r"multi.zarr is a zarr group with 2 arrays \(mask, raw\)"
    ):
        open_stack(tmp_path / "multi.zarr")


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((7,), r"shape \(7,\) \(no axis metadata\): 1 spatial"),
        ((2, 3, 4, 5), r"shape \(2, 3, 4, 5\) \(no axis metadata\): 4 spatial"),
        ((2, 2, 2, 3, 4, 5), r"shape \(2, 2, 2, 3, 4, 5\) .*supports 2D \(Y, X\) or 3D"),
    ],
)
def test_unsupported_dimensions(tmp_path, shape, match):
    zarr.create_array(tmp_path / "a.zarr", shape=shape, dtype="uint8")
    with pytest.raises(ShapeError, match=match):
        open_stack(tmp_path / "a.zarr")


def test_singleton_leading_axis_is_dropped(tmp_path, ref):
    zarr.create_array(tmp_path / "a.zarr", data=ref[None])
    np.testing.assert_array_equal(open_stack(tmp_path / "a.zarr").data.compute(), ref)


@pytest.mark.parametrize("dtype", ["bool", "complex64", "float16", np.dtypes.StringDType()])
def test_bad_dtype(tmp_path, dtype):
    zarr.create_array(tmp_path / "a.zarr", shape=(4, 5), dtype=dtype)
    with pytest.raises(DtypeError, match=r"has dtype .*supported: unsigned/signed integers"):
        open_stack(tmp_path / "a.zarr")


@pytest.mark.parametrize("chunks", [(5, 16), (5, 0, 16), (5, -1, 16), "auto", (5, 1.5, 16)])
def test_bad_chunks(tmp_path, ref, chunks):
    path = build_zarr_v2(tmp_path, ref)[0]
    with pytest.raises(ParameterError, match=r"`chunks` must be 3 positive ints"):
        open_stack(path, chunks=chunks)


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"level": -1}, "`level` must be >= 0"), ({"channel": "0"}, "`channel` must be an int")],
)
def test_bad_parameters(tmp_path, ref, kw, match):
    with pytest.raises(ParameterError, match=match):
        open_stack(build_tiff(tmp_path, ref)[0], **kw)


# ------------------------------------------------------------------ writers


def _ome_nodes(path) -> list:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(str(path)))())
    return [(n, any(isinstance(s, Label) for s in n.specs)) for n in nodes]


def test_write_ome_zarr_round_trip(tmp_path, ref):
    labels = (ref > 500).astype(np.uint32)
    data = da.from_array(ref, chunks=CHUNKS)
    out = tmp_path / "out.ome.zarr"
    write_ome_zarr(out, data, (2.0, 0.5, 0.25), labels={"nuclei": labels}, chunks=(8, 16, 16))
    stack = open_stack(out)
    assert stack.voxel_size == (2.0, 0.5, 0.25) and stack.voxel_size_known
    np.testing.assert_array_equal(stack.data.compute(), ref)
    np.testing.assert_array_equal(open_stack(out / "labels" / "nuclei").data.compute(), labels)
    nodes = _ome_nodes(out)
    image = [n for n, is_label in nodes if not is_label][0]
    np.testing.assert_array_equal(np.asarray(image.data[0]), ref)
    label = [n for n, is_label in nodes if is_label]
    assert label, "ome-zarr-py did not find the label image"
    np.testing.assert_array_equal(np.asarray(label[0].data[0]), labels)
    assert label[0].metadata["axes"][0] == {"name": "z", "type": "space", "unit": "micrometer"}


def test_write_ome_zarr_streams_blocks(tmp_path, ref, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("the whole array was computed")

    monkeypatch.setattr(da.Array, "compute", no_compute)
    data = da.from_array(ref, chunks=CHUNKS)
    with dask.config.set(scheduler="sync"):
        write_ome_zarr(tmp_path / "s.zarr", data, None)
    monkeypatch.undo()
    stack = open_stack(tmp_path / "s.zarr")
    assert not stack.voxel_size_known
    np.testing.assert_array_equal(stack.data.compute(), ref)


def test_write_ome_zarr_refuses_existing(tmp_path, ref):
    out = tmp_path / "o.zarr"
    write_ome_zarr(out, ref, (1, 1, 1))
    with pytest.raises(OutputError, match=r"o.zarr already exists; pass overwrite=True"):
        write_ome_zarr(out, ref, (1, 1, 1))
    write_ome_zarr(out, ref + 1, (1, 1, 1), overwrite=True)
    np.testing.assert_array_equal(open_stack(out).data.compute(), ref + 1)


def test_write_ome_zarr_bad_arguments(tmp_path, ref):
    with pytest.raises(ShapeError, match=r"`labels\['a'\]` \(shape \(3, 4\)\) must have the shape"):
        write_ome_zarr(tmp_path / "x", ref, (1, 1, 1), labels={"a": np.zeros((3, 4), int)})
    with pytest.raises(ParameterError, match="`voxel_size` must be 3 positive numbers"):
        write_ome_zarr(tmp_path / "x", ref, (1, 1))
    with pytest.raises(ShapeError, match="must be 2D"):
        write_ome_zarr(tmp_path / "x", ref[0, 0], (1,))
    assert not (tmp_path / "x").exists()  # nothing written on bad input


def test_create_label_zarr_parallel_writes(tmp_path, ref, client, ome_zarr_reads_warn_nothing):
    out = tmp_path / "labels.ome.zarr"
    target = create_label_zarr(out, SHAPE, (8, 16, 16), (2.0, 0.5, 0.5), dtype="uint32")
    expected = np.zeros(SHAPE, np.uint32)
    expected[:8, 16:32] = 7  # two whole chunks; every other chunk stays unwritten

    def write(arr, region, value):
        arr[region] = value

    futures = [
        client.submit(write, target, (slice(0, 8), slice(16, 32), slice(x, x + 16)), 7)
        for x in (0, 16)
    ]
    client.gather(futures)
    assert pickle.loads(pickle.dumps(target)).shape == SHAPE
    chunk_files = [f for _, _, fs in os.walk(out / "0") for f in fs if f != "zarr.json"]
    assert len(chunk_files) == 2  # sparse: unwritten chunks are absent
    nodes = _ome_nodes(out)
    expect_no_parent(ome_zarr_reads_warn_nothing)  # labels alone: no source image given
    assert nodes[0][1] and "image-label" in nodes[0][0].zarr.root_attrs
    np.testing.assert_array_equal(np.asarray(nodes[0][0].data[0]), expected)
    stack = open_stack(out)
    assert stack.voxel_size == (2.0, 0.5, 0.5)
    np.testing.assert_array_equal(stack.data.compute(), expected)
    with pytest.raises(OutputError, match="already exists"):
        create_label_zarr(out, SHAPE, (8, 16, 16), (2.0, 0.5, 0.5))


def test_create_label_zarr_bad_arguments(tmp_path):
    with pytest.raises(ParameterError, match="`chunks` must be 3 positive ints"):
        create_label_zarr(tmp_path / "a", (4, 5, 6), (4, 5), (1, 1, 1))
    with pytest.raises(DtypeError, match="`dtype` float32 is not an integer"):
        create_label_zarr(tmp_path / "a", (4, 5, 6), (4, 5, 6), (1, 1, 1), dtype="float32")
    with pytest.raises(ParameterError, match="`shape` must be 2 or 3 positive ints"):
        create_label_zarr(tmp_path / "a", (4,), (4,), (1,))
