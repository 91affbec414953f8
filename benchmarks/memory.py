"""Bounded memory: peak RSS of a whole ``nucflow run`` on three stack sizes spanning 16x.

The stacks tile one base stack 1 x 1 x 1, 1 x 2 x 2 and 1 x 4 x 4 (z, y, x), so all have the
same density of nuclei and the same depth, and every one has at least three blocks along each
axis (blocks of 64x256x256, the default): interior blocks on every axis, whose halo reaches into
both neighbours, appear at every size. (A benchmark whose stacks had two blocks along z hid a
growth that three blocks show.) Each run uses the default settings, on the chosen scheduler.
Peak RSS is the larger of the summed VmRSS of the whole process tree (driver, and the workers
of a LocalCluster) sampled every 0.1 s and the largest process's ``ru_maxrss``.

Targets (issue 10): the 16x stack needs at most 1.2x the memory of the smallest, and every
run stays under 2 GiB.

Usage::

    python benchmarks/memory.py                          # threads (~15 min on 2 cores)
    python benchmarks/memory.py --cluster local --keep /tmp/nucflow-memory
    python benchmarks/memory.py --cluster local --set cluster.memory_limit=1.5GiB
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import DIAMETER, MIB, SEED, default_nuclei, run_measured  # noqa: E402

BASE = (192, 768, 768)  # 3 x 3 x 3 default blocks
TILINGS = {"1x": (1, 1, 1), "4x": (1, 2, 2), "16x": (1, 4, 4)}
TARGET_RATIO = 1.2
TARGET_BYTES = 2 * 2**30


def make_stacks_main(folder: str) -> None:
    """Draw the base stack and write it and its tilings as OME-Zarr (subprocess)."""
    import dask.array as da

    from nucflow import io, synth

    base = Path(folder) / "1x.ome.zarr"
    if not base.exists():
        made = synth.make_nuclei(BASE, n_nuclei=default_nuclei(BASE), diameter=DIAMETER, seed=SEED)
        io.write_ome_zarr(base, made.image, made.voxel_size)
    voxel_size = io.open_stack(base).voxel_size
    for name, tiles in TILINGS.items():
        path = Path(folder) / f"{name}.ome.zarr"
        if not path.exists():
            tiled = da.tile(da.from_zarr(str(base / "0")), tiles)
            io.write_ome_zarr(path, tiled, voxel_size)


def run(source: Path, output: Path, cluster: str, extra: list[str]) -> dict:
    code = "from nucflow.cli import console; console()"
    cmd = [sys.executable, "-c", code, "run", "--input", str(source), "--output", str(output)]
    cmd += ["--cluster", cluster, "--overwrite", *extra]
    measured = run_measured(cmd, output.with_suffix(".log"))
    record = json.loads((output / "run.json").read_text())
    return {**measured, "nuclei": record["counts"]["nuclei"], "shape": record["shape"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", default="threads", help="nucflow --cluster (default threads)")
    parser.add_argument("--keep", type=Path, help="keep inputs and outputs in this folder")
    parser.add_argument("--set", action="append", default=[], help="passed to nucflow run")
    parser.add_argument("--sizes", nargs="+", default=list(TILINGS), choices=list(TILINGS))
    args = parser.parse_args(argv)
    extra = [a for s in args.set for a in ("--set", s)]
    with tempfile.TemporaryDirectory(prefix="nucflow-memory-") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"drawing {BASE} and its tilings in {folder} ...", flush=True)
        subprocess.run([sys.executable, __file__, "_stacks", str(folder)], check=True)
        rows = {}
        for name in args.sizes:
            print(f"running nucflow on {name} ...", flush=True)
            source, out = folder / f"{name}.ome.zarr", folder / f"{name}-{args.cluster}-out"
            rows[name] = run(source, out, args.cluster, extra)
            row = rows[name]
            print(
                f"  {row['wall']:.1f} s, {row['rss'] / MIB:.0f} MiB (driver "
                f"{row['rss_driver'] / MIB:.0f}, largest worker {row['rss_worker'] / MIB:.0f})",
                flush=True,
            )
    print(report(rows, args.cluster, args.set))


def report(rows: dict[str, dict], cluster: str, settings: list[str]) -> str:
    smallest = min(rows.values(), key=lambda r: math.prod(r["shape"]))
    lines = [
        f"nucflow run, default settings{' + ' + ' '.join(settings) if settings else ''}, "
        f"--cluster {cluster}, blocks 64x256x256",
        f"{'stack':<18}{'blocks':>9}{'voxels':>15}{'nuclei':>8}{'wall s':>8}"
        f"{'Mvox/s':>8}{'peak MiB':>10}{'vs 1x':>7}{'driver':>8}{'worker':>8}",
    ]
    for row in rows.values():
        voxels = math.prod(row["shape"])
        blocks = "x".join(
            str(math.ceil(n / c)) for n, c in zip(row["shape"], (64, 256, 256), strict=True)
        )
        lines.append(
            f"{'x'.join(map(str, row['shape'])):<18}{blocks:>9}{voxels:>15,}{row['nuclei']:>8}"
            f"{row['wall']:>8.1f}{voxels / row['wall'] / 1e6:>8.2f}{row['rss'] / MIB:>10.0f}"
            f"{row['rss'] / smallest['rss']:>7.2f}{row['rss_driver'] / MIB:>8.0f}"
            f"{row['rss_worker'] / MIB:>8.0f}"
        )
    largest = max(rows.values(), key=lambda r: math.prod(r["shape"]))
    span = math.prod(largest["shape"]) / math.prod(smallest["shape"])
    ratio = largest["rss"] / smallest["rss"]
    peak = max(r["rss"] for r in rows.values())
    lines += [
        f"{span:.0f}x the data -> peak RSS {ratio:.2f}x (target <= {TARGET_RATIO}x: "
        f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}); largest peak {peak / 2**30:.2f} GiB "
        f"(target < 2 GiB: {'met' if peak < TARGET_BYTES else 'NOT met'})",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_stacks":
        make_stacks_main(sys.argv[2])
    else:
        main()
