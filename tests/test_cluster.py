"""Tests for nucflow.cluster against real schedulers: threads, processes, LocalCluster,
a `dask scheduler` subprocess (by address and by scheduler file) and a real Slurm.

The Slurm tests need the one-node cluster of .ci/slurm-up.sh; they skip when `sinfo` cannot
reach a controller, unless NUCFLOW_REQUIRE_SLURM=1 (CI), where they fail instead.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import dask.array as da
import dask.threaded
import numpy as np
import pytest

from nucflow.cluster import Lifetime, connect, describe
from nucflow.errors import ClusterError
from nucflow.progress import Reporter

# Workers receive this module's functions by reference (distributed pickles module-level
# functions with plain pickle), so every worker process must be able to import it:
# LocalCluster and processes inherit sys.path; subprocesses and Slurm jobs get PYTHONPATH.
TESTS_DIR = str(Path(__file__).resolve().parent)

SLURM_LOGS_TIMEOUT = 60


# --- helpers that run on workers -------------------------------------------------------


def _plus_block_index(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
    """Add the block's index, so a block computed for the wrong position shows."""
    index = block_info[None]["chunk-location"][0] if block_info else 0
    return block * 2 + index


def _expected_map_blocks(values: np.ndarray, chunk: int) -> np.ndarray:
    return values * 2 + np.arange(values.size) // chunk


def _slow_marked(block: np.ndarray, marks: str, delay: float, block_info: dict | None = None):
    """Leave a file naming block and process, then work for ``delay`` seconds."""
    index = block_info[None]["chunk-location"][0]
    job = os.environ.get("SLURM_JOB_ID", "none")
    Path(marks, f"{index}-{os.getpid()}-{job}").touch()
    time.sleep(delay)
    return block + 1


def _slurm_job_id(block: np.ndarray, delay: float = 0.0) -> np.ndarray:
    time.sleep(delay)
    return np.full(block.shape, int(os.environ.get("SLURM_JOB_ID", "-1")), dtype=np.int64)


def _array() -> tuple[np.ndarray, da.Array]:
    values = np.arange(1000, dtype=np.int64) % 97
    return values, da.from_array(values, chunks=137)  # uneven last chunk on purpose


def _compute_both(runner) -> tuple[int, np.ndarray]:
    values, array = _array()
    mapped = array.map_blocks(_plus_block_index, dtype=np.int64, meta=np.array((), np.int64))
    total, out = runner.compute(array.sum(), mapped, label="check")
    return int(total), out


def _pythonpath_with_tests() -> str:
    return os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p)


# --- external scheduler ----------------------------------------------------------------


@pytest.fixture(scope="module")
def external_scheduler(tmp_path_factory):
    """A real `dask scheduler` and `dask worker` in subprocesses; yields (address, file)."""
    folder = tmp_path_factory.mktemp("scheduler")
    file = folder / "scheduler.json"
    # The scheduler unpickles the graph too, so it needs the tests on its path as well.
    env = {**os.environ, "PYTHONPATH": _pythonpath_with_tests()}
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file", str(file)]
        + ["--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0"],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "scheduler.log", "w"),  # noqa: SIM115 - closed with the process
        env=env,
    )
    procs = [scheduler]
    try:
        deadline = time.monotonic() + 30
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert file.exists(), (folder / "scheduler.log").read_text()
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(file)]
            + ["--nthreads", "2", "--memory-limit", "1GiB", "--no-dashboard"],
            stdout=subprocess.DEVNULL,
            stderr=open(folder / "worker.log", "w"),  # noqa: SIM115
            env=env,
        )
        procs.append(worker)
        from distributed import Client

        with Client(scheduler_file=str(file), timeout=30) as client:
            client.wait_for_workers(1, timeout=30)
        yield json.loads(file.read_text())["address"], file
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _scheduler_alive(address: str) -> int:
    """Number of workers a fresh client sees at ``address``."""
    from distributed import Client

    with Client(address, timeout=5) as client:
        return len(client.scheduler_info()["workers"])


