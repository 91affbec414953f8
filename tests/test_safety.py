"""Issue 27's reproductions: nothing a user owns is deleted or misread.

Each test is one of the issue's numbered reproductions, run as a user would (the CLI on stacks
from ``nucflow.synth``), and asserts what must happen instead: no foreign byte changes, exit 2
with one line naming the thing and the fix, and a resume that continues the recorded run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
import zarr

from nucflow import io, outdir, synth
from nucflow.cli import main
from nucflow.status import status

SHAPE = (16, 64, 64)
QUICK = ["--set", "qc.enabled=false"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    made = synth.make_nuclei(SHAPE, n_nuclei=12, diameter=8.0, seed=5)
    path = tmp_path_factory.mktemp("safety") / "base.ome.zarr"
    io.write_ome_zarr(path, made.image, made.voxel_size, labels={"truth": made.truth})
    return path


@pytest.fixture(scope="module")
def slices(base, tmp_path_factory) -> Path:
    """The stack as a folder of 2D TIFF slices (no voxel size)."""
    folder = tmp_path_factory.mktemp("slices") / "slicesdir"
    folder.mkdir()
    image = np.asarray(zarr.open_array(str(base / "0"), mode="r"))
    for z, plane in enumerate(image):
        tifffile.imwrite(folder / f"z{z:03d}.tif", plane)
    return folder


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of ``nucflow ARGV`` in this process, warnings as printed lines."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    err = capsys.readouterr().err
    return code, err + "".join(f"nucflow: warning: {w.message}\n" for w in caught)


def refused(code: int, err: str, pattern: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert re.search(pattern, err), f"{pattern!r} not in {err!r}"


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (symlinks by their target path)."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# --- 1. --overwrite on a folder that merely holds a run.json ---------------------------------


@pytest.mark.parametrize(
    "run_json",
    ["not json at all", "{}", '{"status": "complete"}', "copy"],
    ids=["not-json", "empty-object", "status-complete", "another-runs-run.json"],
)
def test_overwrite_never_deletes_a_folder_nucflow_did_not_claim(base, tmp_path, capsys, run_json):
    proj = tmp_path / "proj"
    (proj / "raw").mkdir(parents=True)
    (proj / "thesis.tex").write_text("data")
    (proj / "raw" / "img").write_text("x")
    if run_json == "copy":  # a real run.json, of a real run elsewhere
        other = tmp_path / "other"
        assert cli(capsys, "run", "--input", str(base), "--output", str(other), *QUICK)[0] == 0
        shutil.copy(other / "run.json", proj / "run.json")
    else:
        (proj / "run.json").write_text(run_json)
    before = digests(proj)
    code, err = cli(capsys, "run", "--input", str(base), "--output", str(proj), "--overwrite")
    refused(code, err, r"is not a nucflow output \(no valid \.nucflow-output\.json")
    assert digests(proj) == before


def test_overwrite_deletes_only_the_entries_nucflow_wrote(base, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(capsys, "run", "--input", str(base), "--output", str(out), *QUICK)[0] == 0
    claim = outdir.read_claim(out)
    assert claim is not None
    assert {p.name for p in out.iterdir()} - {outdir.CLAIM_NAME} <= set(claim.entries)
    # A user's file beside the outputs: refused, nothing deleted.
    (out / "notes.txt").write_text("mine")
    before = digests(out)
    code, err = cli(capsys, "run", "--input", str(base), "--output", str(out), "--overwrite")
    refused(code, err, r"holds 'notes\.txt', which nucflow did not write; move it out")
    assert digests(out) == before
    # An entry nucflow wrote, replaced by a link to a user's file: refused too.
    (out / "notes.txt").unlink()
    shutil.rmtree(out / "qc", ignore_errors=True)
    (out / "nuclei.csv").unlink()
    (out / "nuclei.csv").symlink_to(tmp_path / "elsewhere.csv")
    (tmp_path / "elsewhere.csv").write_text("user's table")
    code, err = cli(capsys, "run", "--input", str(base), "--output", str(out), "--overwrite")
    refused(code, err, r"holds 'nuclei\.csv', which nucflow did not write")
    assert (tmp_path / "elsewhere.csv").read_text() == "user's table"
    # run.json replaced by another run's: refused.
    (out / "nuclei.csv").unlink()
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**record, "claim": "0" * 32}))
    code, err = cli(capsys, "run", "--input", str(base), "--output", str(out), "--overwrite")
    refused(code, err, r"run\.json is not the run\.json nucflow wrote for")


# --- 2. a glob input inside the output -------------------------------------------------------


def test_a_glob_input_inside_the_output_is_refused_and_kept(slices, tmp_path, capsys):
    folder = tmp_path / "slicesdir"
    shutil.copytree(slices, folder)
    (folder / "run.json").write_text('{"status": "complete"}')
    before = digests(folder)
    os.chdir(tmp_path)
    try:
        for pattern in ("slices*/z*.tif", "slicesdir/*.tif", str(folder / "z0[0-1]*.tif")):
            argv = ["run", "--input", pattern, "--output", "slicesdir", "--overwrite"]
            code, err = cli(capsys, *argv, "--diameter", "8")
            refused(code, err, r"--output \S+/slicesdir contains the input \S+/slicesdir/z0\d+")
    finally:
        os.chdir(Path(__file__).parent)
    assert digests(folder) == before


# --- 3. an output inside the input's zarr hierarchy ------------------------------------------


@pytest.mark.parametrize("inside", ["labels/x", "0/x", "x"])
def test_an_output_inside_the_inputs_hierarchy_is_refused(base, tmp_path, capsys, inside):
    source = tmp_path / "inp.ome.zarr"
    shutil.copytree(base, source)
    before = digests(source)
    argv = ["run", "--input", f"{source}/0", "--output", f"{source}/{inside}"]
    code, err = cli(capsys, *argv, "--diameter", "8")
    refused(
        code, err, r"--output \S+ is inside the input \S+/inp\.ome\.zarr(/0)?; choose a directory"
    )
    assert digests(source) == before


def test_an_output_holding_a_symlinked_input_is_refused(base, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    link = tmp_path / "link.ome.zarr"
    link.symlink_to(base)
    code, err = cli(capsys, "run", "--input", str(link), "--output", str(base.parent))
    refused(code, err, rf"--output {re.escape(str(base.parent))} contains the input")


# --- 4, 5. voxel size metadata ---------------------------------------------------------------


def _with_scale(base: Path, target: Path, scale: list[float]) -> Path:
    shutil.copytree(base, target)
    meta_file = target / "zarr.json"  # NGFF 0.5: the metadata is the group's "ome" attribute
    meta = json.loads(meta_file.read_text())
    ome = meta["attributes"]["ome"]
    ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = scale
    meta_file.write_text(json.dumps(meta))
    return target


@pytest.mark.parametrize("scale", [[1.0, -0.5, 0.0], [1.0, float("nan"), 0.5], [0.0, 0.5, 0.5]])
def test_a_voxel_size_that_is_not_finite_and_positive_is_refused(base, tmp_path, capsys, scale):
    bad = _with_scale(base, tmp_path / "bad.ome.zarr", scale)
    for command in ("run", "plan"):
        argv = [command, "--input", str(bad), "--diameter", "8"]
        argv += ["--output", str(tmp_path / "out")] if command == "run" else []
        code, err = cli(capsys, *argv)
        refused(
            code, err,
            r"bad\.ome\.zarr: the voxel size in its metadata \(OME-Zarr multiscales "
            r"coordinateTransformations scale\) is \(.*\) µm, which is not finite and positive; "
            r"fix the metadata or pass --voxel-size Z Y X in µm$",
        )  # fmt: skip
    assert not (tmp_path / "out").exists()
    # --voxel-size overrides the metadata: the run matches the well-described stack's.
    good, fixed = tmp_path / "good", tmp_path / "fixed"
    assert cli(capsys, "run", "--input", str(base), "--output", str(good), *QUICK)[0] == 0
    voxel = ["--voxel-size", "1", "0.5", "0.5"]
    assert cli(capsys, "run", "--input", str(bad), "--output", str(fixed), *voxel, *QUICK)[0] == 0
    pd.testing.assert_frame_equal(
        pd.read_parquet(fixed / "nuclei.parquet"), pd.read_parquet(good / "nuclei.parquet")
    )


def test_no_voxel_size_is_said_and_recorded_as_pixels(slices, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = cli(capsys, "run", "--input", str(slices), "--output", str(out), *QUICK)
    assert code == 0, err
    said = [line for line in err.splitlines() if "warning: no voxel size" in line]
    assert said == [
        f"nucflow: warning: no voxel size in {slices}: lengths (--diameter, the table's _um "
        "columns) are in pixels; pass --voxel-size Z Y X in µm"
    ]
    assert json.loads((out / "run.json").read_text())["unit"] == "pixel"
    meta = json.loads(pq.read_schema(out / "nuclei.parquet").metadata[b"nucflow"])
    assert meta["unit"] == "pixel"
    csv = pd.read_csv(out / "nuclei.csv")
    assert (csv["length_unit"] == "pixel").all() and len(csv) > 0
    # With a voxel size, no warning and no length_unit column (the unit is µm).
    out2 = tmp_path / "out2"
    voxel = ["--voxel-size", "1", "0.5", "0.5"]
    code, err = cli(capsys, "run", "--input", str(slices), "--output", str(out2), *voxel, *QUICK)
    assert code == 0 and "no voxel size" not in err
    assert "length_unit" not in pd.read_csv(out2 / "nuclei.csv").columns
    # The truncation hint points at the voxel size, not at a larger max_radius.
    hint = [line for line in err.splitlines() if "reached segment.max_radius" in line]
    assert not hint or "--voxel-size" not in hint[0]


# --- 6. the machine's errors -----------------------------------------------------------------


def test_a_read_only_output_exits_2_naming_it(base, tmpfs, capsys):
    target = tmpfs("ro", "ro,size=1m") / "out"
    code, err = cli(capsys, "run", "--input", str(base), "--output", str(target))
    refused(
        code, err,
        rf"error: {re.escape(str(target))} is on a read-only file system \(Read-only file "
        r"system\); choose an --output on a writable one$",
    )  # fmt: skip


def test_a_full_disk_exits_2_and_never_leaves_a_live_looking_run(base, tmpfs, capsys):
    target = tmpfs("full", "size=256k") / "out"
    code, err = cli(capsys, "run", "--input", str(base), "--output", str(target))
    refused(code, err, r"is on a full file system \(No space left on device\); free space or")
    report = status(target)
    assert report.state in ("failed", "stopped"), report.text
    assert not (target / ".nucflow.lock").exists()


def test_a_native_chunk_larger_than_a_task_may_hold_is_refused(tmp_path):
    """Under a 2 GB address-space limit a 512 MiB stored chunk failed with MemoryError."""
    big = tmp_path / "big.zarr"
    store = zarr.create_array(
        str(big), shape=(64, 2048, 2048), chunks=(64, 2048, 2048), dtype="uint16", zarr_format=2
    )
    store[:2, :8, :8] = 1  # one stored chunk, mostly zeros: small on disk, 512 MiB decoded

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2_000_000_000, 2_000_000_000))

    script = Path(sys.executable).with_name("nucflow")
    for command in ("plan", "run"):
        argv = [str(script), command, "--input", str(big), "--voxel-size", "1", "1", "1"]
        argv += ["--output", str(tmp_path / "out")] if command == "run" else []
        proc = subprocess.run(argv, capture_output=True, text=True, preexec_fn=limit, timeout=120)
        refused(
            proc.returncode, proc.stderr,
            rf"--input {re.escape(str(big))} is stored in chunks of 64x2048x2048 voxels \(0\.50 "
            r"GiB each\), and every read decompresses whole chunks: more than a quarter of the "
            r"[\d.]+ GiB per worker thread here; rewrite the input in smaller chunks",
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


# --- 7, 8. resume continues the recorded run -------------------------------------------------


def _interrupt_while_segmenting(source: Path, out: Path, *extra: str) -> None:
    script = Path(sys.executable).with_name("nucflow")
    argv = [str(script), "run", "--input", str(source), "--output", str(out), *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        blocks = out / ".work" / "blocks"
        if blocks.is_dir() and len(list(blocks.iterdir())) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130, "the run must be interrupted while segmenting"


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> tuple[Path, Path]:
    """A run with --chunks 8 16 16 and a diameter, Ctrl-C'd while segmenting (tests copy it)."""
    folder = tmp_path_factory.mktemp("interrupted")
    made = synth.make_nuclei((32, 96, 96), n_nuclei=40, diameter=8.0, seed=6)
    source = folder / "idt.ome.zarr"
    io.write_ome_zarr(source, made.image, made.voxel_size)
    out = folder / "intr"
    _interrupt_while_segmenting(source, out, "--chunks", "8", "24", "24", "--diameter", "7")
    return source, out


