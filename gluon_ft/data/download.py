"""Download and unpack datasets (and weights) safely.

:func:`fetch` downloads a file into a cache with its SHA-1 checked, retries and resume, and
moves it into place atomically, so the cache only ever holds verified files. A lock file
makes concurrent processes that want the same file download it once. :func:`extract_zip`
unpacks an archive into a fresh directory all-or-nothing and refuses members that could
escape it. Every failure is a :class:`DownloadError`, a usage error with a one-paragraph
message that the command line shows without a traceback.

How :func:`fetch` keeps its ``dest`` either absent or complete and correct: the body is
streamed into ``dest.part`` beside it, verified, and renamed to ``dest`` in one step. An
interrupted download is resumed with an HTTP ``Range`` request when the server supports it; a
resumed file that fails the SHA-1 check is downloaded once more from the start, since the part
kept from before may belong to another version of the file. Processes fetching the same
``dest`` take turns through an exclusive lock on ``dest.lock``; the later ones find the file.
Connecting is given at most 5 s of the timeout, so an unreachable server fails fast; the stall
timeout (64 KiB per ``stall_timeout`` seconds, about 1 KiB/s at the default) catches a server
that sends a byte now and then, which never trips the read timeout; ``max_bytes`` keeps a
wrong or hostile server from filling the disk. A file already at ``dest`` with another SHA-1
may be a copy the user put there by hand: it is never deleted. A partial file is deleted when
the disk is full, since it only holds on to the space the user has to free.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import stat
import sys
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3
from tqdm import tqdm

from gluon_ft.errors import UsageError

__all__ = ["DownloadError", "extract_zip", "fetch", "sha1sum"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# Small network reads: the bytes of a read that a dropped connection interrupts are lost, and
# the resume starts after the last complete read.
_NET_CHUNK = 1 << 16
# A refused or unroutable connection should fail in seconds, even when the read timeout is
# long enough for a slow server.
_MAX_CONNECT_TIMEOUT = 5.0
# Each stall_timeout seconds of a download must bring at least this much data.
_STALL_BYTES = 1 << 16
# Worth another try: the server is overloaded or briefly broken, not refusing the request.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_SHA1 = re.compile(r"[0-9a-f]{40}")


class DownloadError(UsageError):
    """A download or an extraction failed; the message says why and where.

    Attributes
    ----------
    url : str or None
        The address that was being downloaded (None for an extraction failure).
    path : pathlib.Path or None
        The exact file the download was meant to produce, or the archive that could not be
        extracted, so that a caller can tell the user where to put a good copy.
    """

    def __init__(self, message: str, *, url: str | None = None, path: Path | None = None):
        super().__init__(message)
        self.url = url
        self.path = path


class _Transient(Exception):
    """One download attempt failed in a way that another attempt may fix."""


def sha1sum(path: str | os.PathLike) -> str:
    """Return the SHA-1 of a file as 40 lowercase hex digits, reading it in chunks.

    Parameters
    ----------
    path : str or os.PathLike
        The file to hash.

    Returns
    -------
    str
        The hex digest.
    """
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(
    url: str,
    dest: str | os.PathLike,
    sha1: str,
    *,
    max_bytes: int | None = None,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: float = 30,
    stall_timeout: float = 60,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` unless a file with the right SHA-1 is already there.

    A file already at ``dest`` is verified and used without network access. Otherwise
    ``dest`` is either absent or complete and correct; the module docstring tells how.

    Parameters
    ----------
    url : str
        HTTP(S) address of the file.
    dest : str or os.PathLike
        Where the file belongs; its directory is created if needed.
    sha1 : str
        Expected SHA-1 of the file, 40 hex digits.
    max_bytes : int, optional
        The most bytes the file can have: a server that announces more is refused before
        anything is written, and one that sends more is cut off there.
    retries : int, optional
        How many more attempts after a connection error, a dropped or stalled transfer or HTTP 5xx.
    backoff : float, optional
        Seconds to wait before the first retry; the wait doubles with each further retry.
    timeout : float, optional
        Seconds without any data before an attempt is given up; connecting gets at most 5 s.
    stall_timeout : float, optional
        An attempt is given up when this many seconds bring less than 64 KiB.
    progress : bool, optional
        Show a progress bar on stderr.

    Returns
    -------
    pathlib.Path
        ``dest``, holding the verified file.

    Raises
    ------
    DownloadError
        A file at ``dest`` has another SHA-1 (left in place), the server could not be reached
        or kept failing (``dest.part`` is kept to resume), answered with an HTTP error, announced
        or sent over ``max_bytes`` or data with another SHA-1 (discarded), or the disk is full.
    """
    dest = Path(dest)
    expected = _expected_sha1(sha1)
    if dest.exists():
        return _verified_in_place(dest, expected, url)
    transfer = _Transfer.for_dest(
        dest, url, timeout=timeout, stall_timeout=stall_timeout, max_bytes=max_bytes, show=progress
    )
    _download_into_place(transfer, expected, retries=retries, backoff=backoff)
    return dest


