"""Writers of the test stacks in each container, with the library made for it: pybdv for
BigDataViewer HDF5/N5, h5py in Imaris's layout (padding included), tifffile for OME-TIFF."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_bdv(
    data: Path,
    views: np.ndarray,
    voxel: tuple[float, ...],
    *,
    chunks: tuple[int, ...] = (12, 48, 48),
) -> Path:
    """``views`` (t, c, z, y, x) as a BDV dataset (setups = channels), three levels, in
    ``data`` (``.h5``: HDF5, ``.n5``: N5); returns the XML pybdv writes beside it."""
    import warnings

    import pybdv

    for t in range(views.shape[0]):
        for c in range(views.shape[1]):
            with warnings.catch_warnings():  # "Setup 0 is present": adding its time points
                warnings.simplefilter("ignore", UserWarning)
                pybdv.make_bdv(
                    views[t, c], str(data), downscale_factors=[[1, 2, 2], [2, 2, 2]],
                    resolution=list(voxel), unit="micrometer", setup_id=c, timepoint=t,
                    chunks=chunks, downscale_mode="mean",
                )  # fmt: skip
    return data.with_suffix(".xml")


def _attr(value: object) -> np.ndarray:
    """An Imaris attribute: the text as an array of one-byte strings."""
    return np.array(list(str(value)), dtype="S1")


def write_ims(
    path: Path,
    views: np.ndarray,
    voxel: tuple[float, ...],
    *,
    pad: int = 60000,
    chunks: tuple[int, ...] = (16, 64, 64),
) -> Path:
    """``views`` (t, c, z, y, x) as an Imaris 5.5 file: two levels, each ``Data`` padded to
    whole ``chunks`` with ``pad`` (a reader that does not crop would see it)."""
    import h5py

    with h5py.File(path, "w") as f:
        info = f.create_group("DataSetInfo/Image")
        z, y, x = views.shape[2:]
        for name, value in {"X": x, "Y": y, "Z": z, "Unit": "um"}.items():
            info.attrs[name] = _attr(value)
        for i, (n, v) in enumerate(zip((x, y, z), voxel[::-1], strict=True)):
            info.attrs[f"ExtMin{i}"] = _attr(-1.5)
            info.attrs[f"ExtMax{i}"] = _attr(-1.5 + n * v)
        for level, step in enumerate((1, 2)):
            for t in range(views.shape[0]):
                for c in range(views.shape[1]):
                    image = views[t, c][:, ::step, ::step]
                    padded = [-(-n // k) * k for n, k in zip(image.shape, chunks, strict=True)]
                    full = np.full(padded, pad, dtype=views.dtype)
                    full[tuple(slice(0, n) for n in image.shape)] = image
                    group = f.create_group(
                        f"DataSet/ResolutionLevel {level}/TimePoint {t}/Channel {c}"
                    )
                    group.create_dataset("Data", data=full, chunks=chunks, compression="gzip")
                    for axis, n in zip("ZYX", image.shape, strict=True):
                        group.attrs[f"ImageSize{axis}"] = _attr(n)
    return path


def write_czi(path: Path, views: np.ndarray, voxel: tuple[float, ...]) -> Path:
    """``views`` (t, c, z, y, x) as a Zeiss CZI written by pylibCZIrw (Zeiss's library), one
    subblock per plane, with the voxel size in its metadata (metres)."""
    from pylibCZIrw import czi as pyczi

    with pyczi.create_czi(str(path), exist_ok=True) as czi:
        for t in range(views.shape[0]):
            for c in range(views.shape[1]):
                for z in range(views.shape[2]):
                    czi.write(data=views[t, c, z], plane={"T": t, "C": c, "Z": z}, scene=0)
        czi.write_metadata(
            document_name="nucflow test",
            channel_names={c: f"c{c}" for c in range(views.shape[1])},
            scale_z=voxel[0] * 1e-6,
            scale_y=voxel[1] * 1e-6,
            scale_x=voxel[2] * 1e-6,
        )
    return path
