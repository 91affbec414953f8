"""What ``--resume`` may reuse: the input's identity and a fingerprint per stored stage.

A stage's fingerprint is a hash of the input's identity, the resolved parameters the stage
depends on (all of them for a stage not listed in :data:`STAGE_PARAMS`), the fingerprint of the
stage before it, and nucflow's version. It is written next to the stage's stored output
(``.work/<stage>.fingerprint.json``) once that output is complete. ``--resume`` reuses a stage
only if its stored fingerprint equals the one this run computes; otherwise it recomputes that
stage and every stage after it, saying which and why in one line. A run on a changed input is
refused (:func:`start`): nothing stored from the old input is worth keeping.

The input's identity: its real path (absolute, symlinks resolved: the same however the path is
spelled), shape, dtype, chunk layout, the channel read, the content of every zarr metadata file,
the names of all its files, the modification times of its directories (zarr replaces a chunk by
renaming, which changes its directory's time) and the size and modification time of up to
:data:`SAMPLED_FILES` of its files (for a TIFF file: also the first and last 64 KiB of its
content). A ``preprocess.tissue_mask`` file is identified the
same way, as part of the preprocessing's parameters.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nucflow import io, segmenters, stages
from nucflow.errors import InputChangedError, NucflowWarning
from nucflow.version import __version__

__all__ = ["STAGE_PARAMS", "SAMPLED_FILES", "Lineage", "input_identity", "start", "reusable",
           "record", "forget", "add_input"]  # fmt: skip

#: Resolved parameters (fields of :class:`nucflow.config.Params`) that each stored result of the
#: nuclei flow depends on besides the results before it, as :mod:`nucflow.stages` declares
#: them. A result not named here depends on all of them.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    name: params for name, params in stages.RESULT_PARAMS.items() if params is not None
}
#: At most this many files of a directory input have their size and time in the identity.
SAMPLED_FILES = 1024
_ZARR_METADATA = {"zarr.json", ".zarray", ".zattrs", ".zgroup"}
_EDGE_BYTES = 1 << 16
SUFFIX = ".fingerprint.json"


@dataclass
class Lineage:
    """The fingerprint chain of one run, stage by stage, in the order the flow asks."""

    identity: dict[str, Any]
    params: dict[str, Any]
    version: str = __version__
    previous: str = ""  # fingerprint of the last stage asked about
    broken: str | None = None  # first stage recomputed on --resume: every later one is too
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # run.json "stages"
    inputs: dict[str, str] = field(default_factory=dict)  # more inputs than the stack (add_input)

    def fingerprint(self, stage: str) -> str:
        """The fingerprint ``stage`` has in this run if asked about next."""
        keys = STAGE_PARAMS.get(stage, tuple(self.params))
        payload = {
            "stage": stage,
            "input": self.identity,
            "params": {k: self.params.get(k) for k in keys},
            "previous": self.previous,
            "nucflow": self.version,
        }
        if self.inputs:  # absent otherwise: the fingerprints of a run stay those it always had
            payload["inputs"] = self.inputs
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- input identity


def input_identity(stack: io.Stack, *, channel: int | None = None) -> dict[str, Any]:
    """Identity of the stack's input file(s): changes whenever the input does.

    Parameters
    ----------
    stack : nucflow.io.Stack
        The opened input.
    channel : int, optional
        The channel read (None: the only one).

    Returns
    -------
    dict
        JSON-able: ``path``, ``shape``, ``dtype``, ``channel``, ``layout`` (the stored chunk
        shape of a zarr input), ``files`` (a digest of the files, see the module docstring).
    """
    source = getattr(stack.reader, "source", None)  # None for a cropped or computed stack
    layout = list(source.chunk_grid) if isinstance(source, io.ChunkListing) else None
    remote = io.is_url(stack.path)
    return {
        "path": stack.path if remote else os.path.realpath(stack.path),
        "shape": list(stack.data.shape),
        "dtype": str(stack.data.dtype),
        "channel": channel,
        "layout": layout,
        "files": io.url_digest(stack.path) if remote else _input_digest(stack.path),
    }


def _input_digest(path: str) -> str:
    """``path``'s digest, with that of the container holding its pixels (a BigDataViewer XML's
    HDF5 file or N5 folder) when it has one."""
    file, _ = io.split_scene(path)  # FILE.czi#2: the file's digest (the scene is in `path`)
    digest = _files_digest(file)
    for data in io.pixel_files(file):
        digest = hashlib.sha256((digest + _files_digest(data)).encode()).hexdigest()
    return digest


def _files_digest(path: str) -> str:
    """Of the files themselves: the same however ``path`` is spelled (relative, absolute,
    through a symlink)."""
    digest = hashlib.sha256()
    if os.path.isfile(path):
        _add_file(digest, os.path.realpath(path), content=True)
    elif os.path.isdir(path):
        _add_tree(digest, os.path.realpath(path))
    else:  # a glob pattern of TIFF slices
        for name in sorted(os.path.realpath(p) for p in glob.glob(path)):
            _add_file(digest, name, content=False)
    return digest.hexdigest()


def _add_file(digest: Any, path: str, *, content: bool) -> None:
    st = os.stat(path)
    digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    if content:  # a file rewritten within the clock's resolution keeps its time
        with open(path, "rb") as f:
            digest.update(f.read(_EDGE_BYTES))
            f.seek(max(0, st.st_size - _EDGE_BYTES))
            digest.update(f.read(_EDGE_BYTES))


def _add_tree(digest: Any, root: str) -> None:
    files: list[str] = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        digest.update(f"{os.path.relpath(folder, root)}\0{os.stat(folder).st_mtime_ns}\0".encode())
        files.extend(os.path.join(folder, n) for n in sorted(names))
    step = max(1, math.ceil(len(files) / SAMPLED_FILES))
    for i, path in enumerate(files):
        digest.update(f"{os.path.relpath(path, root)}\0".encode())
        if os.path.basename(path) in _ZARR_METADATA:
            digest.update(Path(path).read_bytes())
        elif i % step == 0:
            _add_file(digest, path, content=False)


# ----------------------------------------------------------------------------- the hooks


def start(run: Any, previous_record: dict[str, Any] | None) -> None:
    """Set up the run's fingerprint chain; refuse to resume on a changed input.

    Parameters
    ----------
    run : nucflow.pipeline.Run
        The run being opened (``run.lineage`` is set here).
    previous_record : dict or None
        The run.json found in the output directory before this run, if any.

    Raises
    ------
    InputChangedError
        ``run.resume`` and the input differs from the one the stored run read.
    """
    identity = input_identity(run.stack, channel=run.config.get("channel"))
    if run.resume and previous_record is not None:
        before = previous_record.get("input_identity")
        if before != identity:
            what = _input_change(before, identity)
            raise InputChangedError(
                f"--resume: the input {run.stack.path} is not the one the run in {run.output} "
                f"read ({what}); rerun with --overwrite to start over"
            )
    params = _plain(run.params.flat())
    if (
        run.params.preprocess.tissue_mask
    ):  # preprocessing reads it: its content matters like the input's
        mask = run.params.preprocess.tissue_mask
        params["tissue_mask"] = {"path": os.path.realpath(mask), "files": _files_digest(mask)}
    seg = run.params.segment
    if seg.method != "builtin":  # its source or model files are a parameter too
        made = segmenters.Segmenter.of(seg.method, model=seg.model, device=seg.device)
        params["segmenter"] = {"source": made.source or made.model, "sha256": made.digest()}
    run.lineage = Lineage(identity, params)
    run.facts["input_identity"] = identity
    run.facts["stages"] = run.lineage.stages


def reusable(run: Any, stage: str, *outputs: Path) -> bool:
    """Whether ``--resume`` may reuse the stored output of ``stage`` (else: recompute it).

    Call once per stage, in the flow's order, before computing it; when the stage's output is
    stored, call :func:`record`. A stage is reused only if every path in ``outputs`` exists and
    its stored fingerprint matches this run's, and no stage before it was recomputed. A stage
    that is not reused loses its stored fingerprint now, so a run killed while recomputing it
    never leaves old output looking current. The first stage recomputed for a reason other
    than being unfinished is reported in one warning line.
    """
    lineage: Lineage | None = getattr(run, "lineage", None)
    if lineage is None:  # a run not opened by open_run (nucflow plan): nothing is stored
        return False
    if run.lock is not None:
        run.lock.check()
    fp = lineage.fingerprint(stage)
    lineage.previous = fp
    stored = _read(_path(run, stage))
    reason = None
    if not run.resume:
        reason = "new run"
    elif lineage.broken is not None:
        reason = f"{lineage.broken} was recomputed"
    elif stored is None or not all(Path(p).exists() for p in outputs):
        reason = "not finished"
    elif stored.get("fingerprint") != fp:
        reason = _explain(stored, lineage, stage)
        warnings.warn(
            f"--resume: recomputing {stage} and every stage after it: {reason}",
            stacklevel=3,
            category=NucflowWarning,
        )
    entry: dict[str, Any] = {
        "action": "reused" if reason is None else "computed",
        "fingerprint": fp,
    }
    if reason is not None:
        entry["reason"] = reason
        if run.resume and lineage.broken is None:
            lineage.broken = stage
        _path(run, stage).unlink(missing_ok=True)
    lineage.stages[stage] = entry
    return reason is None


def record(run: Any, stage: str) -> None:
    """Write ``stage``'s fingerprint next to its stored output (call once it is complete)."""
    lineage: Lineage | None = getattr(run, "lineage", None)
    if lineage is None:
        return
    keys = STAGE_PARAMS.get(stage, tuple(lineage.params))
    payload = {
        "stage": stage,
        "fingerprint": lineage.stages[stage]["fingerprint"],
        "params": {k: lineage.params.get(k) for k in keys},
        "input": lineage.identity,
        "inputs": lineage.inputs,
        "nucflow": lineage.version,
    }
    target = _path(run, stage)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(json.dumps(payload, indent=1))
    os.replace(partial, target)


