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
import signal
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
REGIONPROPS = (
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


def run_measured(cmd: list[str], log: Path, timeout: float | None = None) -> dict[str, float]:
    """Run ``cmd``; wall time (s), sampled tree peak and ru_maxrss (bytes). Fails loudly.

    After ``timeout`` seconds the command's process group is killed and ``stopped`` is True:
    its wall time is then a lower bound.
    """
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = PeakSampler(proc.pid)
        sampler.start()
        timer = threading.Timer(timeout or 0, os.killpg, (proc.pid, signal.SIGKILL))
        if timeout:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    sampled = sampler.stop()
    if timeout and proc.returncode == -signal.SIGKILL:
        return {"wall": wall, "rss": max(sampled, usage.ru_maxrss * 1024), "stopped": True}
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
    return _mask_steps(pre, threshold, voxel, d, t), threshold


def _mask_steps(pre: np.ndarray, threshold: float, voxel: tuple, d: dict, t: dict) -> np.ndarray:
    """Threshold, opening, hole filling, small-object removal."""
    import scipy.ndimage as ndi
    import skimage.morphology as morph

    from nucflow.filters import ellipsoid

    with _step(t, "opening"):
        mask = morph.opening(pre > threshold, ellipsoid(d["opening_radius"], voxel))
    with _step(t, "fill_holes"):
        mask = ndi.binary_fill_holes(mask)
    with _step(t, "remove_small"):
        mask = morph.remove_small_objects(mask, max_size=int(d["min_volume"] / math.prod(voxel)))
    return mask


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
        table = regionprops_table(
            labels, intensity_image=image, properties=REGIONPROPS, spacing=voxel
        )
    with _step(t, "save"):
        np.save(out_npy, labels)
    summary = {"timings_s": t, "threshold": threshold, "nuclei": len(table["label"])}
    Path(out_json).write_text(json.dumps(summary))


# ----------------------------------------------------------------------------- naive Dask


def naive_graph(image, voxel: tuple, d: dict, chunks: tuple):
    """The reference's steps as a user writes them from the dask / dask-image docs.

    ``map_overlap`` Gaussian and white top-hat (depth = each filter's reach), a global Otsu
    threshold from a dask histogram, then per chunk, with no overlap: opening, hole filling,
    small-object removal, EDT, ``peak_local_max``, watershed and ``regionprops_table``; labels
    made unique by a per-chunk offset, tables concatenated. Returns the top-hat and a function
    of the threshold giving (labels, list of delayed tables).
    """
    import dask
    import dask.array as da
    import scipy.ndimage as ndi
    import skimage.morphology as morph

    from nucflow.filters import ellipsoid

    image = image.rechunk(chunks)
    sigma = [d["sigma"] / v for v in voxel]
    smooth = image.astype(np.float32).map_overlap(
        ndi.gaussian_filter,
        depth=tuple(int(4 * s + 0.5) for s in sigma),
        boundary="reflect",
        sigma=sigma,
    )
    footprint = ellipsoid(d["background_radius"], voxel, decomposition="sequence")
    top = smooth.map_overlap(
        morph.white_tophat,
        depth=tuple(math.ceil(d["background_radius"] / v) for v in voxel),
        boundary="reflect",
        footprint=footprint,
    )

    def segment(threshold: float):
        labels = da.map_blocks(
            _naive_chunk, top, threshold=threshold, voxel=voxel, d=d, dtype=np.uint32
        )
        tables = [
            dask.delayed(_naive_table)(lab, img, voxel, [s.start for s in where])
            for lab, img, where in zip(
                labels.to_delayed().ravel(),
                image.to_delayed().ravel(),
                _chunk_slices(labels.chunks),
                strict=True,
            )
        ]
        return labels, tables

    return top, segment


def _chunk_slices(chunks) -> list[tuple[slice, ...]]:
    import itertools

    starts = [np.cumsum((0, *c)) for c in chunks]
    return [
        tuple(slice(int(s[i]), int(s[i + 1])) for s, i in zip(starts, index, strict=True))
        for index in itertools.product(*(range(len(c)) for c in chunks))
    ]


def _naive_chunk(top: np.ndarray, *, threshold: float, voxel, d, block_info=None) -> np.ndarray:
    """One chunk on its own: the reference's mask and labels steps; labels offset per chunk."""
    t: dict[str, float] = {}
    mask = _mask_steps(top, threshold, voxel, d, t)
    labels = reference_labels(mask, voxel, d, t).astype(np.uint32)
    index = block_info[0]["chunk-location"]
    number = int(np.ravel_multi_index(index, block_info[0]["num-chunks"]))
    labels[labels > 0] += np.uint32(number << 16)  # unique across chunks (< 65536 per chunk)
    return labels


def _naive_table(labels: np.ndarray, image: np.ndarray, voxel, origin):
    import pandas as pd
    from skimage.measure import regionprops_table

    table = pd.DataFrame(
        regionprops_table(labels, intensity_image=image, properties=REGIONPROPS, spacing=voxel)
    )
    for axis, (o, v) in enumerate(zip(origin, voxel, strict=True)):
        table[f"centroid-{axis}"] += o * v
    return table


def naive_main(source: str, run_json: str, out_zarr: str, out_json: str, chunks: str) -> None:
    """Run the naive Dask pipeline (own subprocess): labels to zarr, table to parquet."""
    import dask
    import dask.array as da
    import pandas as pd
    import skimage.filters
    import zarr

    record = json.loads(Path(run_json).read_text())
    voxel, derived = tuple(record["voxel_size_um"]), record["derived"]
    blocks = tuple(map(int, chunks.split(",")))
    image = da.from_zarr(str(Path(source) / "0"))
    t: dict[str, float] = {}
    with dask.config.set(scheduler="threads"):
        top, segment = naive_graph(image, voxel, derived, blocks)
        with _step(t, "threshold"):
            high = float(image.max().compute())  # the top-hat stays within the input's range
            counts, edges = da.histogram(top, bins=256, range=(0.0, high))
            counts = counts.compute()
            centres = (edges[:-1] + edges[1:]) / 2
            threshold = float(skimage.filters.threshold_otsu(hist=(counts, centres)))
        with _step(t, "segment+table"):
            labels, tables = segment(threshold)
            target = zarr.open_array(
                out_zarr, mode="w", shape=labels.shape, chunks=blocks, dtype=np.uint32
            )
            store = da.store(labels, target, lock=False, compute=False)
            _, *parts = dask.compute(store, *tables)
        with _step(t, "write"):
            table = pd.concat(parts, ignore_index=True)
            table.to_parquet(Path(out_zarr).with_suffix(".parquet"))
    summary = {"timings_s": t, "threshold": threshold, "nuclei": len(table)}
    Path(out_json).write_text(json.dumps(summary))


# ----------------------------------------------------------------------------- kernel floor


def floor_main(source: str, run_json: str, out_json: str, chunks: str) -> None:
    """Each stage's fastest single-call kernel on one block (one thread, best of 3, seconds).

    preprocess: a float32 Gaussian; threshold: a 1024-bin histogram; mask: the blob scale's
    Gaussian and a connected-component labelling; segment: the EDT (``edt``); table: per-label
    sums (``np.bincount``); write: storing the block's labels compressed. Read: decompressing
    the block. The floor of a run is the sum x blocks / cores.
    """
    import tempfile

    import edt
    import scipy.ndimage as ndi
    import zarr

    record = json.loads(Path(run_json).read_text())
    voxel, d = tuple(record["voxel_size_um"]), record["derived"]
    blocks = tuple(map(int, chunks.split(",")))
    array = zarr.open_array(str(Path(source) / "0"), mode="r")
    core = tuple(slice(0, min(b, n)) for b, n in zip(blocks, array.shape, strict=True))
    block = np.asarray(array[core])
    sigma = [d["sigma"] / v for v in voxel]
    smooth = ndi.gaussian_filter(block.astype(np.float32), sigma)
    mask = smooth > smooth.mean() + 2 * smooth.std()
    labels, _ = ndi.label(mask)
    blob = [d["blob_radius"] / math.sqrt(len(voxel)) / v for v in voxel]
    weights = tuple(v / min(voxel) for v in voxel)
    kernels = {
        "read": lambda: array[core],
        "preprocess": lambda: ndi.gaussian_filter(block.astype(np.float32), sigma),
        "threshold": lambda: np.histogram(smooth, bins=1024),
        "mask": lambda: (ndi.gaussian_filter(smooth, blob), ndi.label(mask)),
        "segment": lambda: edt.edtsq(mask.view(np.uint8), anisotropy=weights),
        "table": lambda: np.bincount(labels.ravel(), weights=block.ravel()),
    }
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = zarr.create_array(
            tmp + "/l.zarr", shape=labels.shape, chunks=labels.shape, dtype=labels.dtype
        )
        kernels["write"] = lambda: out.__setitem__(Ellipsis, labels)
        for name, kernel in kernels.items():
            times = []
            for _ in range(3):
                start = time.perf_counter()
                kernel()
                times.append(time.perf_counter() - start)
            best[name] = min(times)
    Path(out_json).write_text(json.dumps({"block": list(block.shape), "seconds": best}))


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


def tile_main(source: str, target: str, tiles: str, chunks: str) -> None:
    """Tile a stack (no truth: its ids would repeat) into a larger one, streamed."""
    import dask.array as da

    from nucflow import io

    stack = io.open_stack(source)
    reps = tuple(map(int, tiles.split(",")))
    blocks = tuple(map(int, chunks.split(",")))
    io.write_ome_zarr(target, da.tile(stack.data, reps), stack.voxel_size, chunks=blocks)


def make_input(folder: Path, shape: tuple[int, ...], nuclei: int, chunks: tuple[int, ...]) -> Path:
    """Write the synthetic stack from a subprocess.

    The parent must stay small: Python starts children with vfork, and Linux carries the
    parent's RSS high-water mark into a child's ``ru_maxrss`` at exec.
    """
    source = folder / "input.ome.zarr"
    if not source.exists():
        as_text = [_csv(shape), _csv(chunks)]
        cmd = [sys.executable, __file__, "_synth", str(source), as_text[0], str(nuclei), as_text[1]]
        subprocess.run(cmd, check=True)
    return source


def make_tiled(folder: Path, base: Path, tiles: tuple[int, ...], chunks: tuple[int, ...]) -> Path:
    target = folder / "large.ome.zarr"
    if not target.exists():
        cmd = [sys.executable, __file__, "_tile", str(base), str(target), _csv(tiles), _csv(chunks)]
        subprocess.run(cmd, check=True)
    return target


def _csv(values) -> str:
    return ",".join(map(str, values))


def read_level0(path: Path) -> np.ndarray:
    import zarr

    return zarr.open_array(str(path / "0"), mode="r")[...]


def run_nucflow(
    source: Path, folder: Path, chunks: tuple[int, ...], settings: list[str], name="nucflow"
) -> tuple[dict, dict]:
    output = folder / name
    if output.exists():  # an earlier repeat's
        shutil.rmtree(output)
    code = "from nucflow.cli import console; console()"  # what the nucflow script runs
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
    measured = run_measured(cmd, folder / f"{name}.log")
    record = json.loads((output / "run.json").read_text())
    return measured, record


def run_reference(source: Path, folder: Path) -> tuple[dict, dict]:
    out_npy, out_json = folder / "reference.npy", folder / "reference.json"
    run_json = folder / "nucflow" / "run.json"
    cmd = [sys.executable, __file__, "_reference", str(source), str(run_json)]
    measured = run_measured([*cmd, str(out_npy), str(out_json)], folder / "reference.log")
    return measured, json.loads(out_json.read_text())


def run_naive(
    source: Path,
    folder: Path,
    chunks: tuple[int, ...],
    name: str = "naive",
    timeout: float | None = None,
) -> tuple[dict, dict]:
    out_zarr, out_json = folder / f"{name}.zarr", folder / f"{name}.json"
    run_json = folder / "nucflow" / "run.json"
    cmd = [sys.executable, __file__, "_naive", str(source), str(run_json), str(out_zarr)]
    log = folder / f"{name}.log"
    measured = run_measured([*cmd, str(out_json), _csv(chunks)], log, timeout)
    if measured.get("stopped"):
        return measured, {"nuclei": -1, "timings_s": {}}
    return measured, json.loads(out_json.read_text())


def run_floor(source: Path, folder: Path, chunks: tuple[int, ...]) -> dict:
    out_json = folder / "floor.json"
    run_json = folder / "nucflow" / "run.json"
    cmd = [sys.executable, __file__, "_floor", str(source), str(run_json), str(out_json)]
    subprocess.run([*cmd, _csv(chunks)], check=True)
    return json.loads(out_json.read_text())


def seam_errors(chunked: np.ndarray, whole: np.ndarray) -> dict[str, int]:
    """Nuclei of the one-block result that chunking changed (no chunked object at IoU >= 0.5),
    split (two or more chunked objects each at least half inside), and chunked fragments."""
    from nucflow.evaluate import accuracy_report

    found = accuracy_report(chunked, whole)
    matched = round(found["recall"] * found["true_nuclei"])
    return {
        "changed": found["true_nuclei"] - matched,
        "split": found["splits"],
        "fragments": found["found_nuclei"] - matched,
        "voxels": int(np.count_nonzero((chunked > 0) != (whole > 0))),
        "identical": bool(np.array_equal(chunked, whole)),
    }


def _labels(folder: Path, name: str) -> np.ndarray:
    import zarr

    if name == "reference":
        return np.load(folder / "reference.npy")
    if name.startswith("naive"):
        return zarr.open_array(str(folder / f"{name}.zarr"), mode="r")[...]
    return read_level0(folder / name / "labels.ome.zarr")


# ----------------------------------------------------------------------------- report


def _ratio(a: float, b: float) -> str:
    return f"{a / b:6.2f}x" if b else "     -"


def stage_rows(ours: dict[str, float], ref: dict[str, float] | None, floor: dict) -> list[str]:
    rows = []
    for stage, steps in STAGES.items():
        mine = sum(ours.get(part, 0.0) for part in stage.split("+"))
        low = sum(floor.get(part, 0.0) for part in stage.split("+"))
        if stage == "preprocess":
            low += floor.get("read", 0.0)
        row = f"{stage:13s}{mine:9.2f} {low:8.2f} {_ratio(mine, low)}"
        if ref is not None:
            theirs = sum(ref.get(s, 0.0) for s in steps)
            detail = " ".join(f"{s} {ref.get(s, 0.0):.2f}" for s in steps)
            row += f" {theirs:11.2f}  {_ratio(theirs, mine)}  {detail}"
        rows.append(row)
    return rows


def report(args, size: dict, runs: dict, floor: dict, scores: dict, seams: dict) -> str:
    """The three-way table of one stack: pipelines, then nucflow's stages against the floor."""
    record = runs["nucflow"][1]
    shape, chunks = size["shape"], tuple(args.chunks)
    voxels, cores = math.prod(shape), os.cpu_count() or 1
    n_blocks = math.prod(math.ceil(n / c) for n, c in zip(shape, chunks, strict=True))
    floor_s = {k: v * n_blocks / cores for k, v in floor["seconds"].items()}
    lines = [
        f"stack {tuple(shape)} uint16 ({voxels / 1e6:,.1f} Mvoxel), voxel "
        f"{tuple(record['voxel_size_um'])} µm, diameter {DIAMETER:g} µm, {size['about']}",
        f"blocks {chunks} ({n_blocks}), halo {tuple(record['halo'])}, threads, {cores} cores; "
        f"median of {size['repeat']} alternating run(s) each; scikit-image {_skimage()}",
        "",
        f"{'pipeline':12s} {'wall s':>8s} {'Mvox/s':>7s} {'/core':>6s} {'vs ref':>7s} "
        f"{'peak MiB':>8s} {'nuclei':>7s} {'F1@0.5':>6s}  seam errors vs one block",
    ]
    ref_wall = runs["reference"][0]["wall"] if "reference" in runs else None
    for name in ("reference", "naive", "nucflow"):
        if name not in runs:
            continue
        measured, summary = runs[name]
        nuclei = summary["counts"]["nuclei"] if name == "nucflow" else summary["nuclei"]
        rate = voxels / measured["wall"] / 1e6
        versus = _ratio(ref_wall, measured["wall"]) if ref_wall else "      -"
        f1 = f"{scores[name]['f1']:6.3f}" if name in scores else "     -"
        if measured.get("stopped"):  # killed at the timeout: bounds only
            lines.append(
                f"{LABELS[name]:12s} >{measured['wall']:7.1f} <{rate:6.2f} <{rate / cores:5.2f} "
                f"{versus:>7s} {measured['rss'] / MIB:8.0f}       -      -  stopped at the "
                "timeout (--naive-timeout) before it finished"
            )
            continue
        lines.append(
            f"{LABELS[name]:12s} {measured['wall']:8.2f} {rate:7.2f} {rate / cores:6.2f} "
            f"{versus:>7s} {measured['rss'] / MIB:8.0f} {nuclei:7d} {f1}  {_seams(name, seams)}"
        )
    total_floor = sum(floor_s.values())
    rate = voxels / total_floor / 1e6
    lines.append(
        f"{'kernel floor':12s} {total_floor:8.2f} {rate:7.2f} {rate / cores:6.2f}"
        f"  (fastest kernel per stage on one block x {n_blocks} blocks / {cores} cores)"
    )
    naive_t = runs["naive"][1]["timings_s"]
    if naive_t:
        lines.append(
            "naive dask passes, s: "
            + " ".join(f"{k} {v:.2f}" for k, v in naive_t.items())
            + "  (Gaussian + top-hat computed in both the threshold and the segment pass)"
        )
    lines += [
        "",
        f"{'stage':12s} {'nucflow s':>9s} {'floor s':>8s} {'nf/floor':>7s}"
        + (f" {'reference s':>11s}  {'ref/nf':>7s}  reference steps, s" if ref_wall else ""),
        *stage_rows(
            record["timings_s"],
            runs["reference"][1]["timings_s"] if ref_wall else None,
            floor_s,
        ),
        f"{'stages sum':12s} {sum(record['timings_s'].values()):9.2f} {total_floor:8.2f}",
        f"floor kernels on one block {tuple(floor['block'])}, s: "
        + " ".join(f"{k} {v:.3f}" for k, v in floor["seconds"].items()),
        "wall of each run, s: "
        + "  ".join(f"{LABELS[n]} {' '.join(f'{w:.2f}' for w in size['walls'][n])}" for n in runs),
    ]
    return "\n".join(lines)


LABELS = {"reference": "reference", "naive": "naive dask", "nucflow": "nucflow"}


def _seams(name: str, seams: dict) -> str:
    if name == "reference":
        return "- (one block)"
    if name not in seams:
        return "not measured (no one-block result at this size)"
    e = seams[name]
    if e["identical"]:
        return "none (labels identical to the one-block run)"
    return (
        f"{e['changed']} nuclei changed, {e['split']} split, {e['fragments']} fragments, "
        f"{e['voxels']} voxels differ in the mask"
    )


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
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=("small", "large"),
        default=["small", "large"],
        help="small: --shape with the reference; large: --shape tiled by --tiles (no reference)",
    )
    parser.add_argument(
        "--tiles", type=int, nargs=3, default=[2, 4, 4], metavar=zyx, help="large = small tiled"
    )
    parser.add_argument("--quick", action="store_true", help="64x256x256 stack only")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (reuses inputs)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to nucflow run (the others read the derived values from its run.json)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each pipeline, alternating; medians shown"
    )
    parser.add_argument(
        "--large-repeat", type=int, help="runs on the large stack (default --repeat)"
    )
    parser.add_argument(
        "--naive-timeout",
        type=float,
        metavar="S",
        help="stop the naive pipeline on the large stack after S s (its wall: a lower bound)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.sizes = list(DEMO_SHAPE), ["small"]
    if args.nuclei is None:
        args.nuclei = default_nuclei(tuple(args.shape))
    if args.large_repeat is None:
        args.large_repeat = args.repeat
    return args


def benchmark(args: argparse.Namespace, folder: Path) -> str:
    chunks = tuple(args.chunks)
    print(f"drawing {tuple(args.shape)} with {args.nuclei} nuclei in {folder} ...", flush=True)
    small = make_input(folder, tuple(args.shape), args.nuclei, chunks)
    texts = []
    for size in args.sizes:
        work = folder / size
        work.mkdir(exist_ok=True)
        if size == "small":
            info = {"source": small, "shape": tuple(args.shape), "repeat": args.repeat}
            info["about"] = f"{args.nuclei} nuclei asked (seed {SEED})"
        else:
            shape = tuple(n * t for n, t in zip(args.shape, args.tiles, strict=True))
            print(f"tiling to {shape} ...", flush=True)
            source = make_tiled(folder, small, tuple(args.tiles), chunks)
            info = {"source": source, "shape": shape, "repeat": args.large_repeat}
            info["about"] = f"the small stack tiled {tuple(args.tiles)}"
        texts.append(bench_size(args, work, info))
    return "\n\n".join(texts)


def bench_size(args: argparse.Namespace, work: Path, info: dict) -> str:
    source, chunks = info["source"], tuple(args.chunks)
    names = ["nucflow", "naive"] + (["reference"] if "small" in work.name else [])
    runs: dict[str, list] = {name: [] for name in names}
    for i in range(info["repeat"]):
        for name in names:
            print(f"{work.name} run {i + 1}/{info['repeat']}: {LABELS[name]} ...", flush=True)
            if name == "nucflow":
                runs[name].append(run_nucflow(source, work, chunks, args.set))
            elif name == "naive":
                timeout = args.naive_timeout if "large" in work.name else None
                runs[name].append(run_naive(source, work, chunks, timeout=timeout))
            else:
                runs[name].append(run_reference(source, work))
    info["walls"] = {name: [m["wall"] for m, _ in done] for name, done in runs.items()}
    median = {name: _median_run(done) for name, done in runs.items()}
    floor = run_floor(source, work, chunks)
    scores, seams = {}, {}
    if "reference" in runs:
        truth = read_level0(source / "labels" / "truth")
        from nucflow.evaluate import match_instances

        for name in runs:
            scores[name] = match_instances(_labels(work, name), truth)
        print(f"{work.name}: one-block runs for the seam errors ...", flush=True)
        whole = tuple(info["shape"])
        run_nucflow(source, work, whole, args.set, name="nucflow-oneblock")
        run_naive(source, work, whole, name="naive-oneblock")
        for name in ("nucflow", "naive"):
            seams[name] = seam_errors(_labels(work, name), _labels(work, f"{name}-oneblock"))
    return report(args, info, median, floor, scores, seams)


def _median_run(runs: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """The run with the median process wall time (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda run: run[0]["wall"])
    return ordered[(len(ordered) - 1) // 2]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        print(benchmark(args, args.keep.resolve()))
        return
    with tempfile.TemporaryDirectory(prefix="nucflow-bench-") as tmp:
        print(benchmark(args, Path(tmp)))


if __name__ == "__main__":
    commands = {
        "_reference": reference_main,
        "_synth": synth_main,
        "_naive": naive_main,
        "_floor": floor_main,
        "_tile": tile_main,
    }
    if sys.argv[1:2] and sys.argv[1] in commands:
        commands[sys.argv[1]](*sys.argv[2:])
    else:
        main()
