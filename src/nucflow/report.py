"""``qc/report.html``: one self-contained page per run, the page a person opens first.

Everything it shows comes from what the run stored (run.json, nuclei.parquet, labels.ome.zarr,
the input it names): the input, parameters and versions; label outlines on maximum projections
of each depth third and on full-resolution planes, with scale bars and axis labels; the
distributions and nuclei per block; truncation, warnings and, when the truth is known, accuracy.
Pictures are PNGs embedded as ``data:`` URIs and a Content-Security-Policy forbids any other
source, so the page loads nothing from the network or from other files.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd

from nucflow import qc
from nucflow.table import write_atomic

__all__ = ["NAME", "write"]

NAME = "report.html"  # in the run's qc/ folder

_MIN_SIDE = 1000  # display pixels on a picture's long side, at least
_MAX_SIDE = 2048  # a projection is reduced (maximum over cells) above this many voxels
_CROP = 1024  # side of a full-resolution plane's crop, voxels
_SAMPLE_ROWS = 100_000  # rows kept for the distributions, whatever the table's size
_OUTLINE = (255, 140, 0)
_MARGIN = (80, 40, 24, 60)  # left, top, right, bottom around a picture, pixels
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def write(
    output: str | Path,
    *,
    record: Mapping[str, Any] | None = None,
    image: da.Array | None = None,
    labels: da.Array | None = None,
) -> Path:
    """Write ``OUTPUT/qc/report.html`` from a run's stored outputs.

    Parameters
    ----------
    output : path
        The run's output directory (holding nuclei.parquet and labels.ome.zarr).
    record : mapping, optional
        The run's run.json record; default: read ``OUTPUT/run.json``.
    image, labels : (Z, Y, X) or (Y, X) dask arrays, optional
        The segmentation channel and the label image over the run's data region (the record's
        ``data_region``); default: the input the record names and level 0 of labels.ome.zarr.
        They are read block-wise: projections and crops, never the whole stack at once.

    Returns
    -------
    Path
        The page written.
    """
    out = Path(output)
    if record is None:
        record = json.loads((out / "run.json").read_text())
    region = tuple(slice(a, b) for a, b in record["data_region"])
    if image is None:
        image = _input_image(record)[region]
    if labels is None:
        labels = da.from_zarr(str(out / "labels.ome.zarr" / "0"))
        labels = labels[(0,) * (labels.ndim - len(region)) + region]
    spatial = _Spatial.of(record, image.shape, tuple(s.start for s in region))
    rows, sample, per_block = _read_table(out / "nuclei.parquet", spatial)
    pictures = _pictures(image, labels, sample, spatial)
    page = _page(record, out, rows, sample, per_block, pictures, spatial)
    path = out / "qc" / NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, page.encode())
    return path


@dataclass(frozen=True)
class _Spatial:
    """Where the pictured region lies and what a voxel measures."""

    shape: tuple[int, ...]  # of the data region
    offset: tuple[int, ...]  # stack coordinates of the region's first voxel
    voxel: tuple[float, ...]  # µm, or 1 per axis for pixels
    unit: str  # "µm" or "px"
    chunks: tuple[int, ...]  # the run's blocks

    @classmethod
    def of(cls, record: Mapping[str, Any], shape: tuple[int, ...], offset: tuple[int, ...]):
        known = record.get("unit") == "micrometer"
        voxel = tuple(record["voxel_size_um"]) if known else (1.0,) * len(shape)
        chunks = tuple(record.get("derived", {}).get("chunks") or shape)
        return cls(shape, offset, voxel, "µm" if known else "px", chunks)


def _input_image(record: Mapping[str, Any]) -> da.Array:
    from nucflow import io

    chunks = record.get("derived", {}).get("chunks")
    config = record.get("config", {})
    stack = io.open_stack(
        record["input"],
        channel=config.get("channel"),
        chunks=tuple(chunks) if chunks else None,
        voxel_size=config.get("voxel_size"),
    )
    selected = (record.get("timepoints") or {}).get("selected")
    return (stack.at(selected[0]) if selected else stack).data


# --- the table: streamed in batches ------------------------------------------------------


def _read_table(path: Path, spatial: _Spatial) -> tuple[int, pd.DataFrame, np.ndarray]:
    """Row count, a bounded sample of rows and nuclei per block (counted by centroid), read
    batch by batch (a partitioned dataset too)."""
    import pyarrow.dataset as ds

    grid = tuple(math.ceil(n / c) for n, c in zip(spatial.shape, spatial.chunks, strict=True))
    per_block = np.zeros(grid, np.int64)
    if not path.exists():
        return 0, pd.DataFrame(), per_block
    dataset = ds.dataset(str(path), format="parquet")
    axes = "zyx"[-len(spatial.shape) :]
    wanted = [f"centroid_{a}" for a in axes]
    wanted += ["volume_um3", "area_um2", "intensity_mean", "truncated", "touches_border", "t"]
    columns = [c for c in wanted if c in dataset.schema.names]
    rows = dataset.count_rows()
    step = max(1, math.ceil(rows / _SAMPLE_ROWS))
    kept, seen = [], 0
    for batch in dataset.to_batches(columns=columns):
        frame = batch.to_pandas()
        if "t" in frame:  # a time-lapse: the pictures show its first time point
            frame = frame[frame["t"] == frame["t"].min()]
        centre = np.stack([frame[f"centroid_{a}"].to_numpy() for a in axes], axis=-1)
        index = np.floor(centre - np.asarray(spatial.offset)) // np.asarray(spatial.chunks)
        index = np.clip(index.astype(int), 0, np.asarray(grid) - 1)
        np.add.at(per_block, tuple(index.T), 1)
        kept.append(frame.iloc[(-seen) % step :: step])
        seen += len(frame)
    sample = pd.concat(kept, ignore_index=True) if kept else pd.DataFrame(columns=columns)
    return rows, sample, per_block


# --- pictures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Picture:
    title: str
    png: bytes
    size: tuple[int, int]  # width, height, pixels
    scale_bar: tuple[int, int, int, int] | None  # x0, y0, x1, y1 in the picture
    caption: str


def _pictures(
    image: da.Array, labels: da.Array, sample: pd.DataFrame, spatial: _Spatial
) -> dict[str, list[_Picture]]:
    """Outlines on the projection of each depth third (the image itself in 2D) and on
    full-resolution planes (the middle of each third), computed in one pass."""
    slabs: list[tuple[int, int] | None] = (
        list(_thirds(spatial.shape[0])) if image.ndim == 3 else [None]
    )
    reduce = max(1, math.ceil(max(spatial.shape[-2:]) / _MAX_SIDE))
    crop = _crop(spatial.shape, sample, spatial.offset)
    planes = [None if s is None else (s[0] + s[1]) // 2 for s in slabs]
    whole = reduce == 1 and crop == tuple(slice(0, n) for n in spatial.shape[-2:])
    if image.ndim == 2 and whole:
        planes = []  # the 2D image at full resolution is shown already
    lazy = [(_project(image, s, reduce), _project(labels, s, reduce, stride=True)) for s in slabs]
    lazy += [(_plane(image, z, crop), _plane(labels, z, crop)) for z in planes]
    computed = dask.compute(*lazy)  # one pass: blocks shared by several pictures read once
    step = f"; each pixel the maximum of {reduce}×{reduce} voxels" if reduce > 1 else ""
    names = ("top third", "middle third", "bottom third") if len(slabs) == 3 else ("all",)
    projections = []
    for slab, name, (picture, flat) in zip(slabs, names, computed, strict=False):
        title = "The image"
        if slab is not None:
            title = f"Maximum projection, {name}, z {_span(slice(*slab), spatial.offset[0])}"
        caption = f"{title}: label outlines in orange{step}."
        projections.append(
            _framed(picture, flat, spatial, origin=(0, 0), voxels_per_cell=reduce,
                    title=title, caption=caption)
        )  # fmt: skip
    full = []
    for z, (picture, flat) in zip(planes, computed[len(slabs) :], strict=True):
        at = "" if z is None else f"plane z {z + spatial.offset[0]}, "
        title = (
            f"Full resolution: {at}y {_span(crop[0], spatial.offset[-2])}, "
            f"x {_span(crop[1], spatial.offset[-1])}"
        )
        caption = f"{title}: one plane, label outlines in orange."
        origin = (crop[0].start, crop[1].start)
        full.append(
            _framed(picture, flat, spatial, origin=origin, voxels_per_cell=1, title=title,
                    caption=caption)
        )  # fmt: skip
    return {"projections": projections, "planes": full}


def _span(s: slice, offset: int) -> str:
    return f"{s.start + offset}–{s.stop + offset - 1}"


def _thirds(depth: int) -> list[tuple[int, int]]:
    """Top, middle and bottom third of z (one slab when too thin)."""
    if depth < 3:
        return [(0, depth)]
    cuts = np.linspace(0, depth, 4).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def _project(
    data: da.Array, slab: tuple[int, int] | None, reduce: int, *, stride: bool = False
) -> da.Array:
    """Maximum along z over the slab (the 2D image itself), reduced by ``reduce`` in y and x:
    labels by taking every ``reduce``-th voxel (label-safe), intensities by cell maxima."""
    if stride:
        data = data[..., ::reduce, ::reduce]
    flat = data[slab[0] : slab[1]].max(axis=0) if slab is not None else data
    if stride or reduce == 1:
        return flat
    chunks = tuple(max(reduce, c // reduce * reduce) for c in flat.chunksize)
    return da.coarsen(np.max, flat.rechunk(chunks), {0: reduce, 1: reduce}, trim_excess=True)


def _crop(
    shape: tuple[int, ...], sample: pd.DataFrame, offset: tuple[int, ...]
) -> tuple[slice, slice]:
    """A y-x window of at most ``_CROP`` voxels a side around the median nucleus."""
    centre = [n // 2 for n in shape[-2:]]
    if len(sample):
        middle = (int(sample[f"centroid_{a}"].median()) for a in "yx")
        centre = [c - o for c, o in zip(middle, offset[-2:], strict=True)]
    window = []
    for c, n in zip(centre, shape[-2:], strict=True):
        side = min(n, _CROP)
        start = min(max(c - side // 2, 0), n - side)
        window.append(slice(start, start + side))
    return window[0], window[1]


def _plane(data: da.Array, z: int | None, crop: tuple[slice, slice]) -> da.Array:
    return data[crop] if z is None else data[(z, *crop)]


def _framed(
    picture: np.ndarray,
    flat: np.ndarray,
    spatial: _Spatial,
    *,
    origin: tuple[int, int],
    voxels_per_cell: int,
    title: str,
    caption: str,
) -> _Picture:
    """The picture in grey with outlines, enlarged to ``_MIN_SIDE`` (nearest neighbour) when
    small, inside axes ticked in stack voxels, with a scale bar."""
    from PIL import Image, ImageDraw

    zoom = max(1, math.ceil(_MIN_SIDE / max(picture.shape)))
    picture = np.kron(picture, np.ones((zoom, zoom), picture.dtype))
    flat = np.kron(flat, np.ones((zoom, zoom), flat.dtype))  # outlines one display pixel wide
    low, high = np.percentile(picture, (1, 99.8)) if picture.size else (0, 1)
    grey = (np.clip((picture - low) / max(high - low, 1e-12), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[qc._inner_boundaries(flat)] = _OUTLINE
    height, width = rgb.shape[:2]
    left, top, right, bottom = _MARGIN
    canvas = Image.new("RGB", (width + left + right, height + top + bottom), "white")
    canvas.paste(Image.fromarray(rgb), (left, top))
    draw = ImageDraw.Draw(canvas)
    font = qc.font_of(15)
    big = qc.font_of(18)
    draw.text((left, 10), qc.say(big, title), fill="black", font=big)
    per_pixel = voxels_per_cell / zoom  # voxels per display pixel
    y0 = origin[0] + spatial.offset[-2]
    x0 = origin[1] + spatial.offset[-1]
    for tick in qc._ticks(x0, x0 + width * per_pixel):
        at = left + (tick - x0) / per_pixel
        draw.line((at, top + height, at, top + height + 5), fill="black")
        draw.text((at, top + height + 7), f"{tick:g}", fill="black", font=font, anchor="mt")
    for tick in qc._ticks(y0, y0 + height * per_pixel):
        at = top + (tick - y0) / per_pixel
        draw.line((left - 5, at, left, at), fill="black")
        draw.text((left - 7, at), f"{tick:g}", fill="black", font=font, anchor="rm")
    draw.text((left + width / 2, top + height + 30), "x (voxels)", fill="black", font=font,
              anchor="mt")  # fmt: skip
    label = Image.new("RGB", (90, 20), "white")
    ImageDraw.Draw(label).text((2, 1), "y (voxels)", fill="black", font=font)
    canvas.paste(label.rotate(90, expand=True), (4, top + height // 2 - 45))
    bar = _scale_bar(draw, font, spatial, per_pixel, (left + width, top + height))
    return _Picture(title, _png(np.asarray(canvas)), canvas.size, bar, caption)


def _scale_bar(draw, font, spatial: _Spatial, per_pixel: float, corner: tuple[int, int]):
    """A white bar of a round length (about a fifth of the width) with its length above it,
    on a dark box in the picture's lower right corner; returns the bar's box."""
    width_px = corner[0] - _MARGIN[0]
    length = _round_down(width_px * per_pixel * spatial.voxel[-1] / 5)
    pixels = max(1, round(length / (per_pixel * spatial.voxel[-1])))
    x1, y1 = corner[0] - 20, corner[1] - 20
    x0, y0 = x1 - pixels, y1 - 8
    draw.rectangle((x0 - 10, y0 - 30, x1 + 10, y1 + 8), fill=(0, 0, 0))
    draw.rectangle((x0, y0, x1, y1), fill=(255, 255, 255))
    text = qc.say(font, f"{length:g} {spatial.unit}")
    draw.text(((x0 + x1) / 2, y0 - 5), text, fill="white", font=font, anchor="mb")
    return (int(x0), int(y0), int(x1), int(y1))


def _round_down(value: float) -> float:
    """The largest 1, 2 or 5 times a power of ten not above ``value``."""
    power = 10.0 ** math.floor(math.log10(value))
    return max(m * power for m in (1, 2, 5) if m * power <= value)


def _png(rgb: np.ndarray) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.png_encode(np.ascontiguousarray(rgb)))


def _distributions(sample: pd.DataFrame) -> _Picture:
    canvas = qc.distributions_picture(sample)
    caption = "Volume (area in 2D) and mean intensity, and mean intensity against depth."
    return _Picture("Distributions", _png(np.asarray(canvas)), canvas.size, None, caption)


_PANELS = 8  # heat map panels at most (layers of z blocks summed in groups above), 4 a row


def _heat_map(per_block: np.ndarray) -> _Picture:
    """Nuclei per block, darker = more: one panel per layer of blocks in z (contiguous layers
    summed into at most ``_PANELS`` groups), four panels a row."""
    from PIL import Image, ImageDraw

    groups = np.array_split(np.arange(per_block.shape[0]), min(per_block.shape[0], _PANELS))
    layers = [per_block[g].sum(axis=0) for g in groups] if per_block.ndim == 3 else [per_block]
    ny, nx = layers[0].shape
    columns = min(len(layers), 4)
    gap, top, head = 24, 40, 22
    cell = int(np.clip(min(480, 1150 // columns - gap) // max(ny, nx, 1), 3, 64))
    width, height = nx * cell + gap, ny * cell + head + gap
    rows = -(-len(layers) // columns)
    canvas = Image.new("RGB", (max(columns * width + gap, 420), top + rows * height), "white")
    draw = ImageDraw.Draw(canvas)
    font = qc.font_of(13)
    most = max(max(int(a.max()) for a in layers), 1)
    draw.text((gap, 8), f"nuclei per block (darkest: {most}); white: none", fill="black",
              font=qc.font_of(16))  # fmt: skip
    for k, (layer, group) in enumerate(zip(layers, groups, strict=False)):
        x0, y0 = gap + k % columns * width, top + k // columns * height
        name = "blocks (y down, x right)"
        if per_block.ndim == 3:
            name = f"z block {group[0]}" + (f"–{group[-1]} (summed)" if len(group) > 1 else "")
        draw.text((x0, y0), qc.say(font, name), fill="black", font=font)
        for (j, i), count in np.ndenumerate(layer):
            shade = int(255 - 215 * count / most)
            box = (x0 + i * cell, y0 + head + j * cell, x0 + (i + 1) * cell - 1,
                   y0 + head + (j + 1) * cell - 1)  # fmt: skip
            draw.rectangle(box, fill=(shade, shade, 255) if count else (255, 255, 255),
                           outline=(200, 200, 200) if cell >= 6 else None)  # fmt: skip
            if cell >= 28:
                ink = "white" if count > most / 2 else "black"
                centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
                draw.text(centre, str(count), fill=ink, font=font, anchor="mm")
    caption = (
        "Nuclei per block of the run (by centroid): where detection thins out, e.g. deep down "
        "or at the edge of the light (blocks at the stack's far faces may be smaller)."
    )
    return _Picture("Nuclei per block", _png(np.asarray(canvas)), canvas.size, None, caption)


# --- the page ----------------------------------------------------------------------------


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1200px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; display: block; }
figcaption { color: #555; font-size: 0.9em; }
.warning { background: #fff3cd; border-left: 4px solid #e0a800; padding: 4px 8px; margin: 4px 0; }
.ok { background: #e7f5e7; border-left: 4px solid #3a3; padding: 4px 8px; }
code, pre { font-family: monospace; font-size: 0.9em; }
"""


