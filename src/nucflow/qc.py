"""Quality-control pictures: what a person looks at first after a run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
import zarr

__all__ = ["write"]

_REGION = 256  # side of a QC region in y and x, voxels


def write(folder: Path, image: da.Array, labels_path: Path, table: pd.DataFrame) -> list[Path]:
    """Write ``outlines.png`` (label outlines on max projections of up to three regions, side
    by side) and ``distributions.png`` (histograms of volume and mean intensity).

    Parameters
    ----------
    folder : Path
        Created if missing.
    image : (Z, Y, X) or (Y, X) dask array
        The segmentation channel.
    labels_path : Path
        The run's ``labels.ome.zarr``.
    table : pandas.DataFrame
        The run's table.

    Returns
    -------
    list of Path
        The pictures written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    labels = da.from_zarr(zarr.open_array(str(labels_path / "0"), mode="r"))
    windows = _regions(image.shape, table)
    # every projection in one pass, so overlapping windows read their blocks once
    flat = dask.compute(*[(_project(image, w), _project(labels, w)) for w in windows])
    return [
        _outline_picture(plt, folder / "outlines.png", flat, windows),
        _histograms(plt, folder / "distributions.png", table),
    ]


def _project(data: da.Array, window: tuple[slice, ...]) -> da.Array:
    """Maximum projection along z of a y-x window (the window itself in 2D)."""
    region = data[(slice(None),) * (data.ndim - 2) + tuple(window)]
    return region.max(axis=0) if data.ndim == 3 else region


def _regions(shape: tuple[int, ...], table: pd.DataFrame) -> list[tuple[slice, ...]]:
    """Up to three y-x windows centred on nuclei (the whole image when it is small)."""
    y_col, x_col = "centroid_y", "centroid_x"
    centres = [(shape[-2] // 2, shape[-1] // 2)]
    if len(table):
        picks = np.unique(np.linspace(0, len(table) - 1, 3).astype(int))
        centres = list(
            zip(table[y_col].to_numpy()[picks], table[x_col].to_numpy()[picks], strict=True)
        )
    regions = []
    for cy, cx in centres:
        window = []
        for c, n in ((cy, shape[-2]), (cx, shape[-1])):
            start = int(min(max(c - _REGION // 2, 0), max(n - _REGION, 0)))
            window.append(slice(start, min(start + _REGION, n)))
        if tuple(window) not in regions:
            regions.append(tuple(window))
    return regions


def _outline_picture(
    plt, path: Path, projections: Sequence[tuple[np.ndarray, np.ndarray]], windows: list
) -> Path:
    """One panel per window: the image projection in grey, label outlines in colour."""
    from skimage.segmentation import find_boundaries

    fig, axes = plt.subplots(1, len(windows), figsize=(5 * len(windows), 5), dpi=100)
    for ax, (picture, flat), window in zip(np.atleast_1d(axes), projections, windows, strict=True):
        low, high = np.percentile(picture, (1, 99.8))
        ax.imshow(picture, cmap="gray", vmin=low, vmax=max(high, low + 1))
        edges = np.ma.masked_where(~find_boundaries(flat, mode="inner"), np.ones(flat.shape))
        ax.imshow(edges, cmap="autumn", alpha=0.9, interpolation="nearest")
        ax.set_title(
            f"outlines on max projection, y {window[0].start}:{window[0].stop}, "
            f"x {window[1].start}:{window[1].stop}",
            fontsize=8,
        )
        ax.set_axis_off()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _histograms(plt, path: Path, table: pd.DataFrame) -> Path:
    size = "volume_um3" if "volume_um3" in table else "area_um2"
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for ax, column in zip(axes, (size, "intensity_mean"), strict=True):
        values = table[column].to_numpy()
        ax.hist(values, bins=40 if len(values) else 1, color="steelblue")
        ax.set_xlabel(column)
        ax.set_ylabel("nuclei")
    fig.suptitle(f"{len(table)} nuclei")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
