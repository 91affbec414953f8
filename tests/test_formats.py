"""Same answer whatever the container: one stack written as OME-Zarr, BigDataViewer HDF5 and
N5 (pybdv), Imaris .ims (h5py, Imaris's layout with its padding), Zeiss CZI (pylibCZIrw, read
through bioio-czi), OME-TIFF and OME-Zarr on S3
(moto's server) gives the same nuclei table and labels; and what each reader reads (setups
and channels, time points, levels, voxel size)."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import CliRunner
from formats_writers import write_bdv, write_czi, write_ims

from nucflow import io, synth

SHAPE = (24, 96, 96)
RUN = CliRunner((12, 48, 48))  # 8 blocks, each cut by nuclei


@pytest.fixture(scope="module")
def stack():
    return synth.make_nuclei(SHAPE, n_nuclei=25, diameter=8.0, seed=7)


@pytest.fixture(scope="module")
def views(stack) -> np.ndarray:
    """(t, c, z, y, x): the stack is channel 1 at time point 0; the other views differ."""
    image = stack.image
    other = (image // 2 + 100).astype(image.dtype)
    return np.stack([np.stack([other, image]), np.stack([image[::-1], other[:, ::-1]])])


@pytest.fixture(scope="module")
def reference(stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    path = root / "stack.ome.zarr"
    io.write_ome_zarr(path, stack.image, stack.voxel_size, chunks=(12, 48, 48))
    return RUN(path, root / "out")


def _write(fmt, stack, views, folder, request):
    """The stack in ``fmt``; the extra options selecting it (channel 1 of multi-view files)."""
    if fmt == "bdv-hdf5":
        pytest.importorskip("pybdv")
        return write_bdv(folder / "bdv_h5.h5", views, stack.voxel_size), ["--channel", "1"]
    if fmt == "bdv-n5":
        pytest.importorskip("z5py")
        return write_bdv(folder / "bdv_n5.n5", views, stack.voxel_size), ["--channel", "1"]
    if fmt == "imaris":
        return write_ims(folder / "stack.ims", views, stack.voxel_size), ["--channel", "1"]
    if fmt == "czi":
        pytest.importorskip("pylibCZIrw")
        pytest.importorskip("bioio_czi")
        return write_czi(folder / "stack.czi", views, stack.voxel_size), ["--channel", "1"]
    if fmt == "ome-tiff":
        path = folder / "stack.ome.tif"
        z, y, x = stack.voxel_size
        meta = {"axes": "ZYX", "PhysicalSizeZ": z, "PhysicalSizeY": y, "PhysicalSizeX": x}
        tifffile.imwrite(path, stack.image, ome=True, tile=(48, 48), metadata=meta)
        return path, []
    server = request.getfixturevalue("s3_server")
    server.env(request.getfixturevalue("monkeypatch"))
    local = folder / "upload"
    local.mkdir()
    if fmt == "s3-ome-tiff":
        path, extra = _write("ome-tiff", stack, views, local, request)
    else:
        assert fmt == "s3-ome-zarr"
        path, extra = local / "stack.ome.zarr", []
        io.write_ome_zarr(path, stack.image, stack.voxel_size, chunks=(12, 48, 48))
    return server.upload(local, "formats", folder.name) + "/" + path.name, extra


@pytest.mark.parametrize("fmt", ["bdv-hdf5", "bdv-n5", "imaris", "czi", "ome-tiff", "s3-ome-zarr"])
def test_every_container_gives_the_ome_zarr_table(fmt, stack, views, reference, tmp_path, request):
    # One time point: a time-lapse would run each (its table says t), as OME-Zarr's would.
    source, extra = _write(fmt, stack, views[:1], tmp_path, request)
    opened = io.open_stack(str(source), channel=1 if extra else None)
    assert opened.voxel_size == pytest.approx(stack.voxel_size)
    table, labels = RUN(source, tmp_path / "out", *extra)
    assert len(table) > 10
    pd.testing.assert_frame_equal(table, reference[0])
    np.testing.assert_array_equal(labels, reference[1])


@pytest.mark.parametrize("fmt", ["bdv-hdf5", "bdv-n5", "imaris", "czi"])
def test_views_levels_and_voxel_size(fmt, stack, views, tmp_path, request):
    source, _ = _write(fmt, stack, views, tmp_path, request)
    opened = io.open_stack(str(source), channel=0, timepoint=1, chunks=(5, 40, 36))
    assert (opened.n_channels, opened.n_timepoints) == (2, 2)
    assert opened.voxel_size == pytest.approx(stack.voxel_size)
    names = {"bdv-hdf5": "BigDataViewer", "bdv-n5": "BigDataViewer", "imaris": "Imaris"}
    assert opened.format.startswith(names.get(fmt, "CZI"))
    again = pickle.loads(pickle.dumps(opened))  # what a process or SLURM worker receives
    np.testing.assert_array_equal(again.data.compute(), views[1, 0])
    np.testing.assert_array_equal(opened.at(0).data.compute(), views[0, 0])
    if fmt == "czi":  # full resolution only; a block reads only its subblocks' region
        from nucflow.io.bioio_format import VendorSource

        # bioio's dask planes alone, as ND2 and LIF are read
        source = opened.reader.source
        planes = VendorSource(source.path, source.scene, source.shape, source.dtype)
        np.testing.assert_array_equal(planes[1, 0, 2:9, 5:50, 7:70], views[1, 0, 2:9, 5:50, 7:70])
        return
    coarse = io.open_stack(str(source), channel=1, level=1)
    if fmt == "imaris":  # the writer strides y and x by 2
        np.testing.assert_array_equal(coarse.data.compute(), views[0, 1][:, ::2, ::2])
        assert coarse.voxel_size == pytest.approx((1.0, 1.0, 1.0))
    else:  # pybdv's first level halves y and x
        assert coarse.data.shape == (24, 48, 48)
        assert coarse.voxel_size == pytest.approx((1.0, 1.0, 1.0))
        z, y, x = io.open_stack(str(source), channel=1, level=2).voxel_size
        assert (z, y, x) == pytest.approx((2.0, 2.0, 2.0))


def test_bdv_container_is_part_of_the_input(stack, views, tmp_path, request, capsys):
    """An output inside the N5 folder is refused; --resume sees the HDF5 file change."""
    from nucflow.cli import main

    n5, _ = _write("bdv-n5", stack, views[:1], tmp_path, request)
    capsys.readouterr()
    assert main(["plan", "--input", str(n5), "--channel", "1"]) == 0
    assert "reader     BigDataViewer XML + HDF5/N5; stored chunks 1x1x12x48x48" in (
        capsys.readouterr().out
    )
    inside = tmp_path / "bdv_n5.n5" / "out"
    assert main(["run", "--input", str(n5), "--output", str(inside), "--channel", "1"]) == 2
    assert (
        f"--output {inside} is inside the input {tmp_path / 'bdv_n5.n5'}" in capsys.readouterr().err
    )

    xml, _ = _write("bdv-hdf5", stack, views[:1], tmp_path, request)
    RUN(xml, tmp_path / "out", "--channel", "1")
    import h5py

    # Re-exported: a new file in its place (this process still holds the old one open).
    changed = tmp_path / "changed.h5"
    shutil.copy(tmp_path / "bdv_h5.h5", changed)
    with h5py.File(changed, "a") as f:
        f["t00000/s01/0/cells"][0, 0, 0] = 1234
    os.replace(changed, tmp_path / "bdv_h5.h5")
    capsys.readouterr()
    code = main(RUN.args(xml, tmp_path / "out", "--channel", "1", "--resume"))
    err = capsys.readouterr().err
    assert code == 2 and f"--resume: the input {xml} is not the one" in err, err


def test_czi_scene_is_selected_and_its_file_fingerprinted(stack, views, tmp_path, request):
    from nucflow import fingerprint
    from nucflow.errors import ParameterError

    czi, _ = _write("czi", stack, views[:1], tmp_path, request)
    opened = io.open_stack(f"{czi}#0", channel=1)
    np.testing.assert_array_equal(opened.data.compute(), stack.image)
    before = fingerprint.input_identity(opened)["files"]
    assert before == fingerprint.input_identity(io.open_stack(str(czi), channel=1))["files"]
    os.utime(czi, ns=(0, 10**18))  # the file changed (as far as --resume can tell)
    assert fingerprint.input_identity(opened)["files"] != before
    with pytest.raises(ParameterError, match=r"scene '3' of .*stack.czi does not exist; it has 1"):
        io.open_stack(f"{czi}#3", channel=1)