def _page(
    record: Mapping[str, Any],
    out: Path,
    rows: int,
    sample: pd.DataFrame,
    per_block: np.ndarray,
    pictures: dict[str, list[_Picture]],
    spatial: _Spatial,
) -> str:
    e = html.escape
    counts = record.get("counts") or {}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f"<title>nucflow QC report: {e(str(out))}</title><style>{_STYLE}</style></head><body>",
        f"<h1>nucflow QC report</h1><p>Run <code>{e(str(out))}</code>, written "
        f"{e(str(record.get('updated', '')))} by nucflow {e(str(record.get('nucflow', '')))}: "
        f"<b>{counts.get('nuclei', rows)} nuclei</b> "
        f"({counts.get('truncated', '?')} truncated).</p>",
        "<h2>Warnings</h2>",
        *_warnings(record, rows, sample, spatial),
    ]
    if "accuracy" in record:
        parts += ["<h2>Accuracy against the ground truth</h2>", _accuracy(record["accuracy"])]
    parts += ["<h2>Input and run</h2>", _table(_run_facts(record, spatial))]
    if pictures["projections"]:
        where = "maximum projections" if len(spatial.shape) == 3 else "the image"
        parts.append(f"<h2>Outlines on {where}</h2>")
        parts += [_figure(p) for p in pictures["projections"]]
    if pictures["planes"]:
        parts.append("<h2>Outlines on full-resolution planes</h2>")
        parts += [_figure(p) for p in pictures["planes"]]
    parts.append("<h2>Distributions</h2>")
    if len(sample) < rows:
        parts.append(f"<p>From an even sample of {len(sample):,} of the {rows:,} nuclei.</p>")
    parts += [_figure(_distributions(sample)), _figure(_heat_map(per_block))]
    parts += [
        "<h2>Parameters</h2><p>As given (config) and as derived for this stack.</p>",
        _table(_flat(record.get("config", {}))),
        _table(_flat(record.get("derived", {}))),
        "<h2>Versions</h2>",
        _table({"nucflow": record.get("nucflow"), **(record.get("versions") or {})}),
        "</body></html>",
    ]
    return "\n".join(parts)


