"""Where the computation runs: the one module that touches a Dask scheduler.

``connect(spec)`` turns a ``--cluster`` value into a :class:`Runner` whose ``compute`` runs dask
collections with a progress bar. Specs:

``threads`` (default)
    dask's threaded scheduler in this process; no client.
``processes``
    dask's multiprocessing scheduler; no client.
``local``
    a :class:`distributed.LocalCluster` sized from ``settings`` or ``configs/cluster/local.yaml``.
``slurm``
    a :class:`dask_jobqueue.SLURMCluster` configured the conventional way, from the user's dask
    config (``jobqueue.slurm.*`` / ``DASK_JOBQUEUE__SLURM__*``), ``settings`` overriding and
    ``configs/cluster/slurm.yaml`` filling what neither sets.
``tcp://HOST:PORT``, ``tls://HOST:PORT`` (or ``scheduler_file=``)
    an existing scheduler, which closing the context leaves running.

Security: every scheduler nucflow starts (``local``, on 127.0.0.1 too, and ``slurm``) speaks
TLS with credentials made for the run, so only the run's own client and workers can connect to
it; its dashboard, and a LocalCluster's workers' HTTP servers, listen on 127.0.0.1 unless
``dashboard_address`` (``worker_dashboard_address``) says otherwise.

Walltimes: a Slurm worker retires before its job's walltime (:class:`_Lifetime`): it takes no
new task, lets its running ones finish while there is time, hands its results over and leaves;
the scheduler reruns what it could not finish without counting that as a worker's death.
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import inspect
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import dask
import yaml

from nucflow import progress as _progress
from nucflow.errors import ClusterError

__all__ = [
    "BACKENDS",
    "Backend",
    "Lifetime",
    "Runner",
    "connect",
    "describe",
    "CONNECT_TIMEOUT",
    "DEFAULT_DASHBOARD",
]

#: Seconds to wait for an existing scheduler before giving up with a ClusterError.
CONNECT_TIMEOUT = 5

_ADDRESS = re.compile(r"^[a-z][a-z0-9+.-]*://\S+$")
_HOST_PORT = re.compile(r"^[\w.-]+:\d+$")
_LOCAL_KEYS = frozenset(
    {
        "n_workers",
        "threads_per_worker",
        "memory_limit",
        "processes",
        "dashboard_address",
        "local_directory",
        "host",
        "scheduler_port",
        "worker_dashboard_address",
    }
)
_POOL_KEYS = frozenset({"num_workers"})
_SLURM_PRIVATE = frozenset(
    {"self", "scheduler", "name", "config_name", "job_cls", "base_class_kwargs", "job_kwargs"}
)

#: Seconds between polls of a distributed scheduler's task stream for finished blocks.
_POLL_INTERVAL = 0.5

#: Where a started scheduler serves its dashboard unless told otherwise: this machine only
#: (a free port, so concurrent runs never collide on :8787).
DEFAULT_DASHBOARD = "127.0.0.1:0"
_DASHBOARD = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[\w.-]*):(?P<port>\d{1,5})$")
#: The files dask-jobqueue writes a Security's in-memory credentials to, as attributes of
#: the cluster holding them open (closing one deletes it).
_DUMPED_CREDENTIALS = ("_job_ca_file", "_job_cert", "_job_key")


# --- parsing ---------------------------------------------------------------------------


def _prepare(
    spec: str,
    scheduler_file: str | os.PathLike[str] | None,
    jobs: int | None,
    adapt: tuple[int, int] | None,
    settings: Mapping[str, Any] | None,
    dashboard_address: str | None,
) -> tuple[Backend, Request]:
    """The backend a spec names and what it is asked for, checked as :func:`connect` needs."""
    backend = _parse(spec, None if scheduler_file is None else os.fspath(scheduler_file))
    _check_scaling(backend, jobs, adapt)
    _check_dashboard_applies(backend, dashboard_address)
    options = _normalize(settings)
    if dashboard_address is not None:
        options["dashboard_address"] = dashboard_address
    return backend, Request(options, jobs, adapt)


def _parse(spec: str, scheduler_file: str | None) -> Backend:
    """The backend a spec names: a named one (BACKENDS) or an existing scheduler."""
    if scheduler_file is not None:
        if spec not in ("threads", "", None):
            raise ClusterError(
                f"--cluster {spec!r} and a scheduler file {scheduler_file!r} were both given; "
                "give only one"
            )
        return _Existing("file", os.fspath(scheduler_file))
    if not isinstance(spec, str) or not spec.strip():
        raise ClusterError(_unknown_message(repr(spec)))
    text = spec.strip()
    if _ADDRESS.match(text):
        return _Existing("address", text)
    if _HOST_PORT.match(text):
        # dask's convention: a bare HOST:PORT means TCP.
        return _Existing("address", f"tcp://{text}")
    backend = BACKENDS.get(text.lower())
    if backend is None:
        raise ClusterError(_unknown_message(text))
    return backend


def _unknown_message(text: str) -> str:
    hint = difflib.get_close_matches(text.lower(), list(BACKENDS), n=1, cutoff=0.6)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return (
        f"unknown --cluster {text!r}; choose {', '.join(BACKENDS)} or tcp://HOST:PORT{suggestion}"
    )


def _check_scaling(backend: Backend, jobs: int | None, adapt: tuple[int, int] | None) -> None:
    if jobs is not None and adapt is not None:
        raise ClusterError("give either jobs (a fixed number) or adapt=(MIN, MAX), not both")
    if (jobs is not None or adapt is not None) and not backend.starts_workers:
        what = "jobs" if jobs is not None else "adapt"
        raise ClusterError(f"{what} applies only to --cluster {_starting()}, not {backend.name!r}")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ClusterError(f"jobs must be a whole number >= 1, got {jobs!r}")
    if adapt is not None:
        try:
            low, high = (int(v) for v in adapt)
        except (TypeError, ValueError) as exc:
            raise ClusterError(
                f"adapt must be a pair (MIN, MAX) of whole numbers, got {adapt!r}"
            ) from exc
        if not 0 <= low <= high or high < 1:
            raise ClusterError(
                f"adapt=(MIN, MAX) needs 0 <= MIN <= MAX and MAX >= 1, got {adapt!r}"
            )


def _normalize(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """Settings keys in dask-config spelling (``job-extra-directives``) become kwargs names."""
    return {str(k).replace("-", "_"): v for k, v in (settings or {}).items()}


def _check_keys(settings: Mapping[str, Any], allowed: frozenset[str], kind: str) -> None:
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ClusterError(
            f"unknown setting(s) {', '.join(unknown)} for --cluster {kind}; "
            f"valid: {', '.join(sorted(allowed)) or 'none'}"
        )


# --- security --------------------------------------------------------------------------


def _is_loopback(host: str | None) -> bool:
    """True if ``host`` names only loopback addresses, i.e. only this machine can reach it."""
    host = (host or "").strip("[]")
    if not host:
        return False  # "" and None bind every interface
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False  # unknown: assume the worst
    return all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def _address_host(address: str) -> str:
    """HOST of ``proto://HOST:PORT`` (brackets of an IPv6 HOST removed)."""
    rest = address.split("://", 1)[-1]
    host = rest.rsplit(":", 1)[0] if rest.count(":") == 1 or rest.startswith("[") else rest
    return host.strip("[]")