def test_resume_without_the_options_continues_the_recorded_run(interrupted, tmp_path, capsys):
    source, stored = interrupted
    out = tmp_path / "intr"
    shutil.copytree(stored, out)
    code, err = cli(capsys, "run", "--input", str(source), "--output", str(out), "--resume")
    assert code == 0, err
    assert "recomputing" not in err
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["chunks"] == [8, 24, 24] and record["config"]["diameter"] == 7
    actions = {stage: entry["action"] for stage, entry in record["stages"].items()}
    assert actions["mask"] == "reused" and actions["segment"] == "reused", actions
    # The same as an uninterrupted run of the recorded command.
    fresh = tmp_path / "fresh"
    argv = ["--chunks", "8", "24", "24", "--diameter", "7"]
    assert cli(capsys, "run", "--input", str(source), "--output", str(fresh), *argv)[0] == 0
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "nuclei.parquet"), pd.read_parquet(fresh / "nuclei.parquet")
    )


def test_resume_with_another_option_recomputes_from_the_stage_it_changes(
    interrupted, tmp_path, capsys
):
    source, stored = interrupted
    out = tmp_path / "intr"
    shutil.copytree(stored, out)
    # segment.min_radius: read by the segmentation only (nucflow.stages)
    smaller = 0.8 * json.loads((out / "run.json").read_text())["derived"]["min_radius"]
    argv = ["run", "--input", str(source), "--output", str(out), "--resume"]
    code, err = cli(capsys, *argv, "--set", f"segment.min_radius={smaller}")
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    actions = {stage: entry["action"] for stage, entry in record["stages"].items()}
    assert actions["mask"] == "reused" and actions["segment"] == "computed", actions
    assert "--resume: recomputing segment and every stage after it: parameters changed" in err


