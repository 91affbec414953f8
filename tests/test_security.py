"""Tests of issues 19 and 27 (12), "secure by default on shared clusters", from the attacker's
side.

A stranger is another process that knows a scheduler's address but holds none of the run's
credentials. It tries a plain TCP client, a TLS connection without a certificate, and a TLS
client with a valid certificate of its own (``Security.temporary()``); every try must be
refused, and the file the stranger's function would write on a worker must not appear. The
control test shows the same script connecting, and writing that file, where nothing protects
the scheduler. Dashboards are probed with a TCP connect on this machine's non-loopback address;
the workers' HTTP servers by the listening sockets of their processes. The Slurm test needs
the one-node cluster of .ci/slurm-up.sh. Workers scratch in the test's own folder: purging the
machine-wide /tmp/dask-scratch-space, which other runs share, can take long enough for
distributed to warn (an error under pytest).
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cluster import (
    _array,
    _compute_both,
    _expected_map_blocks,
    _slurm_job_id,
    _slurm_settings,
)

from nucflow.cli import main
from nucflow.cluster import connect, describe
from nucflow.errors import ClusterError

#: What the stranger runs, as a separate interpreter: one line per try, "refused KIND: why"
#: or "ACCEPTED KIND: ..." when it got a connection and ran a function on a worker.
STRANGER = r"""
import asyncio, ssl, sys
from distributed import Client
from distributed.comm import connect
from distributed.security import Security

address, marks = sys.argv[1], sys.argv[2]
host_port = address.split("://", 1)[1]


def leave_a_mark(path):
    import os

    with open(path, "w") as file:
        file.write(str(os.getpid()))
    return os.getpid()


def client_try(kind, target, security=None):
    try:
        with Client(target, timeout=5, security=security) as client:
            mark = f"{marks}/{kind}"
            pid = client.submit(leave_a_mark, mark, pure=False).result(timeout=10)
            print(f"ACCEPTED {kind}: ran code in process {pid}, wrote {mark}", flush=True)
    except Exception as error:
        print(f"refused {kind}: {type(error).__name__}: {error}".replace("\n", " "), flush=True)


async def tls_without_certificate():
    # The server's certificate is not checked (the stranger has no CA), none is offered.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    comm = await connect("tls://" + host_port, timeout=5, ssl_context=context)
    await comm.write({"op": "identity"})
    return await comm.read()


client_try("plain-tcp", "tcp://" + host_port)
try:
    reply = asyncio.run(tls_without_certificate())
    print(f"ACCEPTED tls-without-certificate: {str(reply)[:80]}", flush=True)
except Exception as error:
    print(f"refused tls-without-certificate: {type(error).__name__}: {error}".replace("\n", " "))
client_try("tls-own-certificate", "tls://" + host_port, Security.temporary())
"""

#: Why each try must fail: the TLS listener drops plain TCP, demands a client certificate,
#: and rejects one its run's CA did not sign (the server may hang up before its alert is read,
#: hence SSLEOFError). Not "cannot reach": the owner computes on the same scheduler afterwards.
TRIES = {
    "plain-tcp": r"Connection reset|CommClosedError",
    "tls-without-certificate": r"(?i)certificate required|handshake|SSLEOFError",
    "tls-own-certificate": r"(?i)certificate does not match|unknown ca|certificate verify failed",
}


def _stranger(address: str, tmp_path: Path) -> dict[str, str]:
    """Run the stranger against ``address``; {kind: its line}. The files its code wrote on a
    worker, if any ran, are in ``tmp_path / "marks"``."""
    script = tmp_path / "stranger.py"
    script.write_text(STRANGER)
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, str(script), address, str(marks)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [
        line
        for line in proc.stdout.splitlines()
        if line.split(" ", 1)[0] in ("refused", "ACCEPTED")
    ]
    assert proc.returncode == 0 and len(lines) == 3, proc.stdout + proc.stderr
    return {line.split(" ", 2)[1].rstrip(":"): line for line in lines}


def _assert_all_refused(outcome: dict[str, str], tmp_path: Path) -> None:
    assert sorted(outcome) == sorted(TRIES)
    for kind, line in outcome.items():
        assert line.startswith(f"refused {kind}: "), line
        assert re.search(TRIES[kind], line), line
    assert list((tmp_path / "marks").iterdir()) == []  # no code of the stranger's ran


def _worker_http_hosts(runner) -> set[str]:
    """The hosts every worker's HTTP server (metrics, health; dashboard) listens on, from the
    sockets its process holds open (psutil), not from what the worker reports."""
    import psutil

    def listening(dask_worker) -> tuple[int, list[int]]:
        from distributed.comm.utils import get_tcp_server_addresses

        return os.getpid(), [port for _, port in get_tcp_server_addresses(dask_worker.http_server)]

    hosts = set()
    for pid, ports in runner.client.run(listening).values():
        assert ports, "a worker serves no HTTP"
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port in ports:
                hosts.add(conn.laddr.ip)
    return hosts


def _external_ip() -> str:
    """This machine's address on the network (not loopback); skip where it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            address = probe.getsockname()[0]
        except OSError:
            address = ""
    if not address or address.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address to test exposure on")
    return address


