"""The local ps-lite launcher, with real scheduler, server and worker processes on 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import gluon_ft  # noqa: F401  (thread settings before mxnet)
import gluon_ft.cluster.launch as launch_module
from gluon_ft.cluster.launch import launch
from gluon_ft.errors import UsageError
from gluon_ft.threads import usable_cores

# Every worker mode runs this one script. A dist_sync cluster waits forever for a worker
# that never connects, hence the modes that block and the timeouts on every test.
WORKER = r'''
import signal
import sys

# Before the slow imports: the other worker imports mxnet for a second or more before it
# fails, and a worker still importing when the launcher's SIGTERM comes would die of it.
if "ignore-sigterm" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

import os
import socket
import subprocess
import time
from pathlib import Path

import gluon_ft  # noqa: F401
import mxnet as mx

mode = sys.argv[1]


def listening_addresses():
    """host:port of every TCP socket this process listens on (ZeroMQ runs in-process)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[3] == "0A" and cols[9] in inodes:
            ip, port = cols[1].split(":")
            found.append(f"{socket.inet_ntoa(bytes.fromhex(ip)[::-1])}:{int(port, 16)}")
    return ",".join(sorted(found))


if mode == "fail-one":
    try:
        os.close(os.open(sys.argv[2], os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        pass  # the other worker already took the failing part: wait in kv.create forever
    else:
        print("failing on purpose", flush=True)
        sys.exit(7)
kv = mx.kv.create("dist_sync")
if mode == "sum":
    kv.init(0, mx.nd.zeros((4,)))
    kv.push(0, mx.nd.ones((4,)) * (kv.rank + 1))
    out = mx.nd.zeros((4,))
    kv.pull(0, out=out)
    print(
        f"rank={kv.rank} num_workers={kv.num_workers} sum={out.asnumpy().tolist()} "
        f"omp={os.environ.get('OMP_NUM_THREADS')} listen={listening_addresses()}",
        flush=True,
    )
elif mode in ("hang", "fail-one"):
    # A grandchild in the worker's process group: stopping the worker must stop it too.
    child = subprocess.Popen(["sleep", "300"])
    Path(sys.argv[2], str(os.getpid())).write_text(str(child.pid))
    time.sleep(300)
'''

RESULT = re.compile(
    r"^\[worker (\d)\] rank=(\d) num_workers=(\d) sum=(\[.*?\]) omp=(\S+) listen=(\S*)$"
)


@pytest.fixture
def worker(tmp_path) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return [sys.executable, str(script)]


def free_ports(count: int) -> list[int]:
    """Distinct ports nothing listens on (all sockets are held open until all are chosen)."""
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie waiting for a parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cluster_processes(port: int) -> list[int]:
    """Every live process started for the cluster on ``port``, grandchildren included
    (they inherit the environment)."""
    needle = f"DMLC_PS_ROOT_PORT={port}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environ and is_running(int(entry)):
            found.append(int(entry))
    return found


def started_pids(output: str) -> dict[str, int]:
    """``{"worker 1": pid, ...}`` from the launcher's start message."""
    line = next(line for line in output.splitlines() if "started scheduler" in line)
    return {label: int(pid) for label, pid in re.findall(r"(\w+ ?\d*) \(pid (\d+)\)", line)}


def assert_nothing_left(port: int, output: str, extra_pids=()) -> None:
    pids = [*started_pids(output).values(), *extra_pids]
    assert len(pids) >= 4
    assert [pid for pid in pids if is_running(pid)] == []
    assert cluster_processes(port) == []


def wait_for_files(folder: Path, count: int, seconds: float = 30) -> list[Path]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        files = [path for path in folder.iterdir() if path.read_text()]
        if len(files) == count:
            return files
        time.sleep(0.1)
    raise AssertionError(f"{count} workers did not start within {seconds} s")


def launch_in_thread(**kwargs) -> tuple[threading.Thread, dict, io.StringIO]:
    result: dict = {}
    out = io.StringIO()

    def run():
        result["code"] = launch(stream=out, **kwargs)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result, out


def check_sums(output: str, num_workers: int = 2) -> list[re.Match]:
    results = [m for m in map(RESULT.match, output.splitlines()) if m]
    assert sorted(int(m[1]) for m in results) == list(range(num_workers))
    assert sorted(int(m[2]) for m in results) == list(range(num_workers))
    expected = [float(sum(range(1, num_workers + 1)))] * 4
    for match in results:
        assert int(match[3]) == num_workers
        assert json.loads(match[4]) == expected
    return results


@pytest.mark.timeout(90)
def test_two_workers_push_pull_through_one_server(worker, monkeypatch):
    # As if the user had not chosen a thread count, whatever the test machine's environment.
    monkeypatch.setattr(launch_module, "THREAD_SETTINGS", {"source": "gluon-ft"})
    out = io.StringIO()
    port = free_ports(1)[0]
    code = launch([*worker, "sum"], num_workers=2, num_servers=1, port=port, stream=out)
    output = out.getvalue()
    assert code == 0, output
    results = check_sums(output)
    prefixes = {"[launch]", "[scheduler]", "[server 0]", "[worker 0]", "[worker 1]"}
    assert {line.split("] ")[0] + "]" for line in output.splitlines()} <= prefixes
    assert {m[5] for m in results} == {str(max(1, usable_cores() // 2))}
    # Every ps-lite socket of the workers stays on the loopback address.
    for match in results:
        addresses = match[6].split(",")
        assert addresses[0], output
        assert all(address.startswith("127.0.0.1:") for address in addresses), output
    assert f"scheduler on 127.0.0.1:{port}" in output
    assert_nothing_left(port, output)


@pytest.mark.timeout(90)
def test_first_failing_worker_decides_the_exit_code_and_stops_the_rest(worker, tmp_path):
    port = free_ports(1)[0]
    out = io.StringIO()
    started = time.monotonic()
    # One worker exits 7 at once; the other then waits in kv.create for a peer that is gone.
    code = launch([*worker, "fail-one", str(tmp_path / "flag")], 2, port=port, stream=out)
    output = out.getvalue()
    assert code == 7, output
    assert time.monotonic() - started < 30
    failed = re.search(r"\[launch\] worker (\d) \(pid (\d+)\) exited with code 7", output)
    assert failed, output
    assert f"[worker {failed[1]}] failing on purpose" in output
    assert_nothing_left(port, output)


class TimedStream(io.StringIO):
    """A StringIO that remembers when each line was written."""

    def __init__(self):
        super().__init__()
        self.times: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.times.append((time.monotonic(), text))
        return super().write(text)


@pytest.mark.timeout(60)
def test_processes_that_ignore_sigterm_are_killed_within_dead_timeout(worker, tmp_path):
    port = free_ports(1)[0]
    out = TimedStream()
    command = [*worker, "fail-one", str(tmp_path / "flag"), "ignore-sigterm"]
    code = launch(command, 2, port=port, stream=out, dead_timeout=3)
    returned_at = time.monotonic()
    output = out.getvalue()
    assert code == 7, output
    failed_at = next(t for t, text in out.times if "exited with code 7" in text)
    # SIGTERM was ignored, so the launcher waited dead_timeout / 3 before its SIGKILL, and
    # still returned within dead_timeout of the failure.
    assert 0.9 <= returned_at - failed_at < 3, output
    assert_nothing_left(port, output)


@pytest.mark.timeout(90)
def test_a_killed_worker_stops_the_cluster(worker, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    port = free_ports(1)[0]
    thread, result, out = launch_in_thread(
        command=[*worker, "hang", str(pids)], num_workers=2, port=port
    )
    files = wait_for_files(pids, 2)
    grandchildren = [int(path.read_text()) for path in files]
    victim = int(files[0].name)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    thread.join(timeout=35)
    assert not thread.is_alive(), "launch did not return after a worker was killed"
    assert time.monotonic() - killed_at < 30
    output = out.getvalue()
    assert result["code"] == 128 + signal.SIGKILL, output
    assert re.search(rf"\[launch\] worker \d \(pid {victim}\) was killed by SIGKILL", output)
    assert_nothing_left(port, output, extra_pids=[int(files[1].name), *grandchildren])


@pytest.mark.timeout(90)
def test_two_clusters_at_once_do_not_interfere(worker):
    ports = free_ports(2)
    runs = [launch_in_thread(command=[*worker, "sum"], num_workers=2, port=p) for p in ports]
    for thread, _, _ in runs:
        thread.join(timeout=80)
    for port, (thread, result, out) in zip(ports, runs):
        output = out.getvalue()
        assert not thread.is_alive()
        assert result["code"] == 0, output
        check_sums(output)
        assert f"scheduler on 127.0.0.1:{port}" in output
        assert_nothing_left(port, output)


@pytest.mark.timeout(60)
def test_lingering_scheduler_and_server_are_stopped_after_the_workers_succeed():
    # Workers that never create a kvstore leave the scheduler and server waiting for them.
    port = free_ports(1)[0]
    out = io.StringIO()
    started = time.monotonic()
    code = launch(
        [sys.executable, "-c", "print('no kvstore')"], 2, port=port, stream=out, dead_timeout=3
    )
    output = out.getvalue()
    assert code == 0, output
    assert time.monotonic() - started < 10
    assert "[worker 1] no kvstore" in output
    assert "every worker succeeded but scheduler, server 0 did not exit" in output
    assert_nothing_left(port, output)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_launcher_stops_everything(worker, tmp_path, signum):
    pids = tmp_path / "pids"
    pids.mkdir()
    port = free_ports(1)[0]
    program = (
        "import sys, gluon_ft\n"
        "from gluon_ft.cluster.launch import launch\n"
        f"sys.exit(launch({[*worker, 'hang', str(pids)]!r}, 2, port={port}))\n"
    )
    launcher = subprocess.Popen(
        [sys.executable, "-c", program],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        files = wait_for_files(pids, 2)
        launcher.send_signal(signum)
        output, _ = launcher.communicate(timeout=30)
    finally:
        launcher.kill()
    assert launcher.returncode == 130, output
    # The workers got SIGTERM and the launcher waited for them, not for its stop timeout.
    assert "[launch] interrupted: asking the workers to save a checkpoint and stop" in output
    assert "[launch] every worker has stopped" in output
    grandchildren = [int(path.read_text()) for path in files]
    assert_nothing_left(port, output, extra_pids=grandchildren)


@pytest.mark.timeout(30)
def test_a_taken_port_is_refused_before_anything_starts(tmp_path):
    marker = tmp_path / "started"
    out = io.StringIO()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        command = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
        with pytest.raises(UsageError, match=f"Port {port} on 127.0.0.1 is already in use"):
            launch(command, 1, port=port, stream=out)
    assert out.getvalue() == ""
    assert not marker.exists()
    assert cluster_processes(port) == []


@pytest.mark.timeout(30)
def test_a_worker_command_that_cannot_start_leaves_nothing_behind(tmp_path):
    port = free_ports(1)[0]
    with pytest.raises(UsageError, match="Cannot start the worker command"):
        launch([str(tmp_path / "no-such-program")], 1, port=port, stream=io.StringIO())
    assert cluster_processes(port) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"command": [], "num_workers": 1}, "launch needs a worker command as a list of words"),
        # A string would otherwise start its first letter, "p", as the worker command.
        ({"command": "python train.py", "num_workers": 1}, "as a list of words"),
        ({"command": ["python"], "num_workers": 0}, "number of workers must be a whole number"),
        (
            {"command": ["python"], "num_workers": 1, "num_servers": 0},
            "number of servers must be a whole number >= 1, not 0",
        ),
        # Unchecked, the socket layer would wrap it to port 4464 and start a cluster there.
        ({"command": ["python"], "num_workers": 1, "port": 70000}, "from 1 to 65535, not 70000"),
        (
            {"command": ["python"], "num_workers": 1, "dead_timeout": 0},
            "dead_timeout must be a positive number of seconds",
        ),
        (
            {"command": ["python"], "num_workers": 1, "host": "no-such-host.invalid"},
            "Cannot resolve the launch host 'no-such-host.invalid'",
        ),
        (
            {"command": ["python"], "num_workers": 1, "host": "203.0.113.77"},  # not ours
            "the launch host must be an address of this machine",
        ),
    ],
)
def test_bad_arguments_are_usage_errors(arguments, message):
    with pytest.raises(UsageError, match=re.escape(message)) as error:
        launch(stream=io.StringIO(), **arguments)
    assert error.value.exit_code == 2
