"""Benchmark a whole nucflow run against a whole-array scikit-image pipeline.

Run ``python benchmarks/pipeline.py`` (128x512x512, blocks of 64x256x256) or add ``--quick``
(64x256x256). The script

1. draws a seeded synthetic stack (``nucflow.synth.make_nuclei``; by default as many nuclei per
   voxel as the demo: 150 in 64x256x256 at voxel (1, 0.5, 0.5) µm, diameter 8 µm) and writes it
   as OME-Zarr in a temporary directory;
2. runs ``nucflow run`` in a subprocess (threaded scheduler, all cores, default settings plus
   any ``--set``) and reads the per-stage timings and the derived parameters from its run.json;
3. runs the same steps with the same parameters on the whole array with scipy/scikit-image in a
   second subprocess (Gaussian, white top-hat with nucflow's footprint, Otsu, opening, hole
   filling, small-object removal, anisotropic EDT, ``peak_local_max`` markers, watershed,
   ``regionprops_table``), timing each step;
4. scores both label images against the ground truth (F1 at IoU 0.5).

Wall time is the subprocess's whole life (interpreter start, imports, reading, writing).
Peak RSS is the larger of (a) the summed VmRSS of the subprocess and all its descendants,
sampled from /proc every 0.1 s (may miss a peak shorter than 0.1 s), and (b) the kernel's
high-water mark ``ru_maxrss`` of the largest single process of the tree, from ``os.wait4``
(exact for that process, a lower bound for the tree). Both are printed.

Each pipeline runs ``--repeat`` times (default 3), alternating, and the run with the median
wall time is reported. Its output on the 2-core development machine is in
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

DEMO_SHAPE = (64, 256, 256)
DEMO_NUCLEI = 150
DIAMETER = 8.0
SEED = 0
MIB = 2**20
# nucflow stage -> the reference steps that do the same work
STAGES = {
    "preprocess": ("read", "gaussian", "tophat"),
    "threshold": ("otsu",),
    "mask": ("opening", "fill_holes", "remove_small"),
    "segment+table": ("edt", "peaks", "watershed", "regionprops"),
    "write": ("save",),
}


# ----------------------------------------------------------------------------- memory


def _children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # comm may hold spaces and ")"
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _vm_rss(pid: int) -> int:
    """Resident set size of one process in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> int:
    """Summed VmRSS of a process and all its descendants, in bytes."""
    children = _children_map()
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += _vm_rss(p)
        todo.extend(children.get(p, []))
    return total


class PeakSampler(threading.Thread):
    """Keep the largest :func:`tree_rss` of a process, sampled every ``interval`` seconds, and
    the largest RSS of the process itself (``driver``) and of any one descendant (``worker``)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self.driver = self.worker = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self.driver = max(self.driver, _vm_rss(self.pid))
            children = _children_map()
            todo = list(children.get(self.pid, []))
            while todo:
                child = todo.pop()
                self.worker = max(self.worker, _vm_rss(child))
                todo.extend(children.get(child, []))
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def run_measured(cmd: list[str], log: Path) -> dict[str, float]:
    """Run ``cmd``; wall time (s), sampled tree peak and ru_maxrss (bytes). Fails loudly."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        sampler = PeakSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    sampled = sampler.stop()
    if proc.returncode != 0:
        sys.exit(f"{cmd[:4]} failed with exit code {proc.returncode}:\n{log.read_text()[-3000:]}")
    maxrss = usage.ru_maxrss * 1024  # kB on Linux
    return {
        "wall": wall,
        "rss_sampled": sampled,
        "rss_maxrss": maxrss,
        "rss": max(sampled, maxrss),
        "rss_driver": sampler.driver,
        "rss_worker": sampler.worker,
    }


# ----------------------------------------------------------------------------- reference