def forget(run: Any, stage: str) -> None:
    """Remove ``stage``'s stored fingerprint: its output is being changed in place (a later
    ``--resume`` recomputes it and every stage after it)."""
    _path(run, stage).unlink(missing_ok=True)


def add_input(run: Any, name: str, stack: io.Stack) -> None:
    """Make a second input (``nucflow measure``'s labels) part of every stage's fingerprint,
    as ``name``: a stage stored from another file there is recomputed on ``--resume``. Call
    before the first :func:`reusable`."""
    lineage: Lineage | None = getattr(run, "lineage", None)
    if lineage is not None:  # a digest of its identity (see input_identity)
        identity = json.dumps(input_identity(stack), sort_keys=True).encode()
        lineage.inputs[name] = hashlib.sha256(identity).hexdigest()


def _path(run: Any, stage: str) -> Path:
    return Path(run.work) / f"{stage}{SUFFIX}"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _explain(stored: dict[str, Any], lineage: Lineage, stage: str) -> str:
    """Why a stored fingerprint differs, as one phrase."""
    if stored.get("nucflow") != lineage.version:
        return f"it was stored by nucflow {stored.get('nucflow')}, this is {lineage.version}"
    if stored.get("input") != lineage.identity:
        return "the input changed"
    inputs = stored.get("inputs") or {}
    for name, digest in lineage.inputs.items():
        if inputs.get(name) != digest:
            return f"the {name} changed"
    before = stored.get("params") or {}
    changed = [
        f"{k} {before.get(k)!r} -> {lineage.params.get(k)!r}"
        for k in STAGE_PARAMS.get(stage, tuple(lineage.params))
        if before.get(k) != lineage.params.get(k)
    ]
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        return "parameters changed: " + ", ".join(changed[:3]) + more
    return "the stages before it changed"


def _input_change(before: dict[str, Any] | None, now: dict[str, Any]) -> str:
    if not before:
        return "the stored run.json does not identify its input"
    for key in ("path", "shape", "dtype", "channel", "layout"):
        if before.get(key) != now.get(key):
            return f"{key} was {before.get(key)}, is {now.get(key)}"
    return "its files were modified since"


def _plain(value: Any) -> Any:
    """JSON's view of ``value`` (tuples become lists), so stored and current compare equal."""
    return json.loads(json.dumps(value, default=str))
