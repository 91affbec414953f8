"""Retiring SLURM workers before their walltime without counting it as a worker death."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any


def walltime_seconds(walltime: str | int) -> int:
    """Slurm's ``--time`` (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) in seconds."""
    text = str(walltime).strip()
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if not days and len(parts) == 1:
        seconds = parts[0] * 60
    elif not days:
        seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    else:
        seconds = sum(p * 60**i for i, p in enumerate(reversed(parts + [0] * (3 - len(parts)))))
    return int(days or 0) * 86400 + seconds


@dataclass(frozen=True)
class Lifetime:
    """When a worker of a job with a walltime retires, in seconds after its job started.

    ``stop``: it takes no new task from ``stop - stagger`` (drawn uniformly per worker, so the
    jobs of one submission do not all leave at once) to ``stop``; ``leave``: it has left by
    then, whatever it is running, ahead of Slurm's kill at ``walltime``.
    """

    walltime: int
    stop: int
    stagger: int
    leave: int

    @classmethod
    def of(cls, walltime: str | int) -> Lifetime:
        """The schedule for a Slurm ``--time``: a margin of 10 % (at least 30 s, at most 5 min,
        at most half the walltime) before the walltime to stop taking tasks, staggered by up
        to half the margin; leaving a third of the margin (at least 10 s) before the kill."""
        total = walltime_seconds(walltime)
        margin = min(max(total // 10, 30), 300, total // 2)
        leave = total - min(max(margin // 3, 10), margin)
        return cls(total, total - margin, margin // 2, leave)

    @property
    def shortest(self) -> int:
        """Seconds a worker computes at least before it stops taking tasks."""
        return self.stop - self.stagger


#: The event topic a retiring worker announces itself on (``{"phase": "retiring" | "left"}``).
_WALLTIME_TOPIC = "nucflow-walltime"


def _walltime_plugin(lifetime: Lifetime) -> Any:
    """The worker plugin that retires a worker before its job's walltime (:func:`_retire`)."""
    cls = globals().get("_WalltimePlugin") or __getattr__("_WalltimePlugin")  # made on first use
    return cls(lifetime)


def _make_walltime_plugin_class() -> type:
    # A WorkerPlugin subclass, made when first needed: importing distributed for it when this
    # module is imported would cost every threads run ~0.1 s. It is pickled by reference
    # (nucflow.cluster.walltime._WalltimePlugin), which the module's __getattr__ resolves on a
    # worker.
    from distributed.diagnostics.plugin import WorkerPlugin

    class _WalltimePlugin(WorkerPlugin):
        """Retires its worker before the walltime of the job it runs in (:func:`_retire`)."""

        name = "nucflow-walltime"
        idempotent = True

        def __init__(self, lifetime: Lifetime) -> None:
            self.lifetime = lifetime
            self._handle: Any = None

        def setup(self, worker: Any) -> None:
            import random

            started = _job_started(worker)
            stop = started + self.lifetime.stop - random.uniform(0, self.lifetime.stagger)
            leave = started + self.lifetime.leave
            delay = max(0.0, stop - time.time())
            self._handle = worker.loop.call_later(delay, _retire, worker, leave)

        def teardown(self, worker: Any) -> None:
            if self._handle is not None:
                worker.loop.remove_timeout(self._handle)

    _WalltimePlugin.__module__ = __name__
    _WalltimePlugin.__qualname__ = "_WalltimePlugin"
    return _WalltimePlugin


def __getattr__(name: str) -> Any:
    if name == "_WalltimePlugin":
        cls = _make_walltime_plugin_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _job_started(worker: Any) -> float:
    """When the worker's job started (epoch s): its nanny's process, else its own."""
    import psutil

    process = psutil.Process()
    if worker.nanny:
        with contextlib.suppress(psutil.Error):
            return min(process.create_time(), process.parent().create_time())
    return process.create_time()


async def _retire(worker: Any, leave: float) -> None:
    """Leave the cluster before the walltime, without the scheduler counting it as a death.

    The worker takes no new task (status ``closing_gracefully``: the scheduler sends it none)
    and announces itself, so that the run submits a job to replace it; it lets its running
    tasks finish while there is time (until ``leave``), hands the results it holds to another
    worker when one is there (the replacement, once it has started), then unregisters as an
    *expected* departure: the scheduler reruns whatever was still running elsewhere without
    counting it towards ``distributed.scheduler.allowed-failures``. Only then does it close.
    (distributed's own ``--lifetime`` closes the worker even when its results found no other
    worker, and the scheduler then counts every task it was running as lost to a dying worker:
    ``KilledWorker`` after four walltimes.)
    """
    import asyncio

    from distributed.core import Status

    if worker.status not in (Status.running, Status.paused):
        return
    log = logging.getLogger("distributed.worker.nucflow")  # in the job's log, as the worker's
    address = worker.address
    worker.status = Status.closing_gracefully
    name = str(worker.name)
    worker.log_event(_WALLTIME_TOPIC, {"phase": "retiring", "worker": address, "name": name})
    running = len(worker.state.executing)
    log.info(
        "nucflow: %s retires before its job's walltime: no new tasks; %d running, leaving "
        "within %.0f s",
        address,
        running,
        leave - time.time(),
    )
    while worker.state.executing and time.time() < leave:
        await asyncio.sleep(0.2)
    handed = False
    while not handed and time.time() < leave:
        stimulus = f"nucflow-walltime-{time.time()}"
        with contextlib.suppress(Exception):
            moved = await worker.scheduler.retire_workers(
                workers=[address], close_workers=False, remove=False, stimulus_id=stimulus
            )
            handed = address in moved  # nothing only this worker holds (any more)
        if not handed:
            await asyncio.sleep(1.0)
    unfinished = len(worker.state.executing)
    log.info(
        "nucflow: %s leaves: %d of %d running task(s) finished, %d to rerun elsewhere; %s",
        address,
        running - min(running, unfinished),
        running,
        unfinished,
        "results handed over"
        if handed
        else f"no worker took its {len(worker.data)} result(s), to recompute",
    )
    worker.log_event(_WALLTIME_TOPIC, {"phase": "left", "worker": address, "name": name})
    with contextlib.suppress(Exception):
        await worker.scheduler.unregister(
            address=address, stimulus_id=f"nucflow-walltime-{time.time()}", expected=True
        )
    await worker.close(nanny=True, executor_wait=False, reason="worker-lifetime-reached")


class _Handover:
    """Driver side of a worker's retirement: one more job while it retires.

    When a worker announces it retires, the adaptive bounds grow by one, so a replacement job is
    submitted while the old one still runs (with ``--jobs 1`` its results then have somewhere
    to go); they shrink back when it leaves, and its job leaves the cluster's ``worker_spec``:
    otherwise the cluster would start a job of the same name once the old one has ended, for
    adaptive scaling to cancel a few seconds later.
    """

    def __init__(self, cluster: Any, low: int, high: int) -> None:
        self.cluster = cluster
        self.low, self.high = low, high
        self.retiring: set[str] = set()

    def adapt(self) -> None:
        extra = len(self.retiring)
        self.cluster.adapt(minimum_jobs=self.low + extra, maximum_jobs=self.high + extra)

    def __call__(self, event: tuple[float, dict]) -> None:
        msg = event[1]
        worker, phase = str(msg.get("worker")), msg.get("phase")
        if phase == "retiring" and worker not in self.retiring:
            self.retiring.add(worker)
            self.adapt()
        elif phase == "left" and worker in self.retiring:
            self.retiring.discard(worker)
            self._forget(str(msg.get("name")))
            self.adapt()

    def _forget(self, name: str) -> None:
        """Drop the job a worker named ``name`` runs in from the cluster's plan (dask-jobqueue
        names a job's workers JOB, or JOB-SUFFIX when it runs several processes)."""
        spec = self.cluster.worker_spec
        for job, options in list(spec.items()):
            names = [f"{job}{suffix}" for suffix in options.get("group", ())] or [str(job)]
            if name in names:
                del spec[job]
