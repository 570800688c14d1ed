"""Start a ps-lite cluster for MXNet's distributed kvstore on this machine.

``mx.kv.create('dist_sync')`` needs a scheduler, one or more servers and the workers, each a
process told its part by ``DMLC_*`` environment variables. :func:`launch` starts all of them
on one host, relays their output line by line with a ``[role N]`` prefix, and fails fast: the
first process that dies takes the whole cluster down, because ps-lite itself never notices a
dead peer (its heartbeats are off by default) and the survivors would wait for it forever.

How ps-lite behaves here (mxnet 1.9.1, measured):

- Schedulers and servers need no script: ``import mxnet`` with ``DMLC_ROLE=server`` or
  ``scheduler`` runs the ps-lite loop inside the import (``kvstore_server.py``) and calls
  ``sys.exit()`` once every worker has shut its kvstore down.
- A worker's rank (``kv.rank``) is handed out by the scheduler as nodes register, so it need
  not match the launch order; the ``[worker N]`` prefixes are launch order. ps-lite reads no
  worker-id variable (it sets ``DMLC_RANK`` itself).
- Without ``DMLC_NODE_HOST`` servers and workers listen on the machine's LAN address. The
  servers unpickle the optimizer a worker sends them, so every process is pinned to ``host``
  (127.0.0.1 by default) to keep those ports off the network.
- A worker whose Python code fails *after* creating the kvstore does not exit at once: the
  kvstore's shutdown waits at a barrier for the other workers. Only a process that really
  ends (a crash, a kill, ``os._exit``, or a failure before ``kv.create``) triggers fail-fast.

Output, threads and signals
---------------------------
Every process (scheduler, servers, workers) starts in a session of its own, so stopping it
also stops anything it started. Their stdout and stderr go to the launcher's ``stream``, one
line at a time, prefixed ``[scheduler]``, ``[server 0]``, ``[worker 1]``; the launcher's own
messages are prefixed ``[launch]``.

Unless the user chose a thread count (``OMP_NUM_THREADS`` or ``MXNET_OMP_MAX_THREADS`` in
the environment or in ``env``), each worker gets ``cores // num_workers`` OpenMP threads (at
least 1) and the scheduler and servers 1 each.

The first SIGINT or SIGTERM goes on to the workers (SIGTERM), and the launcher waits up to
``stop_timeout`` for them to exit: ``gluon-ft train`` workers agree on a step, rank 0 saves a
checkpoint, and all exit with 130. A worker that exits with 130 by itself starts the same
wait. A second signal, or the end of the wait, stops everything at once.

SIGINT and SIGTERM are caught only when the launcher runs in the main thread. Processes that
leave their session (``setsid``, daemons) escape the cleanup, and so does the whole cluster if
the launcher itself is killed with SIGKILL.

Several machines
----------------
:func:`launch_node` (``gluon-ft launch --nnodes N --node-rank R --scheduler HOST:PORT``) runs
one host's part: node 0 the scheduler, every node its servers and workers. Node 0's launcher
listens at ``HOST:PORT`` (an address of node 0) until the other nodes have joined, then runs
ps-lite's scheduler on ``HOST``; every node's processes get the cluster's ``DMLC_*``
variables, ``DMLC_NODE_HOST`` being the address node 0 sees that node on. The launchers find
each other and watch each other through :mod:`gluon_ft.cluster.rendezvous`, so a failure or a lost
host anywhere stops every node: when a process on another node fails, its launcher goes quiet
for ``heartbeat_timeout`` seconds, or node 0's scheduler dies, every node stops its processes
and returns, naming what was lost. The same ``DMLC_*`` variables also let MXNet's
``mxnet.tools.launch`` (ssh, MPI) or a Kubeflow ``MXJob`` start the processes, without the
fail-fast. Either way each worker reads its rank from ``kv.rank``. Keep such a cluster on a
private network: its servers unpickle what workers send them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from gluon_ft import THREAD_SETTINGS
from gluon_ft.cluster import rendezvous
from gluon_ft.errors import Interrupted, UsageError
from gluon_ft.threads import THREAD_VARIABLES, usable_cores

# Importing mxnet is all a scheduler or server needs (see the module docstring).
PS_LOOP_COMMAND = (sys.executable, "-c", "import mxnet")
# How often the launcher looks at its signal count and its deadlines.
POLL_SECONDS = 0.1

# One lock for every launch in this process: concurrent launches share sys.stdout, and a
# line must never be split by another one.
_WRITE_LOCK = threading.Lock()


@dataclass(eq=False)
class _Node:
    """One cluster process: its role, label for the output, and the Popen that runs it."""

    role: str
    label: str
    popen: subprocess.Popen
    exited: threading.Event = field(default_factory=threading.Event)

    @property
    def pid(self) -> int:
        return self.popen.pid


def launch(
    command: Sequence[str],
    num_workers: int,
    num_servers: int = 1,
    port: int | None = None,
    host: str = "127.0.0.1",
    env: dict | None = None,
    dead_timeout: float = 30.0,
    stream: TextIO | None = None,
    stop_timeout: float = 60.0,
) -> int:
    """Run ``command`` as each worker of a local ps-lite cluster and wait for the cluster.

    Output, threads and signals work as the module docstring describes.

    Parameters
    ----------
    command : sequence of str
        The worker command, run without a shell, e.g. ``["python", "train.py"]``. It should
        call ``mx.kv.create('dist_sync')`` (or ``dist_async``).
    num_workers : int
        Number of worker processes, at least 1.
    num_servers : int, default 1
        Number of server processes, at least 1.
    port : int, optional
        The scheduler's port on ``host``; a free one when omitted.
    host : str, default "127.0.0.1"
        The address every process listens on and connects to; must belong to this machine.
    env : dict, optional
        Extra environment variables for every process (e.g. ``PS_VERBOSE``,
        ``OMP_NUM_THREADS``). The cluster variables (``DMLC_ROLE``, ``DMLC_PS_ROOT_URI``,
        ``DMLC_PS_ROOT_PORT``, ``DMLC_NUM_SERVER``, ``DMLC_NUM_WORKER``, ``DMLC_NODE_HOST``)
        are always the launcher's.
    dead_timeout : float, default 30
        Once a process has died, the launcher returns within this many seconds, however the
        others react to SIGTERM. It also bounds how long the scheduler and servers may
        linger after every worker has succeeded.
    stream : text stream, optional
        Where the output goes; ``sys.stdout`` (looked up at call time) by default.
    stop_timeout : float, default 60
        After SIGINT or SIGTERM, how long the workers may take to stop by themselves
        (``gluon-ft train`` saves a checkpoint first).

    Returns
    -------
    int
        0 when every process succeeded (scheduler or servers that had to be stopped after the
        workers succeeded do not count); else the status of the first process that failed:
        its exit code, or 128 + N when signal N killed it; 130 after SIGINT or SIGTERM, or
        once a worker exits with 130 (interrupted).

    Raises
    ------
    UsageError
        Bad arguments, a port already in use, or a command that cannot be started; nothing
        is left running.
    """
    _check_arguments(command, num_workers, num_servers, dead_timeout, stop_timeout)
    plan = _plan_one_host(list(command), num_workers, num_servers, port, host, env)
    return _run_one_host(plan, stream, dead_timeout, stop_timeout)


def _plan_one_host(
    command: list[str],
    num_workers: int,
    num_servers: int,
    port: int | None,
    host: str,
    env: dict | None,
) -> list[tuple[str, str, list[str], dict]]:
    """The plan of :func:`launch`: the whole cluster on ``host``, the scheduler on ``port``."""
    port = free_port(host) if port is None else _check_port_free(host, port)
    layout = _Layout(host, port, num_workers, num_servers, host)
    return _plan_node(command, layout, num_workers, num_servers, True, env)


def _run_one_host(
    plan: list, stream: TextIO | None, dead_timeout: float, stop_timeout: float
) -> int:
    """Run the processes of :func:`launch`'s ``plan`` while SIGINT and SIGTERM are counted."""
    out = sys.stdout if stream is None else stream
    signals = _Signals()
    with _stop_on_signals(signals):
        return _run_node(plan, out, signals, _Waits.of(dead_timeout, stop_timeout))


