"""A run and its output directory: :class:`Run`, claiming the directory, run.json, failing.

A run lives in its output directory: ``run.json`` says ``"status": "running"`` from the start and
``"complete"`` only after every output is on disk (:mod:`nucflow.pipeline.write`). The directory
is claimed and its manifest kept by :mod:`nucflow.outdir`; one writer at a time by
:mod:`nucflow.lock`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import time
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
import zarr

from nucflow import (
    adapters,
    fingerprint,
    io,
    lock,
    outdir,
    segmenters,
)
from nucflow import progress as progress_report
from nucflow import table as table_stage
from nucflow.cluster.runner import Runner
from nucflow.config import Params
from nucflow.errors import (
    NucflowError,
    OutputError,
    Terminated,
)
from nucflow.segment import SegmentParams
from nucflow.version import __version__

WORK = ".work"


LABELS = "labels.ome.zarr"


RUN_JSON = outdir.RUN_JSON


@dataclass
class Run:
    """One run: its input, resolved parameters, output directory and compute runner."""

    stack: io.Stack
    params: Params
    output: Path
    runner: Runner
    config: dict[str, Any]
    resume: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    region: tuple[slice, ...] = ()
    lock: lock.OutputLock | None = None  # held from open_run to finish/fail
    claim: outdir.Claim | None = None  # the output directory's manifest (open_run)
    lineage: fingerprint.Lineage | None = None  # what --resume may reuse (fingerprint.start)
    progress: progress_report.RunProgress | None = field(
        default=None, repr=False, compare=False
    )  # nucflow.progress.attach
    # A time-lapse: the time points to segment (None: the input has no time axis). Each is
    # segmented by a run of its own (``time`` set, ``.work/t0003/``): nucflow.timelapse.
    timepoints: tuple[int, ...] | None = None
    time: int | None = None

    @property
    def work(self) -> Path:
        root = self.output / WORK
        return root if self.time is None else root / timepoint_folder(self.time)

    def entry(self, name: str) -> Path:
        """``output / name``, listed in the output's manifest first: only listed entries are
        ever deleted by ``--overwrite`` (:mod:`nucflow.outdir`). Call before creating it."""
        return self.claim.entry(name) if self.claim is not None else self.output / name

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
        return segment_params_of(self.params)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage into run.json's timings; report its progress (nucflow.progress)."""
        start = time.perf_counter()
        label = name if self.time is None else f"{name} t{self.time}"
        with progress_report.stage(self, label):
            yield
        self.timings[name] = round(time.perf_counter() - start, 3)


def timepoint_folder(t: int) -> str:
    """The work folder of time point ``t`` of a time-lapse, under ``.work/``."""
    return f"t{t:04d}"


def open_run(
    stack: io.Stack,
    params: Params,
    output: str | os.PathLike[str],
    *,
    runner: Any,
    config: dict[str, Any],
    resume: bool = False,
    overwrite: bool = False,
    timepoints: Sequence[int] | None = None,
) -> Run:
    """Claim the output directory and mark the run as running.

    One run at a time writes to a directory: the run takes its lock (:mod:`nucflow.lock`)
    before changing anything in it, and :func:`finish` or :func:`fail` releases it. Only a
    directory nucflow claimed is reused or emptied, and only the entries it wrote
    (:mod:`nucflow.outdir`). ``timepoints`` (a time-lapse: the time points to segment;
    ``stack`` holds the first) makes the flow segment each of them
    (:func:`nucflow.timelapse.each`).

    Raises
    ------
    OutputError
        The directory exists without ``resume``/``overwrite``, is not a nucflow output
        directory or holds entries nucflow did not write, overlaps an input, or another run
        holds its lock.
    InputChangedError
        ``resume`` and the input is not the one the stored run read.
    """
    out = Path(output).resolve()
    check_apart(out, stack.path, what="the input")
    if params.preprocess.tissue_mask:
        check_apart(out, params.preprocess.tissue_mask, what="preprocess.tissue_mask")
    if out.is_dir() and (holder := lock.holder_of(out)):  # say who, whatever else is wrong
        raise OutputError(
            f"output directory {out} is in use by {holder}; wait for that run to end, or stop "
            "it, or choose another --output"
        )
    outdir.check_claimable(out, resume=resume, overwrite=overwrite)
    made_directory = outdir.make_directory(out)
    held = lock.acquire(out)
    try:  # checked again holding the lock: nothing changes the directory now but this run
        found = outdir.check_claimable(out, resume=resume, overwrite=overwrite)
        claim = outdir.claim(out, found, overwrite=overwrite)
        claim.made_directory = made_directory
        claim.entry(WORK).mkdir(exist_ok=True)
        claim.entry(RUN_JSON)
        before = read_run_json(out) if not claim.fresh else None
        run = Run(stack, params, out, runner, config, resume=resume and before is not None)
        run.claim = claim
        run.timepoints = None if timepoints is None else tuple(timepoints)
        run.lock = held
        run.region = data_region(stack, params.chunks)
        run.facts["data_region"] = [[s.start, s.stop] for s in run.region]
        fingerprint.start(run, before)
        write_run_json(run, "running")
        progress_report.attach(run, partial(write_run_json, run, "running"))
    except BaseException:
        held.release()
        raise
    return run