# --- bad specs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("slurn", r"unknown --cluster 'slurn'; choose threads, .* \(did you mean 'slurm'\?\)"),
        ("thread", r"did you mean 'threads'\?"),
        ("LOCALL", r"did you mean 'local'\?"),
        (
            "gpu",
            r"^unknown --cluster 'gpu'; choose threads, processes, local, slurm or tcp://HOST:PORT$",
        ),  # noqa: E501
        ("", r"unknown --cluster"),
    ],
)
def test_unknown_spec(spec, message):
    with pytest.raises(ClusterError, match=message):
        with connect(spec):
            pass
    with pytest.raises(ClusterError, match=message):
        describe(spec)


def test_unreachable_address_fails_fast():
    start = time.monotonic()
    message = (
        r"^cannot reach scheduler tcp://127\.0\.0\.1:1 within 5 s; start it or check the address$"  # noqa: E501
    )
    with pytest.raises(ClusterError, match=message):
        with connect("tcp://127.0.0.1:1"):
            pass
    assert time.monotonic() - start < 15


def test_missing_scheduler_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ClusterError, match=r"scheduler file .*nope\.json does not exist; start"):
        with connect(scheduler_file=str(path)):
            pass


def test_scheduler_file_that_is_not_one(tmp_path):
    path = tmp_path / "scheduler.json"
    path.write_text("not json")
    with pytest.raises(ClusterError, match=r"is not a dask scheduler file"):
        with connect(scheduler_file=path):
            pass


def test_spec_and_scheduler_file_conflict(tmp_path):
    with pytest.raises(ClusterError, match=r"give only one"):
        with connect("local", scheduler_file=tmp_path / "s.json"):
            pass


def test_slurm_without_sbatch_on_path(monkeypatch, tmp_path):
    # An empty PATH is the real condition of a machine without Slurm's client commands.
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ClusterError, match=r"^--cluster slurm needs Slurm's sbatch on PATH; "):
        with connect("slurm"):
            pass


def test_slurm_without_dask_jobqueue(monkeypatch):
    # None in sys.modules makes `import dask_jobqueue` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    with pytest.raises(ClusterError, match=r"pip install 'nucflow\[slurm\]'"):
        with connect("slurm"):
            pass


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spec": "threads", "jobs": 2}, r"jobs applies only to --cluster local or slurm"),
        ({"spec": "local", "jobs": 0}, r"jobs must be a whole number >= 1, got 0"),
        ({"spec": "local", "adapt": (3, 1)}, r"0 <= MIN <= MAX"),
        ({"spec": "local", "jobs": 1, "adapt": (1, 2)}, r"not both"),
        ({"spec": "local", "settings": {"n_wrkers": 2}}, r"unknown setting\(s\) n_wrkers"),
        ({"spec": "threads", "settings": {"cores": 2}}, r"unknown setting\(s\) cores"),
        ({"spec": "slurm", "settings": {"coers": 2}}, r"unknown setting\(s\) coers"),
    ],
)
def test_bad_options(kwargs, message):
    spec = kwargs.pop("spec")
    if spec == "slurm" and shutil.which("sbatch") is None:
        pytest.skip("option check for slurm runs after the sbatch check; run .ci/slurm-up.sh")
    with pytest.raises(ClusterError, match=message):
        with connect(spec, **kwargs):
            pass


# --- the same answer everywhere --------------------------------------------------------


@pytest.mark.parametrize("spec", ["threads", "processes", "local"])
def test_created_schedulers_agree_and_close(spec, capsys):
    values, _ = _array()
    settings = {"n_workers": 2, "threads_per_worker": 1} if spec == "local" else None
    with connect(spec, settings=settings) as runner:
        total, out = _compute_both(runner)
        client, cluster = runner.client, runner.cluster
    assert total == values.sum()
    np.testing.assert_array_equal(out, _expected_map_blocks(values, 137))
    # stderr is not a terminal here: the same dated end line on every scheduler
    assert re.search(r"nucflow: check (\d+)/\1 blocks \(100%\) \| ", capsys.readouterr().err)
    if spec == "local":
        assert client.status == "closed"
        assert cluster.status.name == "closed"
    else:
        assert client is None and runner.dashboard_link is None


