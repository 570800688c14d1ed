"""``gluon-ft launch --nnodes N --node-rank R --scheduler HOST:PORT``: one launcher per host.

Here every "host" is 127.0.0.1 (the namespace test in test_multihost.py uses real separate
addresses). Real launchers, schedulers, servers and workers; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import finish, processes_with_environment

import gluon_ft  # noqa: F401  (thread settings before mxnet)

# Pushes rank + 1 and pulls the sum; "hang" then waits (a worker to kill).
WORKER = r"""
import os, sys, time
from pathlib import Path
import gluon_ft
import mxnet as mx

kv = mx.kv.create("dist_sync")
kv.init(0, mx.nd.zeros((4,)))
kv.push(0, mx.nd.ones((4,)) * (kv.rank + 1))
out = mx.nd.zeros((4,))
kv.pull(0, out=out)
print(f"rank={kv.rank} n={kv.num_workers} sum={out.asnumpy()[0]:g} "
      f"host={os.environ['DMLC_NODE_HOST']}", flush=True)
if sys.argv[1] == "hang":
    Path(sys.argv[2], str(os.getpid())).write_text("started")
    time.sleep(300)
"""


@pytest.fixture
def worker(tmp_path) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return [sys.executable, str(script)]


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def node(rank: int, address: str, command: list[str], nnodes: int = 2, **options):
    """Start one node's launcher through the Python API (for its small timeouts)."""
    arguments = {"join_timeout": 30.0, "heartbeat_timeout": 3.0, **options}
    program = (
        "import sys, gluon_ft\n"
        "from gluon_ft.errors import GluonFTError\n"
        "from gluon_ft.cluster.launch import launch_node\n"
        "try:\n"
        f"    sys.exit(launch_node({command!r}, {nnodes}, {rank}, {address!r}, **{arguments!r}))\n"
        "except GluonFTError as err:\n"
        "    print(f'error: {err}', flush=True)\n"
        "    sys.exit(err.exit_code)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def cluster_processes(ps_port: int) -> list[int]:
    """Live processes started for the ps-lite cluster on ``ps_port``."""
    return processes_with_environment(f"DMLC_PS_ROOT_PORT={ps_port}")


def ps_port_of(output: str) -> int:
    return int(re.search(r"scheduler on 127\.0\.0\.1:(\d+)", output)[1])


@pytest.mark.timeout(120)
def test_two_nodes_form_one_cluster(worker):
    address = f"127.0.0.1:{free_port()}"
    nodes = [node(rank, address, [*worker, "sum"]) for rank in (1, 0)]  # order does not matter
    results = [finish(n, 100) for n in nodes]
    (code1, out1), (code0, out0) = results
    assert code0 == 0 and code1 == 0, out0 + out1
    lines = re.findall(r"\[worker 0\] rank=(\d) n=2 sum=3 host=127.0.0.1", out0 + out1)
    assert sorted(lines) == ["0", "1"], out0 + out1
    assert "node 1 (127.0.0.1) joined" in out0
    assert "started scheduler" in out0 and "scheduler (pid" not in out1  # node 0's alone
    assert cluster_processes(ps_port_of(out0)) == []


@pytest.mark.timeout(120)
def test_a_killed_worker_on_one_node_stops_every_node(worker, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    pids = tmp_path / "pids"
    pids.mkdir()
    node0 = node(0, address, [*worker, "hang", str(pids)])
    node1 = node(1, address, [*worker, "hang", str(pids)])
    deadline = time.monotonic() + 60
    while len(list(pids.iterdir())) < 2:
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.1)
    victim = int(re.search(r"worker 0 \(pid (\d+)\)", _peek(node1))[1])
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    code0, out0 = finish(node0, 60)
    code1, out1 = finish(node1, 60)
    assert time.monotonic() - killed_at < 30
    assert code1 == code0 == 128 + signal.SIGKILL, out0 + out1
    assert f"node 1 (127.0.0.1): worker 0 (pid {victim}) was killed by SIGKILL" in out0
    assert cluster_processes(ps_port_of(out0)) == []


def _peek(process: subprocess.Popen, until: str = "started") -> str:
    """A running launcher's output up to the line that holds ``until`` (read without waiting
    for it to end)."""
    text = ""
    while until not in text:
        line = process.stdout.readline()
        assert line, f"the launcher ended before saying {until!r}:\n{text}"
        text += line
    return text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["killed", "silent"])