def _check_dashboard(address: Any, *, default_host: str = "") -> str:
    """Validate a dashboard ``HOST:PORT``; warn (one line) when it is served to the network.

    ``default_host`` is where ``:PORT`` binds: the LocalCluster's host, every interface
    for a jobqueue scheduler.
    """
    text = str(address).strip()
    match = _DASHBOARD.match(text)
    if not match or int(match["port"]) > 65535:
        raise ClusterError(
            f"--dashboard-address {address!r} must be HOST:PORT or :PORT (port 0 picks a free "
            "one), e.g. --dashboard-address 127.0.0.1:8787"
        )
    if not _is_loopback(match["host"] or default_host):
        warnings.warn(
            f"the dask dashboard on {text} is open to the network with no authentication; "
            f"leave out --dashboard-address to keep it on {DEFAULT_DASHBOARD.split(':')[0]} "
            "and view it through ssh -L",
            UserWarning,
            stacklevel=4,
        )
    return text


def _warn_unauthenticated(address: str) -> None:
    """One line when a tcp:// scheduler is on another machine (anyone on the way can use it)."""
    if address.startswith("tcp://") and not _is_loopback(_address_host(address)):
        warnings.warn(
            f"{address} is a plain tcp:// scheduler on the network: the connection is neither "
            "encrypted nor authenticated; use tls:// with your dask TLS config",
            UserWarning,
            stacklevel=4,
        )


