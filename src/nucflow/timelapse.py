"""Time-lapses: every selected time point segmented as if it were a stack of its own.

An input with a time axis of more than one time point (OME-Zarr ``t``, OME-TIFF/ImageJ ``T``)
runs every time point, or those ``--timepoints`` selects (:func:`select`). Each time point is a
run of its own (:func:`each`): its stages work in ``.work/t0003/`` with the fingerprints of a
single-time-point run, so ``--resume`` reuses its finished stages and segmentation blocks, and
its result equals running that time point alone. A finished time point keeps only its rows
(``.work/t0003/rows/``, with the ``t`` and ``t_s`` columns) and ``done.json`` (counts and the
fingerprint it was made with); ``--resume`` skips it whole, and its intermediates (the size of
the stack each) are deleted as soon as it is finished.

Labels are written into ``labels.ome.zarr`` with a leading time axis over all of the input's
time points (``(T, Z, Y, X)`` or ``(T, Y, X)``, NGFF axis ``t`` of type ``time``), one chunk
per time point; time points not selected stay 0. Label values are unique per time point
(1 + the seed's spatial linear index, as in a single-time-point run): ``(t, label)`` is a
nucleus' key, and a row's ``label`` is its value in ``labels.ome.zarr`` at its ``t``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import zarr

from nucflow import fingerprint, io, pipeline
from nucflow import table as table_stage
from nucflow.errors import ParameterError

__all__ = ["select", "each", "DONE", "ROWS"]

#: In a time point's work folder: the record of a finished time point, and its rows.
DONE = "done.json"
ROWS = "rows"

_SLICE = re.compile(r"(\d*):(\d*)(?::(\d+))?")


def _example(n: int) -> str:
    """Suggestions valid on an input of ``n`` time points (a fixed ``0:10`` was not on 3)."""
    some = ",".join(map(str, sorted({0, n // 2, n - 1})))
    return f"e.g. --timepoints 0:{n} (slice START:STOP[:STEP]) or --timepoints {some}"


def select(spec: str | None, stack: io.Stack) -> tuple[int, ...] | None:
    """The time points ``--timepoints spec`` selects, in increasing order.

    Parameters
    ----------
    spec : str or None
        ``START:STOP[:STEP]`` (a Python slice of non-negative indices, ends optional),
        ``T,T,...`` or ``T``; None selects every time point.
    stack : nucflow.io.Stack
        The opened input (``n_timepoints``).

    Returns
    -------
    tuple of int or None
        None for an input without a time axis (or with a single time point) and no ``spec``:
        a run as for any 3D/2D stack, no ``t`` column.

    Raises
    ------
    ParameterError
        ``spec`` is malformed, selects nothing or an index out of range, or the input has no
        time axis.
    """
    n = stack.n_timepoints
    if spec is None:
        return tuple(range(n)) if n > 1 else None
    if n == 1:
        raise ParameterError(
            f"--timepoints {spec!r}: {stack.path} has no time axis (one time point); "
            "drop --timepoints"
        )
    chosen = _parse(spec.strip(), n, stack.path)
    if not chosen:
        raise ParameterError(
            f"--timepoints {spec!r} selects no time point of the {n} in {stack.path}; "
            f"select some of 0..{n - 1}, {_example(n)}"
        )
    return chosen


def _parse(spec: str, n: int, path: str) -> tuple[int, ...]:
    found = _SLICE.fullmatch(spec)
    if found:
        start, stop, step = (int(g) if g else None for g in found.groups())
        if step == 0:
            raise ParameterError(f"--timepoints {spec!r}: the step must be > 0, {_example(n)}")
        for end in (start, stop):
            if end is not None and end > n:
                _out_of_range(spec, end, n, path)
        return tuple(range(n)[slice(start, stop, step)])
    items = spec.split(",")
    if not spec or not all(item.strip().isdigit() for item in items):
        raise ParameterError(
            f"--timepoints {spec!r} is not a slice or a list of time point indices; {_example(n)}"
        )
    chosen = sorted({int(item) for item in items})
    if chosen[-1] >= n:
        _out_of_range(spec, chosen[-1], n, path)
    return tuple(chosen)


def _out_of_range(spec: str, index: int, n: int, path: str) -> None:
    raise ParameterError(
        f"--timepoints {spec!r} reaches time point {index} but {path} has {n} time points; "
        f"use indices 0..{n - 1}, {_example(n)}"
    )


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class _Done:
    """A finished time point: its counts and its row files."""

    t: int
    rows: int
    truncated: int
    parts: list[Path]
    found: dict[str, float]  # the time point's global value: noise level or threshold


def each(
    run: pipeline.Run,
    segment: Callable[[pipeline.Run], table_stage.Table],
    *,
    per_timepoint: Sequence[str] | None = None,
) -> table_stage.Table:
    """``segment`` every selected time point of ``run``; the movie's table.

    ``segment`` runs a flow's stages on one time point's run and returns its table (as
    :func:`nucflow.pipeline.table` does). Without a time-lapse it is called on ``run`` itself.
    ``per_timepoint`` names the stages ``segment`` runs (the progress plan repeats those per
    time point; the others run once); default: every stage but ``write``.
    ``run.json`` says which time points are done and their counts (``timepoints``).
    """
    if run.timepoints is None:
        return segment(run)
    _prepare_labels(run)
    _per_timepoint_plan(run, per_timepoint)
    summary: dict[str, Any] = {
        "selected": list(run.timepoints),
        "done": [],
        "reused": [],  # by --resume, finished by an earlier attempt
        "counts": {},
    }
    run.facts["timepoints"] = summary
    finished = []
    for t in run.timepoints:
        point = _point(run, t)
        summary["current"] = point.facts  # the live record: nucflow status reads its blocks
        done = _reused(point)
        if done is None:
            done = _close(point, segment(point))
        else:
            summary["reused"].append(t)
            _drop_from_plan(run, t)
        finished.append(done)
        summary["done"].append(t)
        summary["counts"][str(t)] = {"nuclei": done.rows, "truncated": done.truncated, **done.found}
        for name, seconds in point.timings.items():
            run.timings[name] = round(run.timings.get(name, 0.0) + seconds, 3)
    summary.pop("current", None)
    return _joined(run, finished)


def _prepare_labels(run: pipeline.Run) -> None:
    """Create ``labels.ome.zarr`` with the time axis (unless --resume finds it made by the same
    input and parameters: ``.work/labels.fingerprint.json``); empty the time points not
    selected."""
    p, stack = run.params, run.stack
    path = run.entry(pipeline.LABELS)
    shape = (stack.n_timepoints, *stack.data.shape)
    chunks = (1, *pipeline.label_chunks(p.chunks))
    marker = run.output / pipeline.WORK / f"labels{fingerprint.SUFFIX}"
    made_by = _fingerprint(run)
    try:
        found = zarr.open_array(str(path / "0"), mode="r+") if run.resume else None
        same = json.loads(marker.read_text()) == made_by
    except (FileNotFoundError, ValueError, zarr.errors.NodeTypeValidationError):
        found, same = None, False
    if found is None or not same or (found.shape, found.chunks) != (shape, chunks):
        _forget_labels(run)
        found = io.create_label_zarr(
            path,
            stack.data.shape,
            chunks[1:],
            p.voxel_size,
            dtype=pipeline.label_dtype(stack.data.shape),
            overwrite=True,
            timepoints=stack.n_timepoints,
            time_interval_s=stack.time_interval_s,
            source_image=io.image_reference(stack.path, path),
        )
        table_stage.write_atomic(marker, json.dumps(made_by).encode())
    for t in sorted(set(range(stack.n_timepoints)) - set(run.timepoints or ())):
        io.clear_timepoint(found, t)


def _forget_labels(run: pipeline.Run) -> None:
    """The label image is made anew: no time point's stored segmentation is current."""
    for folder in (run.output / pipeline.WORK).glob("t[0-9]*"):
        (folder / DONE).unlink(missing_ok=True)
        (folder / f"segment{fingerprint.SUFFIX}").unlink(missing_ok=True)