@contextmanager
def _step(timings: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def _markers(distance: np.ndarray, mask: np.ndarray, min_distance: int) -> np.ndarray:
    from skimage.feature import peak_local_max

    coords = peak_local_max(
        distance, min_distance=min_distance, labels=mask.astype(np.uint8), exclude_border=False
    )
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(coords.T)] = np.arange(1, len(coords) + 1)
    return markers


def reference_mask(image: np.ndarray, voxel: tuple, d: dict, t: dict) -> tuple[np.ndarray, float]:
    """Gaussian, white top-hat, Otsu, opening, hole filling, small-object removal."""
    import scipy.ndimage as ndi
    import skimage.filters
    import skimage.morphology as morph

    from nucflow.filters import ellipsoid

    with _step(t, "gaussian"):
        smooth = ndi.gaussian_filter(image.astype(np.float32), [d["sigma"] / v for v in voxel])
    with _step(t, "tophat"):
        fp = ellipsoid(d["background_radius"], voxel, decomposition="sequence")
        pre = morph.white_tophat(smooth, fp)
    with _step(t, "otsu"):
        threshold = float(skimage.filters.threshold_otsu(pre))
    with _step(t, "opening"):
        mask = morph.opening(pre > threshold, ellipsoid(d["opening_radius"], voxel))
    with _step(t, "fill_holes"):
        mask = ndi.binary_fill_holes(mask)
    with _step(t, "remove_small"):
        mask = morph.remove_small_objects(mask, max_size=int(d["min_volume"] / math.prod(voxel)))
    return mask, threshold


def reference_labels(mask: np.ndarray, voxel: tuple, d: dict, t: dict) -> np.ndarray:
    """Anisotropic EDT, peak_local_max markers, watershed on the negated distance."""
    import scipy.ndimage as ndi
    from skimage.segmentation import watershed

    with _step(t, "edt"):
        distance = ndi.distance_transform_edt(mask, sampling=voxel)
    with _step(t, "peaks"):
        markers = _markers(distance, mask, round(d["peak_radius"] / min(voxel)))
    with _step(t, "watershed"):
        return watershed(-distance, markers, mask=mask)


def reference_main(source: str, run_json: str, out_npy: str, out_json: str) -> None:
    """The whole-array pipeline (runs in its own subprocess); writes labels and timings."""
    from skimage.measure import regionprops_table

    record = json.loads(Path(run_json).read_text())
    voxel, derived = tuple(record["voxel_size_um"]), record["derived"]
    t: dict[str, float] = {}
    with _step(t, "read"):
        image = read_level0(Path(source))
    mask, threshold = reference_mask(image, voxel, derived, t)
    labels = reference_labels(mask, voxel, derived, t)
    with _step(t, "regionprops"):
        props = (
            "label",
            "area",
            "centroid",
            "bbox",
            "axis_major_length",
            "axis_minor_length",
            "intensity_mean",
            "intensity_min",
            "intensity_max",
            "intensity_std",
        )
        table = regionprops_table(labels, intensity_image=image, properties=props, spacing=voxel)
    with _step(t, "save"):
        np.save(out_npy, labels)
    summary = {"timings_s": t, "threshold": threshold, "nuclei": len(table["label"])}
    Path(out_json).write_text(json.dumps(summary))


# ----------------------------------------------------------------------------- driver


def default_nuclei(shape: tuple[int, ...]) -> int:
    """As many nuclei per voxel as the demo stack."""
    return round(DEMO_NUCLEI * math.prod(shape) / math.prod(DEMO_SHAPE))


def synth_main(source: str, shape: str, nuclei: str, chunks: str) -> None:
    """Draw the stack and write it with its truth (runs in its own subprocess, see make_input)."""
    from nucflow import io, synth

    size = tuple(map(int, shape.split(",")))
    made = synth.make_nuclei(size, n_nuclei=int(nuclei), diameter=DIAMETER, seed=SEED)
    blocks = tuple(map(int, chunks.split(",")))
    io.write_ome_zarr(
        source, made.image, made.voxel_size, labels={"truth": made.truth}, chunks=blocks
    )


