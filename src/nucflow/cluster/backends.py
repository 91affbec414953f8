"""The backends: ``threads``/``processes`` (dask's pools), ``local`` (LocalCluster), an existing
scheduler; the ``Backend`` protocol they share."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import dask

from nucflow.cluster.options import _LOCAL_KEYS, _POOL_KEYS, CONNECT_TIMEOUT, _check_keys, _defaults
from nucflow.cluster.runner import Runner
from nucflow.cluster.security import (
    _check_dashboard,
    _is_loopback,
    _secure_local,
    _warn_unauthenticated,
)
from nucflow.cluster.walltime import Lifetime
from nucflow.errors import ClusterError


@dataclass(frozen=True)
class Request:
    """What :func:`connect` or :func:`describe` was asked for, checked: the settings (as
    keyword names, with the dashboard address) and the number of workers or jobs."""

    options: dict[str, Any]
    jobs: int | None = None
    adapt: tuple[int, int] | None = None


class Backend:
    """One kind of ``--cluster``: how its options are checked, described and started.

    A new backend is a subclass with ``describe`` and ``start``, registered in
    :data:`BACKENDS` under the name ``--cluster`` takes.
    """

    #: The name ``--cluster`` takes (``"address"``/``"file"`` for an existing scheduler).
    name: str = ""
    #: Starts its own scheduler and workers: takes ``jobs``/``adapt`` and a dashboard address.
    starts_workers: bool = False

    def describe(self, req: Request) -> str:
        """One line saying where computing would happen; checks ``req.options``, starts nothing."""
        raise NotImplementedError

    def start(self, req: Request, progress: bool, stack: contextlib.ExitStack) -> Runner:
        """Start (or connect to) the scheduler; ``stack`` closes what was started."""
        raise NotImplementedError

    def lifetime(self, req: Request) -> Lifetime | None:
        """How long its workers live before they retire (a walltime), if they do."""
        return None


class _Pool(Backend):
    """dask's threaded or multiprocessing scheduler in this process; no client."""

    def __init__(self, name: str) -> None:
        self.name = name

    def describe(self, req: Request) -> str:
        _check_keys(req.options, _POOL_KEYS, self.name)
        n = req.options.get("num_workers") or os.cpu_count()
        what = "threaded" if self.name == "threads" else "multiprocessing"
        return f"{self.name}: dask {what} scheduler, {n} {self.name} on this machine"

    def start(self, req: Request, progress: bool, stack: contextlib.ExitStack) -> Runner:
        _check_keys(req.options, _POOL_KEYS, self.name)
        num_workers = req.options.get("num_workers")
        # The scheduler function itself, not its name: for a name, dask imports distributed
        # (0.1 s) to look for a Client first.
        scheduler = _pool_scheduler(self.name)
        keep_freed_arrays()
        config: dict[str, Any] = {"scheduler": scheduler}
        if num_workers is not None:
            config["num_workers"] = int(num_workers)
        if self.name == "processes":
            # One pool for the whole run: dask would start (spawn, import) a new pool for
            # every compute, and a run computes one pass after another (~2 s each on 2 cores).
            config["pool"] = stack.enter_context(_process_pool(num_workers))
        # Plain .compute() calls inside the context go to the same scheduler.
        stack.enter_context(dask.config.set(config))
        return Runner(self.name, scheduler=scheduler, num_workers=num_workers, progress=progress)


def _process_pool(num_workers: int | None) -> Any:
    """A process pool set up as ``dask.multiprocessing.get`` sets up its own."""
    from concurrent.futures import ProcessPoolExecutor

    import dask.multiprocessing as mp

    if os.environ.get("PYTHONHASHSEED") in (None, "0"):
        os.environ["PYTHONHASHSEED"] = "6640"  # as dask: consistent hashing in the workers
    initializer = partial(mp.initialize_worker_process, user_initializer=None)
    workers = int(num_workers) if num_workers else mp.CPU_COUNT
    return ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context(),
        initializer=partial(_initialize_worker_process, initializer),
    )


# glibc's malloc hands every array above its mmap threshold (at most 32 MiB) back to the
# system when it is freed, and trims a freed heap top above 128 KiB: a pass whose tasks
# allocate a block's arrays anew then pays a page fault per 4 KiB of each, every task (about
# a third of a default run's CPU time was spent in the kernel, most of it there). Above these
# limits the arrays stay mapped for the next task: a process keeps at most its largest task's
# free arrays once more (at most 256 MiB left at the heap's top). Only where no memory monitor
# watches the RSS (threads, processes): a distributed worker with a memory limit would count
# the kept arrays as its own, pause at 80 % and never get them back (its nanny sets glibc to
# trim at 64 KiB for that reason), so LocalCluster and Slurm workers keep glibc's defaults.
_KEEP_MAPPED = 256 * 2**20


_MALLOPT = {-1: _KEEP_MAPPED, -3: _KEEP_MAPPED}  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD


