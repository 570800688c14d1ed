"""How the launchers of a multi-host cluster find each other and notice a lost peer.

``gluon-ft launch --nnodes N --node-rank R --scheduler HOST:PORT`` runs on every host. The
launcher of node 0 listens on ``HOST:PORT``; the others connect to it, say who they are
(:func:`join`), and wait until every node has joined (:func:`host`). Node 0 then hands out
the port of ps-lite's scheduler, which it runs on ``HOST``, and the cluster's sizes, and each
node starts its own servers and workers.

From then on every joined node keeps one connection to node 0 (a star), on which both sides
send a line of JSON every second (``alive``) and say how they end: ``failed`` (with what
failed and its exit status), ``interrupted`` (the workers are saving a checkpoint and
stopping), or ``done``. A connection silent for ``heartbeat_timeout`` seconds, or closed
without ``done``, is a lost peer. ps-lite cannot do this job: a dead peer leaves the others
waiting forever, even with ``PS_HEARTBEAT_INTERVAL=1 PS_HEARTBEAT_TIMEOUT=3`` (measured:
40 s after a worker was killed, the scheduler, server and other worker still waited).
Each event becomes a :class:`PeerEvent` on the launcher's queue; node 0 passes on what it
learns, since it is the only node that talks to every other.

Nothing here is authenticated: like ps-lite itself, it belongs on a private network.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gluon_ft.errors import Interrupted, UsageError

PROTOCOL = "gluon-ft launch/1"
HEARTBEAT_SECONDS = 1.0
# How long to wait for one reply line during the join, at most.
_POLL = 0.2


@dataclass(frozen=True)
class NodeSpec:
    """What a node's launcher runs: its rank among ``nnodes`` and its process counts."""

    nnodes: int
    node_rank: int
    workers: int
    servers: int

    def hello(self) -> dict:
        return {
            "hello": PROTOCOL,
            "nnodes": self.nnodes,
            "node_rank": self.node_rank,
            "workers": self.workers,
            "servers": self.servers,
        }


@dataclass(frozen=True)
class PeerEvent:
    """Something another node's launcher said, or its silence: ``kind`` is ``interrupted``,
    ``failed``, ``lost`` or ``done``; ``what`` names the node and what happened."""

    kind: str
    what: str
    code: int = 1


@dataclass(frozen=True)
class Cluster:
    """What node 0 hands out once every node has joined."""

    ps_port: int
    num_workers: int
    num_servers: int
    node_host: str  # this node's address, as the others reach it


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as ``(host, port)``; UsageError if it is not one."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(
            f"--scheduler {text!r}: give node 0's address as HOST:PORT, e.g. 10.0.0.1:29400."
        )
    return host, int(port)


class Link:
    """One connection to another node's launcher: JSON lines both ways, and a heartbeat."""

    def __init__(self, sock: socket.socket, label: str, heartbeat_timeout: float):
        self.sock = sock
        self.label = label
        self.heartbeat_timeout = heartbeat_timeout
        self.finished = False  # it said "done", or we closed it: its silence means nothing
        self.rank: int | None = None  # a joined node's, as node 0 knows it
        self.counts: dict = {}  # a joined node's workers and servers
        self._send_lock = threading.Lock()
        self._closed = threading.Event()
        self._buffer = b""

    def send(self, message: dict) -> None:
        data = (json.dumps(message) + "\n").encode()
        with self._send_lock, contextlib.suppress(OSError):
            self.sock.sendall(data)

    def read(self, timeout: float) -> dict | None:
        """The next message within ``timeout`` seconds; None if the peer closed the link.

        Raises TimeoutError when nothing came, ValueError for a line that is not ours.
        """
        self.sock.settimeout(timeout)
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise
            except OSError:
                return None
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line.decode("utf-8", "replace"))
        if not isinstance(message, dict):
            raise ValueError("not a JSON object")
        return message

    def start(self, report: Callable[[PeerEvent], None]) -> None:
        """Send heartbeats, and turn what comes back into :class:`PeerEvent` reports."""
        threading.Thread(target=self._beat, daemon=True).start()
        threading.Thread(target=self._listen, args=(report,), daemon=True).start()

    def close(self, final: dict | None = None) -> None:
        if final is not None:
            self.send(final)
        self.finished = True
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _beat(self) -> None:
        while not self._closed.wait(HEARTBEAT_SECONDS):
            self.send({"event": "alive"})

    def _listen(self, report: Callable[[PeerEvent], None]) -> None:
        while not self._closed.is_set():
            try:
                message = self.read(self.heartbeat_timeout)
            except TimeoutError:
                if not self.finished:
                    lost = f"no heartbeat for {self.heartbeat_timeout:g} s"
                    report(PeerEvent("lost", f"lost {self.label}: {lost}"))
                return
            except (ValueError, OSError):
                message = None
            if message is None:
                if not self.finished and not self._closed.is_set():
                    report(PeerEvent("lost", f"lost {self.label}: its launcher went away"))
                return
            event = message.get("event")
            if event == "done" or message.get("final"):
                self.finished = True  # it hangs up next: that is no loss
            if event in ("failed", "interrupted", "done"):
                what = str(message.get("what", event))
                report(PeerEvent(event, f"{self.label}: {what}", int(message.get("code", 1))))