def launch_node(
    command: Sequence[str],
    nnodes: int,
    node_rank: int,
    scheduler: str,
    num_workers: int = 1,
    num_servers: int = 1,
    env: dict | None = None,
    dead_timeout: float = 30.0,
    stream: TextIO | None = None,
    stop_timeout: float = 60.0,
    join_timeout: float = 300.0,
    heartbeat_timeout: float = 10.0,
) -> int:
    """Run this host's part of a ``nnodes``-host ps-lite cluster; one call on every host.

    Output, threads, signals, and how the nodes meet and stop together: see the module docstring.

    Parameters
    ----------
    command, num_workers, num_servers, env, dead_timeout, stream, stop_timeout
        As for :func:`launch`; the counts are this node's (``num_servers`` may be 0 where
        another node runs a server).
    nnodes : int
        Number of hosts, at least 1.
    node_rank : int
        This host's place, 0 to ``nnodes - 1``; 0 runs the scheduler.
    scheduler : str
        ``HOST:PORT`` where node 0's launcher listens.
    join_timeout : float, default 300
        How long node 0 waits for the others to join, and they for node 0.
    heartbeat_timeout : float, default 10
        Silence after which another node's launcher counts as lost.

    Returns
    -------
    int
        As :func:`launch`; 1 when another node was lost, or that node's status when it
        reported a failure.

    Raises
    ------
    UsageError
        Bad arguments; an address node 0 cannot listen on; node 0 unreachable, or the nodes
        not all joined, within ``join_timeout``; a duplicate or out-of-range ``node_rank``, or
        another ``nnodes`` than node 0's; no server on any node. Nothing is left running.
    Interrupted
        SIGINT or SIGTERM before the processes started.
    """
    _check_node_arguments(command, num_workers, num_servers, dead_timeout, stop_timeout)
    spec = _node_spec(nnodes, node_rank, num_workers, num_servers)
    address = rendezvous.parse_address(scheduler)
    out = sys.stdout if stream is None else stream
    signals = _Signals()
    with _stop_on_signals(signals):
        links, layout = _meet(spec, address, join_timeout, heartbeat_timeout, signals, out)
        plan = _plan_node(list(command), layout, num_workers, num_servers, node_rank == 0, env)
        waits = _Waits.of(dead_timeout, stop_timeout)
        return _run_node(plan, out, signals, waits, _Peers(links), f"node {node_rank}")


