"""Quality-control pictures: what a person looks at first after a run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd

__all__ = ["distributions_picture", "write"]

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

    The outlines are drawn at one pixel per voxel with numpy and encoded by imagecodecs; the
    histograms are drawn with Pillow in a helper thread while the projections are read.

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
        names = [f"y {_span(w[0], y0)}, x {_span(w[1], x0)}" for w in windows]
        _outline_picture(folder / "outlines.png", flat[: len(windows)], names)
        if slabs:
            depth = [f"{where} third: z {_span(s[0], 0)}" for where, s in zip(
                ("top", "middle", "bottom"), slabs, strict=True)]  # fmt: skip
            _outline_picture(folder / "depth.png", flat[len(windows) :], depth)
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


def _span(s: slice, offset: int) -> str:
    """A half-open range as the first and last voxel, in stack coordinates."""
    return f"{s.start + offset}–{s.stop + offset - 1}"


def _outline_picture(
    path: Path, projections: Sequence[tuple[np.ndarray, np.ndarray]], titles: Sequence[str]
) -> None:
    """One panel per window, each under its title: the projection in grey (1st to 99.8th
    percentile), label outlines in orange (one pixel wide), panels separated by white gaps;
    ``zoom`` (nearest neighbour) pixels per voxel so the row is at least ``_MIN_ROW`` wide."""
    import imagecodecs

    zoom = zoom_of(sum(p.shape[1] for p, _ in projections))
    panels = []
    for picture, flat in projections:
        picture, flat = (np.kron(a, np.ones((zoom, zoom), a.dtype)) for a in (picture, flat))
        low, high = np.percentile(picture, (1, 99.8))
        grey = np.clip((picture - low) / max(high - low, 1e-12), 0, 1)
        rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1)
        rgb[_inner_boundaries(flat)] = _OUTLINE_RGB
        panels.append(rgb)
    height = max(p.shape[0] for p in panels) + HEADER
    gap = np.full((height, _GAP, 3), 255, np.uint8)
    row = []
    for panel, title in zip(panels, titles, strict=True):
        padded = np.full((height, panel.shape[1], 3), 255, np.uint8)
        padded[HEADER : HEADER + panel.shape[0]] = panel
        row += [_titled(padded, title), gap]
    path.write_bytes(imagecodecs.png_encode(np.concatenate(row[:-1], axis=1)))


HEADER = 26  # pixels above each panel, for its title
_MIN_ROW = 1000  # pixels: a row of panels is enlarged to at least this width (at most 8x)


def zoom_of(width: int) -> int:
    """Pixels per voxel of a row of panels ``width`` voxels wide."""
    return int(min(8, max(1, math.ceil(_MIN_ROW / max(width, 1)))))


def _titled(panel: np.ndarray, title: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(panel)
    font = font_of(15)
    ImageDraw.Draw(canvas).text((4, 4), say(font, title), fill="black", font=font)
    return np.asarray(canvas)


def font_of(size: int) -> Any:
    """DejaVu Sans where installed (it has µ and –), else Pillow's own font."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def say(font: Any, text: str) -> str:
    """``text`` in the glyphs ``font`` has: Pillow's own font has no µ or en dash."""
    if "DejaVu" in str(getattr(font, "path", "")):
        return text
    return text.replace("µ", "u").replace("–", "-")


def _inner_boundaries(labels: np.ndarray) -> np.ndarray:
    """Labelled pixels with a differently labelled face neighbour: skimage's
    ``find_boundaries(labels, mode="inner")`` (whose import costs ~0.2 s of a small run)."""
    from scipy import ndimage

    cross = ndimage.generate_binary_structure(labels.ndim, 1)
    spread = ndimage.grey_dilation(labels, footprint=cross, mode="nearest")
    shrunk = ndimage.grey_erosion(labels, footprint=cross, mode="nearest")
    return (spread != shrunk) & (labels != 0)


def _histograms(path: Path, table: pd.DataFrame) -> None:
    """``distributions.png``: :func:`distributions_picture` of the table."""
    distributions_picture(table).save(path)