def _answers(host: str, port: int) -> bool:
    """True if something accepts a TCP connection at host:port."""
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def _dashboard_port(runner) -> int:
    return int(runner.client.scheduler_info()["services"]["dashboard"])


def _owner_only(path: Path, mode: int) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == mode, f"{path}: {oct(path.stat().st_mode)}"


# --- local ---------------------------------------------------------------------------------


def test_stranger_script_works_where_nothing_protects_the_scheduler(tmp_path):
    # The control: distributed's own LocalCluster default binds to loopback with plain TCP,
    # which any user of this machine can reach (what `--cluster local` was before issue 27):
    # the stranger's plain TCP client gets in and its function writes a file as us.
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, dashboard_address=None, local_directory=str(tmp_path / "scratch")
    ) as cluster:
        address = cluster.scheduler_address
        outcome = _stranger(address, tmp_path)
    assert address.startswith("tcp://127.0.0.1:")
    assert outcome["plain-tcp"].startswith("ACCEPTED plain-tcp: ran code in process")
    assert (tmp_path / "marks" / "plain-tcp").is_file()


def test_local_on_loopback_speaks_tls_and_refuses_strangers(tmp_path):
    # `--cluster local` as the CLI starts it: LocalCluster on 127.0.0.1 (configs/cluster/
    # local.yaml), reachable by every user of this machine, so it needs the run's credentials.
    values, _ = _array()
    settings = {"n_workers": 2, "local_directory": str(tmp_path / "scratch")}
    with connect("local", settings=settings, progress=False) as runner:
        address = runner.client.scheduler.address
        outcome = _stranger(address, tmp_path)
        total, out = _compute_both(runner)  # the run's own client and workers still connect
        http = _worker_http_hosts(runner)
        workers = list(runner.client.scheduler_info()["workers"])
    assert address.startswith("tls://127.0.0.1:")
    assert workers and all(w.startswith("tls://127.0.0.1:") for w in workers)
    _assert_all_refused(outcome, tmp_path)
    assert total == values.sum()
    np.testing.assert_array_equal(out, _expected_map_blocks(values, 137))
    assert http == {"127.0.0.1"}


def test_local_beyond_loopback_speaks_tls_and_refuses_strangers(tmp_path):
    host = _external_ip()
    values, _ = _array()
    settings = {"n_workers": 2, "threads_per_worker": 1, "host": host}
    settings["local_directory"] = str(tmp_path / "scratch")
    with connect("local", settings=settings) as runner:
        address = runner.client.scheduler.address
        outcome = _stranger(address, tmp_path)
        total, out = _compute_both(runner)  # the run's own workers still connect
        port = _dashboard_port(runner)
        dashboard = _answers("127.0.0.1", port), _answers(host, port)
        http = _worker_http_hosts(runner)
    assert address.startswith(f"tls://{host}:")
    _assert_all_refused(outcome, tmp_path)
    assert total == values.sum()
    np.testing.assert_array_equal(out, _expected_map_blocks(values, 137))
    assert dashboard == (True, False)  # on loopback only, not on the network address
    assert http == {"127.0.0.1"}  # the workers' HTTP servers too, though they serve on `host`


