"""``--cluster slurm``: a dask-jobqueue SLURMCluster with per-run TLS and walltime retirement."""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
from pathlib import Path
from typing import Any

import dask

from nucflow.cluster.backends import Backend, Request
from nucflow.cluster.options import _SLURM_PRIVATE, DEFAULT_DASHBOARD, _check_keys, _defaults
from nucflow.cluster.runner import Runner
from nucflow.cluster.security import (
    _check_dashboard,
    _credential_parent,
    _CredentialFolder,
    _is_loopback,
    _temporary_security,
)
from nucflow.cluster.walltime import _WALLTIME_TOPIC, Lifetime, _Handover, _walltime_plugin
from nucflow.errors import ClusterError


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

    def lifetime(self, req: Request) -> Lifetime | None:
        return _slurm_lifetime(_slurm_options(req.options, _import_jobqueue()))

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