def distributions_picture(table: pd.DataFrame) -> Any:
    """Histograms of size and mean intensity, and mean intensity against depth, drawn with
    Pillow (matplotlib's import and first figure cost ~0.6 s, a tenth of a small run).

    Parameters
    ----------
    table : pandas.DataFrame
        Rows of a run's table (``volume_um3`` or ``area_um2``, ``intensity_mean``, centroids).

    Returns
    -------
    PIL.Image.Image
        An RGB picture of ``_FIGURE`` pixels.
    """
    from PIL import Image, ImageDraw, ImageFont

    size = "volume_um3" if "volume_um3" in table else "area_um2"
    depth = "centroid_z" if "centroid_z" in table else "centroid_y"
    canvas = Image.new("RGB", _FIGURE, "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    title = ImageFont.load_default(size=16)
    draw.text((_FIGURE[0] // 2, 10), f"{len(table)} nuclei", fill="black", font=title, anchor="mt")
    width = _FIGURE[0] // 3
    for k, column in enumerate((size, "intensity_mean")):
        counts, edges = np.histogram(table[column].to_numpy(), bins=40 if len(table) else 1)
        limits = (edges[0], edges[-1]), (0, counts.max())
        plot = _Axes(canvas, draw, font, k * width, *limits, from_zero=True)
        for count, low, high in zip(counts, edges[:-1], edges[1:], strict=True):
            (x0, x1), (y0, y1) = plot.x([low, high]), plot.y([count, 0])
            if count:
                draw.rectangle((x0, y0, max(x1 - 1, x0), y1), fill=_BLUE)
        plot.frame(column, "nuclei")
    x, y = table[depth].to_numpy(float), table["intensity_mean"].to_numpy(float)
    plot = _Axes(canvas, draw, font, 2 * width, _extent(x), _extent(y), from_zero=False)
    dots = [(int(a) + dx, int(b) + dy) for a, b in zip(plot.x(x), plot.y(y), strict=True)
            for dx in (-1, 0, 1) for dy in (-1, 0, 1)]  # fmt: skip
    draw.point(dots, fill=_BLUE)
    plot.frame(f"{depth} (voxels; depth)", "intensity_mean")
    return canvas


_FIGURE = (1300, 350)  # pixels
_BLUE = (70, 130, 180)
_MARGINS = (75, 45, 20, 50)  # left, top, right, bottom of each panel's plot area, pixels


def _extent(values: np.ndarray) -> tuple[float, float]:
    if not len(values):
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    return (low - 0.5, high + 0.5) if high == low else (low, high)


class _Axes:
    """One panel's plot area: data to pixels, and its frame, ticks and labels."""

    def __init__(self, canvas, draw, font, left: int, xlim, ylim, *, from_zero: bool) -> None:
        self.canvas, self.draw, self.font = canvas, draw, font
        ml, mt, mr, mb = _MARGINS
        self.box = (left + ml, mt, left + _FIGURE[0] // 3 - mr, _FIGURE[1] - mb)
        (x0, x1), (y0, y1) = xlim, ylim
        xpad, ypad = 0.05 * ((x1 - x0) or 1.0), 0.05 * ((y1 - y0) or 1.0)
        self.xlim = (x0 - xpad, x1 + xpad)  # 5 % margins, as matplotlib's
        self.ylim = (y0 if from_zero else y0 - ypad, y1 + ypad)

    def x(self, values) -> np.ndarray:
        (a, b), (left, _, right, _) = self.xlim, self.box
        return left + (np.asarray(values, float) - a) / ((b - a) or 1.0) * (right - left)

    def y(self, values) -> np.ndarray:
        (a, b), (_, top, _, bottom) = self.ylim, self.box
        return bottom - (np.asarray(values, float) - a) / ((b - a) or 1.0) * (bottom - top)

    def frame(self, xlabel: str, ylabel: str) -> None:
        from PIL import Image, ImageDraw

        left, top, right, bottom = self.box
        draw, font = self.draw, self.font
        draw.rectangle(self.box, outline="black")
        for tick in _ticks(*self.xlim):
            at = float(self.x(tick))
            draw.line((at, bottom, at, bottom + 4), fill="black")
            draw.text((at, bottom + 6), f"{tick:g}", fill="black", font=font, anchor="mt")
        for tick in _ticks(*self.ylim):
            at = float(self.y(tick))
            draw.line((left - 4, at, left, at), fill="black")
            draw.text((left - 6, at), f"{tick:g}", fill="black", font=font, anchor="rm")
        draw.text(((left + right) / 2, bottom + 26), xlabel, fill="black", font=font, anchor="mt")
        text = Image.new("RGB", (int(draw.textlength(ylabel, font=font)) + 4, 18), "white")
        ImageDraw.Draw(text).text((2, 1), ylabel, fill="black", font=font)
        rotated = text.rotate(90, expand=True)
        self.canvas.paste(rotated, (left - 70, (top + bottom - rotated.height) // 2))


def _ticks(low: float, high: float) -> list[float]:
    """Round ticks (steps of 1, 2 or 5 times a power of ten, about five) within [low, high]."""
    rough = (high - low) / 5 or 1.0
    power = 10.0 ** math.floor(math.log10(rough))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= rough)
    first = math.ceil(low / step)
    return [round(k * step, 12) for k in range(first, math.floor(high / step) + 1)]