def make_input(folder: Path, shape: tuple[int, ...], nuclei: int, chunks: tuple[int, ...]) -> Path:
    """Write the synthetic stack from a subprocess.

    The parent must stay small: Python starts children with vfork, and Linux carries the
    parent's RSS high-water mark into a child's ``ru_maxrss`` at exec.
    """
    source = folder / "input.ome.zarr"
    as_text = [",".join(map(str, v)) for v in (shape, chunks)]
    cmd = [sys.executable, __file__, "_synth", str(source), as_text[0], str(nuclei), as_text[1]]
    subprocess.run(cmd, check=True)
    return source


def read_level0(path: Path) -> np.ndarray:
    import zarr

    return zarr.open_array(str(path / "0"), mode="r")[...]


def run_nucflow(
    source: Path, folder: Path, chunks: tuple[int, ...], settings: list[str]
) -> tuple[dict, dict]:
    output = folder / "nucflow"
    if output.exists():  # an earlier repeat's
        shutil.rmtree(output)
    code = "from nucflow.cli import main; raise SystemExit(main())"
    cmd = [
        sys.executable,
        "-c",
        code,
        "run",
        "--input",
        str(source),
        "--output",
        str(output),
        "--chunks",
        *map(str, chunks),
        *[arg for setting in settings for arg in ("--set", setting)],
    ]
    measured = run_measured(cmd, folder / "nucflow.log")
    record = json.loads((output / "run.json").read_text())
    return measured, record


def run_reference(source: Path, folder: Path) -> tuple[dict, dict]:
    out_npy, out_json = folder / "reference.npy", folder / "reference.json"
    run_json = folder / "nucflow" / "run.json"
    cmd = [
        sys.executable,
        __file__,
        "_reference",
        str(source),
        str(run_json),
        str(out_npy),
        str(out_json),
    ]
    measured = run_measured(cmd, folder / "reference.log")
    return measured, json.loads(out_json.read_text())


def score(folder: Path, truth: np.ndarray) -> tuple[dict, dict]:
    from nucflow.evaluate import match_instances

    ours = read_level0(folder / "nucflow" / "labels.ome.zarr")
    theirs = np.load(folder / "reference.npy")
    return match_instances(ours, truth), match_instances(theirs, truth)


# ----------------------------------------------------------------------------- report


def _ratio(a: float, b: float) -> str:
    return f"{a / b:6.2f}x" if b else "     -"


def stage_rows(ours: dict[str, float], ref: dict[str, float]) -> list[str]:
    rows = []
    for stage, steps in STAGES.items():
        mine = sum(ours.get(part, 0.0) for part in stage.split("+"))
        theirs = sum(ref.get(s, 0.0) for s in steps)
        detail = " ".join(f"{s} {ref.get(s, 0.0):.2f}" for s in steps)
        rows.append(f"{stage:13s}{mine:9.2f} {theirs:11.2f}  {_ratio(theirs, mine)}  {detail}")
    return rows