def test_local_every_interface_keeps_worker_http_on_loopback_unless_asked(tmp_path):
    # cluster.host=0.0.0.0: scheduler and workers listen on every interface (TLS), their
    # HTTP servers on loopback; cluster.worker_dashboard_address opens them, with a warning.
    settings = {"n_workers": 1, "host": "0.0.0.0", "local_directory": str(tmp_path / "scratch")}
    with connect("local", settings=settings, progress=False) as runner:
        kept = _worker_http_hosts(runner)
        assert runner.client.scheduler.address.startswith("tls://")
    assert kept == {"127.0.0.1"}
    opened = {**settings, "worker_dashboard_address": ":0"}
    with pytest.warns(UserWarning, match=r"^the dask dashboard on 0\.0\.0\.0:0 is open"):
        with connect("local", settings=opened, progress=False) as runner:
            assert _worker_http_hosts(runner) == {"0.0.0.0"}


def test_local_dashboard_stays_on_loopback_and_link_says_so(capsys):
    host = _external_ip()
    with connect("local", settings={"n_workers": 1}, progress=False) as runner:
        port = _dashboard_port(runner)
        reachable = _answers("127.0.0.1", port), _answers(host, port)
        link = runner.dashboard_link
    assert reachable == (True, False)
    assert link == f"http://127.0.0.1:{port}/status"
    err = capsys.readouterr().err
    assert f"ssh -L {port}:127.0.0.1:{port} {socket.gethostname()}" in err


def test_dashboard_opened_to_the_network_warns_in_one_line():
    host = _external_ip()
    message = (
        r"^the dask dashboard on 0\.0\.0\.0:0 is open to the network with no authentication; "
        r"leave out --dashboard-address to keep it on 127\.0\.0\.1 and view it through ssh -L$"
    )
    with pytest.warns(UserWarning, match=message):
        with connect(
            "local", settings={"n_workers": 1}, dashboard_address="0.0.0.0:0", progress=False
        ) as runner:
            assert _answers(host, _dashboard_port(runner))  # the override is real


@pytest.mark.parametrize("value", ["8787", "host", "localhost:99999", "a b:1", "http://x:1"])
def test_bad_dashboard_address(value):
    with pytest.raises(ClusterError, match=r"^--dashboard-address .* must be HOST:PORT or :PORT"):
        with connect("local", dashboard_address=value):
            pass
    with pytest.raises(ClusterError, match=r"must be HOST:PORT or :PORT"):
        describe("local", dashboard_address=value)


@pytest.mark.parametrize("spec", ["threads", "processes", "tcp://127.0.0.1:1"])
def test_dashboard_address_only_where_nucflow_starts_the_scheduler(spec):
    with pytest.raises(ClusterError, match=r"^--dashboard-address applies only to --cluster local"):
        with connect(spec, dashboard_address="127.0.0.1:0"):
            pass


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--cluster", "local", "--dashboard-address", "nope"],
            r"--dashboard-address 'nope' must be HOST:PORT",
        ),
        (["--dashboard-address", "127.0.0.1:0"], r"--dashboard-address applies only to"),
    ],
)
def test_cli_bad_dashboard_address_is_one_line_exit_2(stack2d, capsys, extra, message):
    code = main(["plan", "--input", str(stack2d[0]), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("nucflow plan: error: "), err
    assert re.search(message, err), err


def test_cli_warns_in_one_line_when_the_dashboard_is_opened(stack2d):
    # In a fresh interpreter: inside pytest, warnings go to pytest's recorder, not stderr.
    def plan(*extra: str) -> subprocess.CompletedProcess:
        code = "from nucflow.cli import main; raise SystemExit(main())"
        argv = ["plan", "--input", str(stack2d[0]), "--cluster", "local", *extra]
        return subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120
        )

    opened = plan("--dashboard-address", "0.0.0.0:8787")
    assert opened.returncode == 0
    assert opened.stderr == (
        "nucflow: warning: the dask dashboard on 0.0.0.0:8787 is open to the network with no "
        "authentication; leave out --dashboard-address to keep it on 127.0.0.1 and view it "
        "through ssh -L\n"
    )
    kept = plan("--dashboard-address", "127.0.0.1:8787")
    assert (kept.returncode, kept.stderr) == (0, "")


# --- existing schedulers -------------------------------------------------------------------


def test_tcp_scheduler_on_another_host_warns_in_one_line(tmp_path):
    host = _external_ip()
    message = (
        rf"^tcp://{host}:1 is a plain tcp:// scheduler on the network: the connection is "
        r"neither encrypted nor authenticated; use tls:// with your dask TLS config$"
    )
    with pytest.warns(UserWarning, match=message):
        with pytest.raises(ClusterError, match=r"cannot reach scheduler"):
            with connect(f"tcp://{host}:1"):
                pass
    file = tmp_path / "scheduler.json"
    file.write_text(json.dumps({"type": "Scheduler", "address": f"tcp://{host}:1"}))
    with pytest.warns(UserWarning, match=r"is a plain tcp:// scheduler on the network"):
        with pytest.raises(ClusterError, match=r"cannot reach scheduler .* \(from scheduler file"):
            with connect(scheduler_file=file):
                pass


@pytest.fixture
def tls_scheduler(tmp_path):
    """A TLS scheduler and worker on loopback, and its credentials as 0600 files, as a user
    would keep them for ``distributed.comm.tls.*``; yields (address, config)."""
    from distributed import LocalCluster
    from distributed.security import Security

    security = Security.temporary()
    folder = tmp_path / "tls"
    folder.mkdir(mode=0o700)
    files = {}
    for name, text in (("ca.pem", security.tls_ca_file), ("key.pem", security.tls_client_key)):
        files[name] = folder / name
        files[name].touch(mode=0o600)
        files[name].write_text(text)
    config = {
        "distributed.comm.tls.ca-file": str(files["ca.pem"]),
        "distributed.comm.tls.client.cert": str(files["ca.pem"]),  # self-signed: cert = CA
        "distributed.comm.tls.client.key": str(files["key.pem"]),
    }
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        security=security,
        dashboard_address=None,
        local_directory=str(tmp_path / "scratch"),
    ) as cluster:
        yield cluster.scheduler_address, config


