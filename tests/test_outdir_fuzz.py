"""Issue 27's fuzz of output directories: nothing a user owns is deleted, changed or misread.

"Done when": a fuzz of at least 200 output-directory situations (foreign files, foreign run.json
variants, symlinks, nested input/output, globs, zarr hierarchies, read-only and full file
systems, kills at random points) never deletes or changes a byte outside nucflow's own entries
(checksums before and after) and never leaves an output that ``status`` calls complete when a
fresh run would differ.

Each situation is built from ``random.Random(seed)`` (its id says what it is, e.g.
``output-runjson:other-overwrite-in:rel-out:rel-s88``). Before the command, every path under the
case's folder and the inputs is checksummed, except what nucflow itself wrote there (the entries
of a real nucflow output copied in); afterwards every such path must still be there, unchanged.
A command exits 0 or 2, never 1. Refused (exit 2), it says why in one line, and deletes or
changes nothing at all (nothing new appears but inside nucflow's own entries); proceeding
(exit 0), it leaves an output that ``status`` calls complete, whose table and labels equal a
clean run's, and whose claim lists every entry in it. On read-only and full file systems
(tmpfs, root only) it exits 2 naming the path and never leaves a run that looks complete or
alive; killed (SIGKILL after a seeded delay, or at a seeded write or delete), it leaves no run
that ``status`` calls complete (or running) unless it is, and ``--resume`` then finishes it.
Kills and the larger stack they run on are ``slow``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from nucflow import io, lock, outdir, synth
from nucflow.cli import main
from nucflow.errors import OutputError
from nucflow.status import status

QUICK = ["--set", "qc.enabled=false"]
SMALL = (16, 48, 48)
BIG = (32, 96, 96)
BIG_CHUNKS = ["--chunks", "8", "24", "24"]
NUCFLOW = Path(sys.executable).with_name("nucflow")
CLAIM = outdir.CLAIM_NAME
OPTIONS = {"plain": [], "overwrite": ["--overwrite"], "resume": ["--resume"]}
SPELLINGS = ("abs", "rel", "link", "glob")
#: A progress line (log mode: stderr is not a terminal); only a run that started work draws them.
PROGRESS_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d nucflow: ")
EXISTS = r"exists; pass --resume to continue it or --overwrite to replace it"
NOT_OURS = r"is not a nucflow output \(no valid \.nucflow-output\.json"
IN_USE = r"is in use by (another )?nucflow run"
OVERLAP = r"is inside the input|contains the input"
NOT_RECORDED = r"--resume: the input \S+ is not the one the run in"


# --- the inputs and the clean runs ---------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """What a complete output holds: its table (sorted by label) and its label image."""

    table: pd.DataFrame
    labels: np.ndarray


def result_of(out: Path) -> Result:
    for name in ("nuclei.parquet", "nuclei.csv", "labels.ome.zarr/0"):
        assert (out / name).exists(), f"{out} holds no {name}"
    table = pd.read_parquet(out / "nuclei.parquet").sort_values("label").reset_index(drop=True)
    labels = np.asarray(zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r"))
    return Result(table, labels)


@dataclass(frozen=True)
class World:
    """The module's inputs and clean runs (never written by a case)."""

    zarr: Path  # the small stack as OME-Zarr, with labels/truth
    slices: Path  # the same stack as a folder of 16 2D TIFF slices (no voxel size)
    voxel: list[str]  # --voxel-size for the slices
    ref_out: Path  # a clean run of ``zarr``: copied in as "a real nucflow output"
    other_out: Path  # a clean run of ``slices``: another output's run.json and claim
    ref: Result


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("outdir-fuzz")
    made = synth.make_nuclei(SMALL, n_nuclei=6, seed=1)
    source = root / "data" / "in.ome.zarr"
    io.write_ome_zarr(source, made.image, made.voxel_size, labels={"truth": made.truth})
    slices = root / "data" / "slices"
    slices.mkdir()
    for z, plane in enumerate(made.image):
        tifffile.imwrite(slices / f"z{z:03d}.tif", plane)
    voxel = ["--voxel-size", *(f"{v:g}" for v in made.voxel_size)]
    ref_out, other_out = root / "ref", root / "other"
    assert main(["run", "--input", str(source), "--output", str(ref_out), *QUICK]) == 0
    assert main(["run", "--input", str(slices), "--output", str(other_out), *voxel, *QUICK]) == 0
    ref = result_of(ref_out)
    # The slices with their voxel size given are the same stack: one reference serves both.
    other = result_of(other_out)
    pd.testing.assert_frame_equal(other.table, ref.table)
    assert np.array_equal(other.labels, ref.labels)
    return World(source, slices, voxel, ref_out, other_out, ref)


@dataclass(frozen=True)
class Big:
    """The larger stack the kills run on, and its clean run on ``BIG_CHUNKS``."""

    zarr: Path
    ref_out: Path
    ref: Result


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Big:
    root = tmp_path_factory.mktemp("outdir-fuzz-big")
    made = synth.make_nuclei(BIG, n_nuclei=30, seed=2)
    source = root / "big.ome.zarr"
    io.write_ome_zarr(source, made.image, made.voxel_size)
    ref_out = root / "ref"
    with warnings.catch_warnings(record=True):  # the halo warning of --chunks 8 24 24
        code = main(["run", "--input", str(source), "--output", str(ref_out), *BIG_CHUNKS, *QUICK])
    assert code == 0
    return Big(source, ref_out, result_of(ref_out))


# --- checksums -----------------------------------------------------------------------------