def _point(run: pipeline.Run, t: int) -> pipeline.Run:
    """The run of time point ``t``: its own stack, work folder, fingerprint chain and facts."""
    stack = run.stack.at(t)
    lineage = None
    if run.lineage is not None:  # the input's identity is the movie's: computed once
        lineage = fingerprint.Lineage(run.lineage.identity, run.lineage.params)
    point = dataclasses.replace(
        run,
        stack=stack,
        time=t,
        timings={},
        facts={"t": t},
        region=pipeline.data_region(stack, run.params.chunks),
        lineage=lineage,
    )
    point.facts["data_region"] = [[s.start, s.stop] for s in point.region]
    if lineage is not None:
        point.facts["stages"] = lineage.stages
    point.work.mkdir(parents=True, exist_ok=True)
    return point


def _fingerprint(point: pipeline.Run) -> str | None:
    """What a finished time point (or the label image) was made from: input, every
    parameter, nucflow's version."""
    if point.lineage is None:
        return None
    return fingerprint.Lineage(point.lineage.identity, point.lineage.params).fingerprint(
        "timepoint"
    )


def _reused(point: pipeline.Run) -> _Done | None:
    """The time point as an earlier attempt finished it, if ``--resume`` may reuse it."""
    done = point.work / DONE
    try:
        record = json.loads(done.read_text()) if point.resume else None
    except (FileNotFoundError, ValueError):
        record = None
    parts = [point.work / ROWS / name for name in (record or {}).get("parts", [])]
    if (
        record is None
        or record.get("fingerprint") != _fingerprint(point)
        or not all(p.exists() for p in parts)
    ):
        done.unlink(missing_ok=True)  # never current again once its time point is redone
        return None
    found = record.get("found") or {}
    return _Done(point.time or 0, int(record["rows"]), int(record["truncated"]), parts, found)


