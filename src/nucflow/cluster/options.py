"""What ``--cluster`` and ``cluster.*`` settings may say: the keys each backend takes, checked."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from nucflow.config import resource_path
from nucflow.errors import ClusterError

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


def _defaults(name: str) -> dict[str, Any]:
    """Read configs/cluster/NAME.yaml: from the wheel (nucflow/_configs) or the source tree."""
    path = resource_path("configs", f"cluster/{name}.yaml")
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ClusterError(f"{path} must hold a mapping of settings")
    return _normalize(data)
