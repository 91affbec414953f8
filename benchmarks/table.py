"""The table stage at whole-organ scale: memory and time of combining and writing 10^6-10^8 rows.

A segmentation leaves, per block, the mergeable sums of the labels in the block's core
(:func:`nucflow.measure.block_stats`), filed by the block owning each nucleus
(:func:`nucflow.table.write_sums`: ``.work/blocks/<i_j_k>.parquet`` and
``.work/blocks/<owner>.in/<i_j_k>.parquet``); the table stage (:func:`nucflow.table.gather` and
:func:`nucflow.table.write`) turns them into one row per nucleus. This script writes such
parts without segmenting anything (same columns and dtypes as ``block_stats``, checked; filed
by the same ``write_sums``), then runs the table stage on them in a subprocess and measures it.

The parts are those of a dense tissue: ``--per-block`` nuclei (default 4000) seeded in every
block of 64x512x512 voxels (voxel (1, 0.5, 0.5) µm, the default blocks of a dense terabyte),
each an axis-aligned box of 5-9 x 11-17 x 11-17 voxels around its seed (a nucleus of ~8 µm),
whose label is 1 + the seed's linear index in the stack, as in a segmentation. A box crossing
a block border leaves one row in every block it touches (about a fifth of the nuclei do), so
the table stage must add up parts of several blocks. The sums of a box are exact (closed
forms), so the script checks the result: one row per nucleus, and for the nuclei of one
block, ``n_voxels`` and the centroid of the whole box.

For each size the table stage runs in a fresh subprocess on each scheduler: ``threads`` and a
LocalCluster of 2 single-threaded workers with ``--memory-limit``. Measured: wall time of
``gather`` + ``write`` (inside the subprocess), peak RSS of the subprocess (the driver; on a
LocalCluster it also holds the scheduler) and of its largest descendant (a worker), sampled
every 0.1 s (``PeakSampler`` of ``pipeline.py``).

Usage::

    python benchmarks/table.py                       # 1e6, 3e6, 1e7 nuclei (~15 min, 2 cores)
    python benchmarks/table.py --nuclei 1e6 3e6      # quicker
    python benchmarks/table.py --keep /tmp/nf-table  # keep (and reuse) the synthesized parts
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import MIB, PeakSampler  # noqa: E402

CHUNKS = (64, 512, 512)
VOXEL = (1.0, 0.5, 0.5)
MAX_RADIUS = 8.0  # µm: the default 1.0 x diameter 8 µm
HALF_LOW, HALF_HIGH = (2, 5, 5), (5, 9, 9)  # half-extents of the boxes, voxels, [low, high)
SEED = 0


# ----------------------------------------------------------------------------- synthesis


def grid_counts(nuclei: int, per_block: int) -> tuple[int, int, int]:
    """Blocks per axis: at most 8 deep, square in y and x, at least ``nuclei / per_block``."""
    blocks = math.ceil(nuclei / per_block)
    depth = min(8, blocks)
    side = math.ceil(math.sqrt(blocks / depth))
    depth = math.ceil(blocks / side**2)
    return depth, side, side


def seeds(index: tuple[int, ...], shape: tuple[int, ...], per_block: int):
    """Seeds (n, 3) and half-extents (n, 3) of the nuclei seeded in block ``index``."""
    rng = np.random.default_rng([SEED, *index])
    lo = np.array([i * c for i, c in zip(index, CHUNKS, strict=True)])
    hi = np.minimum(lo + CHUNKS, shape)
    # Distinct positions: a few more draws than needed (collisions are rare), deduplicated,
    # shuffled. (``rng.choice(..., replace=False)`` permutes all 16 M positions of a block.)
    at = np.unique(rng.integers(0, math.prod(hi - lo), size=per_block + per_block // 20 + 16))
    assert len(at) >= per_block, "too many collisions: fewer nuclei per block"
    at = rng.permutation(at)[:per_block]
    seed = np.stack(np.unravel_index(at, tuple(hi - lo)), 1) + lo
    half = rng.integers(HALF_LOW, HALF_HIGH, size=(per_block, 3))
    return seed, half


def _sum_to(m: np.ndarray, power: int) -> np.ndarray:
    """Sum of x**power for x in 0..m (m >= -1), exact in int64."""
    if power == 1:
        return m * (m + 1) // 2
    return m * (m + 1) * (2 * m + 1) // 6


def block_part(index: tuple[int, ...], shape: tuple[int, ...], per_block: int) -> pd.DataFrame:
    """The sums segmentation would leave for block ``index``: every box piece in its core."""
    lo = np.array([i * c for i, c in zip(index, CHUNKS, strict=True)])
    hi = np.minimum(lo + CHUNKS, shape)
    counts = [math.ceil(n / c) for n, c in zip(shape, CHUNKS, strict=True)]
    near = [range(max(0, i - 1), min(n, i + 2)) for i, n in zip(index, counts, strict=True)]
    pieces = []
    for other in np.stack(np.meshgrid(*near, indexing="ij"), -1).reshape(-1, 3):
        seed, half = seeds(tuple(int(i) for i in other), shape, per_block)
        start = np.maximum(np.maximum(seed - half, 0), lo)
        stop = np.minimum(np.minimum(seed + half + 1, shape), hi)
        inside = np.all(stop > start, 1)
        pieces.append((seed[inside], half[inside], start[inside], stop[inside]))
    seed, half, start, stop = (np.concatenate(p) for p in zip(*pieces, strict=True))
    label = np.ravel_multi_index(tuple(seed.T), shape).astype(np.uint64) + np.uint64(1)
    length = stop - start
    first = _sum_to(stop - 1, 1) - _sum_to(start - 1, 1)
    second = _sum_to(stop - 1, 2) - _sum_to(start - 1, 2)
    n = length.prod(1)
    axes = "zyx"
    columns: dict[str, np.ndarray] = {"n": n}
    for i, a in enumerate(axes):
        columns[f"s_{a}"] = first[:, i] * (n // length[:, i])
    for i, a in enumerate(axes):
        for j in range(i, 3):
            if i == j:
                columns[f"s_{a}{a}"] = second[:, i] * (n // length[:, i])
            else:
                rest = n // (length[:, i] * length[:, j])
                columns[f"s_{a}{axes[j]}"] = first[:, i] * first[:, j] * rest
    for i, a in enumerate(axes):
        columns[f"min_{a}"] = start[:, i]
    for i, a in enumerate(axes):
        columns[f"max_{a}"] = stop[:, i] - 1
    far = np.sqrt(((half * VOXEL) ** 2).sum(1))
    columns["seed_distance"] = far.astype(np.float32)
    brightness = 100.0 + (label % np.uint64(997)).astype(np.float64)
    columns["isum"] = brightness * n
    columns["isq"] = brightness**2 * n
    columns["imin"] = columns["imax"] = brightness
    order = np.argsort(label, kind="stable")
    frame = pd.DataFrame({k: v[order] for k, v in columns.items()})
    frame.index = pd.Index(label[order], name="label")
    return frame


def _write_part(args: tuple) -> None:
    from nucflow import table
    from nucflow.blockpass import Grid

    index, shape, per_block, folder = args
    if not (Path(folder) / table.part_name(index)).exists():  # written last: block done
        part = block_part(index, shape, per_block)
        grid = Grid(shape, CHUNKS)  # as pipeline._segment_task files them
        table.write_sums(part, Path(folder), index, grid, offset=(0, 0, 0), full_shape=shape)


def check_format() -> None:
    """The synthesized parts have the columns and dtypes of ``measure.block_stats``."""
    from nucflow import measure

    labels = np.zeros((4, 6, 6), np.uint64)
    labels[1:3, 1:4, 2:5] = 7
    real = measure.block_stats(
        labels, np.ones(labels.shape, np.float32), {"": np.ones(labels.shape)}, origin=(0, 0, 0)
    )
    made = block_part((0, 0, 0), (64, 64, 64), 3)
    assert list(made.columns) == list(real.columns), (list(made.columns), list(real.columns))
    assert made.dtypes.equals(real.dtypes), (made.dtypes, real.dtypes)
    assert made.index.dtype == real.index.dtype and made.index.name == real.index.name


def synthesize(folder: Path, shape: tuple[int, ...], per_block: int) -> int:
    """Write every block's part into ``folder`` (2 processes); returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = [math.ceil(n / c) for n, c in zip(shape, CHUNKS, strict=True)]
    jobs = [(tuple(map(int, i)), shape, per_block, str(folder)) for i in np.ndindex(*counts)]
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_write_part, jobs, chunksize=16))
    return sum(p.stat().st_size for p in folder.rglob("*.parquet"))


