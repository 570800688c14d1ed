"""A two-host ps-lite run on one machine: network namespaces as hosts.

Three namespaces: a switch (a bridge) and two hosts, each joined to it by a veth pair, with
addresses in 10.47.0.0/24 that exist only inside them. Node 0 (10.47.0.1) runs the scheduler,
a server and a worker; node 1 (10.47.0.2) a worker; each through ``ip netns exec ... gluon-ft
launch --nnodes 2 --node-rank R --scheduler 10.47.0.1:PORT``. No traffic leaves the
namespaces. Every namespace goes, with its links, whatever happens.

Slow (two trainings and a failure, over a minute on a busy 2-core machine), so it runs in
``make test-all`` only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import finish, processes_with_environment, write_image_folder

import gluon_ft  # noqa: F401  (thread settings before mxnet)

pytestmark = [
    pytest.mark.multihost,
    pytest.mark.skipif(
        not os.environ.get("GLUON_FT_ALL_MODELS"),
        reason="the multi-host namespace test runs in `make test-all` (GLUON_FT_ALL_MODELS=1)",
    ),
]

SUBNET = "10.47.0"
PORT = 29400
# Pushes rank + 1, pulls the sum, then waits: a cluster with a worker to kill.
HANG = r"""
import os, sys, time
from pathlib import Path
import gluon_ft
import mxnet as mx

kv = mx.kv.create("dist_sync")
kv.init(0, mx.nd.zeros((1,)))
kv.push(0, mx.nd.ones((1,)))
out = mx.nd.zeros((1,))
kv.pull(0, out=out)
Path(sys.argv[1], f"{os.environ['DMLC_NODE_HOST']}-{os.getpid()}").write_text("up")
time.sleep(300)
"""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class Namespaces:
    """``switch``, ``host0`` and ``host1``; names unique to this process."""

    def __init__(self):
        tag = f"gft{os.getpid()}"
        self.switch, self.hosts = f"{tag}sw", [f"{tag}h0", f"{tag}h1"]
        self.all = [self.switch, *self.hosts]

    def create(self) -> None:
        for name in self.all:
            ip("netns", "add", name)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            # The veth pair is made inside the host and its peer moved to the switch: no
            # link ever exists in the machine's own namespace.
            ip("-n", host, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}",
               "netns", self.switch)  # fmt: skip
            ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
            ip("-n", host, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
            ip("-n", host, "link", "set", "eth0", "up")
            ip("-n", host, "link", "set", "lo", "up")

    def remove(self) -> None:
        for name in self.all:
            for pid in ip("netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", name, check=False)

    def left(self) -> list[str]:
        listed = ip("netns", "list", check=False).stdout
        return [name for name in self.all if re.search(rf"^{name}\b", listed, re.M)]

    def run(self, host: int, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.hosts[host], *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **kwargs,
        )


@pytest.fixture
def namespaces():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2's `ip`")
    spaces = Namespaces()
    try:
        try:
            spaces.create()
        except subprocess.CalledProcessError as err:
            pytest.skip(f"cannot create network namespaces here: {err.stderr.strip()}")
        yield spaces
    finally:
        spaces.remove()
        assert spaces.left() == [], "a namespace was left behind"
        # Nothing was ever created in this namespace, and nothing is left of the pairs.
        links = ip("-br", "link", check=False).stdout
        assert not re.search(r"^(p0|p1|br0)\b", links, re.M), links


def launch(node_rank: int, *rest: str, join_timeout: float = 60) -> list[str]:
    command = [sys.executable, "-m", "gluon_ft", "launch", "--nnodes", "2"]
    command += ["--node-rank", str(node_rank), "--scheduler", f"{SUBNET}.1:{PORT}"]
    return [*command, "--join-timeout", str(join_timeout), *rest]


def train_command(data: Path, out: Path) -> list[str]:
    command = [sys.executable, "-m", "gluon_ft", "train", "--kvstore", "dist_sync"]
    command += ["--data", str(data), "--model", "mobilenet0.25", "--pretrained", "none"]
    command += ["--epochs", "2", "--image-size", "32", "--batch-size", "4", "--lr", "0.05"]
    return [*command, "--momentum", "0.9", "--out", str(out), "--no-progress"]


def cluster_processes(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (inherited by every process the
    launchers start)."""
    return processes_with_environment(marker)


