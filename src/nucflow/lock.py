"""One writer per output directory: a lock file that works on network filesystems.

A run claims its output directory by creating ``<output>/.nucflow.lock`` atomically: the
holder's record (host, PID, SLURM job id, start time, heartbeat) is written to a private file
first, then hard-linked to the lock's name. ``link`` fails if the name exists, and unlike
``fcntl``/``flock`` locks it is atomic on NFS too. A daemon thread rewrites the heartbeat every
:data:`HEARTBEAT_S` seconds while the run lives; the lock is removed when the run ends
(complete or failed).

A lock is *stale*, and another run may take it over (with a one-line warning), when its
heartbeat is older than :data:`STALE_AFTER_S` seconds, or when it was taken on this host by a
process that no longer exists (a killed run). Hosts compare heartbeats with their own clocks,
so clocks must agree to well within :data:`STALE_AFTER_S` (NTP does).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nucflow.errors import NucflowWarning, OutputError

__all__ = ["LOCK_NAME", "HEARTBEAT_S", "STALE_AFTER_S", "OutputLock", "acquire", "holder_of"]

LOCK_NAME = ".nucflow.lock"
#: Seconds between two heartbeats of a running run.
HEARTBEAT_S = 30.0
#: A lock whose heartbeat is older than this (seconds) belongs to a dead run: 10 heartbeats.
STALE_AFTER_S = 300.0


@dataclass
class OutputLock:
    """The lock a run holds on its output directory; :meth:`release` when the run ends.

    Attributes
    ----------
    path : Path
        The lock file, ``<output>/.nucflow.lock``.
    record : dict
        What the lock file says: ``token`` (unique to this claim), ``host``, ``pid``,
        ``slurm_job_id``, ``started``, ``heartbeat`` (Unix seconds).
    """

    path: Path
    record: dict[str, Any]
    interval: float = HEARTBEAT_S
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    lost: str | None = None  # why the lock is no longer ours (taken over by another run)

    def start_heartbeat(self) -> None:
        """Refresh the heartbeat every ``interval`` s from a daemon thread (dies with the run)."""
        self._thread = threading.Thread(target=self._beat, name="nucflow-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):  # a missed beat is retried; staleness is 10 beats
                self.refresh()

    def refresh(self) -> None:
        """Rewrite the heartbeat, unless another run has taken the lock over."""
        current = _read(self.path)
        if current is None or current.get("token") != self.record["token"]:
            self.lost = f"the lock {self.path} is now held by {describe(current)}"
            self._stop.set()
            return
        self.record["heartbeat"] = time.time()
        _write_private(self.path, self.record)

    def check(self) -> None:
        """Raise OutputError if another run took this lock over (our heartbeat stalled)."""
        if self.lost:
            raise OutputError(
                f"this run lost its output directory: {self.lost}; run again with --resume "
                "once that run has ended"
            )

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        current = _read(self.path)
        if current is not None and current.get("token") == self.record["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def acquire(
    output: Path, *, stale_after: float = STALE_AFTER_S, heartbeat: float = HEARTBEAT_S
) -> OutputLock:
    """Claim ``output`` (an existing directory) for this process and start the heartbeat.

    Parameters
    ----------
    output : Path
        The run's output directory.
    stale_after : float, optional
        A held lock whose heartbeat is older than this many seconds is taken over.
    heartbeat : float, optional
        Seconds between heartbeats.

    Returns
    -------
    OutputLock

    Raises
    ------
    OutputError
        Another live run holds the lock; the message names it.
    """
    path = output / LOCK_NAME
    record = _my_record()
    for _ in range(20):  # each turn claims, refuses, or tries to remove a stale lock
        try:
            created = _create(path, record)
        except OSError as e:
            raise OutputError(
                f"cannot create the lock {path} ({e.strerror or e}); check that the output "
                "directory is writable, or choose another --output"
            ) from e
        if created:
            lock = OutputLock(path, record, interval=heartbeat)
            lock.start_heartbeat()
            return lock
        held = _read_held(path)
        if held is None:
            continue  # released between our attempt and the read: retry
        why = stale_reason(held, stale_after=stale_after)
        if why is None:
            raise OutputError(
                f"output directory {output} is in use by {describe(held)}; wait for that run "
                f"to end, or stop it, or choose another --output"
            )
        if _remove_if_unchanged(path, held):
            warnings.warn(
                f"taking over the lock of {output}: {describe(held)} {why}",
                stacklevel=2,
                category=NucflowWarning,
            )
    raise OutputError(
        f"could not claim output directory {output}: its lock {path} keeps changing; "
        "another nucflow run is starting there: wait for it, or choose another --output"
    )


def holder_of(output: Path, *, stale_after: float = STALE_AFTER_S) -> str | None:
    """Who holds a live lock on ``output`` (one phrase), or None if it is free or stale."""
    held = _read_held(output / LOCK_NAME)
    if held is None or stale_reason(held, stale_after=stale_after) is not None:
        return None
    return describe(held)


def stale_reason(held: dict[str, Any], *, stale_after: float = STALE_AFTER_S) -> str | None:
    """Why a lock record belongs to a dead run (a phrase), or None if its run may be alive."""
    age = time.time() - float(held.get("heartbeat", 0))
    if age > stale_after:
        return f"sent no heartbeat for {age:.0f} s (stale after {stale_after:.0f} s)"
    if held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", -1))):
        return "is no longer running on this host"
    return None


def describe(held: dict[str, Any] | None) -> str:
    """``nucflow run (PID 123 on host, SLURM job 45, started 2026-…)``."""
    if not held or "pid" not in held:
        return "another nucflow run (its lock file cannot be read)"
    job = f", SLURM job {held['slurm_job_id']}" if held.get("slurm_job_id") else ""
    return (
        f"nucflow run (PID {held.get('pid')} on {held.get('host')}{job}, "
        f"started {held.get('started')})"
    )


# ----------------------------------------------------------------------------- file mechanics


def _my_record() -> dict[str, Any]:
    now = time.time()
    return {
        "token": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds"),
        "heartbeat": now,
    }


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Create ``path`` holding ``record`` if it does not exist; False if it does.

    The record is written completely under a private name first, then linked: a reader never
    sees a half-written lock, and ``link`` is atomic on NFS where ``O_EXCL`` used not to be.
    """
    private = path.with_name(f"{path.name}.{record['token']}")
    _write_private(private, record, replace=False)
    try:
        os.link(private, path)
        return True
    except FileExistsError:
        return False
    finally:
        private.unlink(missing_ok=True)


