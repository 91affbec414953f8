"""What the object-level properties cost (``measure.properties``, :mod:`nucflow.objects`).

Run ``python benchmarks/objects.py`` (~2 min on 2 cores; ``--per-property``: step 3 only).
The script

1. draws the demo's stack (``nucflow.synth.make_nuclei``: 64x256x256, 150 nuclei, seed 0) as
   OME-Zarr in a temporary directory;
2. runs ``nucflow run`` (threads, blocks 32x128x128) with ``measure.properties=[]`` (today's
   moment columns only) and with the default properties, ``--repeat`` times each, alternating,
   and prints the median table stage and whole-run wall times from run.json;
3. times each property alone on the ground-truth nuclei, in this process, one thread
   (``nucflow.objects.measure_rows`` on one block holding the whole stack, minus the same call
   measuring nothing), and prints milliseconds per 1000 nuclei.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from nucflow import io, objects, synth

EXPENSIVE = [
    "solidity",
    "extent",
    "area_convex",
    "feret_diameter_max",
    "euler_number",
    "surface_area",
    "sphericity",
    "intensity_median",
    "intensity_percentile",
    "shell_intensity_mean",
    "inertia_tensor_eigvals",
]


#: Properties sharing one convex hull or one mesh per nucleus.
SHARED = [["solidity", "area_convex", "feret_diameter_max"], ["surface_area", "sphericity"]]


def _run(source: Path, out: Path, properties: str) -> dict[str, float]:
    code = "from nucflow.cli import console; console()"
    argv = [sys.executable, "-c", code, "run", "--input", str(source)]
    argv += ["--output", str(out), "--chunks", "32", "128", "128", "--overwrite"]
    argv += ["--set", f"measure.properties={properties}", "--set", "qc.enabled=false"]
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    wall = time.perf_counter() - start
    timings = json.loads((out / "run.json").read_text())["timings_s"]
    return {"wall": wall, "table": timings["table"], "stages": sum(timings.values())}


def _rows(truth: np.ndarray) -> pd.DataFrame:
    ids = np.unique(truth)[1:]
    from scipy import ndimage

    boxes = ndimage.find_objects(truth)
    rows = {"label": ids}
    for axis, a in enumerate("zyx"):
        rows[f"bbox_min_{a}"] = [boxes[i - 1][axis].start for i in ids]
        rows[f"bbox_max_{a}"] = [boxes[i - 1][axis].stop for i in ids]
    return pd.DataFrame(rows)


def _per_property(made: synth.SyntheticStack, repeat: int) -> dict[str, float]:
    rows = _rows(made.truth)
    common = {"labels": made.truth, "intensities": {"": made.image}, "shape": made.truth.shape}

    def seconds(names: list[str]) -> float:
        spec = objects.Spec.of(names, ndim=3, voxel_size=made.voxel_size)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            objects.measure_rows(rows, spec=spec, **common)
            times.append(time.perf_counter() - start)
        return min(times)

    # "extent" needs no hull or mesh: the cost of cropping and making the regionprops object
    base = seconds(["extent"])
    out = {"(crop + regionprops object, via extent)": base}
    for name in EXPENSIVE:
        out[name] = seconds([name]) - (0 if name == "extent" else base)
    for names in SHARED:  # asked together, they compute their hull or mesh once
        out[" + ".join(names)] = seconds(names) - base
    return {k: 1000 * v / len(rows) * 1000 for k, v in out.items()}  # ms per 1000 nuclei


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--per-property", action="store_true", help="only step 3: each property's cost"
    )
    args = parser.parse_args()
    made = synth.make_nuclei((64, 256, 256), n_nuclei=150, diameter=8.0, seed=0)
    n = int(made.truth.max())
    if not args.per_property:
        _runs(made, args.repeat)
    print(f"\nper property, one thread, ms per 1000 nuclei ({n} nuclei, best of {args.repeat}):")
    for name, ms in _per_property(made, args.repeat).items():
        print(f"  {name:<46} {ms:7.0f}")


def _runs(made: synth.SyntheticStack, repeat: int) -> None:
    """Step 2: whole runs without and with the default properties."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.ome.zarr"
        io.write_ome_zarr(source, made.image, made.voxel_size)
        found: dict[str, list[dict[str, float]]] = {"none": [], "default": []}
        default = "[" + ",".join(objects.DEFAULT_PROPERTIES) + "]"
        for _ in range(repeat):
            found["none"].append(_run(source, Path(tmp) / "none", "[]"))
            found["default"].append(_run(source, Path(tmp) / "default", default))
    n = int(made.truth.max())
    print(f"stack {made.image.shape}, {n} nuclei, blocks 32x128x128, threads")
    head = f"{'properties':<12} {'table s':>8} {'stages s':>9} {'wall s':>7}"
    print(f"{head}  (median of {repeat})")
    for name, runs in found.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{name:<12} {med['table']:8.2f} {med['stages']:9.2f} {med['wall']:7.2f}")


if __name__ == "__main__":
    main()