def host(
    address: tuple[str, int],
    spec: NodeSpec,
    pick_port: Callable[[], int],
    join_timeout: float,
    heartbeat_timeout: float,
    stopped: Callable[[], bool],
    say: Callable[[str], None],
) -> tuple[list[Link], Cluster]:
    """Node 0: wait until the other ``nnodes - 1`` nodes have joined at ``address``.

    ``pick_port()`` chooses the port of ps-lite's scheduler, once ``address`` is bound.

    Raises
    ------
    UsageError
        ``address`` is not one this machine can listen on, or not every node joined within
        ``join_timeout`` seconds.
    Interrupted
        ``stopped()`` became true while waiting.
    """
    listener = _listen_on(address)
    ps_port = pick_port()
    joined: dict[int, Link] = {}
    deadline = time.monotonic() + join_timeout
    say(f"node 0 of {spec.nnodes}: waiting for {spec.nnodes - 1} node(s) at {_show(address)}")
    with listener:
        while len(joined) < spec.nnodes - 1:
            if stopped():
                raise Interrupted("Interrupted while the nodes were joining; nothing started.")
            if time.monotonic() > deadline:
                for link in joined.values():
                    link.close({"error": "not every node joined in time"})
                missing = sorted(set(range(1, spec.nnodes)) - set(joined))
                raise UsageError(
                    f"Node(s) {', '.join(map(str, missing))} did not join {_show(address)} "
                    f"within {join_timeout:g} s. Start `gluon-ft launch --nnodes {spec.nnodes} "
                    f"--node-rank R --scheduler {_show(address)} ...` on each of them, and "
                    "check that they can reach this address."
                )
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            link = _greet(conn, peer, spec, joined, heartbeat_timeout, say)
            if link is not None:
                joined[link.rank] = link
    # The cluster's sizes: each node brings its own counts.
    total = {
        kind: getattr(spec, kind) + sum(link.counts[kind] for link in joined.values())
        for kind in ("workers", "servers")
    }
    if not total["servers"]:
        for link in joined.values():
            link.close({"error": "no node runs a server (-s)"})
        raise UsageError("No node runs a server: give at least one node -s 1 or more.")
    for link in joined.values():
        link.send({"start": PROTOCOL, "ps_port": ps_port, **total})
    cluster = Cluster(ps_port, total["workers"], total["servers"], address[0])
    return list(joined.values()), cluster


def _listen_on(address: tuple[str, int]) -> socket.socket:
    try:
        family, kind, proto, _, where = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UsageError(
            f"--scheduler {_show(address)}: cannot resolve it ({err.strerror})."
        ) from None
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(where)
    except OSError as err:
        listener.close()
        raise UsageError(
            f"--scheduler {_show(address)}: node 0 cannot listen there ({err.strerror}). On "
            "node 0 it must be an address of this machine and a free port."
        ) from None
    listener.listen()
    listener.settimeout(_POLL)
    return listener