def _write_private(path: Path, record: dict[str, Any], *, replace: bool = True) -> None:
    """Write ``record`` owner-only (0600); ``replace`` swaps it in atomically."""
    target = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp") if replace else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    if replace:
        os.replace(target, path)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _read_held(path: Path) -> dict[str, Any] | None:
    """The record of an existing lock, None if there is none.

    A lock that cannot be parsed (damaged, or caught half-replaced) counts as held by an
    unknown run whose heartbeat is the file's modification time: it turns stale like any other.
    """
    try:
        found = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except PermissionError as e:
        raise OutputError(
            f"the lock {path} belongs to another user ({e.strerror}); their run holds this "
            "output directory: choose another --output"
        ) from e
    except (OSError, ValueError):
        found = None
    if isinstance(found, dict) and "token" in found:
        return found
    try:
        return {"token": None, "heartbeat": path.stat().st_mtime}
    except FileNotFoundError:
        return None


def _remove_if_unchanged(path: Path, held: dict[str, Any]) -> bool:
    """Remove the stale lock ``held``, unless it changed since it was judged.

    Only the run that holds ``<lock>.takeover`` (created like the lock) may remove a lock, so
    two runs that judged the same lock stale cannot remove the new holder's lock in turn. A
    takeover guard left by a run that died while taking over is removed after
    :data:`_GUARD_STALE_S` seconds.
    """
    guard = path.with_name(f"{path.name}.takeover")
    if not _create(guard, _my_record()):
        found = _read(guard)
        if found is None or time.time() - float(found.get("heartbeat", 0)) > _GUARD_STALE_S:
            guard.unlink(missing_ok=True)
        time.sleep(0.05)  # let the other run finish its takeover
        return False
    try:
        current = _read_held(path)
        if current is None or current.get("token") != held.get("token"):
            return False
        path.unlink()
        return True
    finally:
        guard.unlink(missing_ok=True)


_GUARD_STALE_S = 30.0


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    # A zombie (killed, not yet reaped by its parent) is not running.
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True