def check_apart(out: Path, source: str | os.PathLike[str], *, what: str) -> None:
    """Refuse an output that is, holds, or lies inside any path the input ``source`` reads
    (each file of a glob, the zarr hierarchy around an array; symlinks followed).

    Raises
    ------
    OutputError
        Naming the input path and the fix.
    """
    for path in io.input_paths(source):
        if out == path or path in out.parents:
            raise OutputError(
                f"--output {out} is inside {what} {path}; choose a directory outside it"
            )
        if out in path.parents:
            raise OutputError(f"--output {out} contains {what} {path}; choose another directory")


def recorded_run(output: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run.json of a nucflow output directory (its claim's), or None."""
    out = Path(output).resolve()
    found = outdir.read_claim(out)
    record = read_run_json(out)
    if found is None or record is None or record.get("claim") != found.claim_id:
        return None
    return record


def read_run_json(out: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((out / RUN_JSON).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def release(run: Run) -> None:
    if run.lock is not None:
        run.lock.release()


def segment_params_of(p: Params) -> SegmentParams:
    return SegmentParams(
        p.voxel_size, p.segment.peak_radius, p.segment.min_radius, p.segment.max_radius
    )


def segment_halo(params: Params) -> tuple[int, ...]:
    """Context in voxels per axis that makes a segmentation block exact (a python
    segmenter's: ``segment.halo_um``)."""
    if params.segment.method != "builtin":
        halo = segmenters.halo_voxels(params.segment.halo_um, params.voxel_size)
        if params.segment.method == "stardist" and params.segment.model:
            step = adapters.stardist_phase(params.segment.model)  # the network's phase kept
            halo = tuple(-(-h // step) * step for h in halo)
        return halo
    return segment_params_of(params).halo()


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


def write_run_json(run: Run, status: str, **extra: Any) -> None:
    """Write run.json atomically (:func:`run_record`)."""
    table_stage.write_atomic(
        run.output / RUN_JSON, json.dumps(run_record(run, status, **extra), indent=2).encode()
    )


def run_record(run: Run, status: str, **extra: Any) -> dict[str, Any]:
    """What run.json says of the run now, as plain JSON types (the QC report reads it too)."""
    p = run.params
    record = {
        "status": status,
        "claim": run.claim.claim_id if run.claim is not None else None,
        "nucflow": __version__,
        "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "input": run.stack.path,
        "shape": list(run.stack.data.shape),
        "dtype": str(run.stack.data.dtype),
        "voxel_size_um": list(p.voxel_size),
        "unit": "micrometer" if calibrated(run) else "pixel",
        "config": run.config,
        "derived": {k: v for k, v in p.flat().items() if k != "voxel_size"},
        "halo": list(segment_halo(p)),
        "cluster": getattr(run.runner, "spec", "threads"),
        "versions": _versions(),
        "timings_s": run.timings,
        **run.facts,
        **extra,
    }
    return dict(json.loads(json.dumps(record, default=_jsonable)))


def calibrated(run: Run) -> bool:
    """Whether lengths are µm: the input or the config gives the voxel size."""
    return bool(run.stack.voxel_size_known or run.config.get("voxel_size"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


def _versions() -> dict[str, str]:
    import edt
    import scipy
    import skimage

    modules = {"dask": dask, "zarr": zarr, "numpy": np, "scipy": scipy}
    modules.update({"scikit-image": skimage, "pandas": pd, "edt": edt})
    found = {name: getattr(m, "__version__", "?") for name, m in modules.items()}
    return {"python": platform.python_version(), **found}


def fail(run: Run, error: BaseException) -> None:
    """Mark the run failed, or interrupted (never complete); release the output.

    A new output refused for bad input (a :class:`NucflowError`, e.g. a NaN found while
    preprocessing) before any stage was stored is withdrawn instead: this run's entries and
    claim are removed, so the same command runs again once the input is fixed, with no
    ``--overwrite``. A run.json that cannot be written (no space left) stays "running" with no
    lock: ``nucflow status`` says stopped.
    """
    ours = run.lock is None or run.lock.lost is None  # else run.json is another run's now
    withdrawn = run.claim if ours and _withdrawable(run, error) else None
    if withdrawn is not None:
        with contextlib.suppress(OSError):
            withdrawn.withdraw()
    elif ours:
        if isinstance(error, KeyboardInterrupt):
            signal = "SIGTERM" if isinstance(error, Terminated) else "SIGINT"
            status, extra = "interrupted", {"signal": signal}
        else:
            status, extra = "failed", {"error": f"{type(error).__name__}: {error}"}
        with contextlib.suppress(OSError):
            write_run_json(run, status, **extra)
    release(run)
    if withdrawn is not None:
        withdrawn.remove_directory()


def _withdrawable(run: Run, error: BaseException) -> bool:
    """Bad input, in an output this run claimed anew, before any stage was stored."""
    return (
        isinstance(error, NucflowError)
        and run.claim is not None
        and run.claim.fresh
        and not any((run.output / WORK).rglob(f"*{fingerprint.SUFFIX}"))
    )
