"""``gluon-ft bench``'s serve figures: a real ``gluon-ft serve`` process under concurrent clients.

The bench starts ``python -m gluon_ft serve RUN`` on 127.0.0.1 at a free port of its own, waits
for ``/health``, then runs one phase per client count (:attr:`ServeLoad.clients`: 1, 8 and
64). In a phase every client posts real JPEG files, one request after the other, as
``curl -F image=@photo.jpg`` would; they start together, so the first request of each client
of the 64-client phase is a burst of 64. Per phase: requests per second, p50 and p99 latency
(from the connection to the last byte of the answer), and the answers other than 200.

The one-client phase sends every image at least once: its answers are the reference, and every
answer of the other phases must name the same classes in the same order, with probabilities
within :data:`TOLERANCE` (batching must not change what a request is told).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gluon_ft.cluster.launch import free_port

TOLERANCE = 1e-5  # the bar for a batched answer against the answer alone
START_TIMEOUT_S = 300.0  # loading a run and warming up every batch shape, on a busy machine
REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ServeLoad:
    """How many requests each phase sends."""

    clients: tuple = (1, 8, 64)
    images: int = 64  # distinct JPEGs; the one-client phase sends each one at least once
    single_requests: int = 128  # the one-client phase
    requests_per_client: int = 8  # each client of the other phases


QUICK_LOAD = ServeLoad(images=16, single_requests=16, requests_per_client=1)


def multipart(data: bytes, filename: str) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with ``data`` in the field ``image``; and its type."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"'
        "\r\nContent-Type: image/jpeg\r\n\r\n"
    )
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post_image(port: int, data: bytes, filename: str) -> tuple[int, dict, float]:
    """``POST /predict`` one image; ``(status, JSON answer, seconds)``."""
    body, content_type = multipart(data, filename)
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request("POST", "/predict", body, {"Content-Type": content_type})
        response = connection.getresponse()
        answer = response.read()
    finally:
        connection.close()
    seconds = time.perf_counter() - started
    try:
        parsed = json.loads(answer)
    except ValueError:
        parsed = {"error": answer[:200].decode("latin-1")}
    return response.status, parsed, seconds


def get_health(port: int) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        if response.status != 200:
            raise ConnectionError(f"/health answered {response.status}")
        return json.loads(response.read())
    finally:
        connection.close()


@contextlib.contextmanager
def running_server(run_dir: Path, port: int, log_file: Path, dtype: str = "float32"):
    """``gluon-ft serve RUN`` in a child process until the block ends; yields its /health."""
    command = [sys.executable, "-m", "gluon_ft", "serve", str(run_dir), "--port", str(port)]
    command += ["--dtype", dtype]
    with open(log_file, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield _wait_for_health(server, port, log_file)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_for_health(server: subprocess.Popen, port: int, log_file: Path) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log_file.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"gluon-ft serve exited with {server.returncode}: {tail}")
        with contextlib.suppress(OSError, ValueError):
            return get_health(port)
        time.sleep(0.2)
    raise RuntimeError(f"gluon-ft serve did not answer /health within {START_TIMEOUT_S:g} s")


def run_phase(port: int, images: list[tuple[str, bytes]], clients: int, per_client: int) -> dict:
    """``clients`` threads, each posting ``per_client`` images in turn, started together.

    Client ``k``'s ``j``-th request sends image ``(k + j * clients) % len(images)``.
    """
    start = threading.Barrier(clients + 1)
    answers: list[list] = [[] for _ in range(clients)]

    def client(k: int) -> None:
        start.wait()
        for j in range(per_client):
            index = (k + j * clients) % len(images)
            name, data = images[index]
            try:
                status, answer, seconds = post_image(port, data, name)
            except OSError as err:  # refused or reset: counted, not raised
                status, answer, seconds = 0, {"error": str(err)}, float("nan")
            answers[k].append((index, status, answer, seconds))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    done = [entry for entries in answers for entry in entries]
    latencies = np.array([seconds for _, status, _, seconds in done if status == 200])
    return {
        "clients": clients,
        "requests": len(done),
        "seconds": wall,
        "requests_per_s": len(done) / wall,
        "p50_ms": float(np.percentile(latencies, 50) * 1000) if len(latencies) else None,
        "p99_ms": float(np.percentile(latencies, 99) * 1000) if len(latencies) else None,
        "non_200": sum(status != 200 for _, status, _, _ in done),
        "statuses": dict(sorted(_count(str(status) for _, status, _, _ in done).items())),
        "answers": done,
    }


def _count(values) -> dict:
    counts: dict = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def same_answer(one: dict, other: dict) -> bool:
    """The same classes in the same order, probabilities within :data:`TOLERANCE`."""
    if one.get("classes") != other.get("classes"):
        return False
    mine, theirs = one.get("probabilities", []), other.get("probabilities", [])
    return len(mine) == len(theirs) and all(abs(a - b) <= TOLERANCE for a, b in zip(mine, theirs))


def compare_with_single(phases: list[dict]) -> dict:
    """Every 200 answer of every phase against the one-client phase's answer for its image."""
    reference = {}
    for index, status, answer, _ in phases[0]["answers"]:
        if status == 200:
            reference.setdefault(index, answer)
    compared = mismatched = 0
    for phase in phases[1:]:
        for index, status, answer, _ in phase["answers"]:
            if status == 200 and index in reference:
                compared += 1
                mismatched += not same_answer(reference[index], answer)
    return {"compared": compared, "mismatched": mismatched, "tolerance": TOLERANCE}


