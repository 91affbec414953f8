"""The output directory: nucflow's claim on it, and the only entries nucflow may delete.

A directory is a nucflow output only if nucflow created it, or found it empty, and wrote its
claim there: :data:`CLAIM_NAME`, holding the claim's id and the manifest, the top-level entries
nucflow wrote (each added *before* it is created, so an entry of a killed run is listed too).
``--overwrite`` deletes the manifest's entries and nothing else; ``--resume`` reuses them. A
directory without a valid claim, a run.json that is not the claim's, or any entry the manifest
does not list (a user's file) is refused with :class:`~nucflow.errors.OutputError` naming it,
before anything is deleted or written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nucflow import lock
from nucflow.errors import OutputError
from nucflow.version import __version__

__all__ = ["CLAIM_NAME", "RUN_JSON", "Claim", "claim", "check_claimable", "read_claim"]

CLAIM_NAME = ".nucflow-output.json"
RUN_JSON = "run.json"
_SCHEMA = "nucflow-output/1"
_PARTIAL = ".partial"  # write_atomic's temporary name: ".<name>.partial"


@dataclass
class Claim:
    """nucflow's claim on an output directory.

    Attributes
    ----------
    path : Path
        The output directory (resolved).
    claim_id : str
        Unique to this claim; run.json repeats it (``claim``).
    entries : list of str
        Top-level names nucflow wrote here (the manifest).
    fresh : bool
        This process created the claim (a new output, or one emptied by ``--overwrite``).
    made_directory : bool
        This process created the directory itself.
    """

    path: Path
    claim_id: str
    entries: list[str] = field(default_factory=list)
    fresh: bool = False
    made_directory: bool = False

    def entry(self, name: str) -> Path:
        """``path / name``, listed in the manifest first (call before creating it)."""
        if name not in self.entries:
            self.entries.append(name)
            self._write()
        return self.path / name

    def clear(self) -> None:
        """Delete every entry of the manifest (``--overwrite``); the claim stays, emptied.

        run.json goes first: a clearing killed half-way never leaves a run.json saying
        complete beside outputs that are gone."""
        for name in sorted(self.entries, key=lambda n: n != RUN_JSON):
            for target in (self.path / name, self.path / f".{name}{_PARTIAL}"):
                _remove(target)
        self.entries = []
        self._write()

    def withdraw(self) -> None:
        """Undo a fresh claim: its entries and the claim file (a run refused mid-way leaves
        nothing to --overwrite). Then, without the lock, :meth:`remove_directory`."""
        self.clear()
        (self.path / CLAIM_NAME).unlink(missing_ok=True)

    def remove_directory(self) -> None:
        """Remove the directory if this process made it and it is empty now."""
        if self.made_directory:
            with contextlib.suppress(OSError):
                self.path.rmdir()

    def _write(self) -> None:
        record = {
            "schema": _SCHEMA,
            "claim": self.claim_id,
            "nucflow": __version__,
            "claimed": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "entries": sorted(self.entries),
        }
        target = self.path / CLAIM_NAME
        partial = target.with_name(f"{target.name}{_PARTIAL}")
        partial.write_text(json.dumps(record, indent=1))
        os.replace(partial, target)


def _remove(target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()


def read_claim(out: Path) -> Claim | None:
    """The claim written in ``out``, or None if there is none (or it is not nucflow's)."""
    try:
        record = json.loads((out / CLAIM_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not (
        isinstance(record, dict)
        and record.get("schema") == _SCHEMA
        and isinstance(record.get("claim"), str)
        and isinstance(record.get("entries"), list)
        and all(isinstance(n, str) and n and "/" not in n for n in record["entries"])
    ):
        return None
    return Claim(out, record["claim"], list(record["entries"]))


def _is_claim_or_lock(name: str) -> bool:
    """The lock and its files, or the temporary name of a claim a killed run never finished."""
    lock_file = name == lock.LOCK_NAME or name.startswith(lock.LOCK_NAME + ".")
    return lock_file or name == CLAIM_NAME + _PARTIAL


def _is_nucflow_file(name: str, entries: list[str]) -> bool:
    """The claim, the lock and their temporary names, the manifest's entries and theirs."""
    if name in entries or name in (CLAIM_NAME, CLAIM_NAME + _PARTIAL):
        return True
    if name == lock.LOCK_NAME or name.startswith(lock.LOCK_NAME + "."):
        return True
    return name.startswith(".") and name.endswith(_PARTIAL) and name[1 : -len(_PARTIAL)] in entries


def check_claimable(out: Path, *, resume: bool, overwrite: bool) -> Claim | None:
    """Refuse ``out`` unless nucflow may write there; its claim if it has one.

    Reads only. None: ``out`` does not exist, or is an empty directory (a new claim).

    Raises
    ------
    OutputError
        ``out`` is not a directory; it holds entries but neither ``resume`` nor
        ``overwrite`` is given; it has no nucflow claim; its run.json is not the claim's; or
        it holds an entry nucflow did not write (named in the message).
    """
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"--output {out} lies under {parent}, a file; choose another path")
    if not out.exists() and not out.is_symlink():
        return None
    if not out.is_dir():
        raise OutputError(f"--output {out} exists and is not a directory; choose another path")
    names = sorted(p.name for p in out.iterdir())
    found = read_claim(out)
    if all(_is_claim_or_lock(n) for n in names):
        return found  # empty but for a lock or a claim never finished: claimed by this run
    if not (resume or overwrite):
        raise OutputError(
            f"output directory {out} exists; pass --resume to continue it or --overwrite to "
            "replace it"
        )
    if found is None:
        raise OutputError(
            f"output directory {out} is not a nucflow output (no valid {CLAIM_NAME}: nucflow "
            "did not create it), and nucflow deletes only what it wrote; choose another --output"
        )
    foreign = [n for n in names if not _is_nucflow_file(n, found.entries)]
    foreign += [n for n in found.entries if (out / n).is_symlink()]  # replaced by a link
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise OutputError(
            f"output directory {out} holds {foreign[0]!r}{more}, which nucflow did not write; "
            "move it out of the directory, or choose another --output"
        )
    _check_run_json(out, found)
    return found


def _check_run_json(out: Path, found: Claim) -> None:
    path = out / RUN_JSON
    if RUN_JSON not in found.entries or not path.exists():
        return
    record = _read_json(path)
    if not (isinstance(record, dict) and record.get("claim") == found.claim_id):
        raise OutputError(
            f"{path} is not the run.json nucflow wrote for {out} (it was replaced or edited); "
            "move it out of the directory, or choose another --output"
        )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def claim(out: Path, found: Claim | None, *, overwrite: bool) -> Claim:
    """Claim ``out`` for this run (call holding its lock, after :func:`check_claimable`).

    ``found`` is the claim :func:`check_claimable` returned: kept (``--resume``), emptied
    (``overwrite``), or None for a new or empty directory, which gets a claim of its own.
    """
    if found is not None and not overwrite:
        return found
    if found is not None:
        found.clear()
    made = Claim(out, uuid.uuid4().hex, fresh=True)
    made._write()
    return made


def make_directory(out: Path) -> bool:
    """Create ``out`` (and its parents) if needed; whether this call created it."""
    if out.is_dir():
        return False
    out.mkdir(parents=True, exist_ok=True)
    return True