def _close(point: pipeline.Run, table: table_stage.Table) -> _Done:
    """Keep a finished time point's rows (with ``t``, ``t_s``), record it, delete the rest."""
    t = point.time or 0
    rows_dir = point.work / ROWS
    shutil.rmtree(rows_dir, ignore_errors=True)
    rows_dir.mkdir()
    parts = []
    for part in table.parts:
        rows = with_time(pq.ParquetFile(part).read().to_pandas(), t, point.stack.time_interval_s)
        # named by time point too: a partitioned table holds the parts of every time point
        kept = rows_dir / f"{pipeline.timepoint_folder(t)}_{part.name}"
        table_stage._write_parquet(kept, rows, table.metadata)
        parts.append(kept)
    found: dict[str, float] = {
        k: point.facts[k] for k in ("noise", "threshold") if k in point.facts
    }
    record = {
        "fingerprint": _fingerprint(point),
        "rows": table.rows,
        "truncated": table.truncated,
        "parts": [p.name for p in parts],
        "found": found,
    }
    table_stage.write_atomic(point.work / DONE, json.dumps(record).encode())
    for entry in point.work.iterdir():  # the intermediates: a stack's size each
        if entry.name not in (DONE, ROWS):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return _Done(t, table.rows, table.truncated, parts, found)


def with_time(rows: pd.DataFrame, t: int, interval_s: float | None) -> pd.DataFrame:
    """``rows`` with ``t`` (and ``t_s`` = t x interval, when known) as the first columns."""
    columns = {"t": pd.Series(t, index=rows.index, dtype="int64")}
    if interval_s is not None:
        columns["t_s"] = pd.Series(t * interval_s, index=rows.index, dtype="float64")
    return pd.concat([pd.DataFrame(columns), rows], axis=1)


def _joined(run: pipeline.Run, finished: list[_Done]) -> table_stage.Table:
    """The movie's table: every time point's rows; the QC sample from the first."""
    interval = run.stack.time_interval_s
    metadata = {
        **table_stage.metadata(
            run.params, calibrated=pipeline.calibrated(run), channel=run.config.get("channel")
        ),
        "time_interval_s": interval,
    }
    measured = table_stage.Objects(pipeline.object_spec(run), None, {})
    suffixes = table_stage.channel_suffixes(run.params.measure.channels)
    label_dtype = str(pipeline.label_dtype(run.stack.data.shape))
    empty = table_stage.empty_table(len(run.region), suffixes, measured, label_dtype)
    return table_stage.Table(
        rows=sum(d.rows for d in finished),
        truncated=sum(d.truncated for d in finished),
        sample=_sample(finished[0], with_time(empty, finished[0].t, interval)),
        parts=[p for d in finished for p in d.parts],
        metadata=metadata,
        empty=with_time(empty, 0, interval),
    )


def _sample(done: _Done, empty: pd.DataFrame) -> pd.DataFrame:
    """At most ``QC_SAMPLE_ROWS`` rows of one time point, read part by part."""
    step = max(1, math.ceil(done.rows / table_stage.QC_SAMPLE_ROWS))
    frames = [pq.ParquetFile(p).read().to_pandas().iloc[::step] for p in done.parts]
    return pd.concat(frames, ignore_index=True) if frames else empty


def _per_timepoint_plan(run: pipeline.Run, per_timepoint: Sequence[str] | None) -> None:
    """The progress plan (passes per stage) of the ``per_timepoint`` stages once per time
    point: ``preprocess t3``, ...; the others (the label pyramid, ``write``) once, in their
    place: a stage planned per time point that never runs would be listed ``-`` after the run
    completed."""
    tracker = run.progress
    if tracker is None or not tracker.plan:
        return
    plan = dict(tracker.plan)
    each_point = [
        name for name in plan if (name in per_timepoint if per_timepoint else name != "write")
    ]
    points = run.timepoints or ()
    repeated = {f"{name} t{t}": plan[name] for t in points for name in each_point}
    tracker.plan = {}
    for name, n in plan.items():
        if name not in each_point:
            tracker.plan[name] = n
        elif name == each_point[0]:
            tracker.plan |= repeated


def _drop_from_plan(run: pipeline.Run, t: int) -> None:
    tracker = run.progress
    if tracker is not None:
        tracker.plan = {k: v for k, v in tracker.plan.items() if not k.endswith(f" t{t}")}