def keep_freed_arrays() -> bool:
    """Make glibc's malloc keep freed block-sized arrays for reuse in this process.

    Returns
    -------
    bool
        False where the C library is not glibc (nothing changed).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in _MALLOPT.items())


def _initialize_worker_process(initializer: Any) -> None:
    keep_freed_arrays()
    initializer()


def _pool_scheduler(kind: str) -> Any:
    if kind == "processes":
        import dask.multiprocessing

        return dask.multiprocessing.get
    import dask.threaded

    return dask.threaded.get


def _local_options(options: dict, jobs: int | None) -> dict[str, Any]:
    _check_keys(options, _LOCAL_KEYS, "local")
    merged = {**_defaults("local"), **options}
    _check_keys(merged, _LOCAL_KEYS, "local (configs/cluster/local.yaml)")
    if jobs is not None:
        merged["n_workers"] = jobs
    # None in the yaml means "let LocalCluster choose".
    return {k: v for k, v in merged.items() if v is not None}


class _Local(Backend):
    """A distributed LocalCluster sized from settings or ``configs/cluster/local.yaml``."""

    name = "local"
    starts_workers = True

    def describe(self, req: Request) -> str:
        kw = _local_options(req.options, req.jobs)
        if "dashboard_address" in req.options:
            host = "127.0.0.1" if kw.get("host") is None else str(kw["host"])
            _check_dashboard(req.options["dashboard_address"], default_host=host)
        workers = kw.get("n_workers", "auto")
        scale = (
            f"adapting {req.adapt[0]}-{req.adapt[1]} workers" if req.adapt else f"{workers} workers"
        )
        return (
            f"local: LocalCluster, {scale} x {kw.get('threads_per_worker', 'auto')} threads, "
            f"memory_limit {kw.get('memory_limit', 'auto')} each"
        )

    def start(self, req: Request, progress: bool, stack: contextlib.ExitStack) -> Runner:
        from distributed import Client, LocalCluster

        kwargs = _local_options(req.options, req.jobs)
        kwargs = _secure_local(kwargs)
        try:
            cluster = stack.enter_context(LocalCluster(**kwargs))
        except (TypeError, ValueError) as exc:
            raise ClusterError(f"cannot start a LocalCluster with {kwargs}: {exc}") from exc
        if req.adapt is not None:
            cluster.adapt(minimum=req.adapt[0], maximum=req.adapt[1])
        client = stack.enter_context(Client(cluster))
        local = _is_loopback(kwargs["dashboard_address"].rpartition(":")[0])
        return Runner(
            self.name, client=client, cluster=cluster, progress=progress, dashboard_local=local
        )


class _Existing(Backend):
    """A scheduler nucflow did not start: an address, or a scheduler file naming one.

    Leaving ``connect`` closes the client only; the scheduler keeps running.
    """

    def __init__(self, name: str, target: str) -> None:
        self.name = name  # "address" or "file"
        self.target = target

    def describe(self, req: Request) -> str:
        if self.name == "file":
            return f"existing dask scheduler from scheduler file {self.target}"
        return f"existing dask scheduler at {self.target}"

    def start(self, req: Request, progress: bool, stack: contextlib.ExitStack) -> Runner:
        from distributed import Client

        target = self.target
        _check_keys(
            req.options, frozenset(), "tcp://…" if self.name == "address" else "scheduler-file"
        )
        if self.name == "file":
            address = _read_scheduler_file(target)
            source = f" (from scheduler file {target})"
            kwargs: dict[str, Any] = {"scheduler_file": target}
        else:
            address, source, kwargs = target, "", {"address": target}
        _warn_unauthenticated(address)
        try:
            client = Client(timeout=CONNECT_TIMEOUT, **kwargs)
        except TypeError as exc:
            if "ssl_context" not in str(exc):
                raise
            raise ClusterError(_no_tls_message(address)) from exc
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"cannot reach scheduler {address}{source} within {CONNECT_TIMEOUT} s; "
                "start it or check the address"
            ) from exc
        except ValueError as exc:
            raise ClusterError(
                f"{address!r} is not a scheduler address ({exc}); use tcp://HOST:PORT"
            ) from exc
        stack.enter_context(client)
        return Runner(target, client=client, progress=progress)


def _no_tls_message(address: str) -> str:
    # distributed's Client reads its TLS credentials from the dask config by default.
    return (
        f"{address} needs TLS credentials: set distributed.comm.tls.ca-file, "
        "distributed.comm.tls.client.cert and distributed.comm.tls.client.key in your dask "
        "config (or DASK_DISTRIBUTED__COMM__TLS__CA_FILE, ...)"
    )


def _read_scheduler_file(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise ClusterError(
            f"scheduler file {path} does not exist; start a scheduler with "
            f"`dask scheduler --scheduler-file {path}` or check the path"
        )
    try:
        address = json.loads(file.read_text())["address"]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ClusterError(
            f"{path} is not a dask scheduler file (a JSON object with an 'address'); "
            "point at the file `dask scheduler --scheduler-file` wrote"
        ) from exc
    return str(address)