def snapshot(roots: list[Path], skip: list[Path] = ()) -> dict[str, str]:
    """sha256 of every file under ``roots``, "dir" for each folder, "-> target" for each
    symlink (not followed); nothing at or under a path of ``skip``."""
    skipped = [str(p) for p in skip]

    def excluded(path: str) -> bool:
        return any(path == s or path.startswith(s + os.sep) for s in skipped)

    found: dict[str, str] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                path = os.path.join(dirpath, name)
                if excluded(path):
                    continue
                if os.path.islink(path):
                    found[path] = "-> " + os.readlink(path)
                elif os.path.isdir(path):
                    found[path] = "dir"
                else:
                    with open(path, "rb") as f:
                        found[path] = hashlib.sha256(f.read()).hexdigest()
            dirnames[:] = [
                d
                for d in dirnames
                if not excluded(os.path.join(dirpath, d))
                and not os.path.islink(os.path.join(dirpath, d))
            ]
    return found


def assert_kept(before: dict[str, str], after: dict[str, str]) -> None:
    """Every path of ``before`` is still there, with the same bytes."""
    gone = [p for p in before if p not in after]
    changed = [p for p in before if p in after and after[p] != before[p]]
    assert not gone and not changed, f"deleted {gone[:5]}, changed {changed[:5]}"


def assert_unchanged(before: dict[str, str], after: dict[str, str], allowed: list[Path]) -> None:
    """Nothing of ``before`` deleted or changed; nothing new but inside ``allowed`` (nucflow's
    own entries: a --resume refused for another input leaves the ``.work`` it made)."""
    assert_kept(before, after)
    new = [p for p in sorted(set(after) - set(before)) if not _under(Path(p), allowed)]
    assert not new, f"a refused run created {new[:5]}"


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


# --- running nucflow -----------------------------------------------------------------------


def cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """Exit code and stderr lines of ``nucflow ARGV`` in this process (warnings as lines)."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    err = capsys.readouterr().err
    return code, err.splitlines() + [f"nucflow: warning: {w.message}" for w in caught]


def refused_in_one_line(lines: list[str], pattern: str, *, progress: bool = False) -> str:
    """The one line of a refusal (``progress``: a run's progress lines before it allowed)."""
    said = [line for line in lines if not (progress and PROGRESS_LINE.match(line))]
    assert len(said) == 1, f"refused in {len(said)} lines: {said}"
    line = said[0]
    assert line.startswith("nucflow run: error: ") and "Traceback" not in line, line
    assert re.search(pattern, line), f"{pattern!r} not in {line!r}"
    return line


def state_of(out: Path) -> str | None:
    """``nucflow status``'s state, None if it says this is no nucflow output."""
    try:
        return status(out).state
    except OutputError:
        return None


def assert_same_result(out: Path, ref: Result) -> None:
    found = result_of(out)
    pd.testing.assert_frame_equal(found.table, ref.table)
    assert np.array_equal(found.labels, ref.labels), f"{out}: labels differ from a clean run's"


def assert_complete(out: Path, ref: Result) -> None:
    """A finished run: status complete, a clean run's results, a claim listing every entry."""
    report = status(out)
    assert report.state == "complete", report.text
    assert_same_result(out, ref)
    found = outdir.read_claim(out)
    assert found is not None, f"{out} holds no valid claim"
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["claim"] == found.claim_id
    top = {
        n
        for n in os.listdir(out)
        if n not in (CLAIM, CLAIM + ".partial") and not n.startswith(lock.LOCK_NAME)
    }
    assert top <= set(found.entries), f"not in the manifest: {sorted(top - set(found.entries))}"
    assert not (out / lock.LOCK_NAME).exists(), "a finished run left its lock"


# --- building a situation ------------------------------------------------------------------


@dataclass
class Ctx:
    """One case's folder, the module's inputs, and a random source for file contents."""

    tmp: Path
    world: World
    rng: random.Random

    def home(self) -> Path:
        """The user's own folder beside everything (symlink targets live here)."""
        path = self.tmp / "home"
        path.mkdir(exist_ok=True)
        return path

    def local_inputs(self) -> tuple[Path, Path]:
        """Copies of the inputs in the case's folder (for outputs placed inside them)."""
        data = self.tmp / "data"
        if not data.exists():
            shutil.copytree(self.world.zarr, data / "in.ome.zarr")
            shutil.copytree(self.world.slices, data / "slices")
        return data / "in.ome.zarr", data / "slices"

    def real_output(self, at: Path) -> list[Path]:
        """A copy of a clean nucflow output at ``at``; its claim and entries (nucflow's)."""
        shutil.copytree(self.world.ref_out, at, symlinks=True)
        entries = outdir.read_claim(at).entries
        return [at / CLAIM, *(at / e for e in entries)]

    def link(self, target: Path, name: str) -> Path:
        links = self.tmp / "links"
        links.mkdir(exist_ok=True)
        path = links / name
        path.symlink_to(target, target_is_directory=target.is_dir())
        return path

    def data(self, low: int = 0, high: int = 3000) -> bytes:
        return self.rng.randbytes(self.rng.randint(low, high))

    def user_tree(self, path: Path, *, depth: int = 2) -> None:
        """A folder of a user's files (and maybe subfolders) at ``path``."""
        path.mkdir(parents=True, exist_ok=True)
        for _ in range(self.rng.randint(1, 3)):
            name = self.rng.choice(USER_FILES)
            (path / name).write_bytes(self.data())
        if depth and self.rng.random() < 0.5:
            self.user_tree(path / self.rng.choice(USER_DIRS), depth=depth - 1)


USER_FILES = ["notes.txt", "thesis.tex", "img_0001.tif", "data.csv", ".DS_Store", "a b.txt"]
USER_DIRS = ["raw", "figures", "old run", ".git"]


@dataclass
class Built:
    """A situation on disk: the command's arguments and what it must do."""

    argv: list[str]  # after ``run``
    out: Path  # the output directory, resolved
    codes: set[int]  # the exit codes allowed
    refusal: str = ""  # the regex the error line matches on exit 2
    # Entries nucflow wrote (a real output's claim and manifest entries, and anything inside
    # them): --overwrite may delete them, so their bytes are not in the "foreign" checksums.
    ours: list[Path] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)  # no new path may appear inside these


