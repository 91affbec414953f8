"""Bounded memory: peak RSS of a whole ``nucflow run`` on a stack and on one 16x larger.

The larger stack tiles the smaller one 1 x 4 x 4 (z, y, x), so both have the same density of
nuclei and the same depth; both runs use the default settings (blocks of 64x256x256, threaded
scheduler on every core). The smaller stack has 2 x 3 x 3 blocks, so it holds blocks of every
kind the larger one holds, down to those whose halo reaches into both neighbours along y and x
(the largest): a stack of only border blocks would compare a smaller per-block working set. Peak RSS
is the larger of the summed VmRSS of the process tree sampled every 0.1 s and the largest
process's ``ru_maxrss`` (see ``pipeline.py``). Targets (issue 5): the 16x stack needs at most
1.5x the memory, and the default settings stay under 3 GB.

Usage::

    python benchmarks/memory.py            # 128x768x768 and 128x3072x3072 (~5 min)
    python benchmarks/memory.py --cluster local --keep /tmp/nucflow-memory
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

BASE = (128, 768, 768)  # 2 x 3 x 3 default blocks
TILES = (1, 4, 4)
TARGET_RATIO = 1.5
TARGET_BYTES = 3 * 2**30


def make_stacks_main(folder: str) -> None:
    """Draw the base stack and write it, and its tiling, as OME-Zarr (subprocess)."""
    import dask.array as da

    from nucflow import io, synth

    made = synth.make_nuclei(BASE, n_nuclei=default_nuclei(BASE), diameter=DIAMETER, seed=SEED)
    base = Path(folder) / "base.ome.zarr"
    io.write_ome_zarr(base, made.image, made.voxel_size)
    tiled = da.tile(da.from_zarr(str(base / "0")), TILES)
    io.write_ome_zarr(Path(folder) / "large.ome.zarr", tiled, made.voxel_size)


def run(source: Path, output: Path, cluster: str) -> dict:
    code = "from nucflow.cli import main; raise SystemExit(main())"
    cmd = [sys.executable, "-c", code, "run", "--input", str(source), "--output", str(output)]
    measured = run_measured([*cmd, "--cluster", cluster], output.with_suffix(".log"))
    record = json.loads((output / "run.json").read_text())
    return {**measured, "nuclei": record["counts"]["nuclei"], "shape": record["shape"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", default="threads", help="nucflow --cluster (default threads)")
    parser.add_argument("--keep", type=Path, help="keep inputs and outputs in this folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nucflow-memory-") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"drawing {BASE} and its {TILES} tiling in {folder} ...", flush=True)
        subprocess.run([sys.executable, __file__, "_stacks", str(folder)], check=True)
        rows = {}
        for name in ("base", "large"):
            print(f"running nucflow on {name} ...", flush=True)
            rows[name] = run(folder / f"{name}.ome.zarr", folder / f"{name}-out", args.cluster)
    print(report(rows, args.cluster))


def report(rows: dict[str, dict], cluster: str) -> str:
    base, large = rows["base"], rows["large"]
    size = math.prod(large["shape"]) / math.prod(base["shape"])
    ratio = large["rss"] / base["rss"]
    lines = [
        f"nucflow run, default settings, --cluster {cluster}",
        f"{'stack':<22}{'voxels':>12}{'nuclei':>8}{'wall s':>9}{'peak RSS MiB':>14}",
    ]
    for name, row in rows.items():
        voxels = math.prod(row["shape"])
        shape = "x".join(map(str, row["shape"]))
        lines.append(
            f"{name + ' ' + shape:<22}{voxels:>12,}{row['nuclei']:>8}{row['wall']:>9.1f}"
            f"{row['rss'] / MIB:>14.0f}"
        )
    lines += [
        f"stack {size:.0f}x larger -> peak RSS {ratio:.2f}x (target <= {TARGET_RATIO}x: "
        f"{'met' if ratio <= TARGET_RATIO else 'NOT met'})",
        f"largest peak {max(large['rss'], base['rss']) / 2**30:.2f} GiB (target < 3 GiB: "
        f"{'met' if max(large['rss'], base['rss']) < TARGET_BYTES else 'NOT met'})",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_stacks":
        make_stacks_main(sys.argv[2])
    else:
        main()