def test_progress_is_labelled_lines_on_stderr_that_is_not_a_terminal(capsys):
    slow = da.ones(4, chunks=1).map_blocks(lambda b: (time.sleep(0.3), b)[1], dtype=float)
    with connect("threads") as runner:
        (total,) = runner.compute(slow.sum(), label="histogram")
    captured = capsys.readouterr()
    assert total == 4
    # one line for the pass (the default 60 s interval allows no line before its end)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d nucflow: histogram 4/4 blocks \(100%\) \| "
        r"[\d.]+s, ETA 0\.0s\n",
        captured.err,
    ), captured.err
    assert captured.out == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("spec", ["threads", "local"])
def test_progress_bar_is_redrawn_on_a_terminal(spec):
    slow = da.ones(8, chunks=1).map_blocks(lambda b: (time.sleep(0.3), b)[1], dtype=float)
    settings = {"n_workers": 1, "threads_per_worker": 1} if spec == "local" else None
    with connect(spec, settings=settings) as runner:
        runner.reporter = Reporter(stream=_Terminal())
        (total,) = runner.compute(slow.sum(), label="histogram")
        drawn = runner.reporter.stream.getvalue()
    assert total == 8
    frames = drawn.split("\r")[1:]
    assert len(frames) > 3 and drawn.endswith("\n") and drawn.count("\n") == 1, drawn
    assert all(
        re.fullmatch(r"histogram: \[#* *\] \| \d+% Completed \| [\d.]+s\n?", f) for f in frames
    )
    assert frames[-1] == f"histogram: [{'#' * 40}] | 100% Completed | {frames[-1].split('| ')[-1]}"


def test_local_cluster_respects_settings(capsys):
    settings = {"n_workers": 2, "threads_per_worker": 1, "memory-limit": "600MiB"}
    with connect("local", settings=settings) as runner:
        limits = runner.client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
        threads = runner.client.nthreads()
        link = runner.dashboard_link
    assert sorted(limits.values()) == [600 * 2**20] * 2
    assert sorted(threads.values()) == [1, 1]
    if link:
        assert f"dask dashboard at {link}" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["address", "scheduler_file"])
def test_existing_scheduler_agrees_and_stays_up(external_scheduler, how):
    address, file = external_scheduler
    values, _ = _array()
    kwargs = {"scheduler_file": str(file)} if how == "scheduler_file" else {"spec": address}
    with connect(**kwargs) as runner:
        total, out = _compute_both(runner)
        client = runner.client
        assert runner.cluster is None
    assert total == values.sum()
    np.testing.assert_array_equal(out, _expected_map_blocks(values, 137))
    assert client.status == "closed"
    assert _scheduler_alive(address) == 1  # the scheduler and its worker are still there


