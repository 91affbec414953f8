"""``nucflow view OUT``: a run's input, label pyramid and table in napari, at the right scale.

:func:`layers` builds napari layer data tuples without importing napari (so it is tested
without a display): the input (every level of an OME-Zarr input, else its level 0) with the
run's voxel size, the label pyramid of ``labels.ome.zarr`` (levels and scales from its NGFF
metadata, read with ome-zarr-py as napari-ome-zarr does) and, as the labels' features, the
table linked to it (``labels.ome.zarr/tables/nuclei``). :func:`show` opens them in napari.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nucflow import io
from nucflow.errors import NucflowError, OutputError

__all__ = ["layers", "show"]


def layers(output: str | os.PathLike[str]) -> list[tuple[Any, dict[str, Any], str]]:
    """napari layer data tuples of a complete run: (data, keyword arguments, layer type).

    Parameters
    ----------
    output : path
        A ``nucflow run`` output directory whose run.json says ``complete``.

    Returns
    -------
    list of tuple
        The input as an ``image`` layer and the nuclei as a multiscale ``labels`` layer whose
        ``features`` are the linked table (one row per label, its ``index`` column the label).

    Raises
    ------
    OutputError
        ``output`` is not a complete nucflow run.
    """
    out = Path(output)
    try:
        record = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        raise OutputError(
            f"{out} has no readable run.json; give a nucflow run's --output"
        ) from None
    if record.get("status") != "complete" or not (out / "labels.ome.zarr").is_dir():
        raise OutputError(
            f"{out} is not a complete nucflow run (status {record.get('status')!r}); "
            "check it with nucflow status"
        )
    labels, scale = _multiscale(out / "labels.ome.zarr")
    image = _input_levels(record)
    image_kw = {"name": "input", "scale": scale[-image[0].ndim :], "blending": "additive"}
    label_kw = {"name": "nuclei", "scale": scale, "opacity": 0.5}
    if (out / "labels.ome.zarr" / "tables" / "nuclei").is_dir():
        label_kw["features"] = _features(out / "labels.ome.zarr" / "tables" / "nuclei")
    return [
        (image if len(image) > 1 else image[0], image_kw, "image"),
        (labels if len(labels) > 1 else labels[0], label_kw, "labels"),
    ]


def show(output: str | os.PathLike[str]) -> None:
    """Open :func:`layers` of ``output`` in napari and run its event loop (needs a display)."""
    found = layers(output)  # refuse a wrong directory before opening any window
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):  # Qt would abort the process
        raise NucflowError(
            "nucflow view needs a display and DISPLAY is not set; run it on a desktop or with "
            "ssh -X, or open labels.ome.zarr in napari where you have a screen"
        )
    try:
        import anndata  # noqa: F401  (the linked table)
        import napari
    except ImportError:
        raise NucflowError(
            "nucflow view needs napari and anndata: pip install 'nucflow[view]'"
        ) from None
    viewer = napari.Viewer(title=f"nucflow: {Path(output).resolve()}")
    for data, kwargs, kind in found:
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    napari.run()


def _multiscale(path: Path) -> tuple[list[Any], list[float]]:
    """Every level (dask arrays) and level 0's scale, as ome-zarr-py reads them."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    # the node of ``path`` itself: a label image's source image is read (and listed) first
    nodes = list(Reader(parse_url(str(path)))())
    node = next((n for n in nodes if Path(n.zarr.subpath()) == Path(path).resolve()), nodes[0])
    scale = node.metadata["coordinateTransformations"][0][0]["scale"]
    return list(node.data), [float(s) for s in scale]


def _input_levels(record: dict[str, Any]) -> list[Any]:
    """The run's input channel at every level it has (OME-Zarr, pyramidal TIFF), or level 0."""
    channel = record.get("config", {}).get("channel")
    levels = [io.open_stack(record["input"], channel=channel).data]
    while True:
        try:
            levels.append(io.open_stack(record["input"], channel=channel, level=len(levels)).data)
        except NucflowError:
            return levels


def _features(table: Path) -> pd.DataFrame:
    """The linked table as napari features: obs and X side by side, ``index`` = label."""
    import anndata

    stored = anndata.read_zarr(str(table))
    frame = pd.concat([stored.obs, stored.to_df()], axis=1)
    frame.insert(0, "index", frame.index.astype(np.uint64))
    return frame.reset_index(drop=True)