def spell_input(ctx: Ctx, source: Path, how: str, *, array: bool = False) -> list[str]:
    """``--input`` as a user types it (``array``: the zarr's array path ``0``), and the voxel
    size for the TIFF slices."""
    slices = source.suffix != ".zarr"
    if how == "glob":
        if slices:
            text = str(source / ctx.rng.choice(["z*.tif", "*.tif", "z0??.tif"]))
        else:
            text = str(source / "[0]") if array else str(source)[:-1] + "[r]"
    else:
        path = source
        if how == "link":
            path = ctx.link(source, "input-link" + ("" if slices else ".ome.zarr"))
        path = path / "0" if array else path
        text = os.path.relpath(path, ctx.tmp) if how == "rel" else str(path)
    return ["--input", text, *(ctx.world.voxel if slices else [])]


def spell_output(ctx: Ctx, out: Path, how: str) -> str:
    """``--output`` as typed: absolute, relative, or through a symlink to its parent."""
    if how == "rel":
        return os.path.relpath(out, ctx.tmp)
    if how == "link":
        return str(ctx.link(out.parent, "output-parent") / out.name)
    return str(out)


def recorded_input(ctx: Ctx, how: str, opt: str) -> tuple[list[str], set[int], str]:
    """The clean run's own input spelled ``how`` (resumable), the codes a run that should
    proceed may end with, and the refusal allowed: ``--resume`` compares a glob as typed with
    the recorded path and refuses it (exit 2)."""
    argv = spell_input(ctx, ctx.world.zarr, how)
    if opt == "resume" and how == "glob":
        return argv, {0, 2}, NOT_RECORDED
    return argv, {0}, ""


def name_of(kind: str, detail: str, opt: str, in_how: str, out_how: str, seed: int) -> str:
    return f"{kind}-{detail}-{opt}-in:{in_how}-out:{out_how}-s{seed}"


@dataclass(frozen=True)
class Case:
    seed: int
    name: str
    build: Callable[[Ctx], Built]


# --- the situations ------------------------------------------------------------------------
# Each planner makes every random choice from ``rng`` at collection (so the id can say them)
# and returns the case; ``build`` makes it on disk.


def plan_missing(seed: int, i: int, rng: random.Random) -> Case:
    """No output directory yet (maybe its parents neither): the run proceeds."""
    source = ("zarr", "array", "slices")[i % 3]
    in_how, opt = rng.choice(SPELLINGS), rng.choice(list(OPTIONS))
    nested = rng.random() < 0.4
    out_how = rng.choice(["abs", "rel"] if nested else ["abs", "rel", "link"])

    def build(ctx: Ctx) -> Built:
        out = ctx.tmp / "a" / "b" / "out" if nested else ctx.tmp / "out"
        ctx.user_tree(ctx.home())
        where = ctx.world.slices if source == "slices" else ctx.world.zarr
        argv = spell_input(ctx, where, in_how, array=source == "array")
        return Built([*argv, "--output", spell_output(ctx, out, out_how), *OPTIONS[opt]], out, {0})

    detail = f"{'nested' if nested else 'plain'}:{source}"
    return Case(seed, name_of("missing", detail, opt, in_how, out_how, seed), build)


def plan_empty(seed: int, i: int, rng: random.Random) -> Case:
    """An empty directory: claimed anew, the run proceeds."""
    source = ("zarr", "array", "slices")[i % 3]
    in_how, opt = rng.choice(SPELLINGS), rng.choice(list(OPTIONS))
    out_how = rng.choice(["abs", "rel", "link"])

    def build(ctx: Ctx) -> Built:
        out = ctx.tmp / "out"
        out.mkdir()
        where = ctx.world.slices if source == "slices" else ctx.world.zarr
        argv = spell_input(ctx, where, in_how, array=source == "array")
        return Built([*argv, "--output", spell_output(ctx, out, out_how), *OPTIONS[opt]], out, {0})

    return Case(seed, name_of("empty", source, opt, in_how, out_how, seed), build)


RUN_JSONS = ["notjson", "emptyobject", "complete", "other", "copy", "claimedited"]
BAD_CLAIMS = ["notjson", "noclaim", "schema2", "badentries", "noentries"]


def foreign_run_json(world: World, variant: str) -> bytes:
    """A run.json nucflow did not write for this directory."""
    if variant == "notjson":
        return b"not json at all {"
    if variant == "emptyobject":
        return b"{}"
    if variant == "complete":
        return b'{"status": "complete"}'
    if variant == "other":  # a real run.json, of another output
        return (world.other_out / "run.json").read_bytes()
    record = json.loads((world.ref_out / "run.json").read_text())
    if variant == "claimedited":
        record["claim"] = "0" * 32
    return json.dumps(record, indent=2).encode()  # "copy": the reference's own


def bad_claim(variant: str) -> bytes:
    """A ``.nucflow-output.json`` that is not a valid claim."""
    schema = "nucflow-output/1"
    record = {
        "notjson": None,
        "noclaim": {"schema": schema, "entries": ["run.json"]},
        "schema2": {"schema": "nucflow-output/2", "claim": "c" * 32, "entries": []},
        "badentries": {"schema": schema, "claim": "c" * 32, "entries": ["../home", ""]},
        "noentries": {"schema": schema, "claim": "c" * 32},
    }[variant]
    return b"{ truncated" if record is None else json.dumps(record).encode()


