"""Stages of a nucflow run and the output directory they fill.

A run lives in its output directory: ``run.json`` says ``"status": "running"`` from the start and
``"complete"`` only after every output is on disk. Intermediate stacks live in ``.work/`` (each
stage leaves a ``.done`` file when finished, so ``--resume`` skips it), segmentation blocks record
their part of the table in ``.work/blocks/`` as they finish (so ``--resume`` redoes only unfinished
blocks), and every final file is written under a temporary name and moved into place.

Flows (``flows/*.py``) compose these stages; stage functions take a :class:`Run` and lazy dask
arrays and return lazy arrays or small results.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import os
import platform
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

import nucflow
from nucflow import filters, fingerprint, io, lock, measure
from nucflow.config import Params
from nucflow.errors import BlockError, ConfigError, NucflowError, OutputError, ParameterError
from nucflow.segment import SegmentParams, segment_block

__all__ = [
    "Run",
    "open_run",
    "preprocess",
    "persist",
    "global_threshold",
    "clean_mask",
    "segment",
    "finish",
    "fail",
    "data_region",
    "segment_halo",
    "blocks_of",
]

WORK = ".work"
RUN_JSON = "run.json"


@dataclass
class Run:
    """One run: its input, resolved parameters, output directory and compute runner."""

    stack: io.Stack
    params: Params
    output: Path
    runner: Any
    config: dict[str, Any]
    resume: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    region: tuple[slice, ...] = ()
    stored: dict[str, Path] = field(default_factory=dict)  # dask name -> .work zarr of persist
    value_ranges: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # of persisted stacks
    lock: lock.OutputLock | None = None  # held from open_run to finish/fail
    lineage: fingerprint.Lineage | None = None  # what --resume may reuse (fingerprint.start)

    @property
    def work(self) -> Path:
        return self.output / WORK

    @property
    def data(self) -> da.Array:
        """The part of the stack that holds data (:attr:`region`), on the run's blocks."""
        return self.stack.data[self.region].rechunk(self.params.chunks)

    @property
    def offset(self) -> tuple[int, ...]:
        """Global coordinates of ``data[0, 0(, 0)]``."""
        return tuple(s.start for s in self.region)

    @property
    def segment_params(self) -> SegmentParams:
        return _segment_params(self.params)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage into run.json's timings."""
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)


# ----------------------------------------------------------------------------- output directory