def _warnings(
    record: Mapping[str, Any], rows: int, sample: pd.DataFrame, spatial: _Spatial
) -> list[str]:
    found = []
    truncated = (record.get("counts") or {}).get("truncated", 0)
    if truncated:
        radius = float(record.get("derived", {}).get("max_radius") or 0)
        fix = (  # as the run's own warning (pipeline.write) says it
            f"rerun with <code>--set segment.max_radius={1.5 * radius:g}</code> (or a larger "
            "<code>--diameter</code>)"
            if spatial.unit == "µm"
            else "the input has no voxel size: pass <code>--voxel-size</code> (anisotropic "
            "voxels counted as cubes make nuclei look elongated), then check "
            "<code>--diameter</code>"
        )
        found.append(
            f"{truncated} nuclei reached <code>segment.max_radius</code> = {radius:g}; they may "
            f"be cut: {fix}."
        )
    if spatial.unit == "px":
        found.append(
            "The input has no voxel size: lengths are in pixels. Pass <code>--voxel-size</code>."
        )
    if rows == 0:
        found.append("No nuclei were found: check <code>--diameter</code> and the projections.")
    if "touches_border" in sample and len(sample):
        share = float(sample["touches_border"].mean())
        if share > 0.25:
            found.append(f"{share:.0%} of the nuclei touch the image border.")
    if not found:
        return ['<p class="ok">None.</p>']
    return [f'<p class="warning">{text}</p>' for text in found]