def test_tls_scheduler_with_the_users_tls_config(tls_scheduler):
    import dask

    address, config = tls_scheduler
    values, _ = _array()
    assert address.startswith("tls://127.0.0.1:")
    with dask.config.set(config):
        with connect(address) as runner:
            total, out = _compute_both(runner)
    assert total == values.sum()
    np.testing.assert_array_equal(out, _expected_map_blocks(values, 137))


def test_tls_scheduler_without_tls_config_names_the_settings(tls_scheduler):
    address, _ = tls_scheduler
    message = rf"^{address} needs TLS credentials: set distributed\.comm\.tls\.ca-file, "
    with pytest.raises(ClusterError, match=message):
        with connect(address):
            pass


# --- real Slurm ----------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.timeout(240)
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_run_refuses_strangers_and_removes_its_credentials(tmp_path, monkeypatch):
    host = _external_ip()
    shared = tmp_path / "shared"
    settings = {**_slurm_settings(tmp_path, monkeypatch), "shared_temp_directory": str(shared)}
    values, array = _array()
    with connect("slurm", settings=settings, jobs=1) as runner:
        address = runner.client.scheduler.address
        (folder,) = shared.iterdir()
        credentials = sorted(folder.iterdir())
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *credentials]}
        script = runner.cluster.job_script()
        outcome = _stranger(address, tmp_path)
        total, out = _compute_both(runner)  # the run's own workers connect
        (jobs,) = runner.compute(array.map_blocks(_slurm_job_id, dtype=np.int64), label="jobs")
        port = _dashboard_port(runner)
        dashboard = _answers("127.0.0.1", port), _answers(host, port)
    assert address.startswith("tls://")
    _assert_all_refused(outcome, tmp_path)
    assert total == values.sum()
    np.testing.assert_array_equal(out, _expected_map_blocks(values, 137))
    assert -1 not in set(jobs.tolist())  # computed in Slurm jobs
    assert modes.pop(folder.name) == 0o700
    assert len(credentials) == 3 and set(modes.values()) == {0o600}, modes
    # The job script names the files; no key material travels in it.
    assert all(str(p) in script for p in credentials) and "BEGIN" not in script
    assert "--no-dashboard" in script and "--protocol tls://" in script
    assert dashboard == (True, False)
    assert not folder.exists() and list(shared.iterdir()) == []
    _owner_only(tmp_path / "logs", 0o700)  # worker logs name the scheduler's address
    for log in (tmp_path / "logs").iterdir():
        assert "PRIVATE KEY" not in log.read_text()
