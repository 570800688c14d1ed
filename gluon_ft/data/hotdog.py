"""The book's hot-dog dataset: where it is cached, and fetching it once."""

from __future__ import annotations

import os
from pathlib import Path

from gluon_ft.errors import UsageError
from gluon_ft.paths import mxnet_home

HOTDOG_URL = "http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"


HOTDOG_SHA1 = "fba480ffa8aa7e0febbb511d181409f899b9baa5"


HOTDOG_ZIP = "hotdog.zip"


# The zip is 261 MB; a server announcing more than this bound serves some other file.
HOTDOG_MAX_BYTES = 300 * 10**6


def hotdog_root(
    cache_dir: str | Path | None = None, url: str | None = None, sha1: str = HOTDOG_SHA1
) -> Path:
    """Return the hot-dog dataset folder (with ``train/`` and ``test/``), downloading it once.

    The zip is cached as ``$MXNET_HOME/datasets/hotdog.zip``; a zip the user put there by hand
    is verified and used.

    Parameters
    ----------
    cache_dir : str or Path, optional
        Where the zip and the extracted folder live; ``$MXNET_HOME/datasets`` by default.
    url : str, optional
        Where to download from: ``$GLUON_FT_HOTDOG_URL`` (a mirror) if set, else the book's.
    sha1 : str
        The zip's expected sha1; a mirror must serve the same file.

    Returns
    -------
    Path
        The folder that holds ``train/`` and ``test/``.
    """
    from gluon_ft.data.download import DownloadError, extract_zip, fetch

    cache = Path(cache_dir) if cache_dir is not None else mxnet_home() / "datasets"
    url = url or os.environ.get("GLUON_FT_HOTDOG_URL") or HOTDOG_URL
    extracted = cache / "hotdog"
    if not extracted.is_dir():
        try:
            zip_path = fetch(url, cache / HOTDOG_ZIP, sha1, max_bytes=HOTDOG_MAX_BYTES)
            extract_zip(zip_path, extracted)
        except DownloadError as err:
            raise UsageError(
                f"{err} The hot-dog dataset could not be obtained. On an offline machine, "
                f"copy hotdog.zip (sha1 {sha1}, from {HOTDOG_URL}) to "
                f"{cache / HOTDOG_ZIP}, or train on your own folder with --data DIR "
                "(DIR/train/<class>/*, DIR/test/<class>/*)."
            ) from None
    # The book's zip holds a top-level hotdog/ folder; accept a flat layout too.
    nested = extracted / "hotdog"
    return nested if (nested / "train").is_dir() else extracted