def test_graph_the_scheduler_cannot_load_raises_instead_of_hanging(
    external_scheduler, tmp_path, monkeypatch
):
    # A module only this process can import: the real "different environments" mistake.
    (tmp_path / "only_here.py").write_text("def plus_one(b):\n    return b + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from only_here import plus_one

    array = da.ones(4, chunks=2).map_blocks(plus_one, dtype=float)
    start = time.monotonic()
    with connect(external_scheduler[0]) as runner:
        with pytest.raises(Exception, match=r"deserializ|only_here"):
            runner.compute(array.sum(), label="doomed")
    assert time.monotonic() - start < 30


def test_dead_scheduler_behind_scheduler_file(tmp_path):
    file = tmp_path / "scheduler.json"
    file.write_text(json.dumps({"type": "Scheduler", "address": "tcp://127.0.0.1:1"}))
    with pytest.raises(ClusterError, match=r"cannot reach scheduler tcp://127\.0\.0\.1:1 \(from"):
        with connect(scheduler_file=str(file)):
            pass


def test_killed_local_worker_does_not_fail_the_computation(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    values = np.arange(24, dtype=np.int64)
    array = da.from_array(values, chunks=1)
    slow = array.map_blocks(_slow_marked, str(marks), 0.4, dtype=np.int64)
    killed: list[int] = []

    def kill_a_busy_worker() -> None:
        # Wait until a few blocks started, then SIGKILL the process running the latest one.
        deadline = time.monotonic() + 60
        while len(list(marks.iterdir())) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        newest = max(marks.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        pid = int(newest.name.split("-")[1])
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    settings = {"n_workers": 2, "threads_per_worker": 1}
    with connect("local", settings=settings) as runner:
        killer = threading.Thread(target=kill_a_busy_worker)
        killer.start()
        (out,) = runner.compute(slow, label="kill", retries=2)
        killer.join()
    np.testing.assert_array_equal(out, values + 1)
    assert killed, "the killer thread never fired"
    started = [p.name.split("-") for p in marks.iterdir()]
    by_killed = {block for block, pid, _ in started if int(pid) == killed[0]}
    redone = {block for block, pid, _ in started if int(pid) != killed[0]}
    # Some block the killed worker had was computed again elsewhere.
    assert by_killed & redone


def test_describe_is_one_line():
    for line in (
        describe("threads"),
        describe("processes", settings={"num_workers": 3}),
        describe("local", settings={"n_workers": 2, "memory_limit": "1GiB"}),
        describe("tcp://10.0.0.1:8786"),
    ):
        assert "\n" not in line and line
    assert "2 workers" in describe("local", jobs=2)


def test_threads_scheduler_is_default_inside_the_context():
    with connect("threads", settings={"num_workers": 1}):
        # the function, not its name: a name makes dask import distributed to look for a Client
        assert dask.config.get("scheduler") is dask.threaded.get
        assert da.ones(10, chunks=3).sum().compute() == 10


# --- real Slurm ------------------------------------------------------------------------


def _slurm_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    # sbatch hands the submitter's environment to the job (--export=ALL, Slurm's default).
    monkeypatch.setenv("PYTHONPATH", _pythonpath_with_tests())
    return {
        "cores": 1,
        "memory": "1GiB",
        "walltime": "00:10:00",
        "log-directory": str(tmp_path / "logs"),
        "local-directory": str(tmp_path / "scratch"),
    }


def _squeue(*args: str) -> list[str]:
    proc = subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, check=True)
    return proc.stdout.split()


def _final_state(job_id: int, timeout: float = 30) -> str:
    """Slurm's state of a job once it is no longer running (squeue keeps ended jobs a while)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = " ".join(_squeue("--states=all", "-j", str(job_id), "-o", "%T"))
        if state and state not in ("RUNNING", "PENDING", "COMPLETING", "CONFIGURING"):
            break
        time.sleep(0.5)
    return state


@pytest.mark.slurm
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_blocks_run_in_real_jobs(tmp_path, monkeypatch):
    array = da.zeros(8, chunks=2, dtype=np.int64)
    ids = array.map_blocks(_slurm_job_id, dtype=np.int64)
    with connect("slurm", settings=_slurm_settings(tmp_path, monkeypatch), jobs=1) as runner:
        (out,) = runner.compute(ids, label="slurm")
        running = {int(i) for i in _squeue("--states=RUNNING", "-o", "%i")}
        script = runner.cluster.job_script()
    job_ids = set(out.tolist())
    assert -1 not in job_ids  # every block ran inside a Slurm job
    assert job_ids <= running  # ... which squeue listed as running while connected
    assert "#SBATCH --mem=1G" in script and "#SBATCH -t 00:10:00" in script
    for job in job_ids:
        assert (tmp_path / "logs" / f"dask-worker-{job}.err").exists()
        # Leaving the context cancelled the worker jobs it had submitted.
        assert _final_state(job) == "CANCELLED"


@pytest.mark.slurm
@pytest.mark.timeout(240)
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_job_cancelled_midway_is_replaced(tmp_path, monkeypatch):
    marks = tmp_path / "marks"
    marks.mkdir()
    values = np.zeros(30, dtype=np.int64)
    blocks = da.from_array(values, chunks=1)
    slow = blocks.map_blocks(_slow_marked, str(marks), 0.5, dtype=np.int64)
    ids = slow.map_blocks(_slurm_job_id, dtype=np.int64)
    cancelled: list[int] = []

    def cancel_the_worker_job() -> None:
        deadline = time.monotonic() + 120
        while len(list(marks.iterdir())) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        job = int(max(marks.iterdir(), key=lambda p: p.stat().st_mtime_ns).name.split("-")[2])
        subprocess.run(["scancel", str(job)], check=True)
        cancelled.append(job)

    # A lost worker is dropped from the cluster after this delay (default 15 s).
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "2s"}):
        with connect(
            "slurm", settings=_slurm_settings(tmp_path, monkeypatch), adapt=(1, 1)
        ) as runner:
            killer = threading.Thread(target=cancel_the_worker_job)
            killer.start()
            (out,) = runner.compute(ids, label="scancel")
            killer.join()
    assert cancelled, "scancel never ran"
    assert _final_state(cancelled[0]) == "CANCELLED"
    job_ids = set(out.tolist())
    assert -1 not in job_ids
    # The result came (at least partly) from a replacement job started after the scancel.
    assert job_ids - {cancelled[0]}
    assert all(job > cancelled[0] for job in job_ids - {cancelled[0]})


def test_describe_reads_dask_jobqueue_environment_variables():
    # The conventional way users configure dask-jobqueue; read by dask at import.
    env = {
        **os.environ,
        "DASK_JOBQUEUE__SLURM__QUEUE": "gpu-long",
        "DASK_JOBQUEUE__SLURM__CORES": "8",
        "DASK_JOBQUEUE__SLURM__MEMORY": "32GiB",
        "DASK_JOBQUEUE__SLURM__WALLTIME": "02:00:00",
    }
    code = "from nucflow.cluster import describe; print(describe('slurm', jobs=3))"
    line = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert line == (
        "slurm: SLURMCluster, 3 job(s) of 8 core(s) / 32GiB, queue gpu-long, walltime 02:00:00"
    )


@pytest.mark.slurm
@pytest.mark.timeout(60)
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_job_script_from_dask_config_with_settings_overriding(tmp_path, monkeypatch):
    config = {
        "jobqueue.slurm.queue": "debug",
        "jobqueue.slurm.cores": 2,
        "jobqueue.slurm.walltime": "00:05:00",
        "jobqueue.slurm.job-extra-directives": ["--comment=nucflow-test"],
    }
    settings = {"walltime": "00:07:00", "log-directory": str(tmp_path / "logs")}
    before = set(_squeue("-o", "%i"))
    with dask.config.set(config):
        # adapt=(0, 1): a cluster that submits nothing until work arrives.
        with connect("slurm", settings=settings, adapt=(0, 1), progress=False) as runner:
            script = runner.cluster.job_script()
    assert "#SBATCH -p debug" in script
    assert "#SBATCH --cpus-per-task=2" in script  # the user's config beats slurm.yaml's 1
    assert "#SBATCH --mem=4G" in script  # slurm.yaml fills what the config leaves null
    assert "#SBATCH -t 00:07:00" in script  # settings beat the user's config
    assert "#SBATCH --comment=nucflow-test" in script
    # workers retire through nucflow's plugin (no distributed --lifetime, issue 27 (13))
    assert "--lifetime" not in script and runner.lifetime == Lifetime.of("00:07:00")
    assert set(_squeue("-o", "%i")) == before


@pytest.mark.parametrize(
    ("walltime", "schedule"),
    [
        ("00:01:00", (60, 30, 15, 50)),  # the 30 s minimum margin; leaves 10 s before the kill
        ("10", (600, 540, 30, 580)),  # minutes, as Slurm reads a bare number
        ("04:00:00", (14400, 14100, 150, 14300)),  # the 5 min maximum margin
        ("1-00", (86400, 86100, 150, 86300)),
    ],
)
def test_lifetime_schedule_from_the_walltime(walltime, schedule):
    lifetime = Lifetime.of(walltime)
    assert (lifetime.walltime, lifetime.stop, lifetime.stagger, lifetime.leave) == schedule
    assert lifetime.shortest == lifetime.stop - lifetime.stagger


def _freed_array_stays_mapped() -> bool:
    """Allocate, touch and free a 48 MiB array (above glibc's largest mmap threshold, within
    a thread's arena): is it still in this process' RSS?"""

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    array = np.ones(48 * 2**20, np.uint8)
    del array
    return rss() - before > 40 * 2**20


def _in_fresh_python(code: str) -> str:
    root = Path(__file__).resolve().parents[1]
    script = f"import tests.test_cluster as t\n{code}"
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
    return done.stdout.strip()


def test_threads_and_processes_keep_freed_block_arrays_mapped_workers_do_not():
    """glibc unmaps a freed 48 MiB array at once (the control, in a fresh process); where a
    run computes without a memory monitor (threads: this process; processes) it is kept for
    the next task, which saves a page fault per 4 KiB of every array of every task. A
    distributed worker keeps glibc's defaults: its memory monitor must see freed memory go,
    or a memory-limited worker pauses for good."""
    assert _in_fresh_python("print(t._freed_array_stays_mapped())") == "False"
    threads = "with t.connect('threads', progress=False): print(t._freed_array_stays_mapped())"
    assert _in_fresh_python(threads) == "True"
    check = dask.delayed(_freed_array_stays_mapped)()
    with connect("processes", settings={"num_workers": 1}, progress=False) as runner:
        assert runner.compute(check) == (True,)
    with connect("local", settings={"n_workers": 1}, progress=False) as runner:
        assert runner.compute(check) == (False,)


def _first_try_outlives_its_worker(block: np.ndarray, marks: str, delay: float, block_info=None):
    """Block 0's first try runs far past its worker's walltime (its worker leaves under it);
    every other try, and every other block, works ``delay`` seconds."""
    index = block_info[None]["chunk-location"][0]
    first = Path(marks, f"first-{index}")
    if index == 0 and not first.exists():
        first.touch()
        time.sleep(600)
    Path(marks, f"{index}-{os.getenv('SLURM_JOB_ID')}-{time.time():.0f}").touch()
    time.sleep(delay)
    return block + 1


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_walltime_retirement_is_not_a_worker_death(tmp_path, monkeypatch):
    """Issue 27 (13): one worker job at a time with a one-minute walltime, and no failure
    allowed (``allowed-failures: 0``: one task lost to a dying worker fails the computation).
    Each worker retires before its walltime, mid-task; its replacement starts while it finishes
    and takes its results; block 0's first try, still running when its worker must leave, is
    rerun elsewhere without counting as a death. distributed's own ``--lifetime`` failed this
    (KilledWorker after 215 s with the default 3 failures allowed)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    values = np.arange(6, dtype=np.int64)
    blocks = da.from_array(values, chunks=1)
    slow = blocks.map_blocks(_first_try_outlives_its_worker, str(marks), 12.0, dtype=np.int64)
    settings = {**_slurm_settings(tmp_path, monkeypatch), "walltime": "00:01:00"}
    config = {
        "distributed.scheduler.allowed-failures": 0,
        "distributed.deploy.lost-worker-timeout": "2s",
    }
    start = time.monotonic()
    with dask.config.set(config):
        with connect("slurm", settings=settings, jobs=1, progress=False) as runner:
            with pytest.warns(UserWarning, match=r"^a block of the slow pass took 12 s, more"):
                (total, out) = runner.compute(slow.sum(), slow, label="slow")
    elapsed = time.monotonic() - start
    assert total == (values + 1).sum()
    np.testing.assert_array_equal(out, values + 1)
    logs = {p.stem: p.read_text() for p in (tmp_path / "logs").glob("dask-worker-*.err")}
    retired = [t for t in logs.values() if "retires before its job's walltime" in t]
    mid_task = [t for t in retired if re.search(r"no new tasks; [1-9]\d* running", t)]
    rerun = [t for t in logs.values() if re.search(r"[1-9]\d* to rerun elsewhere", t)]
    handed = [t for t in logs.values() if "results handed over" in t]
    assert len(logs) >= 2 and mid_task and rerun and handed, (elapsed, logs)
    assert not any("DUE TO TIME LIMIT" in t for t in logs.values())
    print(f"walltime compute: {elapsed:.0f} s, {len(logs)} jobs, {len(retired)} retired")


@pytest.mark.parametrize("name", ["local", "slurm"])
def test_the_packaged_cluster_defaults_are_read(name):
    """configs/cluster/NAME.yaml fills what the user's settings leave out (a path that points
    nowhere would silently give no defaults)."""
    import yaml

    from nucflow.cluster.options import _defaults
    from nucflow.config import resource_path

    shipped = yaml.safe_load(resource_path("configs", f"cluster/{name}.yaml").read_text())
    assert shipped and _defaults(name) == {k.replace("-", "_"): v for k, v in shipped.items()}