def plan_user(seed: int, i: int, rng: random.Random) -> Case:
    """A user's folder (no claim), holding names nucflow uses too: always refused."""
    pool = ["run.json", "nuclei.csv", "nuclei.parquet", "qc", "labels.ome.zarr", ".work"]
    pool += ["notes.txt", "raw", "thesis.tex", ".hidden", "sub dir", "img_0001.tif"]
    names = rng.sample(pool, rng.randint(1, 5))
    if i % 3 == 0 and "run.json" not in names:
        names.append("run.json")
    extra = rng.choice(["", "", "claim", "lock", "partial"])
    run_json = rng.choice(RUN_JSONS) if "run.json" in names else ""
    claim_variant = rng.choice(BAD_CLAIMS) if extra == "claim" else ""
    opt, in_how, out_how = (
        rng.choice(list(OPTIONS)),
        rng.choice(SPELLINGS),
        rng.choice(["abs", "rel", "link"]),
    )

    def build(ctx: Ctx) -> Built:
        proj = ctx.tmp / "proj"
        proj.mkdir()
        for name in names:
            target = proj / name
            if name == "run.json":
                target.write_bytes(foreign_run_json(ctx.world, run_json))
            elif name in ("qc", "labels.ome.zarr", ".work", "raw", "sub dir"):
                ctx.user_tree(target)
                if name == "labels.ome.zarr":
                    (target / ".zgroup").write_text('{"zarr_format": 2}')
            else:
                target.write_bytes(ctx.data())
        if extra == "claim":
            (proj / CLAIM).write_bytes(bad_claim(claim_variant))
        elif extra == "lock":  # a damaged lock: held by an unknown run until it turns stale
            (proj / lock.LOCK_NAME).write_bytes(b"\x00 not a lock")
        elif extra == "partial":
            (proj / ".nuclei.csv.partial").write_bytes(ctx.data())
        argv = spell_input(ctx, ctx.world.zarr, in_how)
        refusal = IN_USE if extra == "lock" else EXISTS if opt == "plain" else NOT_OURS
        argv += ["--output", spell_output(ctx, proj, out_how), *OPTIONS[opt]]
        return Built(argv, proj, {2}, refusal)

    parts = [f"runjson:{run_json}"] if run_json else []
    parts += [f"claim:{claim_variant}"] if claim_variant else [extra] if extra else []
    detail = "+".join([*parts, f"{len(names)}entries"])
    return Case(seed, name_of("user", detail, opt, in_how, out_how, seed), build)


def plan_output_foreign(seed: int, i: int, rng: random.Random) -> Case:
    """A real nucflow output plus entries nucflow did not write: refused, naming one."""
    pool = ["qc", "notes.txt", "raw", "nuclei.tsv", "labels.zarr", ".DS_Store", "run.json.bak"]
    pool += ["nuclei.parquet.old", "results", "Thumbs.db", ".nucflow-output.json.bak", "x.py"]
    names = sorted(rng.sample(pool, rng.randint(1, 3)))
    forms = [rng.choice(["file", "dir", "link"]) for _ in names]
    opt, in_how, out_how = (
        rng.choice(list(OPTIONS)),
        rng.choice(SPELLINGS),
        rng.choice(["abs", "rel", "link"]),
    )

    def build(ctx: Ctx) -> Built:
        out = ctx.tmp / "out"
        ours = ctx.real_output(out)
        for name, form in zip(names, forms, strict=True):
            if form == "file":
                (out / name).write_bytes(ctx.data())
            elif form == "dir":
                ctx.user_tree(out / name)
            else:  # a user's symlink to a file of theirs outside
                target = ctx.home() / f"target-{name}"
                target.write_bytes(ctx.data())
                (out / name).symlink_to(target)
        refusal = EXISTS if opt == "plain" else rf"holds {re.escape(repr(names[0]))}"
        argv = [*spell_input(ctx, ctx.world.zarr, in_how), "--output"]
        return Built(
            [*argv, spell_output(ctx, out, out_how), *OPTIONS[opt]], out, {2}, refusal, ours
        )

    detail = "+".join(f"{n}:{f}" for n, f in zip(names, forms, strict=True))
    return Case(seed, name_of("foreign", detail, opt, in_how, out_how, seed), build)


def plan_output_runjson(seed: int, i: int, rng: random.Random) -> Case:
    """A real nucflow output whose run.json or claim is not nucflow's (or is missing)."""
    variants = [f"runjson:{v}" for v in RUN_JSONS if v != "copy"] + ["runjson:missing"]
    variants += [f"claim:{v}" for v in BAD_CLAIMS] + ["claim:missing", "claim:other"]
    variant = variants[i % len(variants)]
    opt, in_how, out_how = (
        rng.choice(list(OPTIONS)),
        rng.choice(SPELLINGS),
        rng.choice(["abs", "rel", "link"]),
    )

    def build(ctx: Ctx) -> Built:
        out = ctx.tmp / "out"
        ours = ctx.real_output(out)
        argv, codes, refusal = recorded_input(ctx, in_how, opt)
        what, how = variant.split(":")
        if what == "runjson" and how == "missing":  # killed before run.json: resumable
            (out / "run.json").unlink()
            codes, refusal = ({2}, EXISTS) if opt == "plain" else ({0}, "")
        elif what == "runjson":
            (out / "run.json").write_bytes(foreign_run_json(ctx.world, how))
            ours.remove(out / "run.json")  # the user's now
            codes = {2}
            refusal = EXISTS if opt == "plain" else r"run\.json is not the run\.json nucflow wrote"
        else:  # no valid claim of its own: none of it is nucflow's any more
            ours = []
            if how == "missing":
                (out / CLAIM).unlink()
            elif how == "other":  # another output's (valid) claim: run.json is not its
                shutil.copy(ctx.world.other_out / CLAIM, out / CLAIM)
            else:
                (out / CLAIM).write_bytes(bad_claim(how))
            codes = {2}
            mismatch = r"run\.json is not the run\.json nucflow wrote|which nucflow did not write"
            refusal = EXISTS if opt == "plain" else mismatch if how == "other" else NOT_OURS
        argv += ["--output", spell_output(ctx, out, out_how), *OPTIONS[opt]]
        return Built(argv, out, codes, refusal, ours)

    return Case(seed, name_of("output", variant, opt, in_how, out_how, seed), build)


