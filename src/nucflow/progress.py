"""Progress a person can follow: a redrawn bar on a terminal, a few dated lines in a log file.

Every :meth:`nucflow.cluster.Runner.compute` is a *pass* (one task per block). Whatever the
scheduler, its blocks are counted through public hooks only: a :class:`dask.callbacks.Callback`
for threads and processes, the scheduler's task stream (``Client.get_task_stream``) for
distributed schedulers. What is drawn depends on where stderr goes:

- a terminal: ``label: [####      ] | 45% Completed | 12.3s``, redrawn in place;
- anything else (``sbatch --output``, a pipe, a file): one line per ``step_percent`` of a
  stage (of a pass, outside a run) *and* at least ``interval_s`` since the previous line (the
  rarer of the two), one at the end of a pass when ``interval_s`` passed since the stage's
  previous line (always outside a run), and one at the end of every stage, each with the
  stage, blocks done/total, rate and the ETA of the stage and of the run: at most
  ``100 / step_percent`` + passes + 1 lines per stage, however long it runs, and a single
  line per stage on a run shorter than ``interval_s`` a stage.

A stage's pass total is fixed before it starts (:func:`expect`): a planned pass found to have
nothing to do (:func:`skipped`) is counted as done, so ``pass 4/7`` never becomes ``pass 4/6``.

During a run, :class:`RunProgress` also keeps ``run.json``'s ``progress`` record up to date at
every stage boundary and every ``record_s`` seconds; ``nucflow status`` reads it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

__all__ = [
    "Settings",
    "Reporter",
    "RunProgress",
    "parts_of",
    "attach",
    "stage",
    "expect",
    "fmt_seconds",
    "fmt_rate",
]

#: Seconds between redraws of a terminal bar, and between checks of a log line.
TTY_TICK = 0.1
LOG_TICK = 0.25
#: A terminal bar appears only for passes longer than this (short passes stay quiet).
TTY_MINIMUM = 0.5
_BAR_WIDTH = 40


@dataclass(frozen=True)
class Settings:
    """How often progress is reported (config section ``progress``).

    Attributes
    ----------
    step_percent : float
        Log mode: a line when a stage (a pass, outside a run) has advanced by this many
        percent ...
    interval_s : float
        ... and at least this many seconds passed since its last line.
    record_s : float
        ``run.json`` is rewritten at least this often during a run.
    """

    step_percent: float = 5.0
    interval_s: float = 60.0
    record_s: float = 60.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> Settings:
        """Settings from a run's config (its ``progress`` section, when present)."""
        section = dict((config or {}).get("progress") or {})
        return cls(**{k: float(v) for k, v in section.items() if k in cls.__dataclass_fields__})