# ----------------------------------------------------------------------------- the table stage


def combine_main(argv: list[str]) -> None:
    """Subprocess: ``gather`` + ``write`` on the parts; prints a JSON line of facts."""
    parser = argparse.ArgumentParser()
    parser.add_argument("sums", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--shape", type=int, nargs=3, required=True)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--memory-limit", required=True)
    args = parser.parse_args(argv)

    from nucflow import cluster, io, labels_table, measure, table
    from nucflow.blockpass import Grid
    from nucflow.segment import whole_voxels

    shape = tuple(args.shape)
    settings = {}
    if args.cluster == "local":
        settings = {"n_workers": 2, "threads_per_worker": 1, "memory_limit": args.memory_limit}
    with cluster.connect(args.cluster, settings=settings, progress=False) as runner:
        start = time.perf_counter()
        result = table.gather(
            runner,
            Grid(shape, CHUNKS),
            sums=args.sums,
            out=args.output / ".work" / "table",
            offset=(0, 0, 0),
            full_shape=shape,
            reach=whole_voxels(MAX_RADIUS, VOXEL),
            finalize={
                "voxel_size": VOXEL,
                "shape": shape,
                "origin": (0, 0, 0),
                "max_radius": MAX_RADIUS,
                "channel_suffixes": [""],
            },
            metadata={"voxel_size": list(VOXEL), "unit": "micrometer"},
        )
        gathered = time.perf_counter() - start
        how = table.write(
            result, args.output, single_file_rows=1_000_000, empty=measure.empty_table(3)
        )
        wall = time.perf_counter() - start
        # The table inside labels.ome.zarr (as nucflow.pipeline.finish writes it): its time,
        # and the driver's high-water mark before and after it.
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        io.create_label_zarr(args.output / "labels.ome.zarr", shape, CHUNKS, VOXEL)
        linked = labels_table.write(args.output / "labels.ome.zarr", args.output / "nuclei.parquet")
        assert linked == result.rows, f"{linked} rows in labels.ome.zarr/tables for {result.rows}"
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        tables_s = time.perf_counter() - start - wall
    facts = {"wall": wall, "gather": gathered, "rows": result.rows, "how": how}
    facts.update(tables_s=tables_s, maxrss_before_tables=before, maxrss_after_tables=after)
    facts["sample"] = len(result.sample)
    print(json.dumps(facts), flush=True)