@pytest.mark.parametrize("spelling", ["relative", "absolute", "dotted", "symlink"])
def test_resume_does_not_depend_on_how_the_input_is_spelled(
    interrupted, tmp_path, capsys, monkeypatch, spelling
):
    source, stored = interrupted
    out = tmp_path / "intr"
    shutil.copytree(stored, out)
    monkeypatch.chdir(source.parent)
    (tmp_path / "link.ome.zarr").symlink_to(source)
    given = {
        "relative": source.name,
        "absolute": str(source),
        "dotted": f"./{source.parent.name}/../{source.parent.name}/{source.name}",
        "symlink": str(tmp_path / "link.ome.zarr"),
    }[spelling]
    if spelling == "dotted":
        monkeypatch.chdir(source.parent)
        given = f"../{source.parent.name}/./{source.name}"
    code, err = cli(capsys, "run", "--input", given, "--output", str(out), "--resume")
    assert code == 0, err
    assert "modified since" not in err


# --- 9. status after Ctrl-C, into a closed pipe ------------------------------------------------


def test_status_into_a_closed_pipe_keeps_its_exit_code(interrupted):
    _, out = interrupted
    script = Path(sys.executable).with_name("nucflow")
    proc = subprocess.Popen([str(script), "status", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # `nucflow status OUT | head -0`
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert proc.returncode == 1 and err == ""  # interrupted, said by the code alone


# --- 10. an absurd block size -----------------------------------------------------------------


def test_blocks_smaller_than_the_halo_are_warned_about_before_the_work(base, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["run", "--input", str(base), "--output", str(out), "--chunks", "4", "16", "16"]
    code, err = cli(capsys, *argv, *QUICK)
    assert code == 0, err
    line = next(line for line in err.splitlines() if "reads" in line and "--chunks" in line)
    found = re.fullmatch(
        r"nucflow: warning: --chunks 4 16 16 with a halo of (\d+) (\d+) (\d+) voxels reads "
        r"([\d.]+)x the data; --chunks (\d+) (\d+) (\d+) reads ([\d.]+)x",
        line,
    )
    assert found, line
    assert float(found.group(4)) > 4 >= float(found.group(8))
    # The default blocks are fine: no warning.
    code, err = cli(capsys, "run", "--input", str(base), "--output", str(tmp_path / "ok"), *QUICK)
    assert code == 0 and "reads" not in err


# --- 11. the configuration is checked before the output is claimed ---------------------------


@pytest.mark.parametrize(
    ("steps", "said"),
    [
        ("[{gaussian: {sigma: -1}}]", r"`filter\.steps\[0\]` \(gaussian\): `sigma` must be"),
        ("[{median: {size: [3, 3]}}]", r"`filter\.steps\[0\]` \(median\): `size: \[3, 3\]` has 2"),
        ("[{blur: {sigma: 1}}]", r"`filter\.steps\[0\]`: unknown filter 'blur'"),
    ],
    ids=["negative-sigma", "2d-footprint-on-3d", "unknown-step"],
)
def test_bad_filter_steps_are_refused_by_the_nuclei_flow_too(base, tmp_path, capsys, steps, said):
    out = tmp_path / "out"
    argv = ["run", "--input", str(base), "--output", str(out), "--set", f"filter.steps={steps}"]
    code, err = cli(capsys, *argv)
    refused(code, err, said)
    assert not out.exists()


# --- 13. a block longer than a worker lives before its walltime ---------------------------------


def test_plan_says_whether_a_block_fits_the_walltime(base, capsys):
    from nucflow.cli.commands import _walltime_line

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fits = _walltime_line(3.0, 20, (64, 256, 256))
        long = _walltime_line(6.0, 20, (64, 256, 256))
    assert fits.endswith("one block takes 3.0 s on one thread")
    assert long.endswith("(too long: see the warning)")
    assert [str(w.message) for w in caught] == [
        "one block takes 6.0 s, more than a quarter of a worker's 20 s before its walltime: "
        "pass --chunks 64 128 128 or a longer walltime"
    ]
    # nucflow plan --cluster slurm with a one-minute walltime says it (no job is started)
    capsys.readouterr()
    argv = [
        "plan",
        "--input",
        str(base),
        "--cluster",
        "slurm",
        "--set",
        "cluster.walltime=00:01:00",
    ]
    assert main(argv) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("walltime")]
    assert len(said) == 1 and re.fullmatch(
        r"walltime   a worker computes for at least 15 s before it retires; one block takes "
        r"[\d.]+ s on one thread( \(too long: see the warning\))?",
        said[0],
    ), said
