"""Where gluon-ft keeps files, and the one way it replaces a file.

Base layer: no gluon_ft imports. ``$MXNET_HOME`` is MXNet's own cache folder (models,
datasets); gluon-ft keeps its caches (features, the demo's task) beside them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


def mxnet_home() -> Path:
    """Return ``$MXNET_HOME`` (default ``~/.mxnet``), where MXNet caches datasets and models."""
    return Path(os.environ.get("MXNET_HOME", "~/.mxnet")).expanduser()


@contextlib.contextmanager
def replacing(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``, renamed onto ``target`` when the block ends.

    A reader (a concurrent run, a resumed one, a user) sees the old file or the whole new
    one, never a part: the rename is atomic on one file system. The temporary name is a dot
    name with this process's id, so two processes never write the same one. If the block
    raises, the temporary file is removed and ``target`` is left as it was.

    Parameters
    ----------
    target : str or Path
        The file to replace (or create).
    suffix : str
        Appended to the temporary name, for writers that pick the format by the extension
        (matplotlib's ``savefig``).
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def write_text(target: str | Path, text: str) -> Path:
    """Write ``text`` to ``target`` through :func:`replacing`; return ``target`` as a Path."""
    with replacing(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def write_json(target: str | Path, obj) -> Path:
    """Write ``obj`` as indented JSON (one trailing newline) through :func:`replacing`."""
    return write_text(target, json.dumps(obj, indent=2) + "\n")