def _check_node_arguments(
    command: Sequence[str],
    num_workers: int,
    num_servers: int,
    dead_timeout: float,
    stop_timeout: float,
) -> None:
    """:func:`_check_arguments` for one node of several, which may run no server."""
    # A node may run no server (-s 0) when others do; node 0 checks that one does.
    _check_arguments(command, num_workers, max(num_servers, 1), dead_timeout, stop_timeout)
    if not isinstance(num_servers, int) or num_servers < 0:
        raise UsageError(f"The number of servers must be a whole number >= 0, not {num_servers!r}.")


def _node_spec(
    nnodes: int, node_rank: int, num_workers: int, num_servers: int
) -> rendezvous.NodeSpec:
    """Check this node's place among ``nnodes``; return it as a rendezvous.NodeSpec."""
    for name, value in (("nnodes", nnodes), ("node_rank", node_rank)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageError(f"--{name.replace('_', '-')} must be a whole number, not {value!r}.")
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise UsageError(
            f"--node-rank must be from 0 to --nnodes - 1 ({nnodes - 1}), not {node_rank}."
        )
    return rendezvous.NodeSpec(nnodes, node_rank, num_workers, num_servers)


def _meet(spec, address, join_timeout, heartbeat_timeout, signals, out):
    """The rendezvous of :func:`launch_node`: ``(links to the other nodes, _Layout)``."""

    def say(message: str) -> None:
        _write_line(out, f"[launch] {message}")

    stopped = lambda: signals.count > 0  # noqa: E731
    if spec.node_rank == 0:
        pick = lambda: free_port(address[0])  # noqa: E731
        links, cluster = rendezvous.host(
            address, spec, pick, join_timeout, heartbeat_timeout, stopped, say
        )
    else:
        link, cluster = rendezvous.join(
            address, spec, join_timeout, heartbeat_timeout, stopped, say
        )
        links = [link]
    layout = _Layout(
        address[0], cluster.ps_port, cluster.num_workers, cluster.num_servers, cluster.node_host
    )
    return links, layout


class _Peers:
    """The links to the other nodes' launchers (none for a one-host :func:`launch`)."""

    def __init__(self, links: list | None = None):
        self.links = links or []

    def listen(self, events: queue.Queue) -> None:
        for link in self.links:
            link.start(events.put)

    def tell(self, message: dict) -> None:
        for link in self.links:
            link.send(message)

    def close(self, outcome: _Outcome) -> None:
        """Tell the others how this node ended, and hang up."""
        if outcome.code == 0:
            final = {"event": "done"}
        elif outcome.code == Interrupted.exit_code:
            final = {"event": "interrupted", "what": outcome.why}
        else:
            final = {"event": "failed", "what": outcome.why, "code": outcome.code}
        for link in self.links:
            link.close({**final, "final": True})


def _run_node(
    plan: list, out: TextIO, signals: _Signals, waits: _Waits, peers=None, name: str = ""
) -> int:
    """Start the processes of ``plan``, supervise them, stop what is left; return the status.

    Every process starts in a session of its own, so stopping it also stops anything it
    started.
    """
    peers = peers or _Peers()

    def say(message: str) -> None:
        _write_line(out, f"[launch] {message}")

    exits: queue.Queue = queue.Queue()
    nodes: list[_Node] = []
    readers: list[threading.Thread] = []
    # What the other nodes hear if starting fails here (a command that cannot start).
    outcome = _Outcome(1, f"{name or 'a node'} could not start its processes")
    try:
        for role, label, argv, node_env in plan:
            if signals.count:
                break
            nodes.append(_start(role, label, argv, node_env, exits, out, readers))
        where = plan[0][3]
        say(
            f"{name + ': ' if name else ''}scheduler on {where['DMLC_PS_ROOT_URI']}:"
            f"{where['DMLC_PS_ROOT_PORT']}; started "
            + ", ".join(f"{n.label} (pid {n.pid})" for n in nodes)
        )
        peers.listen(exits)
        outcome = _supervise(nodes, exits, signals, waits, say, peers, name)
        return outcome.code
    finally:
        peers.close(outcome)
        if _stop(nodes, waits.kill_after):
            say("stopped the remaining processes")
        for reader in readers:
            # The pipes close once the process groups are gone; a process that escaped
            # its group (its own setsid) could hold one open, so never wait forever.
            reader.join(timeout=1.0)


def _check_arguments(
    command: Sequence[str],
    num_workers: int,
    num_servers: int,
    dead_timeout: float,
    stop_timeout: float,
) -> None:
    if isinstance(command, str) or not command or not command[0]:
        raise UsageError(
            "launch needs a worker command as a list of words, e.g. "
            "`gluon-ft launch -n 2 -- python train.py`."
        )
    for name, value in (("workers", num_workers), ("servers", num_servers)):
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"The number of {name} must be a whole number >= 1, not {value!r}.")
    for name, value in (("dead_timeout", dead_timeout), ("stop_timeout", stop_timeout)):
        if not value > 0:
            raise UsageError(f"{name} must be a positive number of seconds, not {value}.")