def _temporary_security() -> Any:
    """A Security with a fresh self-signed key and certificate, held in memory for one run."""
    from distributed.security import Security

    try:
        return Security.temporary()
    except ImportError as exc:  # cryptography: a nucflow dependency, but may be removed
        raise ClusterError(
            "nucflow secures its schedulers with TLS, which needs the cryptography package; "
            "pip install cryptography"
        ) from exc


class _CredentialFolder:
    """A 0700 folder for the worker jobs' copy of the run's TLS credentials.

    dask-jobqueue writes in-memory credentials to files (0600, by ``tempfile``) in the
    cluster's ``shared_temp_directory``, where the worker jobs read them; this folder is
    that directory, made for one run and removed with everything in it at the end.
    """

    def __init__(self, parent: str | os.PathLike[str]) -> None:
        base = Path(os.path.expandvars(os.fspath(parent))).expanduser()
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = Path(tempfile.mkdtemp(prefix="nucflow-tls-", dir=base))  # mode 0700
        self.cluster: Any = None

    def remove(self) -> None:
        # Close dask-jobqueue's open temporary files first (each deletes its file), or they
        # would fail to delete files already gone when the cluster is garbage collected.
        for name in _DUMPED_CREDENTIALS:
            handle = getattr(self.cluster, name, None)
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()
        shutil.rmtree(self.path, ignore_errors=True)


def _credential_parent(options: dict) -> str:
    """Where the per-run credential folder goes: a directory the worker jobs also see.

    ``shared_temp_directory`` from settings or the dask config (dask-jobqueue's key), else
    ``~/.cache/nucflow``: home directories are shared with the compute nodes on clusters.
    """
    configured = options.pop("shared_temp_directory", None) or dask.config.get(
        "jobqueue.slurm.shared-temp-directory", default=None
    )
    return configured or str(Path.home() / ".cache" / "nucflow")


# --- packaged defaults -----------------------------------------------------------------


def _defaults(name: str) -> dict[str, Any]:
    """Read configs/cluster/NAME.yaml: from the wheel (nucflow/_configs) or the source tree."""
    candidates = [resources.files("nucflow") / "_configs" / "cluster" / f"{name}.yaml"]
    # Editable installs and the source tree keep configs/ at the repository root.
    candidates.append(Path(__file__).resolve().parents[2] / "configs" / "cluster" / f"{name}.yaml")
    for path in candidates:
        if path.is_file():
            data = yaml.safe_load(path.read_text()) or {}
            if not isinstance(data, dict):
                raise ClusterError(f"{path} must hold a mapping of settings")
            return _normalize(data)
    return {}


# --- the runner ------------------------------------------------------------------------


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
                UserWarning,
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


# --- backends --------------------------------------------------------------------------


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


# --- connect ---------------------------------------------------------------------------