def open_run(
    stack: io.Stack,
    params: Params,
    output: str | os.PathLike[str],
    *,
    runner: Any,
    config: dict[str, Any],
    resume: bool = False,
    overwrite: bool = False,
) -> Run:
    """Claim the output directory and mark the run as running.

    One run at a time writes to a directory: the run takes its lock (:mod:`nucflow.lock`)
    before changing anything in it, and :func:`finish` or :func:`fail` releases it.

    Raises
    ------
    OutputError
        The directory exists without ``resume``/``overwrite``, is not a nucflow output
        directory, lies inside the input, or another run holds its lock.
    InputChangedError
        ``resume`` and the input is not the one the stored run read.
    """
    out = Path(output).resolve()
    _check_not_inside_input(out, Path(stack.path).resolve())
    if out.exists():
        _claim_existing(out, resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    held = lock.acquire(out)
    try:
        if overwrite:
            _clear(out)
        (out / WORK).mkdir(exist_ok=True)
        before = _read_run_json(out)
        run = Run(stack, params, out, runner, config, resume=resume and before is not None)
        run.lock = held
        run.region = data_region(stack, params.chunks)
        run.facts["data_region"] = [[s.start, s.stop] for s in run.region]
        fingerprint.start(run, before)
        write_run_json(run, "running")
    except BaseException:
        held.release()
        raise
    return run


def _read_run_json(out: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((out / RUN_JSON).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _clear(out: Path) -> None:
    """Empty an output directory for --overwrite, keeping this run's lock."""
    for entry in out.iterdir():
        if entry.name == lock.LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _release(run: Run) -> None:
    if run.lock is not None:
        run.lock.release()


def _segment_params(p: Params) -> SegmentParams:
    return SegmentParams(p.voxel_size, p.peak_radius, p.min_radius, p.max_radius)


def segment_halo(params: Params) -> tuple[int, ...]:
    """Context in voxels per axis that makes a segmentation block exact."""
    return _segment_params(params).halo()


def data_region(stack: io.Stack, chunks: tuple[int, ...]) -> tuple[slice, ...]:
    """Where the stack holds data: the box around its written chunks (zarr) or all of it.

    Chunks never written are not data: they are neither read, thresholded nor segmented, and
    a nucleus at the edge of the box touches the border. A store with no chunk at all
    gives the first block (read as the fill value: an empty result at no cost).
    """
    region = stack.data_region()
    if region is None:
        region = tuple(slice(0, min(c, n)) for c, n in zip(chunks, stack.data.shape, strict=True))
    return region


def _check_not_inside_input(out: Path, source: Path) -> None:
    if out == source or source in out.parents:
        raise OutputError(
            f"--output {out} is inside the input {source}; choose a directory outside it"
        )
    if out in source.parents:
        raise OutputError(f"--output {out} contains the input {source}; choose another directory")


def _claim_existing(out: Path, *, resume: bool, overwrite: bool) -> None:
    if not out.is_dir():
        raise OutputError(f"--output {out} exists and is not a directory; choose another path")
    if holder := lock.holder_of(out):  # say who, whatever else is wrong with the directory
        raise OutputError(
            f"output directory {out} is in use by {holder}; wait for that run to end, or stop "
            "it, or choose another --output"
        )
    is_ours = (out / RUN_JSON).is_file() or (out / lock.LOCK_NAME).is_file()
    empty = not any(p.name != lock.LOCK_NAME for p in out.iterdir())
    if empty:
        return
    if not (resume or overwrite):
        raise OutputError(
            f"output directory {out} exists; pass --resume to continue it or --overwrite to "
            "replace it"
        )
    if not is_ours:
        raise OutputError(
            f"output directory {out} exists and is not a nucflow output (no run.json); "
            "nucflow will not delete it: choose another --output"
        )


def write_run_json(run: Run, status: str, **extra: Any) -> None:
    """Write run.json atomically."""
    p = run.params
    record = {
        "status": status,
        "nucflow": nucflow.__version__,
        "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "input": run.stack.path,
        "shape": list(run.stack.data.shape),
        "dtype": str(run.stack.data.dtype),
        "voxel_size_um": list(p.voxel_size),
        "unit": "micrometer"
        if run.stack.voxel_size_known or run.config.get("voxel_size")
        else "pixel",
        "config": run.config,
        "derived": {k: v for k, v in vars(p).items() if k not in ("voxel_size",)},
        "halo": list(run.segment_params.halo()),
        "cluster": getattr(run.runner, "spec", "threads"),
        "versions": _versions(),
        "timings_s": run.timings,
        **run.facts,
        **extra,
    }
    _write_atomic(run.output / RUN_JSON, json.dumps(record, indent=2, default=_jsonable).encode())


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


def _versions() -> dict[str, str]:
    import dask_image
    import edt
    import scipy
    import skimage

    modules = {"dask": dask, "dask_image": dask_image, "zarr": zarr, "numpy": np, "scipy": scipy}
    modules.update({"scikit-image": skimage, "pandas": pd, "edt": edt})
    found = {name: getattr(m, "__version__", "?") for name, m in modules.items()}
    return {"python": platform.python_version(), **found}


def _write_atomic(path: Path, payload: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(payload)
    os.replace(partial, path)


def fail(run: Run, error: BaseException) -> None:
    """Mark the run as failed (never complete) with the reason; release the output."""
    if run.lock is None or run.lock.lost is None:  # else run.json is another run's now
        write_run_json(run, "failed", error=f"{type(error).__name__}: {error}")
    _release(run)


# ----------------------------------------------------------------------------- stages


def preprocess(run: Run) -> da.Array:
    """Smoothing and background subtraction (lazy, float32).

    Gaussian of ``sigma`` µm (or, with a tissue mask, normalized convolution inside it), then the
    configured background subtraction with ``background_radius`` µm. Each block reads its own
    halo from the input (:func:`nucflow.filters.chain_read`) and refuses NaN/inf voxels.
    """
    p = run.params
    sigma = tuple(p.sigma / v for v in p.voxel_size)
    steps: list[tuple[str, dict[str, Any]]] = []
    if not p.tissue_mask:
        steps.append(("gaussian", {"sigma": sigma}))
    exact_tophat = p.background == "tophat" and max(p.background_downsample) == 1
    if exact_tophat:  # the full-resolution top-hat joins the Gaussian's pass
        footprint = filters.ellipsoid(p.background_radius, p.voxel_size, decomposition="sequence")
        steps.append(("white_tophat", {"footprint": footprint}))
    if p.tissue_mask:
        tissue = io.open_stack(p.tissue_mask).data[run.region].rechunk(p.chunks) > 0
        image = filters.normalized_convolution(
            _refuse_non_finite(run.data, run.stack.path), tissue, sigma
        )
        smoothed = filters.chain(image, steps) if steps else image
    else:
        check = partial(_check_finite, path=run.stack.path) if run.data.dtype.kind == "f" else None
        smoothed = filters.chain_read(
            run.stack.reader, steps, chunks=p.chunks, region=run.region, check=check
        )
    if exact_tophat or p.background == "none":
        return smoothed.astype(np.float32)
    return filters.subtract_background(
        smoothed,
        method=p.background,
        radius=p.background_radius,
        voxel_size=p.voxel_size,
        downsample=p.background_downsample,
    ).rechunk(p.chunks)


_FOOTPRINT_STEPS = {"erosion", "dilation", "opening", "closing", "white_tophat", "black_tophat"}


def configured_filters(run: Run) -> da.Array:
    """The ``filter.steps`` chain in physical units, as one lazy overlapped pass."""
    p = run.params
    steps = []
    for name, given in p.filter_steps:
        if name not in filters.STEPS:
            raise ConfigError(
                f"`filter.steps`: unknown filter {name!r}; use one of {', '.join(filters.STEPS)}"
            )
        steps.append((name, _physical_step(name, dict(given), p.voxel_size)))
    return filters.chain(run.stack.data.rechunk(p.chunks), steps)


def _physical_step(name: str, given: dict[str, Any], voxel: tuple[float, ...]) -> dict[str, Any]:
    """Translate µm lengths (sigma, radius) into the voxel parameters of ``filters``."""
    if "sigma" in given:
        given["sigma"] = tuple(given["sigma"] / v for v in voxel)
    if "size" in given:
        size = tuple(given.pop("size"))
        given["footprint" if name in _FOOTPRINT_STEPS else "size"] = (
            np.ones(size, bool) if name in _FOOTPRINT_STEPS else size
        )
    if "radius" in given:
        radius = given.pop("radius")
        if name in _FOOTPRINT_STEPS:
            given["footprint"] = filters.ellipsoid(radius, voxel, decomposition="sequence")
        else:
            given["size"] = tuple(2 * int(radius / v) + 1 for v in voxel)
    return given


def write_stack(run: Run, image: da.Array, name: str) -> Path:
    """Write a result stack as OME-Zarr into the output directory (streamed block by block)."""
    path = run.output / name
    partial = run.work / name
    if partial.exists():
        shutil.rmtree(partial)
    with dask.config.set(scheduler=run.runner.scheduler):
        io.write_ome_zarr(partial, image, run.params.voxel_size, chunks=run.params.chunks)
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)
    return path


def _refuse_non_finite(image: da.Array, path: str) -> da.Array:
    """Fail the block that holds NaN or infinite voxels, naming it (policy: refuse, exit 2).

    Treating them as background would need a rule for every filter (a Gaussian spreads one NaN
    over its footprint); the check rides on the preprocess pass, which reads every voxel anyway.
    """
    if image.dtype.kind != "f":
        return image
    return image.map_blocks(_check_finite_block, path=path, dtype=image.dtype, meta=image._meta)


def _check_finite_block(block: np.ndarray, *, path: str, block_info: dict) -> np.ndarray:
    where = tuple(slice(a, b) for a, b in block_info[0]["array-location"])
    _check_finite(block, where, path=path)
    return block


def _check_finite(block: np.ndarray, where: tuple[slice, ...], *, path: str) -> None:
    bad = block.size - int(np.count_nonzero(np.isfinite(block)))
    if bad:
        raise ParameterError(
            f"input {path} has {bad} NaN or infinite voxel(s) in block {_fmt_region(where)}; "
            "replace them (e.g. with 0) before running nucflow"
        )


def persist(run: Run, array: da.Array, name: str, *, label: str) -> da.Array:
    """Write an intermediate stack to ``.work/<name>.zarr`` (once) and read it back lazily.

    A numeric (non-bool) stack's minimum and maximum ride on the same pass and are kept in
    ``run.value_ranges`` (and in ``<name>.done``, for ``--resume``): the threshold needs them
    and would otherwise read the whole stack once more.
    """
    path = run.work / f"{name}.zarr"
    done = run.work / f"{name}.done"
    if fingerprint.reusable(run, name, path, done):
        value_range = json.loads(done.read_text() or "null")
    else:
        if path.exists():
            shutil.rmtree(path)
        # filters may have grown small chunks to fit their halo; store on the run's block grid.
        # Float intermediates are stored raw: compressing noise costs 3x the write for ~20%.
        # Every chunk is written: testing each for emptiness costs more than it saves here.
        options: dict[str, Any] = {"config": {"write_empty_chunks": True}}
        if array.dtype.kind == "f":
            options["compressors"] = None
        array = array.rechunk(run.params.chunks)
        store = da.to_zarr(array, str(path), compute=False, **options)
        if array.dtype == bool:
            run.runner.compute(store, label=label)
            value_range = None
        else:
            _, low, high = run.runner.compute(store, array.min(), array.max(), label=label)
            value_range = [low.item(), high.item()]
        _write_atomic(done, json.dumps(value_range).encode())
        fingerprint.record(run, name)
    stored = da.from_zarr(str(path))
    run.stored[stored.name] = path
    if value_range is not None:
        run.value_ranges[stored.name] = tuple(value_range)
    return stored


def global_threshold(run: Run, image: da.Array) -> float:
    """The foreground threshold of the whole stack, from one global histogram pass."""
    p = run.params
    done = run.work / "threshold.json"
    if fingerprint.reusable(run, "threshold", done):
        value = json.loads(done.read_text())["threshold"]
    elif p.threshold_method == "value":
        if p.threshold_value is None:
            raise ConfigError("`threshold.method` is value but `threshold.value` is null; set both")
        value = float(p.threshold_value)
    else:
        with dask.config.set(scheduler=run.runner.scheduler):
            value = float(
                filters.threshold(
                    image, method=p.threshold_method, value_range=run.value_ranges.get(image.name)
                )
            )
        value *= p.threshold_factor
    _write_atomic(done, json.dumps({"threshold": value}).encode())
    fingerprint.record(run, "threshold")
    run.facts["threshold"] = value
    return value


def clean_mask(run: Run, image: da.Array, threshold: float) -> da.Array:
    """Foreground mask: threshold, opening, hole filling, small-object removal (bool).

    The thresholded, opened mask and the filled mask are stored in ``.work`` (compressed bool
    stacks are cheap to write and read back); without that, dask fuses each step into every
    pass of the global steps after it and computes it several times. Hole filling and
    small-object removal are global: a hole or an object may span blocks.
    """
    p = run.params
    mask = image > threshold
    if p.opening_radius > 0:
        mask = filters.opening(mask, filters.ellipsoid(p.opening_radius, p.voxel_size))
    # Stored once (a compressed bool stack is cheap to read back): dask would otherwise fuse
    # the read, threshold and opening into every pass of the global steps below.
    mask = persist(run, mask, "opened", label="threshold")
    min_voxels = int(p.min_volume / math.prod(p.voxel_size))
    if p.fill_holes:
        mask = filters.fill_holes(mask)
        if min_voxels > 0:
            mask = persist(run, mask, "filled", label="fill holes")
    if min_voxels > 0:
        mask = filters.remove_small_objects(mask, min_voxels)
    return mask


def blocks_of(
    shape: Sequence[int], chunks: Sequence[int]
) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """(grid index, core slices) of every block of ``chunks`` tiling ``shape``."""
    grid = [range(0, n, c) for n, c in zip(shape, chunks, strict=True)]
    for starts in itertools.product(*grid):
        index = tuple(s // c for s, c in zip(starts, chunks, strict=True))
        core = tuple(slice(s, min(s + c, n)) for s, c, n in zip(starts, chunks, shape, strict=True))
        yield index, core


def segment(run: Run, mask: da.Array) -> pd.DataFrame:
    """Label every block's core with its halo, write the label image, gather the table.

    Each task reads its padded mask block and its core's intensities, writes its core of
    ``labels.ome.zarr`` (only if it holds a nucleus) and its part of the table to
    ``.work/blocks/``; finished blocks are skipped on ``--resume``.
    """
    p = run.params
    shape = tuple(mask.shape)
    full_shape = tuple(run.stack.data.shape)
    if mask.name not in run.stored:
        mask = persist(run, mask, "mask", label="mask")
    # Tasks read their blocks themselves: a graph of one task per block, no pixels in it.
    mask_store = zarr.open_array(str(run.stored[mask.name]), mode="r")
    labels_path = run.output / "labels.ome.zarr"
    parts_dir = run.work / "blocks"
    # Labels and block parts are reused only with the fingerprint they were made with.
    reuse = fingerprint.reusable(run, "segment", labels_path, parts_dir)
    if reuse:
        labels = zarr.open_array(str(labels_path / "0"), mode="r+")
    else:
        shutil.rmtree(parts_dir, ignore_errors=True)
        labels = io.create_label_zarr(
            labels_path, full_shape, p.chunks, p.voxel_size, overwrite=True
        )
    fingerprint.record(run, "segment")  # before any block: every part from now on is of it
    parts_dir.mkdir(exist_ok=True)
    readers = _intensity_readers(run)
    halo = run.segment_params.halo()
    tasks, part_files = [], []
    for index, core in blocks_of(shape, p.chunks):
        part = parts_dir / ("_".join(map(str, index)) + ".parquet")
        part_files.append(part)
        if reuse and part.exists():
            continue
        padded = tuple(
            slice(max(0, c.start - h), min(n, c.stop + h))
            for c, h, n in zip(core, halo, shape, strict=True)
        )
        tasks.append(
            dask.delayed(_segment_task, pure=False)(
                mask_store,
                readers,
                labels,
                run.segment_params,
                padded=padded,
                core=core,
                offset=run.offset,
                shape=full_shape,
                part=str(part),
            )
        )
    run.facts["blocks"] = {"total": len(part_files), "computed": len(tasks)}
    if tasks:
        run.runner.compute(*tasks, label="segment")
    # ParquetFile, not pd.read_parquet: that imports pyarrow.dataset (0.3 s)
    totals = measure.combine([pq.ParquetFile(f).read().to_pandas() for f in part_files])
    return measure.finalize(
        totals,
        voxel_size=p.voxel_size,
        shape=shape,
        origin=run.offset,
        max_radius=p.max_radius,
        channel_suffixes=list(readers),
    )


def _intensity_readers(run: Run) -> dict[str, Any]:
    """Suffix -> reader: the segmentation channel first, then ``measure.channels``."""
    readers = {"": run.stack.reader}
    for c in run.params.channels:
        readers[f"_c{c}"] = io.open_stack(run.stack.path, channel=c).reader
    return readers


def _segment_task(
    mask_store: zarr.Array,
    readers: dict[str, Any],
    labels: zarr.Array,
    params: SegmentParams,
    *,
    padded: tuple[slice, ...],
    core: tuple[slice, ...],
    offset: tuple[int, ...],
    shape: tuple[int, ...],
    part: str,
) -> int:
    """Segment one block; ``padded`` and ``core`` index the mask, which starts at ``offset``."""
    mask_region = padded
    padded, core = _shifted(padded, offset), _shifted(core, offset)
    try:
        mask = np.asarray(mask_store[mask_region], dtype=bool)
        intensities = {suffix: reader[core] for suffix, reader in readers.items()}
        return _segment_core(mask, intensities, labels, params, padded, core, shape, part)
    except NucflowError as e:
        raise type(e)(f"block {_fmt_region(core)}: {e}") from e
    except Exception as e:
        raise BlockError(
            f"block {_fmt_region(core)} failed: {type(e).__name__}: {e}; if it ran out of "
            "memory, rerun with smaller --chunks"
        ) from e


def _shifted(region: tuple[slice, ...], offset: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(s.start + o, s.stop + o) for s, o in zip(region, offset, strict=True))


def _fmt_region(region: tuple[slice, ...]) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in region) + "]"


def _segment_core(
    mask: np.ndarray,
    intensities: dict[str, np.ndarray],
    labels: zarr.Array,
    params: SegmentParams,
    padded: tuple[slice, ...],
    core: tuple[slice, ...],
    shape: tuple[int, ...],
    part: str,
) -> int:
    origin = tuple(s.start for s in padded)
    local_core = tuple(slice(c.start - o, c.stop - o) for c, o in zip(core, origin, strict=True))
    lab, seed_distance = segment_block(
        mask, params, origin=origin, global_shape=shape, core=local_core
    )
    if lab.any():
        labels[core] = lab
    stats = measure.block_stats(lab, seed_distance, intensities, origin=[c.start for c in core])
    _write_atomic(Path(part), stats.to_parquet())
    return len(stats)


# ----------------------------------------------------------------------------- outputs


def finish_stack(run: Run, path: Path) -> dict[str, Any]:
    """Mark a filter-only run complete."""
    if run.lock is not None:
        run.lock.check()  # never "complete" over another run's output
    shutil.rmtree(run.work, ignore_errors=True)
    counts = {"stack": path.name}
    write_run_json(run, "complete", counts=counts)
    _release(run)
    return counts


def finish(run: Run, table: pd.DataFrame) -> dict[str, Any]:
    """Write the table, QC pictures and the final run.json; remove the intermediates."""
    p = run.params
    with run.stage("write"):
        _write_table(run, table)
        if p.qc:
            from nucflow import qc

            labels = da.from_zarr(str(run.output / "labels.ome.zarr" / "0"))[run.region]
            windows = qc.write(run.output / "qc", run.data, labels, table, origin=run.offset)
            run.facts["qc_outline_windows_yx"] = [[[s.start, s.stop] for s in w] for w in windows]
    truncated = int(table["truncated"].sum()) if len(table) else 0
    counts = {"nuclei": len(table), "truncated": truncated}
    if truncated:
        warnings.warn(
            f"{truncated} nuclei reached segment.max_radius = {p.max_radius:g}; they may be cut: "
            f"rerun with --set segment.max_radius={1.5 * p.max_radius:g} (or a larger --diameter)",
            stacklevel=2,
        )
    if run.lock is not None:
        run.lock.check()  # never "complete" over another run's output
    shutil.rmtree(run.work, ignore_errors=True)
    write_run_json(run, "complete", counts=counts)
    _release(run)
    return counts


def _write_table(run: Run, table: pd.DataFrame) -> None:
    unit = "micrometer" if run.stack.voxel_size_known or run.config.get("voxel_size") else "pixel"
    meta = {"voxel_size": list(run.params.voxel_size), "unit": unit, "nucflow": nucflow.__version__}
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata(
        {**(arrow.schema.metadata or {}), b"nucflow": json.dumps(meta).encode()}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(arrow, sink)
    _write_atomic(run.output / "nuclei.parquet", sink.getvalue().to_pybytes())
    _write_atomic(run.output / "nuclei.csv", table.to_csv(index=False).encode())