def free_port(host: str) -> int:
    """Return a port on ``host`` that nothing listens on now (the OS picks it)."""
    with _bound_socket(host, 0) as sock:
        return sock.getsockname()[1]


def _check_port_free(host: str, port: int) -> int:
    """Return ``port`` if the scheduler could listen on it, else raise UsageError."""
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"The port must be a number from 1 to 65535, not {port!r}.")
    with _bound_socket(host, port):
        return port


@contextlib.contextmanager
def _bound_socket(host: str, port: int) -> Iterator[socket.socket]:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UsageError(f"Cannot resolve the launch host {host!r}: {err.strerror}.") from None
    with socket.socket(family, kind, proto) as sock:
        # The scheduler's ZeroMQ socket sets SO_REUSEADDR too, so a port whose old
        # connections linger in TIME_WAIT is usable and must not be reported as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            if port and err.errno == errno.EADDRINUSE:
                raise UsageError(
                    f"Port {port} on {host} is already in use, so the scheduler cannot "
                    "listen on it. Choose another with --port, or leave --port out to use "
                    "a free one."
                ) from None
            raise UsageError(
                f"Cannot listen on {host}:{port} ({err.strerror}); the launch host must be "
                "an address of this machine, such as 127.0.0.1."
            ) from None
        yield sock