def measure_serve(run_dir: Path, images: list[tuple[str, bytes]], load: ServeLoad, log) -> dict:
    """Serve ``run_dir`` in a child process and run every phase of ``load`` against it.

    Parameters
    ----------
    run_dir : Path
        A finished run (or :func:`gluon_ft.bench.standin.write_scratch_run`'s stand-in).
    images : list of (str, bytes)
        ``(file name, JPEG bytes)``; at least ``load.images`` of them are used.
    load : ServeLoad
        The phases.
    log : callable
        Called with a line of progress.
    """
    images = images[: load.images]
    with tempfile.TemporaryDirectory(prefix="gluon-ft-bench-serve-") as tmp:
        port = free_port("127.0.0.1")
        log(f"serve: starting gluon-ft serve {run_dir} on 127.0.0.1:{port}")
        with running_server(run_dir, port, Path(tmp) / "serve.log") as health:
            phases = []
            for clients in load.clients:
                per_client = load.single_requests if clients == 1 else load.requests_per_client
                log(f"serve: {clients} client(s) x {per_client} request(s)")
                phases.append(run_phase(port, images, clients, per_client))
            batches = get_health(port)["batches"]
    agreement = compare_with_single(phases)
    by_clients = {str(p["clients"]): {k: v for k, v in p.items() if k != "answers"} for p in phases}
    rates = {clients: figures["requests_per_s"] for clients, figures in by_clients.items()}
    return {
        "run": str(run_dir),
        "model": health["model"],
        "image_size": health["image_size"],
        "dtype": health["dtype"],
        "max_batch": health["max_batch"],
        "batch_wait_ms": health["batch_wait_ms"],
        "distinct_images": len(images),
        "clients": by_clients,
        "speedup_over_one_client": {c: rate / rates["1"] for c, rate in rates.items()},
        "non_200": sum(figures["non_200"] for figures in by_clients.values()),
        "answers_as_when_alone": agreement,
        "batches_served": batches,
        "server_cpu_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def run_test_jpegs(run_dir: Path, count: int) -> list[tuple[str, bytes]]:
    """Up to ``count`` files of the run's test part, evenly spaced, as JPEG bytes (the file
    itself when it is one, else the decoded image encoded as one)."""
    from gluon_ft.deploy.runparts import run_parts

    test = run_parts(Path(run_dir)).test
    chosen = np.unique(np.linspace(0, len(test) - 1, min(count, len(test))).astype(int))
    found = []
    for index in chosen:
        path = Path(test.items[index][0]) if hasattr(test, "items") else None
        if path is not None and path.suffix.lower() in (".jpg", ".jpeg"):
            found.append((path.name, path.read_bytes()))
            continue
        buffer = io.BytesIO()
        test.load(int(index)).save(buffer, format="JPEG", quality=90)
        found.append((f"{index:05d}.jpg", buffer.getvalue()))
    return found


def folder_jpegs(folder: Path, count: int) -> list[tuple[str, bytes]]:
    """Up to ``count`` ``*.jpg`` under ``folder``, sorted by path."""
    paths = sorted(Path(folder).rglob("*.jpg"))[:count]
    return [(f"{i:04d}-{path.name}", path.read_bytes()) for i, path in enumerate(paths)]


def summary_figures(serve: dict) -> dict:
    """The bench's top-level serve figures: requests per second of one client and of the most
    clients, their ratio, and the most clients' p99 latency."""
    clients = serve["clients"]
    most = max(clients, key=int)
    return {
        "serve_1_client_rps": clients["1"]["requests_per_s"],
        f"serve_{most}_clients_rps": clients[most]["requests_per_s"],
        "serve_speedup": serve["speedup_over_one_client"][most],
        f"serve_{most}_clients_p99_ms": clients[most]["p99_ms"],
        "serve_non_200": serve["non_200"],
    }
