"""Look at a run's outputs as a user does: napari, headless, the label pyramid over the image.

``python benchmarks/view.py`` draws a light-sheet-like stack of 24 x 1536 x 1536 voxels, runs
``nucflow run`` on it (its ``labels.ome.zarr`` then has two levels: 1536² and 768²), opens the
input and the labels with ome-zarr-py's reader (as napari-ome-zarr does) and shows them in
napari: the labels as a multiscale layer whose features are the table inside
``labels.ome.zarr/tables/nuclei`` (read with anndata). It saves two screenshots side by side
into ``benchmarks/results/view.png``: the whole middle plane (napari draws a coarse level) and a
256 x 256 voxel region at full resolution (level 0), and prints which level napari drew, and
how long opening and drawing took.

``--run OUT --input STACK`` looks at an existing run instead. napari needs a display: run under
Xvfb (Debian's ``xvfb``): ``xvfb-run -a -s "-screen 0 1600x1200x24" python benchmarks/view.py``
(napari and a Qt binding, e.g. ``pip install "napari[pyqt5]"``; PyQt5 wheels need Debian's
``libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-render-util0
libxkbcommon-x11-0 libgl1``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (24, 1536, 1536)
RESULTS = Path(__file__).resolve().parent / "results"


def make_run(folder: Path) -> tuple[Path, Path]:
    """Draw the stack and run nucflow on it (subprocesses: the CLI as users call it)."""
    source, out = folder / "input.ome.zarr", folder / "run"
    nucflow = [sys.executable, "-c", "from nucflow.cli import main; raise SystemExit(main())"]
    shape = [str(n) for n in SHAPE]
    subprocess.run([*nucflow, "synth", str(source), "--shape", *shape, "--nuclei", "900",
                    "--diameter", "8", "--conditions", "lightsheet"], check=True)  # fmt: skip
    subprocess.run([*nucflow, "run", "--input", str(source), "--output", str(out),
                    "--diameter", "8", "--chunks", "24", "512", "512"], check=True)  # fmt: skip
    return source, out


def read_multiscale(path: Path) -> tuple[list, list[float]]:
    """Every level of an OME-Zarr (dask arrays) and level 0's scale, via ome-zarr-py."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = next(iter(Reader(parse_url(str(path)))()))
    scale = node.metadata["coordinateTransformations"][0][0]["scale"]
    return list(node.data), [float(s) for s in scale]


def features(labels: Path):
    """The table linked to the labels, as napari layer features (one row per label)."""
    import anndata
    import pandas as pd

    table = anndata.read_zarr(str(labels / "tables" / "nuclei"))
    frame = pd.concat([table.obs, table.to_df()], axis=1)
    frame.insert(0, "index", frame.index.astype(np.int64))
    return frame.reset_index(drop=True)


def show(source: Path, out: Path, png: Path) -> None:
    import imageio.v3 as iio
    import napari

    start = time.perf_counter()
    image, image_scale = read_multiscale(source)
    labels, label_scale = read_multiscale(out / "labels.ome.zarr")
    table = features(out / "labels.ome.zarr")
    viewer = napari.Viewer(show=False)
    viewer.window.resize(1100, 1100)
    low, high = np.percentile(np.asarray(image[-1][image[-1].shape[0] // 2]), [1, 99.8])
    viewer.add_image(image if len(image) > 1 else image[0], scale=image_scale,
                     contrast_limits=(float(low), float(high)), name="input")  # fmt: skip
    layer = viewer.add_labels(labels, scale=label_scale, name="nuclei", opacity=0.45)
    layer.features = table
    viewer.dims.set_point(0, image_scale[0] * (labels[0].shape[0] // 2))
    opened = time.perf_counter() - start

    shots, drawn = [], []
    viewer.reset_view()
    shots.append(viewer.screenshot(canvas_only=True, size=(900, 900)))
    drawn.append(layer.data_level)
    centre = [c * s for c, s in zip(_busiest(table), label_scale[1:], strict=True)]
    viewer.camera.center = (0.0, *centre)
    viewer.camera.zoom = 900 / (256 * label_scale[-1])  # 256 voxels across the canvas
    shots.append(viewer.screenshot(canvas_only=True, size=(900, 900)))
    drawn.append(layer.data_level)
    took = time.perf_counter() - start - opened
    viewer.close()
    png.parent.mkdir(parents=True, exist_ok=True)
    gap = np.full((900, 12, shots[0].shape[2]), 255, np.uint8)
    iio.imwrite(png, np.concatenate([shots[0], gap, shots[1]], axis=1))
    print(f"labels   levels {[tuple(a.shape) for a in labels]}, scale {label_scale} µm")
    print(f"table    {len(table)} rows linked by label ({table.shape[1] - 1} columns)")
    print(f"napari   opened in {opened:.1f} s; whole plane drawn from level {drawn[0]}, "
          f"256² region from level {drawn[1]}; both screenshots {took:.1f} s")  # fmt: skip
    print(f"saved    {png}")


def _busiest(table) -> tuple[float, float]:
    """A y/x point among many nuclei (the median centroid of the middle third of z)."""
    z = table["centroid_z"]
    middle = table[(z > z.quantile(1 / 3)) & (z < z.quantile(2 / 3))]
    return float(middle["centroid_y"].median()), float(middle["centroid_x"].median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="an existing run's --output")
    parser.add_argument("--input", type=Path, help="that run's --input (OME-Zarr)")
    parser.add_argument("--png", type=Path, default=RESULTS / "view.png")
    args = parser.parse_args()
    if (args.run is None) != (args.input is None):
        parser.error("--run and --input go together")
    if args.run is not None:
        show(args.input, args.run, args.png)
        return
    with tempfile.TemporaryDirectory() as folder:
        source, out = make_run(Path(folder))
        show(source, out, args.png)


if __name__ == "__main__":
    main()
