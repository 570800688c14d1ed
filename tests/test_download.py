"""gluon_ft.data.download against a real HTTP server on 127.0.0.1 and real zip archives."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gluon_ft.data.download import DownloadError, extract_zip, fetch, sha1sum
from gluon_ft.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
FAST = {"backoff": 0.01, "progress": False}  # retry quickly; the defaults are tested apart

# Incompressible images so that the archive is big enough to cut in the middle of the body.
_rng = random.Random(0)
FILES = {
    "hotdog/train/hotdog/a.png": _rng.randbytes(150_000),
    "hotdog/train/not-hotdog/b.png": _rng.randbytes(100_000),
    "hotdog/test/hotdog/c.png": b"\x89PNG small",
}


def make_zip(members: dict[str, bytes] | None = None, *, extra: list | None = None) -> bytes:
    """A zip archive of ``members``, followed by ``extra`` (ZipInfo, data) pairs as given."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in (FILES if members is None else members).items():
            zf.writestr(name, data)
        for info, data in extra or []:
            zf.writestr(info, data)
    return buf.getvalue()


PAYLOAD = make_zip()
PAYLOAD_SHA1 = hashlib.sha1(PAYLOAD).hexdigest()


@dataclass
class Behaviour:
    """How the test server answers; every request is recorded."""

    payload: bytes = PAYLOAD
    honour_range: bool = True  # answer "Range: bytes=N-" with 206, else with the whole file
    drop_first: int = 0  # cut the connection halfway through the body of the first N requests
    drop_always: bool = False
    fail_first: int = 0  # answer HTTP 500 to the first N requests
    seconds_per_chunk: float = 0.0  # slow the body down (64 KiB chunks)
    seconds_per_byte: float = 0.0  # send the body a byte at a time: a server that trickles
    announce: int | None = None  # the Content-Length to declare instead of the body's own
    no_length: bool = False  # declare no length: the body ends when the connection closes
    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def served(self) -> list[dict]:
        """The requests that got (part of) the body of the file."""
        return [r for r in self.requests if r["status"] in (200, 206)]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the name http.server dispatches to)
        b: Behaviour = self.server.behaviour
        record = {"path": self.path, "headers": dict(self.headers), "status": None, "sent": 0}
        with b.lock:
            b.requests.append(record)
            number = len(b.requests)
        if self.path != "/hotdog.zip":
            record["status"] = 404
            self.send_error(404)
            return
        if number <= b.fail_first:
            record["status"] = 500
            self.send_error(500)
            return
        start = 0
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if wanted and b.honour_range:
            start = int(wanted.group(1))
            record["status"] = 206
            self.send_response(206)
            self.send_header(
                "Content-Range", f"bytes {start}-{len(b.payload) - 1}/{len(b.payload)}"
            )
        else:
            record["status"] = 200
            self.send_response(200)
        body = b.payload[start:]
        self.send_header("Content-Type", "application/zip")
        if b.no_length:
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(b.announce or len(body)))
        self.end_headers()
        if b.drop_always or number <= b.fail_first + b.drop_first:
            body = body[: len(body) // 2]
            self.close_connection = True  # the client sees fewer bytes than Content-Length
        step = 1 if b.seconds_per_byte else 1 << 16
        try:
            for i in range(0, len(body), step):
                time.sleep(b.seconds_per_byte or b.seconds_per_chunk)
                self.wfile.write(body[i : i + step])
                record["sent"] += len(body[i : i + step])
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on this body
            self.close_connection = True

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def server(monkeypatch):
    """Start a server; returns (url of /hotdog.zip, Behaviour to adjust per test)."""
    # A proxy configured on the machine must not intercept requests to the local server.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.behaviour = Behaviour()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/hotdog.zip", httpd.behaviour
    httpd.shutdown()
    httpd.server_close()


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_download_error_is_a_usage_error():
    assert issubclass(DownloadError, UsageError) and DownloadError.exit_code == 2


def test_sha1sum_matches_hashlib(tmp_path):
    path = tmp_path / "f"
    data = random.Random(1).randbytes(3 * (1 << 20) + 7)  # more than one chunk
    path.write_bytes(data)
    assert sha1sum(path) == hashlib.sha1(data).hexdigest()


def test_fetch_and_extract_give_the_tree(server, tmp_path):
    url, b = server
    cache = tmp_path / "datasets"
    path = fetch(url, cache / "hotdog.zip", PAYLOAD_SHA1, **FAST)
    assert path == cache / "hotdog.zip" and path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in cache.iterdir()) == ["hotdog.zip"]  # no .part, no .lock
    root = extract_zip(path, cache / "hotdog")
    assert root == cache / "hotdog"
    assert files_under(root) == FILES
    assert sorted(p.name for p in cache.iterdir()) == ["hotdog", "hotdog.zip"]
    assert len(b.requests) == 1