@contextlib.contextmanager
def connect(
    spec: str = "threads",
    *,
    scheduler_file: str | os.PathLike[str] | None = None,
    jobs: int | None = None,
    adapt: tuple[int, int] | None = None,
    settings: Mapping[str, Any] | None = None,
    progress: bool = True,
    dashboard_address: str | None = None,
) -> Iterator[Runner]:
    """Connect to (or create) the scheduler named by ``spec`` and yield a :class:`Runner`.

    Parameters
    ----------
    spec : str, optional
        ``threads`` (default), ``processes``, ``local``, ``slurm`` or a scheduler address
        ``tcp://HOST:PORT`` / ``tls://HOST:PORT`` (TLS credentials from the dask config
        ``distributed.comm.tls.*``).
    scheduler_file : path, optional
        A scheduler file written by ``dask scheduler --scheduler-file`` or dask-jobqueue's
        SLURMRunner; replaces ``spec``.
    jobs : int, optional
        ``slurm``: number of worker jobs (default 1); ``local``: number of workers.
    adapt : (int, int), optional
        ``slurm``: ``cluster.adapt(minimum_jobs=MIN, maximum_jobs=MAX)``; ``local``:
        ``cluster.adapt(minimum=MIN, maximum=MAX)``.
    settings : mapping, optional
        Overrides: ``num_workers`` for threads/processes; LocalCluster keywords for local
        (``n_workers``, ``threads_per_worker``, ``memory_limit``, …); dask-jobqueue keys for
        slurm (``cores``, ``memory``, ``queue``, ``walltime``, ``account``,
        ``job-extra-directives``, ``local-directory``, ``log-directory``, …).
    progress : bool, optional
        Draw a progress bar on stderr for each ``compute``.
    dashboard_address : str, optional
        ``local`` and ``slurm``: where the scheduler serves its dashboard, ``HOST:PORT``
        (default :data:`DEFAULT_DASHBOARD`, this machine only); a warning says when it is
        reachable from the network.

    Yields
    ------
    Runner

    Raises
    ------
    ClusterError
        The spec is unknown, the scheduler unreachable, or Slurm / dask-jobqueue missing.

    Warns
    -----
    UserWarning
        The dashboard is open to the network, or a ``tcp://`` scheduler is on another host.

    Notes
    -----
    Leaving the context closes what ``connect`` created (client, LocalCluster, Slurm jobs),
    never a scheduler it merely connected to. ``local`` and ``slurm`` use TLS with credentials
    made for this run (Slurm's worker jobs read them from a 0700 folder of 0600 files, removed
    on leaving); others cannot connect.
    """
    backend, req = _prepare(spec, scheduler_file, jobs, adapt, settings, dashboard_address)
    with contextlib.ExitStack() as stack:
        runner = backend.start(req, progress, stack)
        runner.spec = spec if scheduler_file is None else os.fspath(scheduler_file)
        link = runner.dashboard_link
        if link:
            note = _dashboard_note(link) if link.startswith("http://127.0.0.1:") else ""
            print(f"nucflow: dask dashboard at {link}{note}", file=sys.stderr)
        yield runner


def _check_dashboard_applies(backend: Backend, dashboard_address: str | None) -> None:
    if dashboard_address is not None and not backend.starts_workers:
        raise ClusterError(
            f"--dashboard-address applies only to --cluster {_starting()} (nucflow starts "
            f"no scheduler for {backend.name!r}); leave it out"
        )


def _starting() -> str:
    """The backends that start a scheduler and workers, e.g. "local or slurm"."""
    return " or ".join(name for name, b in BACKENDS.items() if b.starts_workers)


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


def _secure_local(kwargs: dict[str, Any]) -> dict[str, Any]:
    """LocalCluster keywords with TLS for the run, and its HTTP servers on loopback.

    Every LocalCluster speaks TLS with credentials made for the run (held in memory; its
    worker processes get them from the cluster): on 127.0.0.1 too, where any user of the
    machine could otherwise connect and run code as the run's owner. LocalCluster binds to
    127.0.0.1 unless given a ``host``; a ``:PORT`` dashboard binds to that same host, so it
    is spelled out here for the check. The workers' HTTP servers (metrics, health; a dashboard
    with bokeh) listen on their host unless told otherwise: on 127.0.0.1 when that host is
    not loopback.
    """
    host = "127.0.0.1" if kwargs.get("host") is None else _address_host(str(kwargs["host"]))
    kwargs = {**kwargs, "dashboard_address": _check_dashboard(_spelled(kwargs, host))}
    if kwargs.get("worker_dashboard_address") is not None:
        given = _spelled(kwargs, host, "worker_dashboard_address")
        kwargs["worker_dashboard_address"] = _check_dashboard(given)
    elif not _is_loopback(host):
        kwargs["worker_dashboard_address"] = DEFAULT_DASHBOARD
    kwargs["security"] = _temporary_security()
    return kwargs


def _spelled(kwargs: dict[str, Any], host: str, key: str = "dashboard_address") -> str:
    """A dashboard address with its host spelled out: ``:PORT`` binds to the cluster's host."""
    address = str(kwargs.get(key) or DEFAULT_DASHBOARD)
    if address.startswith(":"):
        address = f"{host}{address}" if ":" not in host else f"[{host}]{address}"
    return address


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