def report(args, n_true, ours, record, ref, ref_summary, scores) -> str:
    shape, chunks = tuple(args.shape), tuple(args.chunks)
    lines = [
        f"stack {shape} uint16, voxel {tuple(record['voxel_size_um'])} µm, "
        f"diameter {DIAMETER:g} µm",
        f"truth: {n_true} nuclei (asked {args.nuclei}, seed {SEED})",
        f"nucflow: blocks {chunks}, halo {tuple(record['halo'])}, {record['cluster']}, "
        f"{os.cpu_count()} cores",
        f"reference: whole array, scikit-image {_skimage()}",
        "",
        f"{'stage':12s} {'nucflow s':>9s} {'reference s':>11s}  {'ref/nf':>7s}  reference steps, s",
        *stage_rows(record["timings_s"], ref_summary["timings_s"]),
        f"{'stages sum':12s} {sum(record['timings_s'].values()):9.2f} "
        f"{sum(ref_summary['timings_s'].values()):11.2f}",
        f"{'process wall':12s} {ours['wall']:9.2f} {ref['wall']:11.2f}  "
        f"{_ratio(ref['wall'], ours['wall'])}  (interpreter start, imports, I/O included)",
        f"  median run of {args.repeat} each; its stage times are shown above",
        "",
        f"{'peak RSS MiB':12s} {ours['rss'] / MIB:9.0f} {ref['rss'] / MIB:11.0f}  "
        f"nf/ref {ours['rss'] / ref['rss']:.2f}x",
        f"  sampled tree {ours['rss_sampled'] / MIB:.0f} / {ref['rss_sampled'] / MIB:.0f}, "
        f"ru_maxrss {ours['rss_maxrss'] / MIB:.0f} / {ref['rss_maxrss'] / MIB:.0f} "
        "(nucflow / reference)",
        f"{'threshold':12s} {record.get('threshold', float('nan')):9.2f} "
        f"{ref_summary['threshold']:11.2f}",
        f"{'nuclei found':12s} {record['counts']['nuclei']:9d} {ref_summary['nuclei']:11d}"
        f"  (nucflow truncated: {record['counts']['truncated']})",
    ]
    for key, name in (
        ("f1", "F1 @ IoU 0.5"),
        ("precision", "precision"),
        ("recall", "recall"),
        ("mean_matched_iou", "mean IoU"),
    ):
        lines.append(f"{name:12s} {scores[0][key]:9.3f} {scores[1][key]:11.3f}")
    return "\n".join(lines)


def _skimage() -> str:
    import skimage

    return skimage.__version__


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    zyx = ("Z", "Y", "X")
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 512, 512], metavar=zyx)
    parser.add_argument("--nuclei", type=int, help="default: 150 per 64x256x256 (demo)")
    parser.add_argument("--chunks", type=int, nargs=3, default=[64, 256, 256], metavar=zyx)
    parser.add_argument("--quick", action="store_true", help="64x256x256 stack")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to nucflow run (the reference reads the derived values from its run.json)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each pipeline, alternating; medians shown"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.shape = list(DEMO_SHAPE)
    if args.nuclei is None:
        args.nuclei = default_nuclei(tuple(args.shape))
    return args


def benchmark(args: argparse.Namespace, folder: Path) -> str:
    print(f"drawing {tuple(args.shape)} with {args.nuclei} nuclei in {folder} ...", flush=True)
    source = make_input(folder, tuple(args.shape), args.nuclei, tuple(args.chunks))
    runs: dict[str, list] = {"nucflow": [], "reference": []}
    for i in range(args.repeat):
        print(f"run {i + 1}/{args.repeat}: nucflow ...", flush=True)
        runs["nucflow"].append(run_nucflow(source, folder, tuple(args.chunks), args.set))
        print(f"run {i + 1}/{args.repeat}: whole-array reference ...", flush=True)
        runs["reference"].append(run_reference(source, folder))
    walls = {name: [m["wall"] for m, _ in done] for name, done in runs.items()}
    (ours, record), (ref, ref_summary) = (_median_run(runs[n]) for n in ("nucflow", "reference"))
    truth = read_level0(source / "labels" / "truth")
    scores = score(folder, truth)
    text = report(args, int(truth.max()), ours, record, ref, ref_summary, scores)
    each = "  ".join(
        f"{name} {' '.join(f'{w:.2f}' for w in values)}" for name, values in walls.items()
    )
    return f"{text}\nwall of each run, s: {each}"


def _median_run(runs: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """The run with the median process wall time (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda run: run[0]["wall"])
    return ordered[(len(ordered) - 1) // 2]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True)
        print(benchmark(args, args.keep.resolve()))
        return
    with tempfile.TemporaryDirectory(prefix="nucflow-bench-") as tmp:
        print(benchmark(args, Path(tmp)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_reference"]:
        reference_main(*sys.argv[2:6])
    elif sys.argv[1:2] == ["_synth"]:
        synth_main(*sys.argv[2:6])
    else:
        main()