def fmt_seconds(seconds: float | None) -> str:
    """``0.4s``, ``12s``, ``5m02s``, ``3h07m``; ``?`` for unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_rate(mvoxel_s: float) -> str:
    """Mvoxel/s with enough digits to tell a slow pass from a stalled one."""
    if mvoxel_s >= 100:
        return f"{mvoxel_s:.0f}"
    if mvoxel_s >= 1:
        return f"{mvoxel_s:.2f}"
    return f"{mvoxel_s:.3f}" if mvoxel_s >= 0.01 else f"{mvoxel_s:.5f}"


def _stamp() -> str:
    return dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def _interactive(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed
        return False


def _write(stream: IO[str], text: str) -> None:
    # A report must never fail the computation it reports on (e.g. stderr closed at exit).
    with contextlib.suppress(ValueError, OSError):
        stream.write(text)
        stream.flush()


# --- which tasks are the blocks -------------------------------------------------------------


def parts_of(collections: Iterable[Any]) -> set[Any]:
    """Keys whose completion counts as one block done.

    A collection with one output key (a :func:`nucflow.blockpass.pass_graph`, a reduction,
    ``da.store``) counts the tasks that key gathers: one per block for a pass. A collection
    with several output keys (an array) counts those.
    """
    import dask
    from dask.core import flatten, get_dependencies

    parts: set[Any] = set()
    for collection in collections:
        if not dask.is_dask_collection(collection):
            continue
        keys = list(flatten(collection.__dask_keys__()))
        if len(keys) == 1:
            graph = collection.__dask_graph__()
            parts |= set(get_dependencies(graph, keys[0])) or set(keys)
        else:
            parts |= set(keys)
    return parts


# --- one pass ---------------------------------------------------------------------------------


class Steps:
    """When a log line is due: at each ``step_percent`` of a fraction, and no sooner than
    ``interval_s`` after the previous line (shared by the passes of one stage)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._last_step = 0
        self._last_line = time.monotonic()

    def _step(self, fraction: float) -> int:
        return int(100 * fraction // self._settings.step_percent)

    def due(self, fraction: float) -> bool:
        """Whether a line is due at ``fraction`` done; if so, it counts as written."""
        step, now = self._step(fraction), time.monotonic()
        if step <= self._last_step or now - self._last_line < self._settings.interval_s:
            return False
        self._last_step, self._last_line = step, now
        return True

    def interval_passed(self) -> bool:
        """Whether ``interval_s`` passed since the previous line (or the stage's start)."""
        return time.monotonic() - self._last_line >= self._settings.interval_s

    def written(self, fraction: float) -> None:
        """A line was written at ``fraction`` anyway (a pass's end line)."""
        self._last_step = max(self._last_step, self._step(fraction))
        self._last_line = time.monotonic()


@dataclass
class PassRecord:
    """Counts of one pass: what run.json and the ETAs are made of."""

    label: str
    total: int
    done: int = 0
    start: float = field(default_factory=time.monotonic)
    end: float | None = None
    failed: bool = False
    skipped: bool = False  # planned, but found to have nothing to do (no task ran)

    @property
    def elapsed(self) -> float:
        return (self.end or time.monotonic()) - self.start

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 1.0

    def remaining(self) -> float | None:
        """Seconds this pass still needs at its rate so far (None before its first block)."""
        if self.end is not None:
            return 0.0
        if not self.done:
            return None
        return self.elapsed * (self.total - self.done) / self.done

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "done": self.done,
            "total": self.total,
            "elapsed_s": round(self.elapsed, 3),
            **({"failed": True} if self.failed else {}),
            **({"skipped": True} if self.skipped else {}),
        }