# --- slurm -----------------------------------------------------------------------------


def _import_jobqueue() -> Any:
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise ClusterError(
            # a dependency of nucflow since 0.1; the `slurm` extra is kept as an alias
            "--cluster slurm needs dask-jobqueue, which is missing from this environment; "
            "pip install 'nucflow[slurm]'"
        ) from exc
    return dask_jobqueue


def _slurm_keys(jobqueue: Any) -> frozenset[str]:
    """Every keyword SLURMCluster accepts (its own, its job class's and the base classes')."""
    names: set[str] = set()
    for func in (
        jobqueue.slurm.SLURMJob.__init__,
        jobqueue.core.Job.__init__,
        jobqueue.core.JobQueueCluster.__init__,
    ):
        for param in inspect.signature(func).parameters.values():
            if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                names.add(param.name)
    return frozenset(names - _SLURM_PRIVATE)


def _slurm_options(options: dict, jobqueue: Any) -> dict[str, Any]:
    """Keywords for SLURMCluster: settings > user's dask config > configs/cluster/slurm.yaml.

    Keys the user's dask config sets are left to dask-jobqueue, which reads them itself;
    the packaged defaults only fill keys the config leaves null or empty.
    """
    allowed = _slurm_keys(jobqueue) | {"name"}
    _check_keys(options, allowed, "slurm")
    fallbacks = _defaults("slurm")
    _check_keys(fallbacks, allowed, "slurm (configs/cluster/slurm.yaml)")
    kwargs: dict[str, Any] = {}
    for key, value in fallbacks.items():
        configured = dask.config.get(f"jobqueue.slurm.{key.replace('_', '-')}", default=None)
        if configured in (None, {}, []):
            kwargs[key] = value
    kwargs.update(options)
    # In dask-jobqueue, config key `name` is the job name; the `name` kwarg names a worker.
    if "name" in kwargs:
        kwargs["job_name"] = kwargs.pop("name")
    kwargs = _secure_slurm(kwargs)
    return kwargs


def _slurm_lifetime(kwargs: dict[str, Any]) -> Lifetime | None:
    """The retirement schedule of the worker jobs, from their walltime; None without one, or
    where the user's worker options set distributed's own ``--lifetime``."""
    walltime = _configured(kwargs, "walltime", None)
    if not walltime or "--lifetime" in kwargs["worker_extra_args"]:
        return None
    return Lifetime.of(walltime)


def _configured(kwargs: dict[str, Any], key: str, default: Any) -> Any:
    """A SLURMCluster keyword as dask-jobqueue would resolve it: kwargs, then the dask config."""
    if key in kwargs:
        return kwargs[key]
    value = dask.config.get(f"jobqueue.slurm.{key.replace('_', '-')}", default=None)
    return default if value is None else value