def run_combine(parts: Path, output: Path, shape, cluster: str, memory_limit: str) -> dict:
    """The table stage in a subprocess, with its driver's and largest worker's peak RSS."""
    cmd = [sys.executable, __file__, "_combine", str(parts), str(output)]
    cmd += ["--shape", *map(str, shape), "--cluster", cluster, "--memory-limit", memory_limit]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = PeakSampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    sampler.stop()
    if proc.returncode != 0:
        sys.exit(f"{cmd} failed with exit code {proc.returncode}:\n{err[-3000:]}")
    facts = json.loads(out.strip().splitlines()[-1])
    return {**facts, "driver": sampler.driver, "worker": sampler.worker}


def check_table(output: Path, nuclei: int, shape, per_block: int) -> None:
    """One row per nucleus, and block (0, 0, 0)'s nuclei measured as their whole boxes."""
    import pyarrow.dataset as ds

    from nucflow import read_table

    dataset = ds.dataset(output / "nuclei.parquet", format="parquet")
    rows = dataset.count_rows()
    assert rows == nuclei, f"{rows} rows for {nuclei} nuclei"
    seed, half = seeds((0, 0, 0), shape, per_block)
    label = np.ravel_multi_index(tuple(seed.T), shape).astype(np.uint64) + np.uint64(1)
    first = read_table(output, lazy=True).partitions[0].compute()
    first = first.set_index("label").loc[label]
    start, stop = np.maximum(seed - half, 0), np.minimum(seed + half + 1, shape)
    assert np.array_equal(first["n_voxels"].to_numpy(), (stop - start).prod(1))
    centre = (start + stop - 1) / 2
    got = first[["centroid_z", "centroid_y", "centroid_x"]].to_numpy()
    assert np.allclose(got, centre), "centroids differ from the boxes'"


