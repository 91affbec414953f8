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

Here: ``connect``, ``describe`` and the backend registry; ``options`` (the settings each backend
takes), ``security`` (TLS, loopback), ``walltime`` (retiring workers before their walltime),
``runner`` (``Runner``), ``backends`` (threads, processes, local, an existing scheduler),
``slurm``.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from nucflow.cluster.backends import Backend, Request, _Existing, _Local, _Pool
from nucflow.cluster.options import (
    _ADDRESS,
    _HOST_PORT,
    CONNECT_TIMEOUT,
    DEFAULT_DASHBOARD,
    _normalize,
)
from nucflow.cluster.runner import Runner, _dashboard_note
from nucflow.cluster.slurm import _Slurm
from nucflow.cluster.walltime import Lifetime
from nucflow.errors import ClusterError

__all__ = [
    "BACKENDS",
    "Backend",
    "Lifetime",
    "Runner",
    "connect",
    "describe",
    "lifetime",
    "CONNECT_TIMEOUT",
    "DEFAULT_DASHBOARD",
]


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
    NucflowWarning
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


def lifetime(
    spec: str = "threads",
    *,
    scheduler_file: str | os.PathLike[str] | None = None,
    jobs: int | None = None,
    adapt: tuple[int, int] | None = None,
    settings: Mapping[str, Any] | None = None,
    dashboard_address: str | None = None,
) -> Lifetime | None:
    """How long the workers :func:`connect` would start live before they retire (``slurm``
    with a walltime), or None; starts and contacts nothing."""
    backend, req = _prepare(spec, scheduler_file, jobs, adapt, settings, dashboard_address)
    return backend.lifetime(req)


#: The backends ``--cluster`` names, in the order help and error messages list them.
BACKENDS: dict[str, Backend] = {
    b.name: b for b in (_Pool("threads"), _Pool("processes"), _Local(), _Slurm())
}


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


def _starting() -> str:
    """The backends that start a scheduler and workers, e.g. "local or slurm"."""
    return " or ".join(name for name, b in BACKENDS.items() if b.starts_workers)