@pytest.mark.timeout(900)
def test_two_hosts_train_as_one_host_and_a_lost_worker_stops_both(namespaces, tmp_path):
    started = time.monotonic()
    data = write_image_folder(tmp_path / "data", n_train=8, n_test=4, size=32)
    one_host, two_hosts = tmp_path / "one-host", tmp_path / "two-hosts"
    # One OpenMP thread per worker in both runs: another count changes the sums' order, and
    # from-scratch training on 8 images turns that into another first epoch.
    threads = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The reference: one host, two workers, on 127.0.0.1.
    reference = subprocess.run(
        [
            sys.executable,
            "-m",
            "gluon_ft",
            "launch",
            "-n",
            "2",
            "--",
            *train_command(data, one_host),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=threads,
    )
    assert reference.returncode == 0, reference.stdout + reference.stderr

    # Two hosts: node 0 runs the scheduler, a server and a worker; node 1 only a worker.
    # The run directory is on storage both "hosts" share (this machine's tmp_path).
    train = ["--", *train_command(data, two_hosts)]
    node1 = namespaces.run(1, launch(1, "-n", "1", "-s", "0", *train), env=threads)
    node0 = namespaces.run(0, launch(0, "-n", "1", "-s", "1", *train), env=threads)
    code0, out0 = finish(node0, 300)
    code1, out1 = finish(node1, 60)
    assert code0 == 0 and code1 == 0, out0 + out1
    assert f"node 1 ({SUBNET}.2) joined" in out0
    assert "started scheduler" in out0 and "server 0" in out0 and "server" not in out1
    ours = mx_load(two_hosts / "model.params")
    theirs = mx_load(one_host / "model.params")
    assert ours.keys() == theirs.keys()
    worst = max(np.abs(ours[k] - theirs[k]).max() for k in theirs)
    assert worst <= 1e-6, worst
    rows = [json.loads((run / "metrics.json").read_text()) for run in (one_host, two_hosts)]
    assert [r["test_acc"] for r in rows[0]] == [r["test_acc"] for r in rows[1]]
    trained_at = time.monotonic()

    # Kill node 1's worker: node 0 must stop within 60 s, naming what was lost.
    marks = tmp_path / "up"
    marks.mkdir()
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    hang = ["--", sys.executable, str(script), str(marks)]
    env = {**os.environ, "GLUON_FT_TEST_CLUSTER": str(tmp_path)}  # to find every process
    node1 = namespaces.run(1, launch(1, "-n", "1", "-s", "0", *hang), env=env)
    node0 = namespaces.run(0, launch(0, "-n", "1", *hang), env=env)
    deadline = time.monotonic() + 120
    while len(list(marks.iterdir())) < 2:
        assert time.monotonic() < deadline, "the hanging cluster did not start"
        assert node0.poll() is None and node1.poll() is None, finish(node0, 5)
        time.sleep(0.2)
    (victim,) = (int(p.name.rsplit("-", 1)[1]) for p in marks.iterdir() if ".2-" in p.name)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    code0, out0 = finish(node0, 60)
    stopped_in = time.monotonic() - killed_at
    code1, out1 = finish(node1, 30)
    assert stopped_in < 60, out0
    assert code0 == code1 == 128 + signal.SIGKILL, out0 + out1
    assert f"node 1 ({SUBNET}.2): worker 0 (pid {victim}) was killed by SIGKILL" in out0
    assert cluster_processes(f"GLUON_FT_TEST_CLUSTER={tmp_path}") == []
    print(
        f"wall time: trainings {trained_at - started:.1f} s, failure {stopped_in:.1f} s, "
        f"whole test {time.monotonic() - started:.1f} s"
    )


@pytest.mark.timeout(120)
def test_an_unreachable_scheduler_address_is_a_bounded_failure(namespaces):
    # 10.47.0.9 is on the bridge's subnet, but no host holds it.
    command = [sys.executable, "-m", "gluon_ft", "launch", "--nnodes", "2", "--node-rank", "1"]
    command += ["--scheduler", f"{SUBNET}.9:{PORT}", "--join-timeout", "5", "-n", "1"]
    started = time.monotonic()
    code, output = finish(namespaces.run(1, [*command, "--", sys.executable, "-c", "pass"]), 60)
    assert code == 2, output
    assert f"--scheduler {SUBNET}.9:{PORT}: could not reach node 0 there" in output
    assert time.monotonic() - started < 30


def mx_load(path: Path) -> dict:
    import mxnet as mx

    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}
