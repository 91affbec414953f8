"""``nucflow status OUT``: what a run is doing, or did, from its output directory alone.

Reads ``run.json`` (its ``progress`` record, kept current by :mod:`nucflow.progress`) and counts
what the run stored (``.work/<name>.zarr`` chunk files and ``.done`` marks, segmentation parts in
``.work/blocks/``): no scheduler is contacted, so it works from any shell that sees the files.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nucflow.errors import OutputError
from nucflow.lock import holder_of
from nucflow.outdir import CLAIM_NAME, read_claim
from nucflow.progress import fmt_rate, fmt_seconds

__all__ = ["Report", "status", "EXIT_CODES"]

#: Exit code of ``nucflow status`` per state: a script polls it.
EXIT_CODES = {"complete": 0, "running": 3, "failed": 1, "interrupted": 1, "stopped": 1}

_LABEL = 10  # width of the field names


@dataclass(frozen=True)
class Report:
    """A run's state (``complete``, ``running``, ``failed``, ``interrupted`` or ``stopped``)
    and its text."""

    state: str
    text: str

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.state]


def status(output: str | os.PathLike[str]) -> Report:
    """Describe the run whose ``--output`` is ``output``.

    Parameters
    ----------
    output : path
        A nucflow output directory.

    Returns
    -------
    Report
        ``stopped`` is a run whose run.json still says running but whose process, on this
        host, is gone (killed, out of memory, out of walltime); ``interrupted`` one that
        SIGINT (Ctrl-C) or SIGTERM ended, ``failed`` one that an error ended. Unless running,
        the segmentation's blocks done are those whose part is on disk when more are there
        than run.json counted (it is rewritten only every ``progress.record_s`` seconds).

    Raises
    ------
    OutputError
        ``output`` is not a nucflow output directory.
    """
    out = Path(output)
    record = _read_record(out)
    progress = record.get("progress") or {}
    age = _age(record.get("updated"))
    state = record["status"]
    if state == "running" and (_gone(progress) or _unlocked(out)):
        state = "stopped"
    signal = _signal(record)
    if signal:  # also a run.json of an older nucflow: failed, "KeyboardInterrupt: "
        state = "interrupted"
    lines = [_headline(out, state, progress, age, signal)]
    movie = record.get("timepoints") or {}
    current = (movie.get("current") or {}).get("t")
    if movie:  # a time-lapse: the stages of its current (or last) time point
        shown = current if current is not None else (movie.get("done") or [None])[-1]
        lines += _field("movie", _movie_line(movie, shown, current is not None))
        progress = _of_timepoint(progress, shown) if shown is not None else progress
    disk = _Disk.read(out, record)  # counted once: every line tells the same moment
    lines += _now(record, progress, age, state, disk)
    lines += _field("stages", _stages(progress, state))
    lines += _field("on disk", _on_disk(out, disk))
    if state == "failed":
        lines += _field("error", record.get("error", "unknown (run.json names none)"))
    if state != "complete":
        lines += _field("resume", "would redo " + _redo(disk, progress))
    return Report(state, "\n".join(lines))


def _movie_line(movie: dict[str, Any], shown: int | None, running: bool) -> str:
    """Time points done of those selected; the one whose stages follow."""
    done, selected = movie.get("done") or [], movie.get("selected") or []
    text = f"{len(done)}/{len(selected)} time points done"
    if shown is not None:
        text += f"; {'at' if running else 'last'} t {shown} (the stages below are its)"
    return text


_TIME_SUFFIX = re.compile(r" t(\d+)$")


def _of_timepoint(progress: dict[str, Any], t: int) -> dict[str, Any]:
    """``progress`` with only time point ``t``'s stages (``segment t3``) and the movie's own."""

    def keep(name: str) -> bool:
        found = _TIME_SUFFIX.search(name)
        return found is None or int(found.group(1)) == t

    return {
        **progress,
        "stages": {k: v for k, v in (progress.get("stages") or {}).items() if keep(k)},
        "plan": {k: v for k, v in (progress.get("plan") or {}).items() if keep(k)},
    }


def _read_record(out: Path) -> dict[str, Any]:
    path = out / "run.json"
    if not out.is_dir():
        raise OutputError(f"{out} is not a directory; give the --output directory of a nucflow run")
    if not path.is_file():
        raise OutputError(
            f"{out} is not a nucflow output directory (no run.json); give the --output "
            "directory of a nucflow run"
        )
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise OutputError(
            f"{path} is not readable JSON ({error}); is it a nucflow run.json?"
        ) from None
    if not isinstance(record, dict) or record.get("status") not in EXIT_CODES:
        raise OutputError(f"{path} has no nucflow status; is it a nucflow run.json?")
    claim = read_claim(out)
    if claim is None or record.get("claim") != claim.claim_id:
        raise OutputError(
            f"{path} is not the run.json of a nucflow output (no {CLAIM_NAME} names it: copied "
            "or written by hand?); give the --output directory of a nucflow run"
        )
    return record


def _signal(record: dict[str, Any]) -> str | None:
    """The signal that ended an interrupted run: run.json's, else an older nucflow's error."""
    if record["status"] == "interrupted":
        return str(record.get("signal") or "signal unknown")
    error = str(record.get("error", "")) if record["status"] == "failed" else ""
    found = re.match(r"(KeyboardInterrupt|Terminated)\b", error)
    return None if found is None else {"Terminated": "SIGTERM"}.get(found[1], "SIGINT")


def _age(updated: str | None) -> float:
    """Seconds since run.json was written."""
    try:
        then = dt.datetime.fromisoformat(str(updated))
    except ValueError:
        return 0.0
    return max(0.0, (dt.datetime.now(dt.UTC) - then).total_seconds())


def _gone(progress: dict[str, Any]) -> bool:
    """The writing process ran on this host and no longer exists."""
    pid, host = progress.get("pid"), progress.get("host")
    if not pid or host != socket.gethostname():
        return False  # another machine's process: run.json's age is all there is
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _unlocked(out: Path) -> bool:
    """run.json says running but no live run holds the output's lock (none, or a stale one: a
    dead process on this host, or no heartbeat for minutes): its process ended without
    rewriting run.json (killed, or its disk was full), on any host."""
    if holder_of(out) is not None:
        return False
    return _read_record(out)["status"] == "running"  # not finished meanwhile


def _field(name: str, value: str | None) -> list[str]:
    return [f"  {name:<{_LABEL}}{value}"] if value else []


def _headline(
    out: Path, state: str, progress: dict[str, Any], age: float, signal: str | None
) -> str:
    where = ""
    if progress.get("pid"):
        where = f" (pid {progress['pid']} on {progress.get('host', '?')}"
        where += f", run.json updated {fmt_seconds(age)} ago)"
    if state == "stopped":
        return (
            f"nucflow status {out}: stopped — run.json says running but process "
            f"{progress.get('pid')} on {progress.get('host')} is gone or holds no lock "
            "(killed? out of walltime? a full disk?)"
        )
    if signal:
        return f"nucflow status {out}: interrupted ({signal}); --resume continues it"
    return f"nucflow status {out}: {state}{where if state == 'running' else ''}"


def _now(
    record: dict[str, Any], progress: dict[str, Any], age: float, state: str, disk: _Disk
) -> list[str]:
    """Stage, blocks, rate, elapsed and ETAs; workers while running; counts when complete."""
    lines: list[str] = []
    running = state == "running"
    if progress.get("stage") and state != "complete":
        lines += _field("stage", _stage_line(progress, age, None if running else disk))
    elapsed = progress.get("elapsed_s")
    if elapsed is not None:
        elapsed += age if running else 0.0
        eta = (progress.get("eta_s") or {}).get("run") if running else None
        text = f"{fmt_seconds(elapsed)}" + (f", run ETA {_minus(eta, age)}" if running else "")
        lines += _field("elapsed", text)
    if running:
        workers = progress.get("workers")
        link = progress.get("dashboard")
        text = f"{workers if workers is not None else '?'}" + (
            f", dashboard {link}" if link else ""
        )
        lines += _field("workers", text)
    counts = record.get("counts")
    if state == "complete" and counts:
        result = [f"{k} {v}" for k, v in counts.items() if not isinstance(v, dict)]
        if isinstance(counts.get("timepoints"), dict):  # per time point: in run.json
            result.append(f"in {len(counts['timepoints'])} time points")
        lines += _field("result", ", ".join(result))
    return lines


def _minus(eta: float | None, age: float) -> str:
    return fmt_seconds(None if eta is None else max(0.0, eta - age))


def _stage_line(progress: dict[str, Any], age: float, disk: _Disk | None) -> str:
    """The current stage and pass, and the stage's ETA while running; ``disk`` (a run no
    longer running): the segmentation's blocks are the parts stored when more are there than
    run.json counted."""
    name = progress["stage"]
    stage = (progress.get("stages") or {}).get(name, {})
    passes, planned = stage.get("passes", []), stage.get("planned_passes")
    text = f"{name} (pass {len(passes)}/{planned})" if planned else name
    current, where = progress.get("pass"), ""
    if disk and disk.blocks and name.split(" ")[0] == "segment":
        if disk.parts > (current or {}).get("done", -1):
            current = {"label": "segment", "done": disk.parts, "total": disk.blocks}
            where = " on disk"
    if current and current.get("total"):
        done, total = current["done"], current["total"]
        text += f": {current['label']} {done}/{total} blocks{where} ({int(100 * done / total)}%)"
    if progress.get("rate_mvoxel_s") is not None:
        text += f", {fmt_rate(progress['rate_mvoxel_s'])} Mvoxel/s"
    eta = (progress.get("eta_s") or {}).get("stage")
    return text + (f", stage ETA {_minus(eta, age)}" if disk is None else "")


def _stages(progress: dict[str, Any], state: str) -> str:
    stages = progress.get("stages") or {}
    names = list(stages) + [n for n in progress.get("plan") or {} if n not in stages]
    parts = []
    for name in names:
        stage = stages.get(name)
        if stage is None:
            parts.append(f"{name} -")
        elif stage["state"] == "running":
            parts.append(f"{name} running")
        else:  # the stage a signal ended is recorded failed
            failed = state == "interrupted" and stage["state"] == "failed"
            shown = "interrupted" if failed else stage["state"]
            parts.append(f"{name} {shown} {fmt_seconds(stage['elapsed_s'])}")
    return ", ".join(parts)


# --- what the run stored ---------------------------------------------------------------------


def _stored_passes(work: Path) -> list[tuple[str, int, int, bool]]:
    """(name, chunks written, chunks, finished) of every ``.work/<name>.zarr``."""
    found = []
    for store in sorted(work.glob("*.zarr")):
        total = _chunk_count(store)
        if total is None:
            continue
        written = sum(1 for p in (store / "c").rglob("*") if p.is_file())
        name = store.name.removesuffix(".zarr")
        found.append((name, written, total, (work / f"{name}.done").exists()))
    return found


def _chunk_count(store: Path) -> int | None:
    try:
        meta = json.loads((store / "zarr.json").read_text())
        shape = meta["shape"]
        chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return math.prod(math.ceil(n / c) for n, c in zip(shape, chunks, strict=True))


@dataclass(frozen=True)
class _Disk:
    """What the run stored: its passes and its segmentation parts."""

    passes: list[tuple[str, int, int, bool]]
    parts: int
    blocks: int | None  # None before segmentation started

    @classmethod
    def read(cls, out: Path, record: dict[str, Any]) -> _Disk:
        work = out / ".work"
        current = (record.get("timepoints") or {}).get("current")
        if current and "t" in current:  # a time-lapse: its current time point's folder
            work, record = work / f"t{int(current['t']):04d}", current
        passes = _stored_passes(work) if work.is_dir() else []
        parts = len(list((work / "blocks").glob("*.parquet")))
        return cls(passes, parts, (record.get("blocks") or {}).get("total"))


def _on_disk(out: Path, disk: _Disk) -> str:
    if not (out / ".work").is_dir():
        outputs = [n for n in ("nuclei.parquet", "labels.ome.zarr") if (out / n).exists()]
        return ", ".join(outputs) if outputs else "no intermediates"
    parts = [
        f"{name} {written}/{total} chunks" + (" done" if finished else "")
        for name, written, total, finished in disk.passes
    ]
    if disk.blocks is not None or disk.parts:
        parts.append(f"segment blocks {disk.parts}/{disk.blocks if disk.blocks else '?'}")
    return ", ".join(parts) or "nothing stored yet"


def _redo(disk: _Disk, progress: dict[str, Any]) -> str:
    """What ``--resume`` would compute again: passes without ``.done`` (whole), segmentation
    blocks without their part, the stages not finished, and the writing."""
    partial = [
        f"{name} ({written}/{total} chunks)"
        for name, written, total, finished in disk.passes
        if not finished
    ]
    stages = progress.get("stages") or {}
    names = list(stages) + [n for n in progress.get("plan") or {} if n not in stages]
    todo = []
    for name in names:
        if (stages.get(name) or {}).get("state") == "done":
            continue
        if name.split(" ")[0] == "segment" and disk.blocks is not None:
            name = f"{name} ({disk.blocks - disk.parts} of {disk.blocks} blocks)"
        todo.append(name)
    text = ", ".join(todo) or "the remaining stages"
    if partial:
        text += "; unfinished passes redone whole: " + ", ".join(partial)
    return text
