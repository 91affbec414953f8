"""TLS credentials made for a run, loopback checks, and warnings when something is opened to the
network."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import dask

from nucflow.cluster.options import _DASHBOARD, _DUMPED_CREDENTIALS, DEFAULT_DASHBOARD
from nucflow.errors import ClusterError, NucflowWarning


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
            NucflowWarning,
            stacklevel=4,
        )
    return text


def _warn_unauthenticated(address: str) -> None:
    """One line when a tcp:// scheduler is on another machine (anyone on the way can use it)."""
    if address.startswith("tcp://") and not _is_loopback(_address_host(address)):
        warnings.warn(
            f"{address} is a plain tcp:// scheduler on the network: the connection is neither "
            "encrypted nor authenticated; use tls:// with your dask TLS config",
            NucflowWarning,
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
