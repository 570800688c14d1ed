"""Download and unpack datasets (and weights) safely.

:func:`fetch` downloads a file into a cache with its SHA-1 checked, retries and resume, and
moves it into place atomically, so the cache only ever holds verified files. A lock file
makes concurrent processes that want the same file download it once. :func:`extract_zip`
unpacks an archive into a fresh directory all-or-nothing and refuses members that could
escape it. Every failure is a :class:`DownloadError`, a usage error with a one-paragraph
message that the command line shows without a traceback.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path

import requests
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
    retries: int = 3,
    backoff: float = 0.5,
    timeout: float = 30,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` unless a file with the right SHA-1 is already there.

    A file already at ``dest`` (a previous download, or a copy the user put there by hand)
    is verified and used without any network access. Otherwise the body is streamed into
    ``dest.part`` beside it, verified, and renamed to ``dest`` in one step, so ``dest`` is
    either absent or complete and correct. An interrupted download is resumed with an HTTP
    ``Range`` request when the server supports it. Processes fetching the same ``dest``
    take turns through an exclusive lock on ``dest.lock``; the later ones find the file.

    Parameters
    ----------
    url : str
        HTTP(S) address of the file.
    dest : str or os.PathLike
        Where the file belongs; its directory is created if needed.
    sha1 : str
        Expected SHA-1 of the file, 40 hex digits.
    retries : int, optional
        How many more attempts after the first one fails with a connection error, a
        dropped connection or an HTTP 5xx answer.
    backoff : float, optional
        Seconds to wait before the first retry; the wait doubles with each further retry.
    timeout : float, optional
        Seconds without any data from the server before an attempt is given up. Connecting
        is given at most 5 s of it, so an unreachable server fails fast.
    progress : bool, optional
        Show a progress bar on stderr.

    Returns
    -------
    pathlib.Path
        ``dest``, holding the verified file.

    Raises
    ------
    DownloadError
        The file at ``dest`` has another SHA-1 (it is left in place), the server could not
        be reached or kept failing (what arrived stays in ``dest.part`` for the next call
        to resume), it answered with an HTTP error, or it sent data with another SHA-1 (the
        data is discarded).
    """
    dest = Path(dest)
    expected = sha1.strip().lower()
    if not _SHA1.fullmatch(expected):
        raise ValueError(f"sha1 must be 40 hex digits, got {sha1!r}")
    if dest.exists():
        return _verified_in_place(dest, expected, url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(_sibling(dest, ".lock"), waiting_for=dest):
        # Whoever held the lock before us may have just finished this very download.
        if dest.exists():
            return _verified_in_place(dest, expected, url)
        part = _sibling(dest, ".part")
        _download(url, part, retries=retries, backoff=backoff, timeout=timeout, show=progress)
        actual = sha1sum(part)
        if actual != expected:
            part.unlink()
            raise DownloadError(
                f"The file downloaded from {url} has SHA-1 {actual}, but {expected} was "
                f"expected, so it was discarded and nothing was saved at {dest}. The server "
                "sent different data than expected (for example a proxy's error page or a "
                "changed file).",
                url=url,
                path=dest,
            )
        os.replace(part, dest)
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


def _verified_in_place(dest: Path, expected: str, url: str) -> Path:
    actual = sha1sum(dest)
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


def _download(
    url: str, part: Path, *, retries: int, backoff: float, timeout: float, show: bool
) -> None:
    """Fill ``part`` with the body of ``url``, resuming and retrying as needed."""
    timeouts = (min(timeout, _MAX_CONNECT_TIMEOUT), timeout)
    attempt = 0
    with requests.Session() as session:
        while True:
            attempt += 1
            try:
                _download_once(session, url, part, timeouts, show)
                return
            except _Transient as exc:
                reason = str(exc)
            except (requests.ConnectionError, requests.Timeout) as exc:
                # ChunkedEncodingError (a connection dropped mid-body) is not a subclass.
                reason = _describe(exc)
            except requests.exceptions.ChunkedEncodingError:
                reason = "the connection broke off in the middle of the download"
            except requests.RequestException as exc:  # a bad URL, too many redirects, ...
                raise DownloadError(
                    f"Could not download {url} to {_final(part)}: {exc}.",
                    url=url,
                    path=_final(part),
                ) from None
            except OSError as exc:  # writing the partial file failed, e.g. the disk is full
                raise DownloadError(
                    f"Could not save the download of {url} to {part}: {exc.strerror or exc}.",
                    url=url,
                    path=_final(part),
                ) from None
            if attempt > retries:
                raise DownloadError(
                    f"Could not download {url} to {_final(part)}: {reason} (gave up after "
                    f"{attempt} attempts). Check the network connection and the address.",
                    url=url,
                    path=_final(part),
                )
            log.info("download of %s failed (%s); retrying", url, reason)
            time.sleep(backoff * 2 ** (attempt - 1))


def _final(part: Path) -> Path:
    return part.with_name(part.name.removesuffix(".part"))


def _download_once(
    session: requests.Session, url: str, part: Path, timeouts: tuple[float, float], show: bool
) -> None:
    offset = part.stat().st_size if part.exists() else 0
    # Identity encoding: byte ranges must count the file's bytes, not a compressed stream's.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with session.get(url, headers=headers, stream=True, timeout=timeouts) as resp:
        status = resp.status_code
        if status == 416 and offset:
            # The partial file is as long as the whole file, or longer: start over.
            part.unlink()
            raise _Transient("the partial download did not match the file on the server")
        if status in _TRANSIENT_STATUS:
            raise _Transient(f"the server answered HTTP {status} {resp.reason}")
        if status not in (200, 206):
            raise DownloadError(
                f"Could not download {url} to {_final(part)}: the server answered HTTP "
                f"{status} {resp.reason}.",
                url=url,
                path=_final(part),
            )
        if status == 206 and _range_start(resp) != offset:
            part.unlink()
            raise _Transient("the server resumed the download at the wrong place")
        if status == 200:
            offset = 0  # the server ignored the Range header and sends the whole file
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        with (
            open(part, "ab" if offset else "wb") as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=_final(part).name,
                file=sys.stderr,
                disable=not show,
                leave=False,
            ) as progress,
        ):
            for chunk in resp.iter_content(_NET_CHUNK):
                f.write(chunk)
                progress.update(len(chunk))
            f.flush()
            # The rename into place must not survive a crash that the data itself did not.
            os.fsync(f.fileno())
    if total is not None and part.stat().st_size < total:
        raise _Transient("the connection broke off in the middle of the download")


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