def _accuracy(report: Mapping[str, Any]) -> str:
    def three(values: Sequence[float | None]) -> str:
        return " / ".join("-" if v is None else f"{v:.2f}" for v in values)

    facts = {
        "F1 at IoU 0.5": f"{report['f1_iou50']:.3f}",
        "F1 at IoU 0.7": f"{report['f1_iou70']:.3f}",
        "precision, recall": f"{report['precision']:.3f}, {report['recall']:.3f}",
        "true, found nuclei": f"{report['true_nuclei']}, {report['found_nuclei']}",
        "splits, merges": f"{report['splits']}, {report['merges']}",
        "recall by depth (top / mid / bottom)": three(report.get("recall_by_depth", [])),
        "recall by brightness (dim / mid / bright)": three(report.get("recall_by_brightness", [])),
    }
    return _table(facts)


def _run_facts(record: Mapping[str, Any], spatial: _Spatial) -> dict[str, Any]:
    timings = record.get("timings_s") or {}
    facts = {
        "input": record.get("input"),
        "shape, dtype": f"{tuple(record.get('shape', ()))} {record.get('dtype', '')}",
        "voxel size": (
            f"{tuple(spatial.voxel)} µm" if spatial.unit == "µm" else "unknown (pixels)"
        ),
        "channel": (record.get("config") or {}).get("channel") or 0,
        "data region": record.get("data_region"),
        "blocks": f"{spatial.chunks} voxels, {record.get('blocks', {}).get('total', '?')} blocks",
        "halo": record.get("halo"),
        "cluster": record.get("cluster"),
        "time per stage, s": ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
        "outputs": "nuclei.parquet, nuclei.csv, labels.ome.zarr, run.json, qc/",
    }
    selected = (record.get("timepoints") or {}).get("selected")
    if selected:  # a time-lapse: the pictures show its first selected time point
        facts["time points"] = f"{len(selected)} selected; pictures of t = {selected[0]}"
    return facts


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _table(facts: Mapping[str, Any]) -> str:
    e = html.escape
    body = "".join(
        f"<tr><th>{e(str(k))}</th><td>{e(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>"
        for k, v in facts.items()
    )
    return f"<table>{body}</table>"


def _figure(picture: _Picture) -> str:
    source = "data:image/png;base64," + base64.b64encode(picture.png).decode()
    bar = "" if picture.scale_bar is None else " ".join(map(str, picture.scale_bar))
    width, height = picture.size
    return (
        f'<figure data-scale-bar="{bar}"><img src="{source}" width="{width}" height="{height}" '
        f'alt="{html.escape(picture.title)}"><figcaption>{html.escape(picture.caption)}'
        "</figcaption></figure>"
    )