class PassProgress:
    """A pass in flight: counts blocks (thread-safe) and draws them from a helper thread."""

    def __init__(
        self,
        record: PassRecord,
        *,
        stream: IO[str],
        settings: Settings,
        describe: Callable[[PassRecord], str],
        draw: bool,
        poll: Callable[[], None] | None = None,
        steps: Steps | None = None,
        fraction: Callable[[PassRecord], float] | None = None,
        end_line_when_due: bool = False,
    ) -> None:
        self.record = record
        self._stream, self._settings, self._describe = stream, settings, describe
        # Log lines step through the stage's fraction when a run gives one, else the pass's.
        self._steps = steps or Steps(settings)
        self._fraction = fraction or (lambda r: r.fraction)
        self._draw = draw
        # In a run, a pass's end line waits for interval_s like a step line: on a short run
        # the stage's own line says it all (one line per stage).
        self._end_line_when_due = end_line_when_due
        self._tty = draw and _interactive(stream)
        self._poll = poll
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drawn = False
        self._thread: threading.Thread | None = None

    def start(self) -> PassProgress:
        if self._draw or self._poll is not None:
            self._thread = threading.Thread(target=self._loop, name="nucflow-progress", daemon=True)
            self._thread.start()
        return self

    def advance(self, n: int = 1) -> None:
        """``n`` more blocks are done."""
        with self._lock:
            self.record.done = min(self.record.total, self.record.done + n)

    def set_total(self, total: int) -> None:
        with self._lock:
            self.record.total = total

    def finish(self, failed: bool) -> None:
        """Stop the helper thread; draw the pass's last line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            if not failed:
                self.record.done = self.record.total
            self.record.failed = failed
            self.record.end = time.monotonic()
        # A failure is told by the error line that follows (one line for bad input, exit 2).
        if not self._draw or (failed and not self._tty):
            return
        if self._tty:
            if self._drawn:
                self._draw_bar()
                _write(self._stream, "\n")
        elif not self._end_line_when_due or self._steps.interval_passed():
            _write(self._stream, self._line())
            self._steps.written(self._fraction(self.record))

    def _loop(self) -> None:
        tick = TTY_TICK if self._tty else LOG_TICK
        while not self._stop.wait(tick):
            with contextlib.suppress(Exception):  # a report must never fail the run
                if self._poll is not None:
                    self._poll()
                if self._tty and self.record.elapsed >= TTY_MINIMUM:
                    self._draw_bar()
                elif self._draw and not self._tty:
                    self._maybe_line()

    def _draw_bar(self) -> None:
        frac = self.record.fraction
        bar = "#" * int(_BAR_WIDTH * frac)
        label = f"{self.record.label}: " if self.record.label else ""
        self._drawn = True
        _write(
            self._stream,
            f"\r{label}[{bar:<{_BAR_WIDTH}}] | {int(100 * frac)}% Completed | "
            f"{fmt_seconds(self.record.elapsed)}",
        )

    def _maybe_line(self) -> None:
        if self.record.done >= self.record.total:
            return  # the end line follows
        if self._steps.due(self._fraction(self.record)):
            _write(self._stream, self._line())

    def _line(self) -> str:
        return f"{_stamp()} nucflow: {self._describe(self.record)}\n"


def _blocks(record: PassRecord) -> str:
    percent = int(100 * record.fraction)
    return f"{record.label} {record.done}/{record.total} blocks ({percent}%)"


class Reporter:
    """Progress of passes outside a run: the pass's label, blocks, elapsed time and ETA.

    Parameters
    ----------
    stream : file, optional
        Where to draw (default: ``sys.stderr`` at the time of each pass).
    settings : Settings, optional
    draw : bool, optional
        False counts without drawing anything.
    """

    def __init__(
        self, stream: IO[str] | None = None, settings: Settings | None = None, draw: bool = True
    ) -> None:
        self._stream = stream
        self.settings = settings or Settings()
        self.draw = draw

    @property
    def stream(self) -> IO[str]:
        return self._stream or sys.stderr

    def begin(self, label: str, total: int, poll: Callable[[], None] | None = None) -> PassProgress:
        """Start reporting a pass of ``total`` blocks; call ``finish`` on the result."""
        return PassProgress(
            self._new_record(label, total),
            stream=self.stream,
            settings=self.settings,
            describe=self.describe,
            draw=self.draw,
            poll=poll,
            **self._stepping(),
        ).start()

    def _new_record(self, label: str, total: int) -> PassRecord:
        return PassRecord(label, total)

    def _stepping(self) -> dict[str, Any]:
        """How a new pass's log lines step (keyword arguments of :class:`PassProgress`)."""
        return {}

    def describe(self, record: PassRecord) -> str:
        """The text of a log line for ``record``."""
        eta = fmt_seconds(record.remaining())
        return f"{_blocks(record)} | {fmt_seconds(record.elapsed)}, ETA {eta}"


# --- a whole run ------------------------------------------------------------------------------


@dataclass
class StageRecord:
    name: str
    start: float = field(default_factory=time.monotonic)
    end: float | None = None
    state: str = "running"
    passes: list[PassRecord] = field(default_factory=list)
    steps: Steps | None = None

    @property
    def elapsed(self) -> float:
        return (self.end or time.monotonic()) - self.start


