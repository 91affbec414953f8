"""Progress a person can follow (issue 17): log lines on stderr redirected to a file, on every
scheduler; run.json as a live record; ``nucflow status`` on running, complete, failed, killed
and foreign directories."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from nucflow import io
from nucflow.blockpass import pass_graph
from nucflow.cli import main
from nucflow.cluster import connect
from nucflow.config import load, resolve
from nucflow.pipeline import NUCLEI
from nucflow.plan import pass_tasks
from nucflow.progress import Reporter, RunProgress, Settings
from nucflow.stages import flow_passes

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d nucflow: "
TIME = r"(\d+\.\ds|\d+s|\d+m\d\ds|\d+h\d\dm|\?)"
#: A pass line: pass, blocks done/total, rate; stage, its pass count, elapsed, ETA; run, ETA.
PASS_LINE = re.compile(
    STAMP + r"(?P<label>[\w ]+?) (?P<done>\d+)/(?P<total>\d+) blocks \((?P<pct>\d+)%\), "
    r"[\d.]+ Mvoxel/s \| stage (?P<stage>\w+) \(pass (?P<n>\d+)/(?P<of>\d+)\) "
    + TIME
    + r", ETA "
    + TIME
    + r" \| run "
    + TIME
    + r", ETA "
    + TIME
)
STAGE_LINE = re.compile(
    STAMP
    + r"stage (?P<stage>\w+) done in "
    + TIME
    + r"( \((?P<passes>\d+) pass(es)? of \d+(-\d+)? blocks?(, (?P<skipped>\d+) skipped: nothing "
    r"to do)?\))? \| run " + TIME + r", ETA " + TIME
)
STEP = 5
SEGMENTING = re.compile(r"segment blocks (\d+)/80")
MAIN = "from nucflow.cli import main; raise SystemExit(main())"


def _wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _status(out: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["status", str(out)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# --- log lines ----------------------------------------------------------------------------


WARNING = "nucflow: warning: "  # e.g. nuclei that reached segment.max_radius


@pytest.mark.timeout(300)
@pytest.mark.parametrize("spec", ["threads", "processes", "local"])
def test_redirected_stderr_gets_few_complete_lines(stack3d, run_cli, tmp_path, spec):
    """A run with a tiny interval stands for a long one: only the 5 % steps limit the lines."""
    extra = ["--cluster", spec, *(["--jobs", "2"] if spec == "local" else [])]
    _check_redirected_log(stack3d[0], run_cli, tmp_path, extra, dashboard=spec == "local")


#: Runs the CLI, then logs as distributed's event loop may after the cluster closed.
MAIN_THEN_LATE_LOGS = (
    "import logging, sys; from nucflow.cli import main; code = main(); "
    "late = logging.getLogger('distributed.batched'); "
    "late.info('Batched Comm Closed (late)'); late.warning('a late warning'); sys.exit(code)"
)


@pytest.mark.timeout(300)
def test_distributed_info_logged_after_the_cluster_closed_stays_off_stderr(
    stack3d, run_cli, tmp_path
):
    """The shutdown race a Slurm CI run hit: a comm closed after the cluster restored
    distributed's log level printed an INFO record and its traceback into the job log."""
    args = run_cli.args(stack3d[0], tmp_path / "out", "--cluster", "local", "--jobs", "1")
    proc = subprocess.run(
        [sys.executable, "-c", MAIN_THEN_LATE_LOGS, *args],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Batched Comm Closed" not in proc.stderr
    assert "distributed.batched - WARNING - a late warning" in proc.stderr  # warnings still show


@pytest.mark.slurm
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("slurm_cluster")
def test_redirected_stderr_gets_few_complete_lines_under_slurm(stack3d, run_cli, tmp_path):
    """As the README's sbatch example runs: the driver's stderr is the job log, the workers
    are Slurm jobs configured by DASK_JOBQUEUE__SLURM__* variables (read by the subprocess)."""
    jobqueue = {
        "CORES": "1",
        "MEMORY": "2GiB",
        "WALLTIME": "00:20:00",
        "LOG_DIRECTORY": str(tmp_path / "logs"),
        "PYTHON": sys.executable,
    }
    env = {**os.environ, **{f"DASK_JOBQUEUE__SLURM__{k}": v for k, v in jobqueue.items()}}
    extra = ["--cluster", "slurm", "--jobs", "2"]
    _check_redirected_log(stack3d[0], run_cli, tmp_path, extra, dashboard=True, env=env)
    assert list((tmp_path / "logs").glob("dask-worker-*.err"))  # the workers were Slurm jobs


def _check_redirected_log(
    source: Path,
    run_cli,
    tmp_path: Path,
    extra: list[str],
    *,
    dashboard: bool,
    env: dict[str, str] | None = None,
) -> None:
    """Run with stderr to a file; every line is a pass, stage or dashboard line with every
    field, at most one per 5 % step of each pass plus its end line."""
    out, log = tmp_path / "out", tmp_path / "stderr.log"
    extra = [*extra, "--set", "progress.interval_s=0"]
    extra += ["--set", f"progress.step_percent={STEP}", "--set", "progress.record_s=0.5"]
    proc = subprocess.run(
        [sys.executable, "-c", MAIN, *run_cli.args(source, out, *extra)],
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),  # noqa: SIM115 - closed with the process
        text=True,
        timeout=540,
        env=env,
    )
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, lines[-5:]
    assert re.fullmatch(
        r"nucflow run: \d+ nuclei \(\d+ truncated\) in [\d.]+ s -> .*\n"
        r"nucflow run: QC report .*/qc/report\.html \(open it in a browser\)\n",
        proc.stdout,
    )
    dashboards = [line for line in lines if line.startswith("nucflow: dask dashboard at ")]
    passes = [PASS_LINE.fullmatch(line) for line in lines]
    stages = [STAGE_LINE.fullmatch(line) for line in lines]
    assert len(dashboards) == dashboard
    said = [line for line in lines if line.startswith(("nucflow: dask dashboard at ", WARNING))]
    others = [line for line, p, s in zip(lines, passes, stages, strict=True) if not (p or s)]
    assert others == said, others  # progress lines, the dashboard and warnings: nothing else

    progress = json.loads((out / "run.json").read_text())["progress"]
    plan = progress["plan"]
    assert [s["stage"] for s in stages if s] == list(plan)  # every stage ends with a line
    ends = [p for p in passes if p and p["pct"] == "100"]
    ran = {
        name: [p["label"] for p in stage["passes"] if not p.get("skipped")]
        for name, stage in progress["stages"].items()
    }
    assert len(ends) == sum(map(len, ran.values()))  # every pass that ran ends with a line
    for name, labels in ran.items():  # no two passes of a stage look alike
        assert len(set(labels)) == len(labels), (name, labels)
    # a stage's pass total is the one it started with (a skipped pass counts as done)
    assert all(p["of"] == str(plan[p["stage"]]) for p in passes if p)
    assert all(len(s["passes"]) == plan[n] for n, s in progress["stages"].items())
    # the bound, however long the run: per stage, a line per 5 % of the stage, one at the end
    # of each of its passes and one at its end (23 for a one-pass stage)
    for name, count in plan.items():
        written = sum(1 for p in passes if p and p["stage"] == name) + 1
        assert written <= 100 // STEP + count + 1, (name, written)
    segment = [p for p in passes if p and p["stage"] == "segment"]
    assert 3 <= len(segment) <= 100 // STEP + 1  # steps are reported, not only the end
    percents = [int(p["pct"]) for p in segment]
    assert percents == sorted(percents) and len({v // STEP for v in percents}) == len(percents)
    assert all(int(p["total"]) == 80 and int(p["done"]) <= 80 for p in passes if p)


def test_a_short_run_logs_one_line_per_stage(stack3d, run_cli, tmp_path):
    """Default settings (a line at most every 60 s): a run of a few seconds with stderr to a
    file says each stage once, with its passes (a skipped one said so), and nothing else but
    warnings."""
    out, log = tmp_path / "out", tmp_path / "stderr.log"
    proc = subprocess.run(
        [sys.executable, "-c", MAIN, *run_cli.args(stack3d[0], out, "--set", "mask.min_volume=0")],
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),  # noqa: SIM115 - closed with the process
        text=True,
        timeout=240,
    )
    lines = [line for line in log.read_text().splitlines() if not line.startswith(WARNING)]
    assert proc.returncode == 0, lines[-5:]
    plan = json.loads((out / "run.json").read_text())["progress"]["plan"]
    stages = [STAGE_LINE.fullmatch(line) for line in lines]
    assert all(stages), lines
    assert [s["stage"] for s in stages] == list(plan)
    mask = next(s for s in stages if s["stage"] == "mask")
    assert (mask["passes"], mask["skipped"]) == ("4", "1"), mask.group(0)


def test_lines_follow_the_rarer_of_step_and_interval():
    tasks = [partial(time.sleep, 0.02) for _ in range(40)]
    for settings, most in [(Settings(step_percent=5, interval_s=3600), 1), (Settings(50, 0), 2)]:
        with connect("threads", settings={"num_workers": 2}) as runner:
            sink = _Log()
            runner.reporter = Reporter(stream=sink, settings=settings)
            runner.compute(pass_graph(tasks, "p"), label="p")
        lines = sink.getvalue().splitlines()
        assert 1 <= len(lines) <= most, lines
        assert re.fullmatch(STAMP + r"p 40/40 blocks \(100%\) \| .*", lines[-1])


def test_log_lines_step_through_the_stage_not_each_pass():
    """A stage of four passes at 50 % steps: one step line for the stage, not one per pass
    (a long stage of many passes stays at ~25 lines)."""
    tasks = [partial(time.sleep, 0.05) for _ in range(24)]
    with connect("threads", settings={"num_workers": 2}) as runner:
        sink = _Log()
        tracker = RunProgress(
            voxels=10**6, write=lambda: None, runner=runner, settings=Settings(50, 0), stream=sink
        )
        runner.reporter = tracker
        tracker.plan = {"s": 4}
        with tracker.stage("s"):
            for _ in range(4):
                runner.compute(pass_graph(tasks, "p"), label="p")
    lines = sink.getvalue().splitlines()
    steps = [line for line in lines if PASS_LINE.fullmatch(line) and "(100%)" not in line]
    ends = [line for line in lines if PASS_LINE.fullmatch(line) and "(100%)" in line]
    assert len(ends) == 4 and re.search(r"stage s \(pass 4/4\)", ends[-1]), lines
    assert len(steps) <= 1, lines
    assert STAGE_LINE.fullmatch(lines[-1]) and len(lines) == len(steps) + 5, lines


class _Log:
    """A file that is not a terminal."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def getvalue(self) -> str:
        return "".join(self.parts)


def test_pass_plan_matches_the_passes_a_run_makes(stack3d, run_cli, tmp_path):
    """flow_passes (the run's ETA) must count the passes pipeline really runs."""
    out = tmp_path / "out"
    run_cli(stack3d[0], out, "--set", "mask.min_volume=0")
    progress = json.loads((out / "run.json").read_text())["progress"]
    made = {name: len(stage["passes"]) for name, stage in progress["stages"].items()}
    config = load(options={"chunks": [8, 32, 32]}, overrides=["mask.min_volume=0"])
    params = resolve(config, shape=(40, 128, 128), voxel_size=(1.0, 0.5, 0.5))
    declared = flow_passes(NUCLEI, params, (40, 128, 128))
    assert declared["mask"] == 4  # thresholding, then three passes of hole filling only
    # the local detection leaves no hole here: hole filling skips its writing pass, which the
    # run records as skipped (the stage's pass total stays the one it started with)
    assert made == declared == progress["plan"]
    mask = progress["stages"]["mask"]["passes"]
    assert [p.get("skipped", False) for p in mask] == [False, False, False, True]
    assert [p["label"] for p in mask] == ["foreground", "holes find", "holes join", "holes fill"]
    assert all(s["state"] == "done" for s in progress["stages"].values())
    assert progress["eta_s"]["run"] == 0.0


def test_plan_counts_the_tasks_of_the_passes_a_run_makes(stack3d, run_cli, tmp_path):
    """One description of the pass structure (the stages' pass grids): the ETA's passes and
    `nucflow plan`'s task count both follow it, here with a background on cells of one voxel
    (three preprocess passes, the cells stored by the Gaussian's; plan once counted one)."""
    out = tmp_path / "out"
    sets = ["preprocess.background=gaussian", "preprocess.background_downsample=1"]
    run_cli(stack3d[0], out, *(a for s in sets for a in ("--set", s)))
    record = json.loads((out / "run.json").read_text())
    stages = record["progress"]["stages"]
    config = load(options={"chunks": [8, 32, 32]}, overrides=sets)
    shape = tuple(b - a for a, b in record["data_region"])
    params = resolve(config, shape=shape, voxel_size=(1.0, 0.5, 0.5))
    made = {name: len(stage["passes"]) for name, stage in stages.items()}
    declared = flow_passes(NUCLEI, params, shape)
    # hole filling and small-object removal keep every component here: each skips its writing
    # pass (two passes, of a task per block and one more, the fewer), recorded as skipped
    assert made == declared == record["progress"]["plan"]
    skipped = [p for p in stages["mask"]["passes"] if p.get("skipped")]
    assert [p["label"] for p in skipped] == ["holes fill", "small objects remove"]
    skipped_tasks = 2 * (stages["mask"]["passes"][0]["total"] + 1)
    assert [p["label"] for p in stages["preprocess"]["passes"]] == [
        "preprocess",
        "background",
        "subtract background",
    ]
    tasks = pass_tasks(params, shape)
    for name, stage in stages.items():
        if stage["passes"] and name != "threshold":  # the threshold adds its histogram tree
            made_tasks = sum(p["total"] + 1 for p in stage["passes"] if not p.get("skipped"))
            assert tasks[name] == made_tasks + (skipped_tasks if name == "mask" else 0), name


# --- nucflow status -----------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_status_of_a_running_then_complete_run(stack3d, run_cli, tmp_path, capsys):
    out = tmp_path / "out"
    proc = run_cli.start(stack3d[0], out, "--set", "progress.record_s=0.2")
    seen: list[tuple[int, str]] = []
    try:

        def segmenting() -> bool:
            if not (out / "run.json").exists():
                return False
            seen.append(_status(out, capsys))
            code, text = seen[-1]
            return (code == 3 and bool(SEGMENTING.search(text))) or proc.poll() is not None

        _wait_for(segmenting)
    finally:
        proc.wait(timeout=240)
    assert proc.returncode == 0
    running = [text for code, text in seen if code == 3 and SEGMENTING.search(text)]
    assert running, seen[-1]  # seen while segmenting
    text = running[-1]
    assert re.match(rf"nucflow status {re.escape(str(out))}: running \(pid {proc.pid} on ", text)
    assert re.search(r"\n  stage     \w+ \(pass \d+/\d+\)", text)
    assert re.search(r"\n  elapsed   \S+, run ETA \S+\n  workers   \d+", text)
    assert re.search(r"\n  on disk   .*preprocessed 80/80 chunks done", text)
    done = int(SEGMENTING.search(text).group(1))
    assert re.search(rf"\n  resume    would redo .*segment \({80 - done} of 80 blocks\)", text)

    code, text = _status(out, capsys)
    assert code == 0
    assert text.startswith(f"nucflow status {out}: complete\n")
    assert re.search(r"\n  result    nuclei \d+, truncated \d+\n", text)
    assert "resume" not in text and "workers" not in text


@pytest.fixture
def nan_stack(tmp_path) -> Path:
    image = np.ones((16, 64, 64), np.float32)
    image[3, 40, 40] = np.nan
    path = tmp_path / "nan.ome.zarr"
    io.write_ome_zarr(path, image, (1.0, 0.5, 0.5))
    return path


FAILING_FLOW = """
from nucflow import flowrun, pipeline, stages
from nucflow.errors import ParameterError


def _refuse(job, inputs):
    raise ParameterError("the threshold refused this stack (a test)")


REFUSING = stages.Stage(
    "threshold", ("preprocess",), stages.only(stages.THRESHOLD), body=_refuse, per_timepoint=True
)
STAGES = (pipeline.NUCLEI[0], REFUSING, *pipeline.NUCLEI[2:])


def run(job):
    return flowrun.run(job, STAGES)
"""


def test_status_of_a_failed_run(stack3d, run_cli, tmp_path, capsys):
    """A run that fails after storing a stage keeps its output (a new one refused before any
    stage was stored is withdrawn: tests/test_cli.py); status names the error."""
    flow, out = tmp_path / "failing.py", tmp_path / "out"
    flow.write_text(FAILING_FLOW)
    assert main(run_cli.args(stack3d[0], out, "--flow", str(flow))) == 2
    code, text = _status(out, capsys)
    assert code == 1
    assert text.startswith(f"nucflow status {out}: failed\n")
    assert "\n  error     ParameterError: the threshold refused this stack (a test)" in text
    assert re.search(r"\n  stages    preprocess done \S+, threshold failed \S+, mask -", text)
    redo = r"\n  resume    would redo threshold, mask, segment, table, pyramid, write"
    assert re.search(redo, text), text


@pytest.mark.timeout(300)
def test_status_of_a_killed_run(stack3d, run_cli, tmp_path, capsys):
    out = tmp_path / "out"
    proc = run_cli.start(stack3d[0], out)
    try:
        _wait_for(lambda: (out / ".work" / "smoothed.done").exists() or proc.poll() is not None)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    code, text = _status(out, capsys)
    assert code == 1
    assert f"stopped — run.json says running but process {proc.pid} on " in text
    assert "smoothed 80/80 chunks done" in text


@pytest.mark.parametrize("make", ["missing", "empty", "other"])
def test_status_of_a_directory_that_is_not_a_run(tmp_path, capsys, make):
    target = tmp_path / "x"
    if make != "missing":
        target.mkdir()
    if make == "other":
        (target / "run.json").write_text('{"hello": 1}')
    code, text = _status(target, capsys)
    assert code == 2
    assert text.count("\n") == 1 and text.startswith("nucflow status: error: "), text
