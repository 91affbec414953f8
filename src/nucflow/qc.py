"""Quality-control pictures: what a person looks at first after a run."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd

__all__ = ["write"]

_REGION = 256  # side of a QC region in y and x, voxels
_GAP = 4  # white pixels between panels
_OUTLINE_RGB = (255, 140, 0)


def write(
    folder: Path,
    image: da.Array,
    labels: da.Array,
    table: pd.DataFrame,
    *,
    origin: Sequence[int] | None = None,
) -> list[tuple[slice, ...]]:
    """Write ``outlines.png`` (label outlines on max projections of up to three regions, side
    by side), for 3D stacks ``depth.png`` (the middle region projected over the top, middle
    and bottom third of the stack: nuclei missed deep down show there) and
    ``distributions.png`` (histograms of volume and mean intensity, and mean intensity against
    depth: attenuation, and whether the dim deep nuclei were found).

    The outlines are drawn at one pixel per voxel with numpy and encoded by imagecodecs;
    only the histograms need matplotlib, whose import and first drawing (~0.6 s) run in a
    helper thread while the projections are read.

    Parameters
    ----------
    folder : Path
        Created if missing.
    image, labels : (Z, Y, X) or (Y, X) dask arrays
        The segmentation channel and the label image, over the same region of the stack.
    table : pandas.DataFrame
        The run's table (coordinates in the stack).
    origin : sequence of int, optional
        Stack coordinates of ``image[0, 0(, 0)]``; default all zero.

    Returns
    -------
    list of tuple of slice
        The y-x windows of ``outlines.png``, left to right, in stack coordinates.
    """
    folder.mkdir(parents=True, exist_ok=True)
    y0, x0 = (0, 0) if origin is None else tuple(origin)[-2:]
    with ThreadPoolExecutor(1) as helper:
        drawn = helper.submit(_histograms, folder / "distributions.png", table)
        windows = _regions(image.shape, table, origin=(y0, x0))
        # every projection in one pass, so overlapping windows read their blocks once
        slabs = _depth_slabs(image.shape, windows[len(windows) // 2])
        flat = dask.compute(
            *[(_project(image, w), _project(labels, w)) for w in [*windows, *slabs]]
        )
        _outline_picture(folder / "outlines.png", flat[: len(windows)])
        if slabs:
            _outline_picture(folder / "depth.png", flat[len(windows) :])
        drawn.result()
    return [
        (slice(y.start + y0, y.stop + y0), slice(x.start + x0, x.stop + x0)) for y, x in windows
    ]


def _project(data: da.Array, window: tuple[slice, ...]) -> da.Array:
    """Maximum projection along z of a y-x window or a z-y-x slab (the window itself in 2D)."""
    region = data[(slice(None),) * (data.ndim - len(window)) + tuple(window)]
    return region.max(axis=0) if data.ndim == 3 else region


def _depth_slabs(shape: tuple[int, ...], window: tuple[slice, ...]) -> list[tuple[slice, ...]]:
    """The window over the top, middle and bottom third of z (none in 2D or when thin)."""
    if len(shape) != 3 or shape[0] < 3:
        return []
    cuts = np.linspace(0, shape[0], 4).round().astype(int)
    return [(slice(a, b), *window) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def _regions(
    shape: tuple[int, ...], table: pd.DataFrame, *, origin: tuple[int, int] = (0, 0)
) -> list[tuple[slice, ...]]:
    """The y-x windows of ``outlines.png`` in an image of ``shape``, left to right: up to
    three, centred on the first, middle and last nucleus of the table (the whole image when it
    is small). The table's coordinates are those of the image shifted by ``origin``."""
    centres = [(shape[-2] // 2, shape[-1] // 2)]
    if len(table):
        picks = np.unique(np.linspace(0, len(table) - 1, 3).astype(int))
        centres = list(
            zip(
                table["centroid_y"].to_numpy()[picks] - origin[0],
                table["centroid_x"].to_numpy()[picks] - origin[1],
                strict=True,
            )
        )
    windows = []
    for cy, cx in centres:
        window = []
        for c, n in ((cy, shape[-2]), (cx, shape[-1])):
            start = int(min(max(c - _REGION // 2, 0), max(n - _REGION, 0)))
            window.append(slice(start, min(start + _REGION, n)))
        if tuple(window) not in windows:
            windows.append(tuple(window))
    return windows


def _outline_picture(path: Path, projections: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """One panel per window, one pixel per voxel: the projection in grey (1st to 99.8th
    percentile), label outlines in orange, panels separated by white gaps."""
    import imagecodecs
    from skimage.segmentation import find_boundaries

    panels = []
    for picture, flat in projections:
        low, high = np.percentile(picture, (1, 99.8))
        grey = np.clip((picture - low) / max(high - low, 1e-12), 0, 1)
        rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1)
        rgb[find_boundaries(flat, mode="inner")] = _OUTLINE_RGB
        panels.append(rgb)
    height = max(p.shape[0] for p in panels)
    gap = np.full((height, _GAP, 3), 255, np.uint8)
    row = []
    for panel in panels:
        padded = np.full((height, panel.shape[1], 3), 255, np.uint8)
        padded[: panel.shape[0]] = panel
        row += [padded, gap]
    path.write_bytes(imagecodecs.png_encode(np.concatenate(row[:-1], axis=1)))


def _histograms(path: Path, table: pd.DataFrame) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, thread-safe

    size = "volume_um3" if "volume_um3" in table else "area_um2"
    depth = "centroid_z" if "centroid_z" in table else "centroid_y"
    fig = Figure(figsize=(13, 3.5), dpi=100)
    axes = fig.subplots(1, 3)
    for ax, column in zip(axes[:2], (size, "intensity_mean"), strict=True):
        values = table[column].to_numpy()
        ax.hist(values, bins=40 if len(values) else 1, color="steelblue")
        ax.set_xlabel(column)
        ax.set_ylabel("nuclei")
    axes[2].scatter(table[depth], table["intensity_mean"], s=4, color="steelblue")
    axes[2].set_xlabel(f"{depth} (voxels; depth)")
    axes[2].set_ylabel("intensity_mean")
    fig.suptitle(f"{len(table)} nuclei")
    fig.tight_layout()
    fig.savefig(path)