def _secure_slurm(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The scheduler's dashboard on loopback unless asked otherwise; no worker dashboards.

    dask-jobqueue's own default is :8787 on every interface, and every worker job would
    serve a dashboard of its own on its node's address.
    """
    kwargs = dict(kwargs)
    dashboard = kwargs.pop("dashboard_address", None)
    scheduler = dict(_configured(kwargs, "scheduler_options", {}))
    if dashboard is not None:
        scheduler["dashboard_address"] = dashboard
    scheduler.setdefault("dashboard_address", DEFAULT_DASHBOARD)
    scheduler["dashboard_address"] = _check_dashboard(scheduler["dashboard_address"])
    kwargs["scheduler_options"] = scheduler
    extra = list(_configured(kwargs, "worker_extra_args", []))
    if not any(arg in ("--dashboard", "--no-dashboard") for arg in extra):
        extra.append("--no-dashboard")
    kwargs["worker_extra_args"] = extra
    return kwargs


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
    # (nucflow.cluster._WalltimePlugin), which the module's __getattr__ resolves on a worker.
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


class _Slurm(Backend):
    """A dask-jobqueue SLURMCluster: worker jobs submitted with sbatch, TLS for the run."""

    name = "slurm"
    starts_workers = True

    def describe(self, req: Request) -> str:
        kw = _slurm_options(req.options, _import_jobqueue())

        def get(key: str) -> Any:
            return kw.get(key, dask.config.get(f"jobqueue.slurm.{key}", default=None))

        scale = (
            f"adapting {req.adapt[0]}-{req.adapt[1]} jobs"
            if req.adapt
            else f"{req.jobs or 1} job(s)"
        )
        return (
            f"slurm: SLURMCluster, {scale} of {get('cores')} core(s) / {get('memory')}, "
            f"queue {get('queue') or 'default'}, walltime {get('walltime')}"
        )

    def start(self, req: Request, progress: bool, stack: contextlib.ExitStack) -> Runner:
        jobqueue = _import_jobqueue()
        if shutil.which("sbatch") is None:
            raise ClusterError(
                "--cluster slurm needs Slurm's sbatch on PATH; run on a Slurm login node, "
                "load the Slurm module, or choose --cluster local"
            )
        from distributed import Client

        kwargs = _slurm_options(req.options, jobqueue)
        credentials = None
        if "security" not in kwargs:  # a Security given in settings is the user's choice
            credentials = _CredentialFolder(_credential_parent(kwargs))
            stack.callback(credentials.remove)  # after the cluster closes (stacks unwind LIFO)
            kwargs["security"] = _temporary_security()
            kwargs["shared_temp_directory"] = str(credentials.path)
        _private_log_directory(kwargs)
        try:
            cluster = stack.enter_context(jobqueue.SLURMCluster(**kwargs))
        except (TypeError, ValueError) as exc:
            raise ClusterError(
                f"cannot configure SLURMCluster ({exc}); set jobqueue.slurm.* in your dask config "
                "or DASK_JOBQUEUE__SLURM__* variables"
            ) from exc
        low, high = req.adapt if req.adapt is not None else (req.jobs or 1, req.jobs or 1)
        # Adaptive even for a fixed count: cluster.scale(jobs=N) never replaces a job that
        # Slurm ended (walltime, preemption, scancel), and the computation would wait forever.
        handover = _Handover(cluster, low, high)
        handover.adapt()
        if credentials is not None:
            credentials.cluster = cluster
        client = stack.enter_context(Client(cluster))
        lifetime = _slurm_lifetime(kwargs)
        if lifetime is not None:
            client.subscribe_topic(_WALLTIME_TOPIC, handover)
            client.register_plugin(_walltime_plugin(lifetime))
        local = _is_loopback(kwargs["scheduler_options"]["dashboard_address"].rpartition(":")[0])
        runner = Runner(
            self.name, client=client, cluster=cluster, progress=progress, dashboard_local=local
        )
        runner.lifetime = lifetime
        return runner


def _private_log_directory(kwargs: dict[str, Any]) -> None:
    """Create the job log folder owner-only: worker logs name the scheduler's address."""
    folder = _configured(kwargs, "log_directory", None)
    if folder:
        Path(os.path.expandvars(os.fspath(folder))).expanduser().mkdir(
            parents=True, exist_ok=True, mode=0o700
        )


# --- describe --------------------------------------------------------------------------


def describe(
    spec: str = "threads",
    *,
    scheduler_file: str | os.PathLike[str] | None = None,
    jobs: int | None = None,
    adapt: tuple[int, int] | None = None,
    settings: Mapping[str, Any] | None = None,
    dashboard_address: str | None = None,
) -> str:
    """One line telling where :func:`connect` with the same arguments would compute.

    Validates the arguments like :func:`connect` but starts and contacts nothing.

    Returns
    -------
    str
        E.g. ``"local: LocalCluster, 2 workers x 1 thread, memory_limit auto"``.

    Raises
    ------
    ClusterError
        As :func:`connect` would for an unknown spec or bad options.
    """
    backend, req = _prepare(spec, scheduler_file, jobs, adapt, settings, dashboard_address)
    return backend.describe(req)


#: The backends ``--cluster`` names, in the order help and error messages list them.
BACKENDS: dict[str, Backend] = {
    b.name: b for b in (_Pool("threads"), _Pool("processes"), _Local(), _Slurm())
}