class RunProgress(Reporter):
    """Progress of a run: passes grouped into stages, ETAs for the stage and the run, and the
    ``progress`` record of ``run.json``.

    Parameters
    ----------
    voxels : int
        Voxels a pass goes through (the run's data region): the rate's numerator.
    write : callable
        Rewrites run.json (as ``running``); called at stage boundaries and every ``record_s``.
    runner : object
        The run's :class:`nucflow.cluster.Runner`: workers and dashboard link.
    """

    def __init__(
        self,
        *,
        voxels: int,
        write: Callable[[], None],
        runner: Any,
        settings: Settings | None = None,
        stream: IO[str] | None = None,
        draw: bool = True,
        record: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(stream, settings, draw)
        self.voxels = voxels
        self.plan: dict[str, int] = {}
        self.stages: dict[str, StageRecord] = {}
        self.current: StageRecord | None = None
        self._write, self._runner = write, runner
        self._record = record if record is not None else {}
        self._start = time.monotonic()
        self._started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._lock = threading.Lock()
        self._beat_stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- passes

    def _new_record(self, label: str, total: int) -> PassRecord:
        record = PassRecord(label, total)
        if self.current is not None:
            with self._lock:
                self.current.passes.append(record)
        return record

    def _stepping(self) -> dict[str, Any]:
        stage = self.current
        if stage is None:
            return {}
        if stage.steps is None:
            stage.steps = Steps(self.settings)
        return {
            "steps": stage.steps,
            "fraction": partial(self._stage_fraction, stage),
            "end_line_when_due": True,
        }

    def _stage_fraction(self, stage: StageRecord, record: PassRecord) -> float:
        """How much of ``stage`` is done while ``record`` (its latest pass) runs."""
        passes = max(self.plan.get(stage.name) or 0, len(stage.passes))
        return (len(stage.passes) - 1 + record.fraction) / passes if passes else 1.0

    def describe(self, record: PassRecord) -> str:
        rate = record.fraction * self.voxels / max(record.elapsed, 1e-9) / 1e6
        stage_left, run_left = self.etas()
        where = ""
        if self.current is not None:
            planned = self.plan.get(self.current.name)
            count = f"{len(self.current.passes)}/{planned}" if planned else len(self.current.passes)
            where = f"stage {self.current.name} (pass {count}) "
        stage_elapsed = self.current.elapsed if self.current is not None else record.elapsed
        return (
            f"{_blocks(record)}, {fmt_rate(rate)} Mvoxel/s | {where}{fmt_seconds(stage_elapsed)}, "
            f"ETA {fmt_seconds(stage_left)} | run {fmt_seconds(self.elapsed)}, "
            f"ETA {fmt_seconds(run_left)}"
        )

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    # -- ETAs

    def _seconds_per_block(self) -> float | None:
        passes = [p for s in self.stages.values() for p in s.passes if p.done]
        blocks = sum(p.done for p in passes)
        return sum(p.elapsed for p in passes) / blocks if blocks else None

    def _blocks_per_pass(self) -> int:
        passes = [p for s in self.stages.values() for p in s.passes if not p.skipped]
        return passes[-1].total if passes else 0

    def etas(self) -> tuple[float | None, float | None]:
        """Seconds left in the current stage and in the run (None: not known yet).

        A pass's own rate gives its remaining time; passes still to come (counted by
        :attr:`plan`) are given the mean time per block of every pass so far.
        """
        stage = self.current
        if stage is None:
            return None, None
        running = [p for p in stage.passes if p.end is None]
        left = running[-1].remaining() if running else 0.0
        per_block = self._seconds_per_block()
        if stage.name not in self.plan:
            return left, None
        if left is None or per_block is None:
            return None, None
        per_pass = per_block * self._blocks_per_pass()
        stage_left = left + max(0, self.plan[stage.name] - len(stage.passes)) * per_pass
        later = sum(n for name, n in self.plan.items() if name not in self.stages)
        return stage_left, stage_left + later * per_pass

    # -- stages

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Group the passes run inside into stage ``name``; keep run.json up to date."""
        with self._lock:
            self.current = self.stages[name] = StageRecord(name)
        self.save()
        self._start_heartbeat()
        state = "failed"
        try:
            yield
            state = "done"
        finally:
            self._stop_heartbeat()
            record = self.stages[name]
            record.end, record.state = time.monotonic(), state
            if self.draw and state == "done" and not _interactive(self.stream):
                _write(self.stream, f"{_stamp()} nucflow: {self._stage_line(record)}\n")
            self.save()

    def skip(self, label: str) -> None:
        """A planned pass of the current stage has nothing to do: it counts as done (no line),
        so the stage's pass numbers and total stay those it started with."""
        stage = self.current
        if stage is None:
            return
        record = PassRecord(label, 0, skipped=True)
        record.end = record.start
        with self._lock:
            stage.passes.append(record)

    def _stage_line(self, record: StageRecord) -> str:
        _, run_left = self.etas()
        if record.name not in self.plan or not self.plan:
            run_left = None
        elif record is self.current and record.state == "done":
            later = [n for n in self.plan if n not in self.stages]
            run_left = run_left if later else 0.0
        return (
            f"stage {record.name} done in {fmt_seconds(record.elapsed)}{_passes_said(record)} | "
            f"run {fmt_seconds(self.elapsed)}, ETA {fmt_seconds(run_left)}"
        )

    def _start_heartbeat(self) -> None:
        self._beat_stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="nucflow-record", daemon=True)
        self._beat.start()

    def _stop_heartbeat(self) -> None:
        # Joined before the stage ends, so no heartbeat write can follow the run's last one.
        self._beat_stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None

    def _heartbeat(self) -> None:
        while not self._beat_stop.wait(self.settings.record_s):
            self.save()

    # -- run.json

    def snapshot(self) -> dict[str, Any]:
        """The ``progress`` record of run.json."""
        stage_left, run_left = self.etas()
        with self._lock:
            stages = {
                s.name: {
                    "state": s.state,
                    "elapsed_s": round(s.elapsed, 3),
                    "passes": [p.as_json() for p in s.passes],
                    **({"planned_passes": self.plan[s.name]} if s.name in self.plan else {}),
                }
                for s in self.stages.values()
            }
            current = self.current.passes[-1] if self.current and self.current.passes else None
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": self._started,
            "elapsed_s": round(self.elapsed, 3),
            "stage": self.current.name if self.current else None,
            "pass": current.as_json() if current else None,
            "rate_mvoxel_s": round(self._rate(current), 6) if current else None,
            "eta_s": {"stage": _rounded(stage_left), "run": _rounded(run_left)},
            "plan": dict(self.plan),
            "stages": stages,
            "workers": _workers(self._runner),
            "dashboard": getattr(self._runner, "dashboard_link", None),
        }

    def _rate(self, record: PassRecord) -> float:
        return record.fraction * self.voxels / max(record.elapsed, 1e-9) / 1e6

    def save(self) -> None:
        """Put the snapshot into the run's facts and rewrite run.json (never raises)."""
        with contextlib.suppress(Exception):
            self._record["progress"] = self.snapshot()
            self._write()