def _greet(conn, peer, spec: NodeSpec, joined: dict, heartbeat_timeout: float, say) -> Link | None:
    """Read a joining node's hello; keep its link, or tell it why not and close it."""
    link = Link(conn, f"node ? ({peer[0]})", heartbeat_timeout)
    try:
        hello = link.read(10.0)
    except (TimeoutError, ValueError, UnicodeDecodeError):
        hello = None
    if not hello or hello.get("hello") != PROTOCOL:
        link.close()  # not one of ours (a port scan, another program): ignore it
        return None
    rank = hello.get("node_rank")
    problem = None
    counts = {kind: hello.get(kind) for kind in ("workers", "servers")}
    if hello.get("nnodes") != spec.nnodes:
        problem = f"it says --nnodes {hello.get('nnodes')}, node 0 says {spec.nnodes}"
    elif not all(isinstance(n, int) and n >= 0 for n in counts.values()):
        problem = f"its process counts {counts} are not whole numbers"
    elif not isinstance(rank, int) or not 1 <= rank < spec.nnodes:
        problem = f"--node-rank {rank} is not one of 1..{spec.nnodes - 1}"
    elif rank in joined:
        problem = f"--node-rank {rank} has already joined from {joined[rank].label}"
    if problem:
        say(f"refused a node from {peer[0]}: {problem}")
        link.close({"error": problem})
        return None
    link.label = f"node {rank} ({peer[0]})"
    link.rank, link.counts = rank, counts
    say(f"{link.label} joined")
    return link


def join(
    address: tuple[str, int],
    spec: NodeSpec,
    join_timeout: float,
    heartbeat_timeout: float,
    stopped: Callable[[], bool],
    say: Callable[[str], None],
) -> tuple[Link, Cluster]:
    """Node R > 0: join node 0 at ``address`` and wait for the go.

    Raises
    ------
    UsageError
        Node 0 cannot be reached within ``join_timeout`` seconds, refuses this node (a
        duplicate or wrong ``--node-rank``, other counts), or is not a gluon-ft launcher.
    Interrupted
        ``stopped()`` became true while waiting.
    """
    deadline = time.monotonic() + join_timeout
    where = _show(address)
    say(f"node {spec.node_rank} of {spec.nnodes}: joining node 0 at {where}")
    sock = _connect(address, deadline, stopped)
    link = Link(sock, f"node 0 ({where})", heartbeat_timeout)
    link.send(spec.hello())
    while True:
        if stopped():
            link.close()
            raise Interrupted("Interrupted while waiting for the other nodes; nothing started.")
        remaining = deadline - time.monotonic()
        try:
            reply = link.read(min(_POLL, max(remaining, 0.01)))
        except TimeoutError:
            if remaining > 0:
                continue
            link.close()
            raise UsageError(
                f"Node 0 at {where} did not start the cluster within {join_timeout:g} s: not "
                "every node joined, or it is not a `gluon-ft launch --node-rank 0`."
            ) from None
        except (ValueError, UnicodeDecodeError):
            reply = {"error": "it answered with something that is not gluon-ft launch's"}
        if reply is None or "start" not in reply:
            link.close()
            why = (reply or {}).get("error", "it closed the connection")
            raise UsageError(f"--scheduler {where}: node 0 refused this node: {why}.")
        node_host = sock.getsockname()[0]  # the address node 0 sees this node on
        cluster = Cluster(int(reply["ps_port"]), reply["workers"], reply["servers"], node_host)
        return link, cluster


def _connect(address: tuple[str, int], deadline: float, stopped) -> socket.socket:
    """Connect to node 0, retrying until ``deadline``: it may start after this node."""
    try:
        socket.getaddrinfo(*address, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UsageError(
            f"--scheduler {_show(address)}: cannot resolve it ({err.strerror})."
        ) from None
    last = "no attempt"
    while time.monotonic() < deadline:
        if stopped():
            raise Interrupted("Interrupted while joining node 0; nothing started.")
        try:
            return socket.create_connection(address, timeout=min(5.0, deadline - time.monotonic()))
        except OSError as err:
            last = err.strerror or type(err).__name__
            time.sleep(0.5)
    raise UsageError(
        f"--scheduler {_show(address)}: could not reach node 0 there ({last}). Check the "
        "address, that node 0's `gluon-ft launch` runs, and that this host can reach it."
    )


def _show(address: tuple[str, int]) -> str:
    host_name, port = address
    return f"[{host_name}]:{port}" if ":" in host_name else f"{host_name}:{port}"