@dataclass(frozen=True)
class _Layout:
    """Where the cluster's scheduler is, how big the cluster is, and this node's address."""

    root_host: str
    root_port: int
    num_workers: int  # over every node
    num_servers: int
    node_host: str


def _plan_node(
    command: list[str],
    layout: _Layout,
    num_workers: int,
    num_servers: int,
    with_scheduler: bool,
    extra_env: dict | None,
) -> list[tuple[str, str, list[str], dict]]:
    """Return ``(role, label, argv, environment)`` for this node's scheduler (if
    ``with_scheduler``), its ``num_servers`` servers and ``num_workers`` workers."""
    # Inherited DMLC_* variables describe some other cluster (say, the pod this runs in).
    base = {k: v for k, v in os.environ.items() if not k.startswith("DMLC_")}
    base.update({str(k): str(v) for k, v in (extra_env or {}).items()})
    base.update(
        DMLC_PS_ROOT_URI=layout.root_host,
        DMLC_PS_ROOT_PORT=str(layout.root_port),
        DMLC_NUM_SERVER=str(layout.num_servers),
        DMLC_NUM_WORKER=str(layout.num_workers),
        DMLC_NODE_HOST=layout.node_host,
    )
    # Without it Python workers fill an 8 KB pipe buffer before anything shows up.
    base.setdefault("PYTHONUNBUFFERED", "1")
    user_threads = THREAD_SETTINGS["source"] == "user" or any(
        name in (extra_env or {}) for name in THREAD_VARIABLES
    )

    def node_env(role: str, threads: int) -> dict:
        environment = dict(base, DMLC_ROLE=role)
        if not user_threads:
            # N processes each sized for every core would oversubscribe the machine; the
            # scheduler and servers only route and sum, so one thread is enough for them.
            environment["OMP_NUM_THREADS"] = str(threads)
        return environment

    worker_threads = max(1, usable_cores() // num_workers)
    plan = []
    if with_scheduler:
        plan.append(("scheduler", "scheduler", list(PS_LOOP_COMMAND), node_env("scheduler", 1)))
    plan += [
        ("server", f"server {i}", list(PS_LOOP_COMMAND), node_env("server", 1))
        for i in range(num_servers)
    ]
    plan += [
        ("worker", f"worker {i}", command, node_env("worker", worker_threads))
        for i in range(num_workers)
    ]
    return plan


def _start(
    role: str,
    label: str,
    argv: list[str],
    environment: dict,
    exits: queue.Queue,
    out: TextIO,
    readers: list[threading.Thread],
) -> _Node:
    """Start one process in a new session, with threads relaying its output and its exit.

    A thread per exit, rather than polling, reports failures in the order they happen.
    """
    try:
        popen = subprocess.Popen(
            argv,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            encoding="utf-8",
            errors="replace",
            # Its own session and process group: killpg reaches its children too, and a
            # Ctrl-C in the terminal reaches only the launcher, which then stops everyone.
            start_new_session=True,
        )
    except OSError as err:
        raise UsageError(f"Cannot start the {role} command {argv[0]!r}: {err.strerror}.") from None
    node = _Node(role, label, popen)

    def wait() -> None:
        popen.wait()
        node.exited.set()
        exits.put(node)

    reader = threading.Thread(target=_relay, args=(popen.stdout, label, out), daemon=True)
    reader.start()
    readers.append(reader)
    threading.Thread(target=wait, daemon=True).start()
    return node


def _relay(pipe: TextIO, label: str, out: TextIO) -> None:
    # Text mode uses universal newlines, so tqdm's carriage-return updates show up as lines.
    with pipe:
        for line in pipe:
            text = line.rstrip("\n")
            _write_line(out, f"[{label}] {text}")


def _write_line(out: TextIO, line: str) -> None:
    with _WRITE_LOCK:
        try:
            out.write(line + "\n")
            out.flush()
        except (OSError, ValueError):
            # A closed or broken output must not stop the draining of the pipes, or the
            # processes would block on a full pipe.
            pass


@dataclass(frozen=True)
class _Waits:
    """How long the launcher waits: for the scheduler and servers after every worker has
    succeeded (``linger``), for the workers to stop after an interruption (``stop``), and
    between SIGTERM and SIGKILL (``kill_after``)."""

    linger: float
    stop: float
    kill_after: float

    @classmethod
    def of(cls, dead_timeout: float, stop_timeout: float) -> _Waits:
        # Two SIGTERM-to-SIGKILL waits plus the linger fit in dead_timeout.
        kill_after = min(5.0, dead_timeout / 3)
        return cls(dead_timeout - 2 * kill_after, stop_timeout, kill_after)


@dataclass(frozen=True)
class _Outcome:
    """How a node ended: its exit status and, for the other nodes, why."""

    code: int
    why: str


class _Signals:
    """Counts SIGINT and SIGTERM: the first asks the workers to stop, a second insists."""

    def __init__(self):
        self.count = 0

    def __call__(self, *_) -> None:
        self.count += 1


def _supervise(
    nodes: list[_Node],
    exits: queue.Queue,
    signals: _Signals,
    waits: _Waits,
    say: Callable[[str], None],
    peers: _Peers,
    name: str = "",
) -> _Outcome:
    """Wait for the cluster; return its outcome as soon as it is decided.

    ``exits`` brings the processes that ended and what the other nodes report
    (:class:`gluon_ft.cluster.rendezvous.PeerEvent`).
    """
    here = f"{name}: " if name else ""
    running = set(nodes)
    workers = {node for node in nodes if node.role == "worker"}
    workers_done_at = None
    stopping = _Stopping(workers, waits.stop, say, peers)
    while running:
        if signals.count and not stopping.since:
            stopping.begin(f"{here}interrupted", forward=True)
        if stopping.since and (signals.count > 1 or stopping.overdue()):
            say("stopping the cluster now" if signals.count > 1 else stopping.overdue_message())
            return _Outcome(Interrupted.exit_code, f"{here}interrupted")
        try:
            item = exits.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if workers_done_at is not None and time.monotonic() - workers_done_at > waits.linger:
                names = ", ".join(n.label for n in nodes if n in running)
                say(
                    f"every worker succeeded but {names} did not exit within "
                    f"{waits.linger:.1f} s; stopping them"
                )
                return _Outcome(0, "done")
            continue
        if isinstance(item, rendezvous.PeerEvent):
            outcome = _peer_event(item, stopping, peers, len(running), say)
            if outcome is not None:
                return outcome
            continue
        running.discard(item)
        code = item.popen.returncode
        what = f"{item.label} (pid {item.pid}) {_describe(code)}"
        if item.role == "worker" and (stopping.since or code == Interrupted.exit_code):
            if not stopping.since:
                stopping.begin(f"{here}{what}", forward=False)
            if not workers & running:
                say("every worker has stopped")
                return _Outcome(Interrupted.exit_code, stopping.why)
            continue
        if code != 0:
            say(f"{here}{what}; stopping {len(running)} other(s)")
            return _Outcome(128 - code if code < 0 else code, what)
        if item.role == "worker" and not workers & running:
            workers_done_at = time.monotonic()
    return _Outcome(0, "done")


def _peer_event(event, stopping: _Stopping, peers: _Peers, running: int, say) -> _Outcome | None:
    """What another node's report means here: None to go on, else this node's outcome."""
    if event.kind == "done":
        return None
    if event.kind == "interrupted":
        if not stopping.since:
            stopping.begin(event.what, forward=True)
        return None
    if stopping.since:
        return None  # the workers are stopping already; the stop wait bounds it
    say(f"{event.what}; stopping {running} process(es) here")
    return _Outcome(event.code if event.kind == "failed" else 1, event.what)


class _Stopping:
    """The wait for the workers to stop by themselves after an interruption.

    ``gluon-ft train`` workers stop at a step they agree on through the kvstore, and rank 0
    saves a checkpoint meanwhile: the scheduler and servers must live until they are done.
    """

    def __init__(self, workers: set[_Node], seconds: float, say: Callable[[str], None], peers):
        self.workers = workers
        self.seconds = seconds
        self.say = say
        self.peers = peers
        self.since: float | None = None
        self.why = ""

    def begin(self, why: str, forward: bool) -> None:
        """Start the wait; ``forward`` the stop to the workers (SIGTERM) and other nodes."""
        self.since = time.monotonic()
        self.why = why
        self.peers.tell({"event": "interrupted", "what": why})
        if forward:
            for node in self.workers:
                if not node.exited.is_set():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(node.pid, signal.SIGTERM)
        self.say(
            f"{why}: {'asking' if forward else 'waiting for'} the workers to save a checkpoint "
            f"and stop (at most {self.seconds:g} s; interrupt again to stop at once)"
        )

    def overdue(self) -> bool:
        return time.monotonic() - self.since > self.seconds

    def overdue_message(self) -> str:
        return f"the workers did not stop within {self.seconds:g} s; stopping the cluster"


def _describe(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was killed by {name}"


def _stop(nodes: list[_Node], kill_after: float) -> bool:
    """SIGTERM every process group, SIGKILL what is left after ``kill_after`` seconds.

    Groups whose leader has already exited are signalled too: anything the leader started
    is still in them. Returns whether anything was still running.
    """
    alive = _running(nodes)
    for node in alive:
        _signal_group(node, signal.SIGTERM)
    if not _wait_gone(alive, kill_after):
        for node in alive:
            _signal_group(node, signal.SIGKILL)
        _wait_gone(alive, kill_after)
    return bool(alive)


def _wait_gone(nodes: list[_Node], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _running(nodes):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS / 2)
    return True


def _running(nodes: list[_Node]) -> list[_Node]:
    """The nodes whose process, or anything left in their process group, still runs."""
    groups = _live_process_groups()
    return [
        node
        for node in nodes
        if not node.exited.is_set()
        or (node.pid in groups if groups is not None else _group_signallable(node.pid))
    ]


def _live_process_groups() -> set[int] | None:
    """Process group ids with a live (not zombie) member; None where there is no /proc.

    killpg(pgid, 0) also succeeds for zombies, and orphaned zombies stay forever in a
    container whose init does not reap them, so the launcher would wait for nothing.
    """
    if not os.path.isdir("/proc"):
        return None
    groups = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
                state, _, pgrp = stat.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if state != "Z":
            groups.add(int(pgrp))
    return groups


def _group_signallable(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal_group(node: _Node, signum: int) -> None:
    # The group id is the leader's pid (start_new_session). The kernel does not reuse a pid
    # while a group of that id has members; once the group is empty we stop signalling it
    # (see _running), which leaves only a pid wrap-around within seconds as a risk.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.pid, signum)


@contextlib.contextmanager
def _stop_on_signals(signals: _Signals) -> Iterator[None]:
    """Count SIGINT and SIGTERM in ``signals`` while the cluster runs.

    Python delivers signals to the main thread only, so a launch from another thread leaves
    signal handling to its caller.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        signum: signal.signal(signum, signals) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