def plan_output_symlink(seed: int, i: int, rng: random.Random) -> Case:
    """A real nucflow output with an entry replaced by a symlink to a user's file or folder
    outside: refused (deleting or rewriting it would reach the user's data)."""
    entries = ["labels.ome.zarr", "nuclei.csv", "nuclei.parquet", "run.json", ".work"]
    replaced = sorted(rng.sample(entries, 1 if rng.random() < 0.7 else 2))
    opt, in_how, out_how = (
        rng.choice(list(OPTIONS)),
        rng.choice(SPELLINGS),
        rng.choice(["abs", "rel", "link"]),
    )

    def build(ctx: Ctx) -> Built:
        out = ctx.tmp / "out"
        ours = ctx.real_output(out)
        for name in replaced:
            target = ctx.home() / f"mine-{name}"
            if (out / name).is_dir():  # the user's folder, looking like the entry
                shutil.copytree(out / name, target)
                (target / "keep.txt").write_bytes(ctx.data(1))
                shutil.rmtree(out / name)
            elif name == ".work":  # absent from a finished output: a folder of theirs
                ctx.user_tree(target)
            else:
                target.write_bytes(ctx.data(1))
                (out / name).unlink()
            (out / name).symlink_to(target, target_is_directory=target.is_dir())
            ours.remove(out / name)
        refusal = EXISTS if opt == "plain" else rf"holds {re.escape(repr(replaced[0]))}"
        argv = [*spell_input(ctx, ctx.world.zarr, in_how), "--output"]
        return Built(
            [*argv, spell_output(ctx, out, out_how), *OPTIONS[opt]], out, {2}, refusal, ours
        )

    return Case(seed, name_of("symlink", "+".join(replaced), opt, in_how, out_how, seed), build)


def plan_output_inside(seed: int, i: int, rng: random.Random) -> Case:
    """A real nucflow output with a user's files placed inside its entries (or none): with
    --overwrite/--resume it proceeds, and may delete those files with their entry."""
    places = ["labels.ome.zarr", "labels.ome.zarr/0", "labels.ome.zarr/tables", ".work"]
    places += [".work/sub"]
    count = i % 4  # 0: the clean output
    items = [(rng.choice(places), rng.choice(["file", "link"])) for _ in range(count)]
    opt = ["overwrite", "resume", "plain"][i % 3] if i % 4 else ["overwrite", "resume"][i % 2]
    in_how, out_how = rng.choice(SPELLINGS), rng.choice(["abs", "rel", "link"])

    def build(ctx: Ctx) -> Built:
        out = ctx.tmp / "out"
        ours = ctx.real_output(out)
        for n, (place, form) in enumerate(items):
            folder = out / place
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{ctx.rng.choice(['notes', 'mine', 'keep'])}-{n}.txt"
            if form == "file":  # inside an entry: nucflow's to delete with it
                (folder / name).write_bytes(ctx.data())
            else:  # a link inside an entry may go; the user's file it points to may not
                target = ctx.home() / f"linked-{n}.txt"
                target.write_bytes(ctx.data(1))
                (folder / name).symlink_to(target)
        if (out / ".work").exists():
            ours.append(out / ".work")
        argv, codes, refusal = recorded_input(ctx, in_how, opt)
        if opt == "plain":
            codes, refusal = {2}, EXISTS
        argv += ["--output", spell_output(ctx, out, out_how), *OPTIONS[opt]]
        return Built(argv, out, codes, refusal, ours)

    detail = "+".join(f"{p}:{f}" for p, f in items) or "clean"
    return Case(seed, name_of("inside", detail, opt, in_how, out_how, seed), build)


def lock_record(*, host: str, age: float) -> bytes:
    now = time.time() - age
    record = {"token": uuid.uuid4().hex, "host": host, "pid": os.getpid(), "slurm_job_id": None}
    record |= {"started": "2026-01-01T00:00:00+00:00", "heartbeat": now}
    return json.dumps(record).encode()


def plan_locks(seed: int, i: int, rng: random.Random) -> Case:
    """Locks and temporary names: a live run's lock refuses; a dead run's is taken over; the
    temporary ``.<entry>.partial`` names of a claimed output are nucflow's."""
    variants = ["live", "live-empty", "otherhost", "stale", "stale-empty", "damaged"]
    variants += ["partials", "partial-noclaim"]
    variant = variants[i % len(variants)]
    partials = rng.sample(
        [".run.json.partial", ".nuclei.csv.partial", CLAIM + ".partial", ".nucflow.lock.1a2b"],
        rng.randint(1, 3),
    )
    opt, in_how, out_how = (
        rng.choice(list(OPTIONS)),
        rng.choice(SPELLINGS),
        rng.choice(["abs", "rel", "link"]),
    )

    def build(ctx: Ctx) -> Built:
        out = ctx.tmp / "out"
        empty = variant.endswith("empty") or variant == "partial-noclaim"
        ours = [] if empty else ctx.real_output(out)
        out.mkdir(exist_ok=True)
        path = out / lock.LOCK_NAME
        argv, codes, refusal = recorded_input(ctx, in_how, opt)
        if variant in ("live", "live-empty", "otherhost"):  # a run that may be alive: kept
            host = "elsewhere.example.org" if variant == "otherhost" else socket.gethostname()
            path.write_bytes(lock_record(host=host, age=5))
            codes, refusal = {2}, IN_USE
        elif variant == "damaged":  # unreadable and fresh: an unknown run holds it
            path.write_bytes(b"\x00garbage")
            codes, refusal = {2}, IN_USE
        elif variant.startswith("stale"):  # its heartbeat stopped an hour ago: taken over
            path.write_bytes(lock_record(host=socket.gethostname(), age=3600))
            ours.append(path)
            if empty:
                codes, refusal = {0}, ""
            elif opt == "plain":
                codes, refusal = {2}, EXISTS
        elif variant == "partials":  # a killed run's temporary names, in its claimed output
            for name in partials:
                (out / name).write_bytes(ctx.data())
                ours.append(out / name)
            if opt == "plain":
                codes, refusal = {2}, EXISTS
        else:  # a temporary name but no claim: not nucflow's output, not nucflow's file
            (out / ".run.json.partial").write_bytes(ctx.data())
            codes, refusal = {2}, EXISTS if opt == "plain" else NOT_OURS
        argv += ["--output", spell_output(ctx, out, out_how), *OPTIONS[opt]]
        return Built(argv, out, codes, refusal, ours)

    detail = variant + (":" + "+".join(partials) if variant == "partials" else "")
    return Case(seed, name_of("lock", detail, opt, in_how, out_how, seed), build)