def test_a_lost_node_0_ends_the_others_within_the_heartbeat_timeout(worker, tmp_path, how):
    address = f"127.0.0.1:{free_port()}"
    pids = tmp_path / "pids"
    pids.mkdir()
    node0 = node(0, address, [*worker, "hang", str(pids)])
    node1 = node(1, address, [*worker, "hang", str(pids)])
    start0 = _peek(node0)
    ps_port = ps_port_of(start0)
    try:
        while len(list(pids.iterdir())) < 2:
            time.sleep(0.1)
        # Killed: its connection closes at once. Stopped: it goes silent, as a host that
        # lost its network would.
        node0.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        lost_at = time.monotonic()
        code1, out1 = finish(node1, 60)
        assert time.monotonic() - lost_at < 3.0 + 10, out1
        assert code1 == 1, out1
        why = "its launcher went away" if how == "killed" else "no heartbeat for 3 s"
        assert f"lost node 0 ({address}): {why}" in out1
    finally:
        node0.kill()
        node0.wait()
        for pid in cluster_processes(ps_port):  # node 0's own processes lost their launcher
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(90)
def test_a_duplicate_node_rank_is_refused(worker):
    address = f"127.0.0.1:{free_port()}"
    node0 = node(0, address, [*worker, "sum"], nnodes=3, join_timeout=8.0)
    first = node(1, address, [*worker, "sum"], nnodes=3)
    joined = _peek(node0, "node 1 (127.0.0.1) joined")  # the second node 1 comes after it
    code, output = finish(node(1, address, [*worker, "sum"], nnodes=3), 30)
    assert code == 2, output
    # Refused at once, not after node 0's 8 s join timeout: that would say "did not join".
    assert "--node-rank 1 has already joined" in output
    # Node 2 never comes: node 0 gives up after its join timeout, and so does node 1.
    code0, out0 = finish(node0, 30)
    out0 = joined + out0
    assert code0 == 2 and "Node(s) 2 did not join" in out0, out0
    code1, out1 = finish(first, 30)
    assert code1 == 2, out1


@pytest.mark.timeout(60)
def test_nothing_listening_at_the_scheduler_address_is_a_bounded_failure(worker):
    address = f"127.0.0.1:{free_port()}"
    code, output = finish(node(1, address, [*worker, "sum"], join_timeout=3.0), 30)
    assert code == 2, output
    # Bounded: it exits 2 within finish()'s 30 s, or finish() kills it (exit -9).
    assert f"--scheduler {address}: could not reach node 0 there" in output


@pytest.mark.timeout(60)
def test_a_scheduler_address_that_is_not_a_launcher_is_a_bounded_failure(worker):
    # Something else listens there and never answers (an ssh server, another program).
    with socket.create_server(("127.0.0.1", 0)) as other:
        address = f"127.0.0.1:{other.getsockname()[1]}"
        accepted = []
        threading.Thread(target=lambda: accepted.append(other.accept()), daemon=True).start()
        code, output = finish(node(1, address, [*worker, "sum"], join_timeout=3.0), 30)
    assert code == 2, output
    assert f"Node 0 at {address} did not start the cluster within 3 s" in output


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--nnodes", "2", "--node-rank", "0"], "need --nnodes, --node-rank and --scheduler"),
        (["--nnodes", "2", "--node-rank", "2", "--scheduler", "127.0.0.1:1"], "--node-rank must"),
        (["--nnodes", "2", "--node-rank", "0", "--scheduler", "nonsense"], "HOST:PORT"),
        (["--nnodes", "2", "--node-rank", "0", "--scheduler", "203.0.113.77:29400"], "node 0"),
        (["--nnodes", "2", "--node-rank", "1", "--scheduler", "no-such.invalid:1"], "resolve"),
    ],
)
def test_bad_node_arguments_exit_2_before_anything_starts(arguments, message, cli):
    done = cli("launch", *arguments, "-n", "1", "--", sys.executable, "-c", "pass")
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