def test_fetch_again_uses_the_cache(server, tmp_path):
    url, b = server
    dest = tmp_path / "hotdog.zip"
    fetch(url, dest, PAYLOAD_SHA1, **FAST)
    fetch(url, dest, PAYLOAD_SHA1, **FAST)
    assert len(b.requests) == 1


def test_progress_bar_goes_to_stderr(server, tmp_path, capsys):
    url, _ = server
    fetch(url, tmp_path / "hotdog.zip", PAYLOAD_SHA1, backoff=0.01, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "hotdog.zip" in err


def test_wrong_sha1_leaves_nothing(server, tmp_path):
    url, b = server
    cache = tmp_path / "datasets"
    wrong = "0" * 40
    with pytest.raises(DownloadError) as info:
        fetch(url, cache / "hotdog.zip", wrong, **FAST)
    message = str(info.value)
    assert wrong in message and PAYLOAD_SHA1 in message
    assert info.value.url == url and info.value.path == cache / "hotdog.zip"
    assert list(cache.iterdir()) == []
    assert len(b.requests) == 1  # the server is fine; a mismatch is not retried


def test_user_placed_zip_is_used_without_a_request(server, tmp_path):
    url, b = server
    dest = tmp_path / "hotdog.zip"
    dest.write_bytes(PAYLOAD)
    assert fetch(url, dest, PAYLOAD_SHA1.upper(), **FAST) == dest
    assert b.requests == []


def test_user_placed_wrong_zip_is_reported_and_kept(server, tmp_path):
    url, b = server
    dest = tmp_path / "hotdog.zip"
    dest.write_bytes(b"not the dataset")
    with pytest.raises(DownloadError) as info:
        fetch(url, dest, PAYLOAD_SHA1, **FAST)
    message = str(info.value)
    assert PAYLOAD_SHA1 in message and hashlib.sha1(b"not the dataset").hexdigest() in message
    assert str(dest) in message and info.value.path == dest
    assert dest.read_bytes() == b"not the dataset"
    assert b.requests == []


def test_something_unreadable_in_place_is_reported_and_kept(server, tmp_path):
    url, b = server
    dest = tmp_path / "hotdog.zip"
    dest.mkdir()  # a folder where the zip belongs: it cannot be read as one
    with pytest.raises(DownloadError) as info:
        fetch(url, dest, PAYLOAD_SHA1, **FAST)
    assert "cannot be read" in str(info.value) and str(dest) in str(info.value)
    assert info.value.path == dest and dest.is_dir() and b.requests == []


def test_server_error_then_success_is_retried(server, tmp_path):
    url, b = server
    b.fail_first = 1
    dest = fetch(url, tmp_path / "hotdog.zip", PAYLOAD_SHA1, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert [r["status"] for r in b.requests] == [500, 200]


def test_client_error_is_not_retried(server, tmp_path):
    url, b = server
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        fetch(url.replace("hotdog.zip", "missing.zip"), tmp_path / "x.zip", PAYLOAD_SHA1, **FAST)
    assert info.value.path == tmp_path / "x.zip"
    assert len(b.requests) == 1
    assert list(tmp_path.iterdir()) == []


def test_dropped_connection_is_resumed_with_range(server, tmp_path):
    url, b = server
    b.drop_first = 1
    dest = fetch(url, tmp_path / "hotdog.zip", PAYLOAD_SHA1, **FAST)
    assert dest.read_bytes() == PAYLOAD
    first, second = b.requests
    assert "Range" not in first["headers"] and first["sent"] == len(PAYLOAD) // 2
    kept = int(re.fullmatch(r"bytes=(\d+)-", second["headers"]["Range"]).group(1))
    assert 0 < kept <= first["sent"]  # what arrived completely before the drop is kept
    assert second["status"] == 206 and second["sent"] == len(PAYLOAD) - kept


def test_server_ignoring_range_starts_over(server, tmp_path):
    url, b = server
    b.drop_first, b.honour_range = 1, False
    dest = fetch(url, tmp_path / "hotdog.zip", PAYLOAD_SHA1, **FAST)
    assert dest.read_bytes() == PAYLOAD  # the first half was not kept in front of it
    assert "Range" in b.requests[1]["headers"] and b.requests[1]["status"] == 200


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    url, b = server
    (tmp_path / "hotdog.zip.part").write_bytes(PAYLOAD[:1000])
    dest = fetch(url, tmp_path / "hotdog.zip", PAYLOAD_SHA1, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert b.requests[0]["headers"]["Range"] == "bytes=1000-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hotdog.zip"]


def test_connection_that_always_drops_fails(server, tmp_path):
    url, b = server
    b.drop_always = True
    with pytest.raises(DownloadError, match="broke off") as info:
        fetch(url, tmp_path / "hotdog.zip", PAYLOAD_SHA1, retries=2, **FAST)
    assert info.value.url == url and "3 attempts" in str(info.value)
    assert len(b.requests) == 3
    assert not (tmp_path / "hotdog.zip").exists()


def test_unreachable_server_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with socket.socket() as s:  # a port that nothing listens on once the socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hotdog.zip"
    start = time.monotonic()
    with pytest.raises(DownloadError, match="(?i)connection refused") as info:
        fetch(url, tmp_path / "hotdog.zip", PAYLOAD_SHA1, progress=False)  # default retries
    assert time.monotonic() - start < 10
    assert info.value.url == url and info.value.path == tmp_path / "hotdog.zip"
    assert "Traceback" not in str(info.value)


_FETCH_IN_CHILD = """
import sys, time
from pathlib import Path
ready, go = Path(sys.argv[4]), Path(sys.argv[5])
from gluon_ft.data.download import fetch
ready.touch()
while not go.exists():
    time.sleep(0.01)
print(fetch(sys.argv[1], Path(sys.argv[2]), sys.argv[3], progress=False, backoff=0.01))
"""


def test_two_processes_download_once(server, tmp_path):
    url, b = server
    b.seconds_per_chunk = 0.15  # about 1 s of body: the second process arrives meanwhile
    dest = tmp_path / "cache" / "hotdog.zip"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children = []
    for i in range(2):
        ready = tmp_path / f"ready{i}"
        argv = [sys.executable, "-c", _FETCH_IN_CHILD, url, str(dest), PAYLOAD_SHA1, ready, go]
        children.append((subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True), ready))
    deadline = time.monotonic() + 30
    while not all(ready.exists() for _, ready in children):
        assert time.monotonic() < deadline, "the child processes did not start"
        time.sleep(0.01)
    go.touch()  # both call fetch at the same moment
    outputs = [child.communicate(timeout=30)[0] for child, _ in children]
    assert [child.returncode for child, _ in children] == [0, 0]
    assert [out.strip() for out in outputs] == [str(dest), str(dest)]
    assert dest.read_bytes() == PAYLOAD
    assert len(b.requests) == 1
    assert sorted(p.name for p in dest.parent.iterdir()) == ["hotdog.zip"]


# ---------------------------------------------------------------- hostile or failing servers


def test_trickling_server_is_given_up_at_the_stall_deadline(server, tmp_path):
    url, b = server
    b.seconds_per_byte = 0.05  # data never stops long enough for a read timeout
    start = time.monotonic()
    with pytest.raises(DownloadError, match="stalled") as info:
        fetch(url, tmp_path / "hotdog.zip", PAYLOAD_SHA1, retries=1, stall_timeout=1.0, **FAST)
    assert time.monotonic() - start < 6
    assert "2 attempts" in str(info.value) and info.value.path == tmp_path / "hotdog.zip"
    first, second = b.requests
    # What trickled in is kept: the retry resumes after it, as after a dropped connection.
    assert first["sent"] > 0 and second["headers"]["Range"].startswith("bytes=")
    assert not (tmp_path / "hotdog.zip").exists()


def test_slow_but_steady_server_outlasts_the_stall_deadline(server, tmp_path):
    url, b = server
    b.seconds_per_chunk = 0.3  # 4 chunks of 64 KiB: 1.2 s in all, each second brings data
    dest = fetch(url, tmp_path / "hotdog.zip", PAYLOAD_SHA1, stall_timeout=1.0, **FAST)
    assert dest.read_bytes() == PAYLOAD and len(b.requests) == 1


def test_resumed_partial_with_a_bad_checksum_is_downloaded_again_from_zero(server, tmp_path):
    url, b = server
    stale = b"bytes of some other file " * 40  # an earlier run's .part of a changed file
    (tmp_path / "hotdog.zip.part").write_bytes(stale)
    dest = fetch(url, tmp_path / "hotdog.zip", PAYLOAD_SHA1, **FAST)
    assert dest.read_bytes() == PAYLOAD
    resumed, fresh = b.requests
    assert resumed["headers"]["Range"] == f"bytes={len(stale)}-" and resumed["status"] == 206
    assert "Range" not in fresh["headers"] and fresh["status"] == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hotdog.zip"]


def test_resumed_download_is_restarted_only_once(server, tmp_path):
    url, b = server
    (tmp_path / "hotdog.zip.part").write_bytes(PAYLOAD[:1000])
    wrong = "0" * 40  # the server's file never matches
    with pytest.raises(DownloadError, match="from the start") as info:
        fetch(url, tmp_path / "hotdog.zip", wrong, **FAST)
    assert wrong in str(info.value) and PAYLOAD_SHA1 in str(info.value)
    assert ["Range" in r["headers"] for r in b.requests] == [True, False]
    assert list(tmp_path.iterdir()) == []


def test_server_announcing_more_than_the_expected_size_is_refused(server, tmp_path):
    url, b = server
    b.announce = 10**12  # a terabyte "hotdog.zip"
    (tmp_path / "hotdog.zip.part").write_bytes(PAYLOAD[:1000])
    with pytest.raises(DownloadError, match="announced") as info:
        fetch(url, tmp_path / "hotdog.zip", PAYLOAD_SHA1, max_bytes=len(PAYLOAD), **FAST)
    assert f"{len(PAYLOAD)}" in str(info.value) and info.value.url == url
    assert len(b.requests) == 1  # another attempt would get the same answer
    assert list(tmp_path.iterdir()) == []


def test_server_sending_more_than_the_expected_size_is_cut_off(server, tmp_path):
    url, b = server
    b.no_length = True  # nothing announced: the bound must hold while the body streams in
    limit = len(PAYLOAD) // 2
    with pytest.raises(DownloadError, match="more than") as info:
        fetch(url, tmp_path / "hotdog.zip", PAYLOAD_SHA1, max_bytes=limit, **FAST)
    assert str(limit) in str(info.value)
    assert len(b.requests) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("no_length", [False, True], ids=["announced", "unannounced"])
def test_file_of_exactly_the_expected_size_downloads(server, tmp_path, no_length):
    url, b = server
    b.no_length = no_length
    dest = fetch(url, tmp_path / "hotdog.zip", PAYLOAD_SHA1, max_bytes=len(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD


def test_hotdog_download_refuses_a_server_announcing_more_than_the_dataset(
    server, tmp_path, monkeypatch
):
    from gluon_ft.data.hotdog import hotdog_root

    url, b = server
    b.announce = 10**12
    monkeypatch.setenv("GLUON_FT_HOTDOG_URL", url)
    with pytest.raises(UsageError, match="announced"):
        hotdog_root(tmp_path / "datasets")
    assert len(b.requests) == 1
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.fixture
def small_disk(tmp_path, monkeypatch) -> tuple[Path, bool]:
    """A directory on a full-able disk: a real 1 MiB tmpfs (as root), else a folder whose
    download writes fail with ENOSPC past 1 MiB. Returns (directory, is it a real tmpfs)."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)]
    if shutil.which("mount") and subprocess.run(mount, capture_output=True).returncode == 0:
        try:
            yield folder, True
        finally:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)
        return
    import gluon_ft.data.download

    real_open = open

    def open_on_a_small_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if Path(path).is_relative_to(folder) and "b" in mode and mode[0] in "wa":
            real_write = f.write

            def write(data):
                if f.tell() + len(data) > 1 << 20:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                return real_write(data)

            f.write = write
        return f

    monkeypatch.setattr(gluon_ft.data.download, "open", open_on_a_small_disk, raising=False)
    yield folder, False


BIG_PAYLOAD = random.Random(2).randbytes(2 << 20)  # twice the small disk


def test_full_disk_is_reported_and_leaves_nothing_partial(server, small_disk):
    url, b = server
    b.payload = BIG_PAYLOAD
    disk, _ = small_disk
    dest = disk / "datasets" / "hotdog.zip"
    with pytest.raises(DownloadError, match="No space left") as info:
        fetch(url, dest, hashlib.sha1(BIG_PAYLOAD).hexdigest(), **FAST)
    assert [p for p in disk.rglob("*") if p.is_file()] == []
    message = str(info.value)
    assert str(dest.parent) in message and "free" in message
    assert len(b.requests) == 1  # a full disk is not retried


def test_full_disk_during_the_hotdog_download_exits_2_without_a_traceback(
    server, small_disk, tmp_path
):
    url, b = server
    b.payload = BIG_PAYLOAD
    disk, real = small_disk
    if not real:
        pytest.skip("mounting a tmpfs was refused (not root); the in-process test covers it")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MXNET_HOME": str(disk)}
    env["GLUON_FT_HOTDOG_URL"] = url
    argv = ["train", "--data", "hotdog", "--pretrained", "none", "--out", str(tmp_path / "run")]
    result = subprocess.run(
        [sys.executable, "-m", "gluon_ft", *argv, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert "gluon-ft: error:" in result.stderr and "No space left" in result.stderr
    assert "Traceback" not in result.stderr
    assert [p for p in disk.rglob("*") if p.is_file()] == []


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix, whose mode bits live in the high half of external_attr
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("member", "data"),
    [
        (zipfile.ZipInfo("../evil.txt"), b"x"),
        (zipfile.ZipInfo("hotdog/../../evil.txt"), b"x"),
        (zipfile.ZipInfo("..\\evil.txt"), b"x"),
        (zipfile.ZipInfo("/tmp/evil.txt"), b"x"),
        (zipfile.ZipInfo("C:/evil.txt"), b"x"),
        (_symlink("hotdog/train/link.png"), b"/etc/passwd"),
    ],
    ids=["dotdot", "nested-dotdot", "backslash-dotdot", "absolute", "drive", "symlink"],
)
def test_unsafe_member_is_refused_and_nothing_extracted(tmp_path, member, data):
    archive = tmp_path / "dl" / "evil.zip"
    archive.parent.mkdir()
    # The safe members come first: a refusal must happen before any of them is written.
    archive.write_bytes(make_zip(extra=[(member, data)]))
    dest = tmp_path / "dl" / "out" / "hotdog"
    with pytest.raises(DownloadError) as info:
        extract_zip(archive, dest)
    assert repr(member.filename) in str(info.value) and info.value.path == archive
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "dl",
        "dl/evil.zip",
        "dl/out",
    ]


def test_garbage_is_refused(tmp_path):
    archive = tmp_path / "hotdog.zip"
    archive.write_bytes(b"<html>captive portal</html>")
    with pytest.raises(DownloadError, match="not a valid zip") as info:
        extract_zip(archive, tmp_path / "hotdog")
    assert info.value.path == archive
    assert [p.name for p in tmp_path.iterdir()] == ["hotdog.zip"]


def test_corrupt_member_leaves_nothing(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("hotdog/a.png", b"A" * 1000)
        zf.writestr("hotdog/b.png", b"B" * 1000)
    data = bytearray(buf.getvalue())
    data[data.index(b"B" * 1000) + 500] ^= 0xFF  # the second member fails its CRC check
    archive = tmp_path / "hotdog.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="corrupt"):
        extract_zip(archive, tmp_path / "hotdog")
    assert [p.name for p in tmp_path.iterdir()] == ["hotdog.zip"]  # not even a.png


def test_existing_extraction_is_returned_untouched(tmp_path):
    archive = tmp_path / "hotdog.zip"
    archive.write_bytes(PAYLOAD)
    dest = extract_zip(archive, tmp_path / "hotdog")
    (dest / "hotdog" / "train" / "hotdog" / "a.png").write_bytes(b"edited")
    archive.unlink()  # a second extraction would now fail
    assert extract_zip(archive, tmp_path / "hotdog") == dest
    assert (dest / "hotdog" / "train" / "hotdog" / "a.png").read_bytes() == b"edited"


def test_stale_staging_directory_is_replaced(tmp_path):
    archive = tmp_path / "hotdog.zip"
    archive.write_bytes(PAYLOAD)
    stale = tmp_path / ".hotdog.partial"  # left by an extraction that was killed
    (stale / "hotdog").mkdir(parents=True)
    (stale / "hotdog" / "half.png").write_bytes(b"half")
    dest = extract_zip(archive, tmp_path / "hotdog")
    assert files_under(dest) == FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hotdog", "hotdog.zip"]
