"""The CLI contract (docs/design.md): bad input or usage exits 2 with ONE line on stderr naming the
thing and the fix, never a traceback; degenerate but valid stacks run to completion.

Policy for non-finite voxels (NaN/inf in a float input): refuse with exit 2, naming the file,
the block and its number of non-finite voxels (pipeline checks them in the preprocess pass, which
reads every voxel anyway); treating them as background would need a rule for every filter.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from nucflow import io, synth
from nucflow.cli import main
from nucflow.cli.parser import _parser
from nucflow.measure import table_columns
from nucflow.objects import default_columns


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of ``nucflow ARGV`` run in-process (argparse exits via SystemExit).

    Under pytest, warnings go to pytest's recorder instead of stderr: add them back as the
    lines the CLI would print.
    """
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code
    return code, capsys.readouterr().err + "".join(
        f"nucflow: warning: {w.message}\n" for w in caught
    )


def assert_refused(code: int, err: str, pattern: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"stderr is not one line: {err!r}"
    assert re.search(pattern, err), f"{pattern!r} not in {err!r}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Small inputs and config files, written once; values are paths."""
    d = tmp_path_factory.mktemp("cli")

    def array(name: str, value: np.ndarray, **kwargs) -> str:
        zarr.save_array(str(d / name), value, **kwargs)
        return str(d / name)

    made = synth.make_nuclei((16, 48, 48), n_nuclei=5, seed=1)
    io.write_ome_zarr(d / "nuclei.ome.zarr", made.image, made.voxel_size)
    two = zarr.create_array(
        str(d / "two.zarr"), shape=(2, 16, 40, 40), dtype="uint16", dimension_names="czyx"
    )
    two[:] = 1
    files = {
        "notes.txt": "not an image\n",
        "table.csv": "a,b\n1,2\n",
        "typo.yaml": "diamter: 5\n",
        "broken.yaml": "threshold: [otsu,\n",
        "list.yaml": "- 1\n- 2\n",
    }
    for name, text in files.items():
        (d / name).write_text(text)
    return {
        "dir": str(d),
        "u16": array("u16.zarr", np.zeros((16, 40, 40), np.uint16)),
        "nuclei": str(d / "nuclei.ome.zarr"),
        "two": str(d / "two.zarr"),
        "1d": array("1d.zarr", np.zeros(10, np.uint16)),
        "4d": array("4d.zarr", np.zeros((2, 4, 8, 8), np.uint16)),
        "6d": array("6d.zarr", np.zeros((2, 1, 2, 4, 8, 8), np.uint16)),
        # zarr v2: a v3 string array warns at write time (zarr's UnstableSpecificationWarning)
        "str": array("str.zarr", np.array([["a", "b"], ["c", "d"]]), zarr_format=2),
        "bool": array("bool.zarr", np.zeros((4, 8, 8), bool)),
        "complex": array("complex.zarr", np.zeros((4, 8, 8), np.complex64)),
        **{name.split(".")[0]: str(d / name) for name in files},
    }


# (command line with {placeholders} from `data` and {out}, regex the stderr line must match)
BAD_INPUTS = {
    "missing input": (
        "run --input {dir}/missing.zarr --output {out}",
        r"^nucflow run: error: input \S+/missing\.zarr does not exist; check the path$",
    ),
    "text file": (
        "run --input {notes} --output {out}",
        r"^nucflow run: error: \S+/notes\.txt is not an image nucflow can read; supported: zarr ",
    ),
    "csv file": (
        "run --input {table} --output {out}",
        r"^nucflow run: error: \S+/table\.csv is not an image nucflow can read; supported: zarr ",
    ),
    "1D array": (
        "run --input {1d} --output {out}",
        r"1d\.zarr has shape \(10,\) \(no axis metadata\): 1 spatial dimension\(s\) after "
        r"removing t and c; nucflow supports 2D \(Y, X\) or 3D \(Z, Y, X\) images",
    ),
    "4D array without axes": (
        "plan --input {4d}",
        r"^nucflow plan: error: \S+/4d\.zarr has shape \(2, 4, 8, 8\) \(no axis metadata\): "
        r"4 spatial dimension\(s\)",
    ),
    "6D array": (
        "run --input {6d} --output {out}",
        r"6d\.zarr has shape \(2, 1, 2, 4, 8, 8\) \(no axis metadata\): 5 spatial dimension\(s\)",
    ),
    "string dtype": (
        "run --input {str} --output {out}",
        r"str\.zarr has dtype <U1, which nucflow cannot process; supported: unsigned/signed "
        r"integers, float32, float64; convert the image to one of them$",
    ),
    "bool dtype": (
        "run --input {bool} --output {out}",
        r"bool\.zarr has dtype bool, which nucflow cannot process; supported: ",
    ),
    "complex dtype": (
        "run --input {complex} --output {out}",
        r"complex\.zarr has dtype complex64, which nucflow cannot process; supported: ",
    ),
    "diameter 0": (
        "run --input {u16} --output {out} --diameter 0",
        r"^nucflow run: error: config `diameter` must be a number > 0 or auto, got 0\.0$",
    ),
    "diameter -3": (
        "run --input {u16} --output {out} --diameter -3",
        r"config `diameter` must be a number > 0 or auto, got -3\.0$",
    ),
    "diameter inf": (
        "run --input {u16} --output {out} --diameter inf",
        r"config `diameter` must be a number > 0 or auto, got inf$",
    ),
    "diameter larger than the stack": (
        "run --input {u16} --output {out} --diameter 1000",
        r"`diameter` 1000 is larger than the stack \(40 along its longest axis\); pass the "
        r"nucleus diameter in µm \(or pixels without voxel size\)$",
    ),
    "diameter larger than the stack in µm": (
        "plan --input {nuclei} --diameter 30",
        r"`diameter` 30 is larger than the stack \(24 along its longest axis\)",
    ),
    "background_downsample 0": (
        "run --input {u16} --output {out} --set preprocess.background_downsample=0",
        r"config `preprocess.background_downsample` must be null, an integer > 0 or 2-3 "
        r"integers > 0, got 0$",
    ),
    "background_downsample per axis, wrong length": (
        "run --input {u16} --output {out} --set preprocess.background_downsample=[1,2]",
        r"`preprocess.background_downsample` has 2 values but the stack has 3 axes; pass one "
        r"integer or one per axis$",
    ),
    "chunks 0": (
        "run --input {u16} --output {out} --chunks 0 10 10",
        r"config `chunks` must be null or 2-3 integers > 0, got \[0, 10, 10\]$",
    ),
    "chunks 2 values for 3D": (
        "run --input {u16} --output {out} --chunks 10 10",
        r"`chunks` has 2 values but the stack has 3 axes; pass Z Y X$",
    ),
    "chunks 4 values": (
        "run --input {u16} --output {out} --chunks 10 10 10 10",
        r"config `chunks` must be null or 2-3 integers > 0, got \[10, 10, 10, 10\]$",
    ),
    "voxel size 2 values for 3D": (
        "run --input {u16} --output {out} --voxel-size 1 1",
        r"`voxel_size` has 2 values but the stack has 3 axes; pass Z Y X$",
    ),
    "voxel size 4 values": (
        "run --input {u16} --output {out} --voxel-size 1 1 1 1",
        r"config `voxel_size` must be null or 2-3 numbers > 0, got \[1\.0, 1\.0, 1\.0, 1\.0\]$",
    ),
    "voxel size 0": (
        "run --input {u16} --output {out} --voxel-size 0 1 1",
        r"config `voxel_size` must be null or 2-3 numbers > 0, got \[0\.0, 1\.0, 1\.0\]$",
    ),
    "voxel size inf": (
        "run --input {u16} --output {out} --voxel-size inf 1 1",
        r"config `voxel_size` must be null or 2-3 numbers > 0, got \[inf, 1\.0, 1\.0\]$",
    ),
    "channel 5 of 1": (
        "run --input {u16} --output {out} --channel 5",
        r"`channel` 5 is out of range: \S+/u16\.zarr has 1 channel\(s\); valid range 0\.\.0$",
    ),
    "channel 5 of 2": (
        "run --input {two} --output {out} --channel 5",
        r"`channel` 5 is out of range: \S+/two\.zarr has 2 channel\(s\); valid range 0\.\.1$",
    ),
    "channel missing for 2 channels": (
        "plan --input {two}",
        r"`channel` is required: \S+/two\.zarr has 2 channels \(c axis\); pass --channel 0\.\.1$",
    ),
    "measured channel out of range": (
        "plan --input {u16} --set measure.channels=[3]",
        r"`measure\.channels` holds 3 but \S+/u16\.zarr has 1 channel\(s\); use 0\.\.0$",
    ),
    "tune region of the wrong length": (
        "tune --input {u16} --output {out} --region 0:4 0:8",
        r"^nucflow tune: error: --region has 2 ranges but the stack has 3 axes; pass Z Y X$",
    ),
    "tune region outside the stack": (
        "tune --input {u16} --output {out} --region 0:4 0:8 0:99",
        r"--region .0:99. must be START:STOP with 0 <= START < STOP <= 40 "
        r"\(the stack is 16 x 40 x 40 voxels, Z Y X\)$",
    ),
    "unknown key via --set": (
        "run --input {u16} --output {out} --set diamter=5",
        r"^nucflow run: error: unknown config key `diamter` \(command line\); "
        r"did you mean `diameter`\?$",
    ),
    "unknown key in a config file": (
        "run {typo} --input {u16} --output {out}",
        r"unknown config key `diamter` \(\S+/typo\.yaml\); did you mean `diameter`\?$",
    ),
    "unknown threshold method": (
        "run --input {u16} --output {out} --set threshold.method=foo",
        r"config `threshold\.method` must be local, otsu, li, triangle, yen or value, got 'foo'$",
    ),
    "fill_holes not a bool": (
        "run --input {u16} --output {out} --set mask.fill_holes=maybe",
        r"config `mask\.fill_holes` must be true or false, got 'maybe'$",
    ),
    "threshold value nan": (
        "run --input {u16} --output {out} --set threshold.value=.nan",
        r"config `threshold\.value` must be null or a finite number, got nan$",
    ),
    "section set to a value": (
        "run --input {u16} --output {out} --set preprocess=3",
        r"config `preprocess` \(command line\) must be a mapping of keys$",
    ),
    "--set without =": (
        "run --input {u16} --output {out} --set diameter",
        r"--set 'diameter' must look like key=value, e.g\. --set threshold\.method=li$",
    ),
    "config not YAML": (
        "run {broken} --input {u16} --output {out}",
        r"config file \S+/broken\.yaml is not valid YAML \(line 2\); fix its syntax$",
    ),
    "config not a mapping": (
        "run {list} --input {u16} --output {out}",
        r"config file \S+/list\.yaml must hold a mapping of keys, not list$",
    ),
    "config missing": (
        "run {dir}/nope.yaml --input {u16} --output {out}",
        r"config file \S+/nope\.yaml does not exist; check the path$",
    ),
    "output inside the input": (
        "run --input {u16} --output {u16}/results",
        r"--output \S+/u16\.zarr/results is inside the input \S+/u16\.zarr; "
        r"choose a directory outside it$",
    ),
    "output contains the input": (
        "run --input {u16} --output {dir}",
        r"--output \S+ contains the input \S+/u16\.zarr; choose another directory$",
    ),
    "output is a file": (
        "run --input {u16} --output {notes}",
        r"--output \S+/notes\.txt exists and is not a directory; choose another path$",
    ),
    "unknown cluster (run)": (
        "run --input {u16} --output {out} --cluster slurn",
        r"^nucflow run: error: unknown --cluster 'slurn'; choose threads, processes, local, "
        r"slurm or tcp://HOST:PORT \(did you mean 'slurm'\?\)$",
    ),
    "unknown cluster (plan)": (
        "plan --input {u16} --cluster slurn",
        r"^nucflow plan: error: unknown --cluster 'slurn'.*did you mean 'slurm'",
    ),
    "bad --adapt": (
        "run --input {u16} --output {out} --adapt 8",
        r"--adapt '8' must be MIN:MAX with 0 <= MIN <= MAX, e\.g\. --adapt 1:8$",
    ),
    "unknown flow": (
        "run --input {u16} --output {out} --flow nope",
        r"--flow 'nope': no such flow \(\S+/nope\.py\); use nuclei, preprocess, mask or a "
        r"\.py file$",
    ),
    # the whole configuration is checked against the stack before the output is claimed
    # (nucflow.stages): a mistake found by a stage must not leave a claimed, failed output
    "unknown filter step": (
        "run --flow preprocess --input {u16} --output {out} "
        '--set filter.steps=[{{"gausian":{{}}}}]',
        r"^nucflow run: error: `filter.steps\[0\]`: unknown filter 'gausian'; use one of "
        r".*gaussian",
    ),
    "bad filter step parameter": (
        "run --flow preprocess --input {u16} --output {out} "
        '--set filter.steps=[{{"gaussian":{{"sigmaa":1}}}}]',
        r"^nucflow run: error: `filter.steps\[0\]` \(gaussian\): bad parameters for step "
        r"'gaussian': .*unexpected keyword argument 'sigmaa'$",
    ),
    # the README's 2D example on a 3D stack: the step and the key as written, and the fix
    "2D filter step size on a 3D stack": (
        "run --flow preprocess --input {u16} --output {out} "
        '--set filter.steps=[{{"gaussian":{{"sigma":1}}}},{{"closing":{{"size":[5,5]}}}}]',
        r"^nucflow run: error: `filter.steps\[1\]` \(closing\): `size: \[5, 5\]` has 2 values "
        r"but the stack has 3 axes; give one per axis \(Z Y X\), e.g. `size: \[5, 5, 5\]`, or "
        r"one number$",
    ),
    "filter step with a footprint too small for its axes": (
        "run --flow preprocess --input {u16} --output {out} "
        '--set filter.steps=[{{"opening":{{"size":[0,3,3]}}}}]',
        r"^nucflow run: error: `filter.steps\[0\]` \(opening\): `size` must contain at least one "
        r"True element$",
    ),
    "threshold value missing": (
        "run --input {u16} --output {out} --set threshold.method=value",
        r"^nucflow run: error: `threshold.method` is value but `threshold.value` is null; "
        r"set both$",
    ),
    "threshold value missing (plan)": (
        "plan --input {u16} --set threshold.method=value",
        r"^nucflow plan: error: `threshold.method` is value but `threshold.value` is null",
    ),
    "tissue mask missing": (
        "run --input {u16} --output {out} --set preprocess.tissue_mask={dir}/missing.zarr",
        r"^nucflow run: error: `preprocess.tissue_mask`: input \S+/missing\.zarr does not "
        r"exist; check the path$",
    ),
    "tissue mask of another shape": (
        "run --input {u16} --output {out} --set preprocess.tissue_mask={nuclei}",
        r"^nucflow run: error: `preprocess.tissue_mask` \S+/nuclei\.ome\.zarr has shape "
        r"\(16, 48, 48\) but the input has \(16, 40, 40\); give a mask of the input's shape$",
    ),
    # argparse usage errors: one line (no usage block), exit 2
    "--resume with --overwrite": (
        "run --input {u16} --output {out} --resume --overwrite",
        r"^nucflow run: error: argument --overwrite: not allowed with argument --resume "
        r"\(see nucflow run --help\)$",
    ),
    "unknown command": (
        "segment --input {u16}",
        r"^nucflow: error: argument command: invalid choice: 'segment' \(choose from .*'run'.*\) "
        r"\(see nucflow --help\)$",
    ),
    "no command": ("", r"^nucflow: error: the following arguments are required: command"),
    "missing --input": (
        "run --output {out}",
        r"^nucflow run: error: the following arguments are required: --input "
        r"\(see nucflow run --help\)$",
    ),
    "not an int": (
        "run --input {u16} --output {out} --chunks 10 ten 10",
        r"^nucflow run: error: argument --chunks: invalid int value: 'ten'",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(capsys, data, tmp_path, case):
    command, pattern = BAD_INPUTS[case]
    out = tmp_path / "out"
    argv = command.format(**data, out=out).split()
    code, err = cli(capsys, *argv)
    assert_refused(code, err, pattern)
    assert not out.exists()  # nothing is created for a refused run


@pytest.mark.parametrize("extra", [[], ["--overwrite"], ["--resume"]])
def test_existing_foreign_output_is_refused_and_untouched(capsys, data, tmp_path, extra):
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = cli(capsys, "run", "--input", data["u16"], "--output", str(out), *extra)
    pattern = (
        r"output directory \S+/results is not a nucflow output \(no valid \.nucflow-output\.json: "
        r"nucflow did not create it\), and nucflow deletes only what it wrote; choose another "
        r"--output$"
        if extra
        else r"output directory \S+/results exists; pass --resume to continue it or "
        r"--overwrite to replace it$"
    )
    assert_refused(code, err, pattern)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"


def test_existing_nucflow_output_needs_resume_or_overwrite(capsys, data, tmp_path):
    out = tmp_path / "results"
    assert cli(capsys, "run", "--input", data["nuclei"], "--output", str(out))[0] == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, err = cli(capsys, "run", "--input", data["nuclei"], "--output", str(out))
    assert_refused(code, err, r"output directory \S+/results exists; pass --resume")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def run_console(*argv: str) -> subprocess.CompletedProcess:
    """``nucflow ARGV`` in a fresh interpreter, as the installed script runs it (its entry
    point), so stderr also shows warnings printed by the CLI."""
    command = "from nucflow.cli import console; console()"
    return subprocess.run(
        [sys.executable, "-c", command, *argv], capture_output=True, text=True, timeout=120
    )


def test_console_script_missing_input(tmp_path):
    proc = run_console(
        "run", "--input", str(tmp_path / "missing.zarr"), "--output", str(tmp_path / "out")
    )
    assert_refused(
        proc.returncode, proc.stderr,
        r"^nucflow run: error: input \S+/missing\.zarr does not exist; check the path$",
    )  # fmt: skip
    assert proc.stdout == ""


def test_console_script_exits_with_mains_code_after_flushing_its_output(tmp_path):
    """The console command skips the interpreter's teardown (cli.console): the exit code is
    still main's, output to a pipe is complete, and an uncaught exception (--debug) still
    fails the process with its traceback."""
    made = run_console("synth", str(tmp_path / "s.zarr"), "--shape", "8", "32", "32")
    assert made.returncode == 0, made.stderr
    assert re.fullmatch(
        r"nucflow synth: \d+ nuclei, .* -> \S+/s\.zarr \(truth at .*\)\n", made.stdout
    )
    assert io.open_stack(str(tmp_path / "s.zarr")).data.shape == (8, 32, 32)
    missing = ["run", "--input", str(tmp_path / "no.zarr"), "--output", str(tmp_path / "out")]
    crashed = run_console(*missing, "--debug")
    assert crashed.returncode == 1
    assert crashed.stderr.startswith("Traceback") and "InputPathError" in crashed.stderr


def test_console_script_zarr_v3_string_dtype_is_one_line(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.save_array(str(tmp_path / "str3.zarr"), np.array([["a", "b"], ["c", "d"]]))
    proc = run_console("plan", "--input", str(tmp_path / "str3.zarr"))
    assert_refused(
        proc.returncode, proc.stderr, r"str3\.zarr has dtype <U1, which nucflow cannot process"
    )


@pytest.fixture
def nan_stack(tmp_path) -> str:
    image = synth.make_nuclei((16, 48, 48), n_nuclei=5, seed=1).image.astype(np.float32)
    image[3, 10:14, 10:14] = np.nan
    image[5, 0, 0] = np.inf  # 17 non-finite voxels, all in the one default block
    zarr.save_array(str(tmp_path / "nan.zarr"), image)
    return str(tmp_path / "nan.zarr")


@pytest.mark.parametrize(
    "extra", [[], ["--set", "threshold.method=value", "--set", "threshold.value=300"]]
)
def test_non_finite_voxels_are_refused(capsys, nan_stack, tmp_path, extra):
    out = tmp_path / "out"
    voxel = ["--voxel-size", "1", "1", "1"]  # else a warning line says lengths are pixels
    code, err = cli(capsys, "run", "--input", nan_stack, "--output", str(out), *voxel, *extra)
    assert_refused(
        code, err,
        r"^nucflow run: error: input \S+/nan\.zarr has 17 NaN or infinite voxel\(s\) in block "
        r"\[0:16, 0:48, 0:48\]; replace them \(e\.g\. with 0\) before running nucflow$",
    )  # fmt: skip
    # A new output refused mid-run is withdrawn: the same command runs once the input is fixed.
    assert not out.exists()


@pytest.mark.parametrize(
    ("shape", "n_nuclei"),
    [((1, 48, 48), 5), ((4, 20, 20), 1), ((16, 48, 48), 1)],
    ids=["single slice", "smaller than a chunk and the halo", "one nucleus"],
)
def test_degenerate_stacks_complete(capsys, tmp_path, shape, n_nuclei):
    made = synth.make_nuclei(shape, n_nuclei=n_nuclei, seed=2)
    source, out = tmp_path / "in.ome.zarr", tmp_path / "out"
    io.write_ome_zarr(source, made.image, made.voxel_size)
    code, err = cli(capsys, "run", "--input", str(source), "--output", str(out))
    assert code == 0, err
    table = pd.read_parquet(out / "nuclei.parquet")
    assert list(table.columns) == table_columns(3) + default_columns(3)
    assert list(pd.read_csv(out / "nuclei.csv").columns) == table_columns(3) + default_columns(3)
    assert len(table) >= 1
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    labels = zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r")
    assert labels.shape == shape
    assert set(table["label"]) == set(np.unique(labels[:])) - {0}


def test_demo_scores_itself_and_keeps_earlier_folders(capsys, tmp_path):
    """The README's first command: a full run on a synthetic stack, scored against its truth."""
    folder = tmp_path / "demo"
    assert main(["demo", "--output", str(folder)]) == 0
    out = capsys.readouterr().out
    found = int(re.search(r"found\s+(\d+) nuclei", out).group(1))
    f1 = float(re.search(r"accuracy\s+F1 ([\d.]+)", out).group(1))
    assert f1 >= 0.95
    table = pd.read_parquet(folder / "run" / "nuclei.parquet")
    assert len(table) == found
    assert json.loads((folder / "run" / "run.json").read_text())["status"] == "complete"
    page = Path(re.search(r"report\s+(\S+) \(open it in a browser\)", out).group(1))
    assert page == folder.resolve() / "run" / "qc" / "report.html"
    text = page.read_text()  # rewritten once run.json holds the accuracy
    assert "Accuracy against the ground truth" in text and f"<td>{f1:.3f}</td>" in text

    assert main(["demo", "--output", str(folder)]) == 2  # an earlier demo is kept...
    assert "pass --overwrite or another --output" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["demo", "--output", str(foreign), "--overwrite"]) == 2  # ...and so is this
    assert "is not a nucflow output" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert (foreign / "notes.txt").read_text() == "keep"


def test_the_default_demo_folder_is_git_ignored():
    """`nucflow demo` in a clone writes ./nucflow-demo/, which `git status` never shows."""
    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    default = _parser().parse_args(["demo"]).output
    inside = repo / default / "run" / "nuclei.csv"
    found = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", str(inside)])
    assert found.returncode == 0, f"{default}/ is not in .gitignore"


def test_help_imports_nothing_heavy_and_a_run_skips_scipy_stats():
    """`nucflow --help` (issue 14: under 0.3 s) loads no numerical library; the run's modules
    leave out scipy.stats (0.4 s) and matplotlib (the QC pictures are drawn with Pillow)."""
    import subprocess
    import sys

    def loaded(code: str, names: list[str]) -> list[str]:
        code += f"\nimport sys; print(*[m for m in {names} if m in sys.modules], sep=',')"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        return out.stdout.splitlines()[-1].split(",") if out.stdout.strip() else []

    heavy = ["numpy", "scipy", "dask", "pandas", "zarr", "skimage", "matplotlib"]
    help_code = (
        "from nucflow.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert loaded(help_code, heavy) == [""]
    assert loaded("import nucflow.pipeline", ["scipy.stats", "matplotlib", "dask"]) == ["dask"]


WARNING_FLOW = """
import warnings

from nucflow import flowrun

NUCLEI = flowrun.load_flow("nuclei")
STAGES = NUCLEI.STAGES


def run(job):
    warnings.warn("a library's deprecation", DeprecationWarning, stacklevel=1)
    warnings.warn("a library's user warning", stacklevel=1)
    return NUCLEI.run(job)
"""


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_other_libraries_warnings_stay_out_of_nucflows_lines(stack2d, tmp_path, debug):
    """`nucflow view` printed napari's pydantic deprecations as `nucflow: warning: ...`: only
    nucflow's own warnings (here: nuclei that reached segment.max_radius) are said as
    nucflow's; code that is not nucflow's (a flow file, as a library would) is heard only with
    --debug, as Python shows it (file, line, category)."""
    flow = tmp_path / "warning_flow.py"
    flow.write_text(WARNING_FLOW)
    argv = ["run", "--flow", str(flow), "--input", str(stack2d[0]), "--output", str(tmp_path / "o")]
    argv += ["--debug"] if debug else []
    proc = subprocess.run(
        [sys.executable, "-c", "from nucflow.cli import main; raise SystemExit(main())", *argv],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("nucflow: warning: ")]
    assert len(ours) == 1 and re.match(r"nucflow: warning: \d+ nuclei reached segment", ours[0])
    theirs = [
        f"{flow}:11: DeprecationWarning: a library's deprecation",
        f"{flow}:12: UserWarning: a library's user warning",
    ]
    assert [line for line in theirs if line in proc.stderr.splitlines()] == (
        theirs if debug else []
    )
