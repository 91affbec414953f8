"""The ``Runner``: computes pass graphs on a scheduler, reports progress, retries tasks."""

from __future__ import annotations

import contextlib
import socket
import time
import warnings
from typing import Any

import dask

from nucflow import progress as _progress
from nucflow.cluster.options import _POLL_INTERVAL
from nucflow.cluster.walltime import Lifetime
from nucflow.errors import NucflowWarning


class Runner:
    """What :func:`connect` yields: computes dask collections where the user asked.

    Attributes
    ----------
    spec : str
        The cluster spec as given (``"threads"``, ``"local"``, ``"tcp://…"``, …).
    client : distributed.Client or None
        The client, for distributed specs; None for ``threads`` and ``processes``.
    dashboard_link : str or None
        The dashboard address, when the scheduler serves one.
    cluster : object or None
        The cluster object :func:`connect` created (LocalCluster, SLURMCluster), else None.

    Notes
    -----
    ``dashboard_local=True`` (a dashboard bound to loopback) makes the link name
    127.0.0.1, where the dashboard really listens, not the scheduler's network address.
    """

    def __init__(
        self,
        spec: str,
        *,
        client: Any = None,
        cluster: Any = None,
        scheduler: Any = None,
        num_workers: int | None = None,
        progress: bool = True,
        dashboard_local: bool = False,
    ) -> None:
        self.spec = spec
        self.client = client
        self.cluster = cluster
        self.dashboard_link = _dashboard_link(client, dashboard_local)
        self._scheduler = scheduler
        self.num_workers = num_workers
        #: When workers retire before their jobs' walltime (``slurm`` with a walltime), else None.
        self.lifetime: Lifetime | None = None
        self._warned_block_time = False
        #: Draws and counts every pass; a run replaces it with its own (nucflow.progress).
        self.reporter: _progress.Reporter = _progress.Reporter(draw=progress)

    def __repr__(self) -> str:
        return f"Runner(spec={self.spec!r}, client={self.client!r})"

    @property
    def scheduler(self) -> Any:
        """What ``dask.config.set(scheduler=...)`` takes: the client, else the scheduler."""
        return self.client if self.client is not None else self._scheduler

    def compute(self, *collections: Any, label: str = "", retries: int = 2) -> tuple:
        """Compute dask collections, reporting their progress on stderr (:attr:`reporter`).

        Parameters
        ----------
        *collections : dask collections or plain objects
            What to compute; plain objects pass through, as with :func:`dask.compute`.
        label : str, optional
            Names the pass in the progress report, e.g. ``"histogram"``.
        retries : int, optional
            With a client, how many times a failed task is retried; tasks lost with a
            worker are also rescheduled by the scheduler itself.

        Returns
        -------
        tuple
            One result per collection, like :func:`dask.compute`.
        """
        parts = _progress.parts_of(collections)
        if self.client is None:
            return self._compute_local(collections, label, parts)
        return self._compute_distributed(collections, label, parts, retries)

    def _compute_distributed(
        self, collections: tuple, label: str, parts: set, retries: int
    ) -> tuple:
        counter = _StreamCounter(self.client, parts)
        watch = self.reporter.begin(label, len(parts), poll=counter.poll)
        counter.watch = watch
        failed = True
        try:
            futures = self.client.compute(list(collections), retries=retries)
            result = tuple(self.client.gather(futures))
            failed = False
        finally:
            watch.finish(failed)
        self._check_block_time(counter.longest, label)
        return result

    def _check_block_time(self, seconds: float, label: str) -> None:
        """One warning when a block took more than a quarter of a worker's time before it
        retires (:attr:`lifetime`): a block running at a retirement is lost past the margin."""
        if self.lifetime is None or self._warned_block_time:
            return
        if seconds > self.lifetime.shortest / 4:
            self._warned_block_time = True
            warnings.warn(
                f"a block of the {label or 'pass'} pass took {seconds:.0f} s, more than a "
                f"quarter of the {self.lifetime.shortest} s a worker computes before it retires "
                f"(walltime {self.lifetime.walltime} s): use smaller --chunks, or a longer "
                "walltime, or blocks will be lost and rerun at each retirement",
                NucflowWarning,
                stacklevel=3,
            )

    def _compute_local(self, collections: tuple, label: str, parts: set) -> tuple:
        from dask.callbacks import Callback

        kwargs: dict[str, Any] = {"scheduler": self._scheduler}
        if self.num_workers is not None:
            kwargs["num_workers"] = self.num_workers
        watch = self.reporter.begin(label, len(parts))
        counted = set(parts)

        def start_state(dsk: Any, state: Any) -> None:
            if counted and counted.isdisjoint(dsk.keys()):  # keys renamed: count every task
                counted.clear()
                watch.set_total(len(dsk))

        def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if not counted or key in counted:
                watch.advance()

        failed = True
        try:
            with Callback(start_state=start_state, posttask=posttask):
                result = dask.compute(*collections, **kwargs)
            failed = False
            return result
        finally:
            watch.finish(failed)


class _StreamCounter:
    """Counts finished blocks from the scheduler's task stream (``Client.get_task_stream``,
    public): works alike for LocalCluster, SLURM and a scheduler nucflow did not start."""

    def __init__(self, client: Any, parts: set) -> None:
        self._client = client
        self._pending = set(parts)
        self.watch: Any = None
        #: The longest compute time of a counted block seen so far (s).
        self.longest = 0.0
        self._last = time.monotonic()
        # The first call starts the stream's recording; "0s" asks for nothing older.
        with contextlib.suppress(Exception):
            client.get_task_stream(start="0s")

    def poll(self) -> None:
        """Count the blocks finished since the last poll (overlapping windows; deduplicated)."""
        now = time.monotonic()
        if now - self._last < _POLL_INTERVAL or not self._pending:
            return
        # A duration, not a time: the scheduler measures it on its own clock.
        window = f"{now - self._last + 5 * _POLL_INTERVAL:.3f}s"
        self._last = now
        records = self._client.get_task_stream(start=window)
        done = {
            r["key"] for r in records if r.get("key") in self._pending and r.get("status") == "OK"
        }
        for record in records:
            if record.get("key") not in done:
                continue
            for span in record.get("startstops", ()):
                if span.get("action") == "compute":
                    self.longest = max(self.longest, span["stop"] - span["start"])
        self._pending -= done
        if done and self.watch is not None:
            self.watch.advance(len(done))


def _dashboard_link(client: Any, local: bool = False) -> str | None:
    if client is None:
        return None
    try:
        link = client.dashboard_link
        port = client.scheduler_info()["services"]["dashboard"] if local else None
    except (KeyError, AttributeError, OSError):  # no dashboard service
        return None
    if port:
        return f"http://127.0.0.1:{port}/status"
    return link or None


def _dashboard_note(link: str) -> str:
    """How to open a loopback dashboard from another machine: an ssh tunnel to this one."""
    port = link.split(":")[2].split("/")[0]
    return f" (elsewhere: ssh -L {port}:127.0.0.1:{port} {socket.gethostname()})"
