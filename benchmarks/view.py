"""Look at a run's outputs as a user does: napari, headless, the label pyramid over the image.

``python benchmarks/view.py`` draws a stack of 16 x 1536 x 1536 voxels (``nucflow synth``),
runs ``nucflow run`` on it (its ``labels.ome.zarr`` then has two levels: 1536² and 768²) and
shows what ``nucflow view`` shows (:func:`nucflow.view.layers`: the input, the label pyramid
read with ome-zarr-py as napari-ome-zarr does, its features the table inside
``labels.ome.zarr/tables/nuclei``) in napari. It saves two screenshots side by side into
``benchmarks/results/view.png``: the whole middle plane (napari draws a coarse level) and a
256 x 256 voxel region (level 0), and prints which level napari drew, and how long opening and
drawing took.

``--run OUT`` looks at an existing run instead; ``--keep DIR`` keeps the stack and run.
napari needs a display: run under Xvfb (Debian's ``xvfb``)::

    xvfb-run -a -s "-screen 0 1600x1200x24" python benchmarks/view.py

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

SHAPE = (16, 1536, 1536)
RESULTS = Path(__file__).resolve().parent / "results"


def make_run(folder: Path) -> Path:
    """Draw the stack and run nucflow on it (subprocesses: the CLI as users call it)."""
    source, out = folder / "input.ome.zarr", folder / "run"
    nucflow = [sys.executable, "-c", "from nucflow.cli import console; console()"]
    shape = [str(n) for n in SHAPE]
    subprocess.run([*nucflow, "synth", str(source), "--shape", *shape, "--nuclei", "600",
                    "--diameter", "8"], check=True)  # fmt: skip
    subprocess.run([*nucflow, "run", "--input", str(source), "--output", str(out),
                    "--diameter", "8", "--chunks", "16", "512", "512"], check=True)  # fmt: skip
    return out


def show(out: Path, png: Path) -> None:
    """What ``nucflow view OUT`` shows (:func:`nucflow.view.layers`), as two screenshots."""
    import imageio.v3 as iio
    import napari

    from nucflow import view

    start = time.perf_counter()
    found = view.layers(out)
    viewer = napari.Viewer(show=True)  # under Xvfb; a hidden viewer's screenshots are black
    viewer.window.resize(1100, 1100)
    image_layer, layer = (getattr(viewer, f"add_{kind}")(d, **kw) for d, kw, kind in found)
    labels, scale = layer.data, layer.scale
    coarse = np.asarray(image_layer.data[-1] if image_layer.multiscale else image_layer.data[
        ::4, ::4, ::4])  # fmt: skip
    image_layer.contrast_limits = tuple(float(v) for v in np.percentile(coarse, [1, 99.8]))
    viewer.dims.set_point(0, scale[0] * (labels[0].shape[0] // 2))
    opened = time.perf_counter() - start

    shots, drawn = [], []
    viewer.reset_view()
    shots.append(viewer.screenshot(canvas_only=True, size=(900, 900)))
    drawn.append(layer.data_level)
    table = layer.features
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9
    camera.center = (0.0, *(c * s for c, s in zip(_busiest(table), scale[1:], strict=True)))
    camera.zoom = 900 / (256 * scale[-1])  # 256 voxels across the canvas
    shots.append(viewer.screenshot(canvas_only=True, size=(900, 900)))
    drawn.append(layer.data_level)
    took = time.perf_counter() - start - opened
    viewer.close()
    png.parent.mkdir(parents=True, exist_ok=True)
    gap = np.full((900, 12, shots[0].shape[2]), 255, np.uint8)
    iio.imwrite(png, np.concatenate([shots[0], gap, shots[1]], axis=1))
    print(
        f"labels   levels {[tuple(a.shape) for a in labels]}, scale {[float(v) for v in scale]} µm"
    )
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
    parser.add_argument("--keep", type=Path, help="make (or reuse) the stack and run here")
    parser.add_argument("--png", type=Path, default=RESULTS / "view.png")
    args = parser.parse_args()
    if args.run is not None:
        show(args.run, args.png)
        return
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / "run"
        if not (out / "run.json").exists():
            make_run(folder)
        show(out, args.png)


if __name__ == "__main__":
    main()
