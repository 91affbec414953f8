"""Empty space costs nothing: a terabyte-sized zarr store holding data in one small region.

(Not named ``sparse.py``: scripts here put this folder first on ``sys.path``, and dask imports
the ``sparse`` package.)

The script writes a zarr v3 array of ``--shape`` (default 2048x16384x16384 uint16, 1.1 TB
nominal, chunks 64x512x512) whose only written chunks hold a synthetic stack of
``--region`` (default 64x512x1024, 600 nuclei) at ``--at``; the same region is also written
alone as a small array. It then times, in subprocesses,

1. ``nucflow plan`` on the large store (graph build, calibration on one block);
2. ``nucflow run`` on the large store (wall time, peak RSS of the process tree);
3. ``nucflow run`` on the region alone,

and checks that both runs found the same nuclei: the tables agree row for row once the large
run's coordinates are shifted by ``--at`` (labels differ: they are seed indices in each stack).

Usage::

    python benchmarks/empty_space.py            # ~30 s; the large store takes ~70 MB on disk
    python benchmarks/empty_space.py --keep /tmp/nucflow-sparse

Output on the 2-core development machine: see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import DIAMETER, MIB, run_measured  # noqa: E402

VOXEL = (1.0, 0.5, 0.5)
NUCFLOW = [sys.executable, "-c", "from nucflow.cli import console; console()"]


def make_stores_main(folder: str, shape: str, chunks: str, region: str, at: str, nuclei: str):
    """Write the large sparse store and the region alone (subprocess: keeps the parent small)."""
    import zarr

    from nucflow import synth

    shape_, chunks_, region_, at_ = (
        tuple(map(int, v.split(","))) for v in (shape, chunks, region, at)
    )
    made = synth.make_nuclei(region_, n_nuclei=int(nuclei), diameter=DIAMETER, seed=1)
    where = tuple(slice(a, a + n) for a, n in zip(at_, region_, strict=True))
    for name, full, place in (("large", shape_, where), ("region", region_, ...)):
        array = zarr.create_array(
            str(Path(folder) / f"{name}.zarr"), shape=full, chunks=chunks_, dtype="uint16"
        )
        array[place] = made.image


def table_rows_match(large: Path, region: Path, at: tuple[int, ...]) -> tuple[bool, int, int]:
    """Whether the two tables hold the same nuclei (large shifted by ``at``), and their sizes."""
    import numpy as np
    import pandas as pd

    big, small = pd.read_parquet(large), pd.read_parquet(region)
    for axis, shift in zip("zyx", at, strict=True):
        for column in (f"centroid_{axis}", f"bbox_min_{axis}", f"bbox_max_{axis}"):
            big[column] -= shift
        big[f"centroid_{axis}_um"] = big[f"centroid_{axis}"] * VOXEL["zyx".index(axis)]
    order = ["bbox_min_z", "bbox_min_y", "bbox_min_x", "centroid_z", "centroid_y", "centroid_x"]
    big, small = (
        t.drop(columns="label").sort_values(order, ignore_index=True) for t in (big, small)
    )
    same = big.shape == small.shape and all(
        np.allclose(big[c], small[c], rtol=1e-9, atol=1e-6)
        if small[c].dtype.kind == "f"
        else (big[c].to_numpy() == small[c].to_numpy()).all()
        for c in small.columns
    )
    return same, len(big), len(small)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    zyx = ("Z", "Y", "X")
    parser.add_argument("--shape", type=int, nargs=3, default=[2048, 16384, 16384], metavar=zyx)
    parser.add_argument("--chunks", type=int, nargs=3, default=[64, 512, 512], metavar=zyx)
    parser.add_argument("--region", type=int, nargs=3, default=[64, 512, 1024], metavar=zyx)
    parser.add_argument("--at", type=int, nargs=3, default=[1024, 8192, 8192], metavar=zyx)
    parser.add_argument("--nuclei", type=int, default=600)
    parser.add_argument("--keep", type=Path, help="keep the stores and outputs in this folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nucflow-sparse-") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        print(
            f"writing {tuple(args.region)} of data into a {tuple(args.shape)} store ...", flush=True
        )
        text = [",".join(map(str, v)) for v in (args.shape, args.chunks, args.region, args.at)]
        subprocess.run(
            [sys.executable, __file__, "_stores", str(folder), *text, str(args.nuclei)], check=True
        )
        common = ["--diameter", str(DIAMETER), "--voxel-size", *map(str, VOXEL)]
        started = time.perf_counter()
        plan = subprocess.run(
            [*NUCFLOW, "plan", "--input", str(folder / "large.zarr"), *common],
            check=True,
            capture_output=True,
            text=True,
        )
        plan_wall = time.perf_counter() - started
        runs = {}
        for name in ("large", "region"):
            print(f"running nucflow on {name} ...", flush=True)
            output = folder / f"{name}-out"
            cmd = [
                *NUCFLOW,
                "run",
                "--input",
                str(folder / f"{name}.zarr"),
                "--output",
                str(output),
            ]
            runs[name] = run_measured([*cmd, *common], folder / f"{name}.log")
        same, n_large, n_region = table_rows_match(
            folder / "large-out" / "nuclei.parquet",
            folder / "region-out" / "nuclei.parquet",
            args.at,
        )
    nominal = math.prod(args.shape) * 2
    print(f"\nnucflow plan (large store), {plan_wall:.1f} s:\n{plan.stdout.strip()}\n")
    print(f"{'input':<34}{'wall s':>8}{'peak RSS MiB':>14}{'nuclei':>8}")
    for name, shape, n in (("large", args.shape, n_large), ("region", args.region, n_region)):
        label = f"{name} {'x'.join(map(str, shape))}"
        if name == "large":
            label += f" ({nominal / 1e12:.1f} TB)"
        print(f"{label:<34}{runs[name]['wall']:>8.1f}{runs[name]['rss'] / MIB:>14.0f}{n:>8}")
    print(f"same nuclei as the region alone: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_stores"]:
        make_stores_main(*sys.argv[2:8])
    else:
        main()