def _passes_said(record: StageRecord) -> str:
    """`` (7 passes of 8 blocks, 1 skipped: nothing to do)``: what a stage's one line says of
    its passes."""
    ran = [p for p in record.passes if not p.skipped]
    if not ran:
        return ""
    blocks = sorted({p.total for p in ran})
    each = f"{blocks[0]}" if len(blocks) == 1 else f"{blocks[0]}-{blocks[-1]}"
    n, skipped = len(record.passes), len(record.passes) - len(ran)
    return (
        f" ({n} pass{'es' if n != 1 else ''} of {each} block{'s' if each != '1' else ''}"
        + (f", {skipped} skipped: nothing to do" if skipped else "")
        + ")"
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _workers(runner: Any) -> int | None:
    """Workers computing now: the client's, else the pool's."""
    client = getattr(runner, "client", None)
    if client is not None:
        with contextlib.suppress(Exception):
            return len(client.nthreads())
        return None
    return getattr(runner, "num_workers", None) or os.cpu_count()


# --- hooks for pipeline and flows -------------------------------------------------------------


def attach(run: Any, write: Callable[[], None]) -> RunProgress:
    """Give ``run`` (a :class:`nucflow.pipeline.Run`) a :class:`RunProgress` and make its
    runner report through it.

    Parameters
    ----------
    run : nucflow.pipeline.Run
    write : callable
        Rewrites the run's run.json as running (its ``progress`` fact is kept current).
    """
    voxels = math.prod(s.stop - s.start for s in run.region) if run.region else 0
    runner = run.runner
    previous = getattr(runner, "reporter", None)
    tracker = RunProgress(
        voxels=voxels or math.prod(run.stack.data.shape),
        write=write,
        runner=runner,
        settings=Settings.from_config(run.config),
        draw=getattr(previous, "draw", False),
        record=run.facts,
    )
    run.progress = tracker
    if previous is not None:
        runner.reporter = tracker
    tracker.save()
    return tracker


@contextlib.contextmanager
def stage(run: Any, name: str) -> Iterator[None]:
    """``run``'s stage ``name`` (a no-op for a run without :func:`attach`)."""
    tracker = getattr(run, "progress", None)
    if tracker is None:
        yield
        return
    with tracker.stage(name):
        yield


def expect(run: Any, plan: Mapping[str, int]) -> None:
    """Tell ``run``'s progress how many passes each stage will run (for the run's ETA)."""
    tracker = getattr(run, "progress", None)
    if tracker is not None:
        tracker.plan = dict(plan)


def skipped(run: Any, label: str) -> None:
    """A planned pass ``label`` of ``run``'s current stage has nothing to do (a component
    selection that keeps every component): it is recorded as a skipped pass, so the stage's
    pass total, its ETA and ``planned_passes`` stay those it started with."""
    tracker = getattr(run, "progress", None)
    if tracker is not None:
        tracker.skip(label)