def plan_in_input(seed: int, i: int, rng: random.Random) -> Case:
    """An output that is, holds, or lies inside the input (its zarr hierarchy, its folder)."""
    source = ("zarr", "array", "slices")[i % 3]
    in_how = SPELLINGS[(i // 3) % 4]
    if source == "slices":  # a folder input, or a glob of its files
        targets = ["", "..", "z003.tif"] + (["sub", "sub/deeper"] if in_how != "glob" else [])
    else:
        targets = ["labels/x", "0/x", "x", "labels/truth/x", "", "labels", "0", "..", ".zattrs"]
        targets += ["labels/truth", "0/0"]
    target = rng.choice(targets)
    opt = rng.choice(list(OPTIONS))
    out_how = rng.choice(["abs", "rel", "link-input"])

    def build(ctx: Ctx) -> Built:
        zarr_path, slices = ctx.local_inputs()
        root = slices if source == "slices" else zarr_path
        out = (root / target).resolve() if target else root
        argv = spell_input(ctx, root, in_how, array=source == "array")
        if out_how == "link-input":  # through a symlink to the input's root
            link = ctx.link(root, "root-link")
            given = str(link / target) if target else str(link)
        else:
            given = spell_output(ctx, out, out_how)
        argv += ["--output", given, *OPTIONS[opt]]
        return Built(argv, out, {2}, OVERLAP, inputs=[root])

    detail = f"{source}/{target or '.'}".replace("/", "~")
    return Case(seed, name_of("in-input", detail, opt, in_how, out_how, seed), build)


def plan_glob(seed: int, i: int, rng: random.Random) -> Case:
    """A glob input whose matches lie in the output."""
    variant = ["slices-dir", "parent", "slices-in-output", "zarr-parent"][i % 4]
    pattern = rng.choice(["z*.tif", "*.tif", "z0[0-1]*.tif", "z00?.tif"])
    rel, opt = rng.random() < 0.5, rng.choice(list(OPTIONS))
    with_runjson = rng.random() < 0.5

    def build(ctx: Ctx) -> Built:
        zarr_path, slices = ctx.local_inputs()
        if variant == "slices-dir":  # the slices' own folder, with a foreign run.json maybe
            out, folder = slices, slices
            if with_runjson:
                (slices / "run.json").write_bytes(b'{"status": "complete"}')
        elif variant == "parent":
            out, folder = slices.parent, slices
        elif variant == "slices-in-output":  # the user keeps slices in a real output
            out = ctx.tmp / "out"
            ctx.real_output(out)
            folder = out / "slices"
            shutil.copytree(slices, folder)
        else:
            out, folder = zarr_path.parent, None
        if folder is None:
            text = str(zarr_path)[:-1] + "[r]"
        else:
            text = str(folder / pattern)
        if rel:
            text = os.path.relpath(text, ctx.tmp)
            given = os.path.relpath(out, ctx.tmp)
        else:
            given = str(out)
        voxel = [] if folder is None else ctx.world.voxel
        argv = ["--input", text, *voxel, "--output", given, *OPTIONS[opt]]
        return Built(argv, out, {2}, OVERLAP, inputs=[slices, zarr_path])

    detail = f"{variant}:{pattern}" + (
        "+runjson" if variant == "slices-dir" and with_runjson else ""
    )
    return Case(seed, name_of("glob", detail, opt, "glob", "rel" if rel else "abs", seed), build)


def plan_not_dir(seed: int, i: int, rng: random.Random) -> Case:
    """An output that is a file, a symlink (to a file, to nothing, to a folder, to a real
    output), a path under a file, or a new folder inside a user's folder."""
    variants = ["file", "link-file", "dangling", "link-empty", "link-output", "under-file"]
    variants += ["new-in-user-folder", "under-file"]
    variant = variants[i % len(variants)]
    opt, in_how = rng.choice(list(OPTIONS)), rng.choice(SPELLINGS)

    def build(ctx: Ctx) -> Built:
        given = ctx.tmp / "out"
        home = ctx.home()
        argv, codes, refusal = recorded_input(ctx, in_how, opt)
        ours: list[Path] = []
        if variant == "file":
            given.write_bytes(ctx.data())
            out, codes, refusal = given, {2}, r"exists and is not a directory"
        elif variant == "link-file":
            (home / "report.pdf").write_bytes(ctx.data())
            given.symlink_to(home / "report.pdf")
            out, codes, refusal = home / "report.pdf", {2}, r"exists and is not a directory"
        elif variant == "dangling":  # a link to a folder not made yet: made there
            given.symlink_to(home / "later")
            out = home / "later"
        elif variant == "link-empty":
            (home / "empty").mkdir()
            given.symlink_to(home / "empty", target_is_directory=True)
            out = home / "empty"
        elif variant == "link-output":
            out = ctx.tmp / "real"
            ours = ctx.real_output(out)
            given.symlink_to(out, target_is_directory=True)
            if opt == "plain":
                codes, refusal = {2}, EXISTS
        elif variant == "under-file":  # a mistyped path: its "parent" is a file
            (home / "notes.txt").write_bytes(ctx.data())
            out = given = home / "notes.txt" / "out"
            codes, refusal = {2}, r"notes\.txt"
        else:
            ctx.user_tree(home / "project")
            out = given = home / "project" / "results"
        argv += ["--output", str(given), *OPTIONS[opt]]
        return Built(argv, out, codes, refusal, ours)

    return Case(seed, name_of("not-dir", variant, opt, in_how, "abs", seed), build)


KINDS: list[tuple[Callable[[int, int, random.Random], Case], int]] = [
    (plan_missing, 16),
    (plan_empty, 9),
    (plan_user, 40),
    (plan_output_foreign, 20),
    (plan_output_runjson, 26),
    (plan_output_symlink, 16),
    (plan_output_inside, 24),
    (plan_locks, 16),
    (plan_in_input, 36),
    (plan_glob, 12),
    (plan_not_dir, 16),
]


def _cases() -> list[Case]:
    cases, seed = [], 0
    for planner, count in KINDS:
        for i in range(count):
            cases.append(planner(seed, i, random.Random(seed)))
            seed += 1
    return cases


CASES = _cases()
assert len(CASES) >= 200 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_an_output_directory_situation(case, world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative spellings are relative to the case's folder
    built = case.build(Ctx(tmp_path, world, random.Random(1_000_003 + case.seed)))
    roots = [tmp_path, world.zarr.parent]  # the case and the module's inputs
    whole = snapshot(roots)
    foreign = snapshot(roots, skip=built.ours)

    code, lines = cli(capsys, "run", *built.argv, *QUICK)

    assert code in (0, 2), f"exit {code} (never 1): {lines}"
    assert code in built.codes, f"exit {code}, expected {sorted(built.codes)}: {lines}"
    if code == 2:  # refused: one line; nothing deleted or changed, nothing new but nucflow's
        refused_in_one_line(lines, built.refusal)
        assert_unchanged(whole, snapshot(roots), allowed=built.ours)
    else:
        after = snapshot(roots, skip=built.ours)
        assert_kept(foreign, after)
        for path in set(after) - set(foreign):  # inside the output (or its new parents)
            made = Path(path) == built.out or built.out in Path(path).parents
            assert made or (Path(path) in built.out.parents and after[path] == "dir"), path
            assert not any(p in Path(path).parents for p in built.inputs), f"wrote {path}"
        assert_complete(built.out, world.ref)
    # On exit 2 the tree is as the user made it: what status says of it is theirs (a run.json
    # they copied in may say complete); on exit 0 assert_complete checked the output.


# --- read-only and full file systems (root only: they mount tmpfs) -------------------------


def remount_read_only(target: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)


def fill(mount: Path, leave_kib: int) -> None:
    """A user's file taking all the space of ``mount`` but ``leave_kib`` KiB."""
    stats = os.statvfs(mount)
    size = max(0, stats.f_bavail * stats.f_frsize - leave_kib * 1024)
    with open(mount / "filler.bin", "wb") as f:
        f.write(b"\x5a" * size)


#: (situation, option): the mount is read-only (``ro-``) or has little room left (``full-``).
TMPFS = [("ro-missing", "plain"), ("ro-mountpoint", "overwrite"), ("ro-output", "resume")]
TMPFS += [("ro-user", "overwrite"), ("full-fresh", "plain"), ("full-nested", "resume")]
TMPFS += [("full-empty", "plain"), ("full-overwrite", "overwrite"), ("full-resume", "resume")]
TMPFS += [("ro-output", "overwrite"), ("full-fresh", "overwrite"), ("full-empty", "resume")]


def _tmpfs_case(seed: int) -> tuple[str, str, int]:
    variant, opt = TMPFS[seed]
    # A run of the small stack needs some 700 KiB at its peak: each of these runs out (a
    # copied output's ~300 KiB, freed by --overwrite, included).
    room = 200 if variant in ("full-overwrite", "full-resume") else 480
    free = random.Random(5000 + seed).randrange(0, room) if variant.startswith("full") else 0
    return variant, opt, free


TMPFS_CASES = [_tmpfs_case(seed) for seed in range(len(TMPFS))]


@pytest.mark.parametrize(
    ("variant", "opt", "free"),
    TMPFS_CASES,
    ids=[
        f"tmpfs-{v}-{o}" + (f"-{f}KiB-free" if v.startswith("full") else "") + f"-s{s}"
        for s, (v, o, f) in enumerate(TMPFS_CASES)
    ],
)
def test_a_read_only_or_full_file_system(variant, opt, free, world, tmpfs, tmp_path, capsys):
    full = variant.startswith("full")
    mount = tmpfs("fs", "size=2m" if full or variant in ("ro-output", "ro-user") else "ro,size=2m")
    ctx = Ctx(tmp_path, world, random.Random(free))
    ctx.user_tree(ctx.home())
    ours: list[Path] = []
    out = mount / "out"
    if variant == "ro-mountpoint":
        out = mount
    elif variant == "full-nested":
        out = mount / "a" / "b" / "out"
    elif variant == "full-empty":
        out.mkdir()
    elif variant in ("ro-output", "full-overwrite", "full-resume"):
        ours = ctx.real_output(out)
    elif variant == "ro-user":
        ctx.user_tree(out)
    if variant in ("ro-output", "ro-user"):
        (mount / "notes.txt").write_bytes(ctx.data(1))
        remount_read_only(mount)
    if full:
        (mount / "notes.txt").write_bytes(ctx.data(1))
        fill(mount, free)
    roots = [tmp_path, world.zarr.parent]
    foreign = snapshot(roots, skip=ours)

    argv = ["run", "--input", str(world.zarr), "--output", str(out), *OPTIONS[opt], *QUICK]
    code, lines = cli(capsys, *argv)

    assert code == 2, f"exit {code}: {lines}"
    if variant == "ro-user" and opt != "plain":
        pattern = NOT_OURS
    elif variant in ("ro-output", "ro-user") and opt == "plain":
        pattern = EXISTS
    elif full:
        pattern = r"No space left on device"
    else:
        pattern = r"[Rr]ead-only file system"
    line = refused_in_one_line(lines, pattern, progress=full)
    assert str(mount) in line, f"the error names no path: {line}"
    assert_kept(foreign, snapshot(roots, skip=ours))
    state = state_of(out)
    if state == "complete":  # only an output left as it was
        assert_same_result(out, world.ref)
    else:
        assert state != "running", status(out).text  # run.json "running" with a live lock


# --- kills at random points ----------------------------------------------------------------

#: Run ``nucflow`` and SIGKILL itself just before the N-th call of os.replace (every file
#: nucflow writes is moved into place with it) or of outdir._remove (each deletion of
#: --overwrite): a kill at a chosen point, reproducible.
KILLER = """
import os, signal, sys
from nucflow import outdir
at, on = int(os.environ["FUZZ_KILL_AT"]), os.environ["FUZZ_KILL_ON"]
calls = [0]
def killing(real):
    def call(*args, **kwargs):
        if calls[0] >= at:
            os.kill(os.getpid(), signal.SIGKILL)
        calls[0] += 1
        return real(*args, **kwargs)
    return call
if on == "replace":
    os.replace = killing(os.replace)
else:
    outdir._remove = killing(outdir._remove)
from nucflow.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def killed_at(argv: list[str], *, delay: float | None = None, at: tuple[str, int] = ("", 0)):
    """Run ``nucflow ARGV`` in a session of its own and SIGKILL it (all its processes) after
    ``delay`` seconds, or at call ``at`` (see :data:`KILLER`). Returns its exit code."""
    if delay is not None:
        command, env = [str(NUCFLOW), *argv], None
    else:
        command = [sys.executable, "-c", KILLER, *argv]
        env = {**os.environ, "FUZZ_KILL_ON": at[0], "FUZZ_KILL_AT": str(at[1])}
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    try:
        proc.wait(timeout=delay if delay is not None else 120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode


def check_after_kill(out: Path, ref: Result, foreign: dict[str, str], roots, ours) -> None:
    """Foreign bytes kept; a dead run is never "running", and "complete" only if it is."""
    assert_kept(foreign, snapshot(roots, skip=ours))
    state = state_of(out)
    assert state != "running", f"the killed run is reported running: {status(out).text}"
    if state == "complete":
        assert json.loads((out / "run.json").read_text())["status"] == "complete"
        assert_same_result(out, ref)


KILL_STARTS = ["fresh", "overwrite", "resume-killed", "empty", "fresh", "overwrite", "fresh"]
TIMED = [(s, KILL_STARTS[s], random.Random(7000 + s).uniform(0.2, 4.0)) for s in range(7)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("seed", "start", "delay"),
    TIMED,
    ids=[f"kill-timed-{start}-after-{delay:.2f}s-s{seed}" for seed, start, delay in TIMED],
)
def test_killed_after_a_random_delay(seed, start, delay, world, big, tmp_path, capsys):
    ctx = Ctx(tmp_path, world, random.Random(seed))
    ctx.user_tree(ctx.home())
    out = tmp_path / "out"
    ours: list[Path] = []
    if start == "empty":
        out.mkdir()
    elif start == "overwrite":  # a complete output, being replaced
        shutil.copytree(big.ref_out, out)
        ours = [out / CLAIM, *(out / e for e in outdir.read_claim(out).entries)]
    roots = [tmp_path, big.zarr]
    foreign = snapshot(roots, skip=ours)
    argv = ["run", "--input", str(big.zarr), "--output", str(out), *BIG_CHUNKS, *QUICK]
    opts = ["--overwrite"] if start == "overwrite" else []
    if start == "resume-killed":  # killed once, then killed again while resuming
        killed_at(argv, delay=random.Random(8000 + seed).uniform(0.2, 4.0))
        opts = ["--resume"]
    killed_at([*argv, *opts], delay=delay)
    check_after_kill(out, big.ref, foreign, roots, ours)
    code, lines = cli(capsys, *argv, "--resume")
    assert code == 0, f"--resume after the kill exited {code}: {lines}"
    assert_complete(out, big.ref)
    assert_kept(foreign, snapshot(roots, skip=ours))


STARTS = ["fresh", "overwrite", "resume"]
# Every one of the first six os.replace calls (the claim, its manifest, run.json: where the
# output's state changes most), then seeded calls of the ~235 a small run makes.
AT_CALL = [(3 * k + i, "replace", start, k) for k in range(6) for i, start in enumerate(STARTS)]
AT_CALL += [
    (s, "replace", STARTS[s % 3], random.Random(s).randrange(6, 240)) for s in range(18, 22)
]
# --overwrite deletes 5 entries and their temporary names: 10 calls of outdir._remove.
AT_CALL += [
    (22 + i, "remove", "overwrite", k)
    for i, k in enumerate(random.Random(9500).sample(range(10), 6))
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("seed", "on", "start", "at"),
    AT_CALL,
    ids=[f"kill-{on}-{start}-at-call{at}-s{seed}" for seed, on, start, at in AT_CALL],
)
def test_killed_at_a_chosen_write_or_delete(seed, on, start, at, world, tmp_path, capsys):
    ctx = Ctx(tmp_path, world, random.Random(seed))
    ctx.user_tree(ctx.home())
    out = tmp_path / "out"
    ours = [] if start == "fresh" else ctx.real_output(out)
    roots = [tmp_path, world.zarr.parent]
    foreign = snapshot(roots, skip=ours)
    argv = ["run", "--input", str(world.zarr), "--output", str(out), *QUICK]
    opts = [] if start == "fresh" else [f"--{start}"]
    killed_at([*argv, *opts], at=(on, at))
    check_after_kill(out, world.ref, foreign, roots, ours)
    code, lines = cli(capsys, *argv, "--resume")
    assert code == 0, f"--resume after the kill exited {code}: {lines}"
    assert_complete(out, world.ref)
    assert_kept(foreign, snapshot(roots, skip=ours))