def extract_zip(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Extract a zip archive into ``dest_dir``, all or nothing.

    Every member is checked before anything is written: absolute paths, drive letters,
    ``..`` components and symbolic links are refused, since they could write outside
    ``dest_dir`` or point into the rest of the file system. The members are extracted into a
    hidden sibling directory that is renamed to ``dest_dir`` only when complete, so an
    interrupted or failed extraction never leaves a partial tree under ``dest_dir``.

    Parameters
    ----------
    archive : str or os.PathLike
        The zip file.
    dest_dir : str or os.PathLike
        The directory to create. If it exists already it is taken as a finished extraction
        and returned untouched.

    Returns
    -------
    pathlib.Path
        ``dest_dir``.

    Raises
    ------
    DownloadError
        The archive is missing, is not a valid zip file, is corrupt, or has a member that
        is refused (the message names it). Nothing is left behind.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    if dest_dir.exists():
        return dest_dir
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(_sibling(dest_dir, ".lock"), waiting_for=dest_dir):
        if dest_dir.exists():  # another process finished extracting while we waited
            return dest_dir
        # Holding the lock, any staging directory left here belongs to a process that died.
        staging = dest_dir.with_name(f".{dest_dir.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _extract_checked(archive, staging)
            os.rename(staging, dest_dir)
        except BaseException:
            # A refused member, a corrupt archive, a full disk or Ctrl-C: leave nothing behind.
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return dest_dir


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _extract_checked(archive: Path, staging: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            # Check every member before writing anything, so a refusal extracts nothing.
            for info in members:
                _check_member(info, archive)
            zf.extractall(staging, members)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise DownloadError(
            f"{archive} is not a valid zip archive or is corrupt ({exc}); nothing was "
            "extracted. Delete it and download it again.",
            path=archive,
        ) from None
    except OSError as exc:  # missing archive, full disk, no permission
        raise DownloadError(
            f"Could not extract {archive}: {exc.strerror or exc}; nothing was extracted.",
            path=archive,
        ) from None


def _check_member(info: zipfile.ZipInfo, archive: Path) -> None:
    name = info.filename
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        problem = "has an absolute path or a drive letter"
    elif ".." in parts:
        problem = "has a '..' component that would escape the destination"
    elif stat.S_ISLNK(info.external_attr >> 16):
        problem = "is a symbolic link"
    else:
        return
    raise DownloadError(
        f"Refusing to extract {archive}: its member {name!r} {problem}. Nothing was "
        "extracted; the archive is damaged or was not made for this program.",
        path=archive,
    )


def _expected_sha1(sha1: str) -> str:
    """``sha1`` as 40 lowercase hex digits; a ValueError if it is no SHA-1 at all."""
    expected = sha1.strip().lower()
    if not _SHA1.fullmatch(expected):
        raise ValueError(f"sha1 must be 40 hex digits, got {sha1!r}")
    return expected


def _download_into_place(transfer: _Transfer, expected: str, *, retries: int, backoff: float):
    """Download, verify and rename the file to ``transfer.dest``, one process at a time."""
    dest = transfer.dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(_sibling(dest, ".lock"), waiting_for=dest):
            # Whoever held the lock before us may have just finished this very download.
            if dest.exists():
                _verified_in_place(dest, expected, transfer.url)
                return
            _download_verified(transfer, expected, retries=retries, backoff=backoff)
            os.replace(transfer.part, dest)
    except OSError as exc:  # the cache folder cannot be created or written at all
        raise DownloadError(
            f"Could not save {dest}: {exc.strerror or exc}.", url=transfer.url, path=dest
        ) from None


def _verified_in_place(dest: Path, expected: str, url: str) -> Path:
    try:
        actual = sha1sum(dest)
    except OSError as exc:  # a folder of that name, or a file the user may not read
        raise DownloadError(
            f"{dest} exists but cannot be read ({exc.strerror or exc}). It was left in place: "
            f"remove it to download {url} again, or replace it with the correct file.",
            url=url,
            path=dest,
        ) from None
    if actual != expected:
        # Never delete it: it may be a copy the user placed here by hand.
        raise DownloadError(
            f"{dest} exists but its SHA-1 is {actual}, while {expected} was expected. It was "
            f"left in place: delete it to download {url} again, or replace it with the "
            "correct file.",
            url=url,
            path=dest,
        )
    return dest


@contextlib.contextmanager
def _exclusive(lock_path: Path, *, waiting_for: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``, which is removed again on release.

    Removing the lock file while others wait on it is safe only because a waiter that gets
    the lock checks that the path still names the file it locked, and starts over if not.
    """
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process working on %s", waiting_for)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, lock_path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


@dataclass(frozen=True)
class _Transfer:
    """One file to download into ``part``, and the limits every attempt keeps to."""

    url: str
    part: Path
    timeouts: tuple[float, float]  # (connect, read) for requests
    stall_timeout: float
    max_bytes: int | None
    show: bool

    @property
    def dest(self) -> Path:
        return self.part.with_name(self.part.name.removesuffix(".part"))

    @classmethod
    def for_dest(
        cls,
        dest: Path,
        url: str,
        *,
        timeout: float,
        stall_timeout: float,
        max_bytes: int | None,
        show: bool,
    ) -> _Transfer:
        """The download of ``url`` into ``dest.part``, with ``fetch``'s limits."""
        return cls(
            url,
            _sibling(dest, ".part"),
            timeouts=(min(timeout, _MAX_CONNECT_TIMEOUT), min(timeout, stall_timeout)),
            stall_timeout=stall_timeout,
            max_bytes=max_bytes,
            show=show,
        )


def _download_verified(transfer: _Transfer, expected: str, *, retries: int, backoff: float):
    """Fill ``transfer.part`` with the file whose SHA-1 is ``expected``, or raise.

    A download that was resumed (appended to what an earlier attempt or run left) and fails
    the check is downloaded once more from the start; a fresh one that fails is final, since
    the server sent that data whole.
    """
    for from_scratch in (False, True):
        resumed = _download(transfer, retries=retries, backoff=backoff)
        actual = sha1sum(transfer.part)
        if actual == expected:
            return
        transfer.part.unlink()
        if not resumed or from_scratch:
            again = " even when downloaded again from the start," if from_scratch else ""
            raise DownloadError(
                f"The file downloaded from {transfer.url} has SHA-1 {actual}, but {expected} "
                f"was expected,{again} so it was discarded and nothing was saved at "
                f"{transfer.dest}. The server sent different data than expected (for example a "
                "proxy's error page or a changed file).",
                url=transfer.url,
                path=transfer.dest,
            )
        log.warning(
            "the resumed download of %s failed its SHA-1 check; downloading it again from the "
            "start",
            transfer.url,
        )


def _download(transfer: _Transfer, *, retries: int, backoff: float) -> bool:
    """Fill ``transfer.part`` with the body of its URL, resuming and retrying as needed.

    Returns whether the finished file was resumed: its first bytes came before this attempt.
    """
    attempt = 0
    url, dest = transfer.url, transfer.dest
    with requests.Session() as session:
        while True:
            attempt += 1
            try:
                return _download_once(session, transfer) > 0
            except _Transient as exc:
                reason = str(exc)
            except (requests.ConnectionError, requests.Timeout) as exc:
                # ChunkedEncodingError (a connection dropped mid-body) is not a subclass.
                reason = _describe(exc)
            except requests.exceptions.ChunkedEncodingError:
                reason = "the connection broke off in the middle of the download"
            except requests.RequestException as exc:  # a bad URL, too many redirects, ...
                raise DownloadError(
                    f"Could not download {url} to {dest}: {exc}.", url=url, path=dest
                ) from None
            if attempt > retries:
                raise DownloadError(
                    f"Could not download {url} to {dest}: {reason} (gave up after {attempt} "
                    f"attempt{'s' if attempt > 1 else ''}). Check the network connection and the "
                    "address.",
                    url=url,
                    path=dest,
                )
            log.info("download of %s failed (%s); retrying", url, reason)
            time.sleep(backoff * 2 ** (attempt - 1))


def _save_failed(transfer: _Transfer, exc: OSError, total: int | None) -> DownloadError:
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return DownloadError(
            f"Could not save the download of {transfer.url} to {transfer.part}: "
            f"{exc.strerror or exc}.",
            url=transfer.url,
            path=transfer.dest,
        )
    # A partial file on a full disk only holds on to the space the user has to free.
    transfer.part.unlink(missing_ok=True)
    folder = transfer.part.parent
    needs = f"{transfer.dest.name} needs {total / 2**20:.1f} MiB, " if total else ""
    return DownloadError(
        f"Could not save the download of {transfer.url} in {folder}: {exc.strerror} ({needs}"
        f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB is free there). The partial file "
        "was deleted. Free some space, or choose a cache folder on a larger disk (MXNET_HOME).",
        url=transfer.url,
        path=transfer.dest,
    )


def _download_once(session: requests.Session, transfer: _Transfer) -> int:
    """One attempt; returns the offset it resumed at (0 for the whole file)."""
    part = transfer.part
    offset = part.stat().st_size if part.exists() else 0
    # Identity encoding: byte ranges must count the file's bytes, not a compressed stream's.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with session.get(transfer.url, headers=headers, stream=True, timeout=transfer.timeouts) as resp:
        status = resp.status_code
        if status == 416 and offset:
            # The partial file is as long as the whole file, or longer: start over.
            part.unlink()
            raise _Transient("the partial download did not match the file on the server")
        if status in _TRANSIENT_STATUS:
            raise _Transient(f"the server answered HTTP {status} {resp.reason}")
        if status not in (200, 206):
            raise DownloadError(
                f"Could not download {transfer.url} to {transfer.dest}: the server answered "
                f"HTTP {status} {resp.reason}.",
                url=transfer.url,
                path=transfer.dest,
            )
        if status == 206 and _range_start(resp) != offset:
            part.unlink()
            raise _Transient("the server resumed the download at the wrong place")
        if status == 200:
            offset = 0  # the server ignored the Range header and sends the whole file
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        if total is not None and transfer.max_bytes is not None and total > transfer.max_bytes:
            raise _too_large(transfer, f"the server announced {total} bytes")
        _write_body(resp, transfer, offset, total)
    if total is not None and part.stat().st_size < total:
        raise _Transient("the connection broke off in the middle of the download")
    return offset


def _write_body(resp: requests.Response, transfer: _Transfer, offset: int, total: int | None):
    """Append the body to the partial file (or start it, at offset 0), within the limits."""
    stall = _StallDeadline(transfer.stall_timeout)
    try:
        with (
            open(transfer.part, "ab" if offset else "wb") as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=transfer.dest.name,
                file=sys.stderr,
                disable=not transfer.show,
                leave=False,
            ) as progress,
        ):
            size = offset
            for chunk in _body_chunks(resp):
                size += len(chunk)
                if transfer.max_bytes is not None and size > transfer.max_bytes:
                    raise _too_large(transfer, f"the server sent {size} bytes")
                f.write(chunk)
                progress.update(len(chunk))
                stall.arrived(len(chunk))
            f.flush()
            # The rename into place must not survive a crash that the data itself did not.
            os.fsync(f.fileno())
    except requests.RequestException:  # an OSError too, but the network's: retried by caller
        raise
    except OSError as exc:  # the disk is full, or the folder is not writable
        raise _save_failed(transfer, exc, total) from None


def _too_large(transfer: _Transfer, what: str) -> DownloadError:
    transfer.part.unlink(missing_ok=True)
    return DownloadError(
        f"Refusing the download of {transfer.url}: {what}, more than the "
        f"{transfer.max_bytes} bytes that {transfer.dest.name} can have, so it is not the "
        f"expected file. Nothing was saved at {transfer.dest}.",
        url=transfer.url,
        path=transfer.dest,
    )


def _body_chunks(resp: requests.Response) -> Iterator[bytes]:
    """The response body as it arrives, with the errors that ``iter_content`` would raise.

    Each read returns what the socket has, up to 64 KiB: ``iter_content`` waits for a full
    chunk, so a server trickling a byte at a time would hold one read for hours.
    """
    while True:
        try:
            chunk = resp.raw.read1(_NET_CHUNK, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise requests.ReadTimeout(exc) from exc
        except urllib3.exceptions.ProtocolError as exc:
            raise requests.exceptions.ChunkedEncodingError(exc) from exc
        except urllib3.exceptions.DecodeError as exc:
            raise requests.exceptions.ContentDecodingError(exc) from exc
        except urllib3.exceptions.SSLError as exc:
            raise requests.exceptions.SSLError(exc) from exc
        if not chunk:
            return
        yield chunk


class _StallDeadline:
    """Gives an attempt up when ``seconds`` pass that bring less than :data:`_STALL_BYTES`."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._since, self._bytes = time.monotonic(), 0

    def arrived(self, count: int) -> None:
        now = time.monotonic()
        self._bytes += count
        if self._bytes >= _STALL_BYTES:
            self._since, self._bytes = now, 0
        elif now - self._since > self.seconds:
            raise _Transient(
                f"the download stalled ({self._bytes} bytes in {now - self._since:.1f} s)"
            )


def _range_start(resp: requests.Response) -> int | None:
    match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _describe(exc: BaseException) -> str:
    """Name the root cause of a requests connection error ("Connection refused", ...)."""
    if isinstance(exc, requests.ConnectTimeout):
        return "connecting to the server timed out"
    if isinstance(exc, requests.ReadTimeout):
        return "the server stopped sending data"
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        err = todo.pop(0)
        if not isinstance(err, BaseException) or id(err) in seen:
            continue
        seen.add(id(err))
        # The socket-level error (refused, name not resolved, unreachable) that urllib3 and
        # requests wrap in several layers of their own exceptions.
        if isinstance(err, OSError) and not isinstance(err, requests.RequestException):
            if err.errno is not None and err.strerror:
                return err.strerror
            if isinstance(err, TimeoutError):
                return "the connection timed out"
        todo.extend([*err.args, getattr(err, "reason", None), err.__cause__, err.__context__])
    return str(exc)