# ----------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nuclei", type=float, nargs="+", default=[1e6, 3e6, 1e7])
    parser.add_argument("--per-block", type=int, default=4000, help="nuclei seeded per block")
    parser.add_argument("--clusters", nargs="+", default=["threads", "local"])
    parser.add_argument("--memory-limit", default="1.5GiB", help="per LocalCluster worker")
    parser.add_argument("--keep", type=Path, help="keep (and reuse) the parts in this folder")
    args = parser.parse_args(argv)
    check_format()
    rows = []
    with tempfile.TemporaryDirectory(prefix="nucflow-table-") as scratch:
        folder = args.keep or Path(scratch)
        for asked in args.nuclei:
            counts = grid_counts(int(asked), args.per_block)
            shape = tuple(n * c for n, c in zip(counts, CHUNKS, strict=True))
            nuclei = math.prod(counts) * args.per_block
            parts = folder / f"parts-{nuclei}"
            start = time.perf_counter()
            size = synthesize(parts, shape, args.per_block)
            print(
                f"{nuclei:,} nuclei in {'x'.join(map(str, counts))} blocks: parts "
                f"{size / 2**30:.2f} GiB, {time.perf_counter() - start:.0f} s",
                flush=True,
            )
            for name in args.clusters:
                output = folder / f"out-{nuclei}-{name}"
                shutil.rmtree(output, ignore_errors=True)
                row = run_combine(parts, output, shape, name, args.memory_limit)
                check_table(output, nuclei, shape, args.per_block)
                shutil.rmtree(output)
                row.update(nuclei=nuclei, blocks=math.prod(counts), cluster=name)
                rows.append(row)
                print("  " + line(row), flush=True)
                print(
                    f"    labels.ome.zarr/tables/nuclei: {row['tables_s']:.1f} s, driver "
                    f"high-water mark {row['maxrss_before_tables'] / MIB:.0f} MiB before it, "
                    f"{row['maxrss_after_tables'] / MIB:.0f} MiB after",
                    flush=True,
                )
            if not args.keep:
                shutil.rmtree(parts)
    print(report(rows, args.memory_limit))


def line(row: dict) -> str:
    worker = f"{row['worker'] / MIB:>8.0f}" if row["cluster"] == "local" else f"{'-':>8}"
    return (
        f"{row['cluster']:<8}{row['nuclei']:>12,}{row['blocks']:>8,}{row['wall']:>8.1f}"
        f"{row['nuclei'] / row['wall'] / 1e3:>9.1f}{row['driver'] / MIB:>11.0f}{worker}"
        f"  {row['how']}"
    )


def report(rows: list[dict], memory_limit: str) -> str:
    lines = [
        f"table stage (gather + write) on synthesized parts, blocks {'x'.join(map(str, CHUNKS))}; "
        f"local = LocalCluster, 2 workers x 1 thread, memory_limit {memory_limit}",
        f"{'cluster':<8}{'nuclei':>12}{'blocks':>8}{'wall s':>8}{'krow/s':>9}"
        f"{'driver MiB':>11}{'worker':>8}  table",
    ]
    lines += [line(r) for r in rows]
    for name in dict.fromkeys(r["cluster"] for r in rows):
        mine = [r for r in rows if r["cluster"] == name]
        small, large = mine[0], mine[-1]
        lines.append(
            f"{name}: {large['nuclei'] / small['nuclei']:.0f}x the nuclei -> driver peak "
            f"{large['driver'] / small['driver']:.2f}x"
            + (
                f", largest worker {large['worker'] / small['worker']:.2f}x"
                if name == "local"
                else ""
            )
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_combine":
        combine_main(sys.argv[2:])
    else:
        main()
