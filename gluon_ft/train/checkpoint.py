"""Checkpoints of a training run: the one place that writes and reads them.

A checkpoint is a directory under ``RUN/checkpoints/``::

    epoch-0002/          after epoch 2 (on a signal: interrupted-epoch-0003-step-000017/)
      model.params       the network's parameters (``save_parameters``)
      optimizer.nd       the optimizer's state arrays (``nd.save``: momentum, ...)
      running-stats.nd   (a stop mid-epoch with several devices or workers) every copy's
                         BatchNorm running statistics, which differ until the epoch ends
      ema.nd             (--ema) the moving average of every parameter; its update count
                         is meta.json's "ema"
      meta.json          position, config, metrics so far, RNG scheme, optimizer counters,
                         and the size and SHA-1 of both files

It is written under a temporary name (``.epoch-0002.tmp-<pid>``) and renamed into place only
when complete, so a process killed at any moment leaves either the whole checkpoint or a
temporary directory that :func:`latest_checkpoint` never considers. Nothing here unpickles:
``Trainer.save_states``/``load_states`` pickle the optimizer, so its state is taken from the
trainer's updaters and stored as plain NDArrays plus JSON instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import mxnet as mx
from mxnet import gluon

from gluon_ft.errors import UsageError
from gluon_ft.model.graft import load_parameters

FORMAT = "gluon-ft-checkpoint/1"
PARAMS_FILE = "model.params"
OPTIMIZER_FILE = "optimizer.nd"
META_FILE = "meta.json"
STATS_FILE = "running-stats.nd"
EMA_FILE = "ema.nd"
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint directory and its metadata.

    ``epoch`` counts the finished epochs; ``step`` the optimizer steps already taken in the
    next one (non-zero only for a checkpoint saved on an interruption).
    """

    path: Path
    meta: dict

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.step

    def describe(self) -> str:
        """``epoch 2`` or ``epoch 3, after step 17``, for messages."""
        if self.step:
            return f"epoch {self.epoch + 1}, after step {self.step}"
        return f"epoch {self.epoch}"


def checkpoint_name(epoch: int, step: int = 0) -> str:
    """Directory name for ``epoch`` finished epochs and ``step`` steps into the next."""
    if step:
        return f"interrupted-epoch-{epoch + 1:04d}-step-{step:06d}"
    return f"epoch-{epoch:04d}"


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- optimizer state -------------------------------------------------------------------------


def _structural_names(net: gluon.Block) -> dict[int, str]:
    """``id(Parameter) -> 'features.0.weight'``: names that do not depend on name scopes."""
    return {id(p): name for name, p in net._collect_params_with_prefix().items()}


def _updaters(trainer: gluon.Trainer) -> list:
    """The Updater objects that hold the optimizer state, wherever this trainer keeps it."""
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._update_on_kvstore:
        updater = getattr(trainer._kvstore, "_updater", None)
        # A distributed kvstore keeps the optimizer on its servers, out of our reach.
        return [updater] if updater is not None else []
    return list(trainer._updaters)


def _flatten_state(state, key: str, arrays: dict) -> dict | None:
    """Describe an optimizer state as JSON, moving its NDArrays into ``arrays``."""
    if state is None:
        return None
    if isinstance(state, mx.nd.NDArray):
        arrays[key] = state.as_in_context(mx.cpu())
        return {"array": key}
    if isinstance(state, tuple | list):
        items = [_flatten_state(s, f"{key}/{i}", arrays) for i, s in enumerate(state)]
        return {"tuple" if isinstance(state, tuple) else "list": items}
    if isinstance(state, int | float | bool):
        return {"value": state}
    raise TypeError(f"cannot store optimizer state of type {type(state).__name__}")


def _unflatten_state(desc, arrays: dict):
    if desc is None:
        return None
    if "array" in desc:
        # A copy per updater: each device's updater owns and updates its state in place.
        return arrays[desc["array"]].copy()
    if "value" in desc:
        return desc["value"]
    kind = "tuple" if "tuple" in desc else "list"
    items = [_unflatten_state(d, arrays) for d in desc[kind]]
    return tuple(items) if kind == "tuple" else items


def optimizer_state(trainer: gluon.Trainer, net: gluon.Block) -> tuple[dict, dict]:
    """Return ``(arrays, info)``: the optimizer's state NDArrays and a JSON description.

    States are keyed by the parameters' structural names, so they load into a network built
    in another process, whatever its name scope.
    """
    names = _structural_names(net)
    index_names = {i: names[id(p)] for i, p in enumerate(trainer._params)}
    optimizer = trainer._optimizer
    updaters = _updaters(trainer)
    arrays: dict = {}
    states = {}
    if updaters:
        for index, state in sorted(updaters[0].states.items()):
            name = index_names[index]
            states[name] = _flatten_state(state, name, arrays)
    info = {
        "name": type(optimizer).__name__.lower(),
        "learning_rate": trainer.learning_rate,
        "num_update": optimizer.num_update,
        "update_counts": {
            str(device): {index_names[i]: n for i, n in counts.items()}
            for device, counts in optimizer._all_index_update_counts.items()
        },
        "states": states,
        "states_available": bool(updaters),
    }
    return arrays, info


def restore_optimizer_state(
    trainer: gluon.Trainer, net: gluon.Block, arrays: dict, info: dict
) -> None:
    """Put state saved by :func:`optimizer_state` into ``trainer`` (built for ``net``)."""
    names = _structural_names(net)
    name_index = {names[id(p)]: i for i, p in enumerate(trainer._params)}
    optimizer = trainer._optimizer
    if info.get("name") != type(optimizer).__name__.lower():
        raise UsageError(
            f"The checkpoint holds {info.get('name')} optimizer state, but this run uses "
            f"{type(optimizer).__name__.lower()}."
        )
    unknown = sorted(set(info["states"]) - set(name_index))
    if unknown:
        raise UsageError(
            f"The checkpoint has optimizer state for parameters this network lacks: "
            f"{', '.join(unknown[:5])}."
        )
    for updater in _updaters(trainer):
        updater.states.clear()
        updater.states_synced.clear()
        for name, desc in info["states"].items():
            index = name_index[name]
            updater.states[index] = _unflatten_state(desc, arrays)
            # The Updater moves unsynced state to its weight's device on the next step.
            updater.states_synced[index] = False
    optimizer.num_update = int(info["num_update"])
    # Mutated in place: the optimizer aliases one of these dicts as _index_update_count.
    for device, counts in info["update_counts"].items():
        target = optimizer._all_index_update_counts.setdefault(int(device), {})
        target.clear()
        target.update({name_index[n]: int(c) for n, c in counts.items() if n in name_index})
    if optimizer.lr_scheduler is None:
        trainer.set_learning_rate(float(info["learning_rate"]))


# --- saving and finding checkpoints ----------------------------------------------------------


def save_checkpoint(
    directory: str | Path,
    net: gluon.Block,
    trainer: gluon.Trainer,
    meta: dict,
    running_stats: mx.nd.NDArray | None = None,
    ema=None,
) -> Checkpoint:
    """Write a checkpoint of ``net`` and ``trainer`` into ``directory``, atomically.

    Parameters
    ----------
    directory : str or Path
        The run's ``checkpoints/`` folder.
    net, trainer
        The network and its trainer, between two optimizer steps.
    meta : dict
        JSON metadata; must hold ``epoch`` (finished epochs) and may hold ``step`` (steps taken
        in the next epoch). ``format``, ``optimizer`` and ``files`` are added here.
    running_stats : NDArray, optional
        Every device's and worker's running statistics (see :mod:`gluon_ft.train.bn_stats`).
    ema : WeightAverage, optional
        ``--ema``'s average of the weights (:mod:`gluon_ft.train.ema`).

    Returns
    -------
    Checkpoint
        The renamed, complete checkpoint. Older interrupted checkpoints are removed, as this
        one supersedes them.
    """
    directory = Path(directory)
    name = checkpoint_name(int(meta["epoch"]), int(meta.get("step", 0)))
    tmp = directory / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    described = _write_arrays(tmp, net, trainer, running_stats, ema)
    full_meta = {"format": FORMAT, **meta, **described}
    (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2) + "\n")
    _fsync(tmp / META_FILE)
    _fsync(tmp)
    saved = Checkpoint(_move_into_place(tmp, directory / name), full_meta)
    _remove_superseded(directory, saved)
    return saved


def _write_arrays(tmp: Path, net, trainer, running_stats, ema) -> dict:
    """Write the checkpoint's array files into ``tmp``, each synced to disk; return what
    ``meta.json`` says of them: ``optimizer``, ``files`` (size and SHA-1 of each) and, with
    ``ema``, ``ema``."""
    net.save_parameters(str(tmp / PARAMS_FILE))
    arrays, optimizer_info = optimizer_state(trainer, net)
    mx.nd.save(str(tmp / OPTIMIZER_FILE), arrays)
    written = [PARAMS_FILE, OPTIMIZER_FILE]
    if running_stats is not None:
        mx.nd.save(str(tmp / STATS_FILE), {"copies": running_stats})
        written.append(STATS_FILE)
    ema_info = None
    if ema is not None:
        ema_arrays, ema_info = ema.state()
        mx.nd.save(str(tmp / EMA_FILE), ema_arrays)
        written.append(EMA_FILE)
    files = {}
    for file_name in written:
        _fsync(tmp / file_name)
        files[file_name] = {
            "bytes": (tmp / file_name).stat().st_size,
            "sha1": _sha1(tmp / file_name),
        }
    described = {"optimizer": optimizer_info, "files": files}
    if ema_info is not None:
        described["ema"] = ema_info
    return described


def _move_into_place(tmp: Path, final: Path) -> Path:
    """Rename the complete temporary directory ``tmp`` to ``final``, and sync the folder."""
    directory = final.parent
    if final.exists():
        # Only a checkpoint that resume skipped as damaged can be in the way: set it aside.
        stale = directory / f".{final.name}.old-{os.getpid()}"
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.rename(tmp, final)
    _fsync(directory)
    return final


def _remove_superseded(directory: Path, saved: Checkpoint) -> None:
    """Remove the interrupted checkpoints older than ``saved``: it supersedes them."""
    for older in list_checkpoints(directory):
        if older.step and older.position < saved.position:
            shutil.rmtree(older.path, ignore_errors=True)


def _read_meta(path: Path) -> dict:
    """Metadata of a checkpoint directory; ValueError if it is not a complete checkpoint."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"no readable {META_FILE} ({err.__class__.__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{META_FILE} is not a {FORMAT} file")
    for file_name, expected in meta.get("files", {}).items():
        file = path / file_name
        if not file.is_file() or file.stat().st_size != expected["bytes"]:
            raise ValueError(f"{file_name} is missing or has the wrong size")
    if (
        not {PARAMS_FILE, OPTIMIZER_FILE}
        <= set(meta.get("files", {}))
        <= {PARAMS_FILE, OPTIMIZER_FILE, STATS_FILE, EMA_FILE}
    ):
        raise ValueError(f"{META_FILE} does not list {PARAMS_FILE} and {OPTIMIZER_FILE}")
    return meta


def list_checkpoints(directory: str | Path) -> list[Checkpoint]:
    """Complete checkpoints in ``directory``, oldest first; temporary directories are ignored."""
    directory = Path(directory)
    found = []
    if directory.is_dir():
        for path in directory.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            try:
                found.append(Checkpoint(path, _read_meta(path)))
            except ValueError:
                continue
    return sorted(found, key=lambda c: c.position)


def latest_checkpoint(directory: str | Path) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint whose files match their recorded SHA-1.

    Returns
    -------
    (Checkpoint or None, list of str)
        The checkpoint to resume from, and one line per directory passed over, with why.
    """
    directory = Path(directory)
    skipped = []
    complete = list_checkpoints(directory)
    complete_paths = {c.path for c in complete}
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            if not path.is_dir() or path in complete_paths:
                continue
            if _TEMP.match(path.name):
                skipped.append(f"{path.name}: unfinished (a temporary directory)")
                continue
            try:
                _read_meta(path)
            except ValueError as err:
                skipped.append(f"{path.name}: {err}")
    for candidate in reversed(complete):
        bad = [
            name
            for name, expected in candidate.meta["files"].items()
            if _sha1(candidate.path / name) != expected["sha1"]
        ]
        if not bad:
            return candidate, skipped
        skipped.append(f"{candidate.path.name}: SHA-1 mismatch in {', '.join(bad)}")
    return None, skipped


def prune_checkpoints(directory: str | Path, keep_last: int, keep_epochs=()) -> list[Path]:
    """Delete end-of-epoch checkpoints but the newest ``keep_last`` and those of ``keep_epochs``.

    ``--keep-checkpoints K`` keeps the last K (``--resume`` needs the last) and the best epoch's,
    which becomes ``model.params``. Interrupted checkpoints are :func:`save_checkpoint`'s.
    """
    finished = [c for c in list_checkpoints(directory) if not c.step]
    kept = {c.path for c in finished[-keep_last:]} | {
        c.path for c in finished if c.epoch in set(keep_epochs)
    }
    removed = [c.path for c in finished if c.path not in kept]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporary checkpoint directories left by processes that no longer run."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        match = _TEMP.match(path.name)
        if not match or not path.is_dir():
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def saved_running_stats(checkpoint: Checkpoint) -> mx.nd.NDArray | None:
    """The running statistics of every copy, if ``checkpoint`` holds them."""
    if STATS_FILE not in checkpoint.meta["files"]:
        return None
    try:
        return mx.nd.load(str(checkpoint.path / STATS_FILE))["copies"]
    except (mx.base.MXNetError, KeyError, TypeError) as err:
        raise UsageError(f"{checkpoint.path / STATS_FILE} is unreadable: {err}") from None


def saved_ema(checkpoint: Checkpoint) -> tuple[dict, dict] | None:
    """``(arrays, info)`` of the checkpoint's ``--ema`` average, if it holds one."""
    if EMA_FILE not in checkpoint.meta["files"]:
        return None
    try:
        arrays = mx.nd.load(str(checkpoint.path / EMA_FILE))
    except mx.base.MXNetError as err:
        raise UsageError(f"{checkpoint.path / EMA_FILE} is unreadable: {err}") from None
    return (arrays if isinstance(arrays, dict) else {}), checkpoint.meta["ema"]


def restore_checkpoint(checkpoint: Checkpoint, net: gluon.Block, trainer: gluon.Trainer) -> dict:
    """Load ``checkpoint`` into ``net`` (on its contexts) and ``trainer``; return its metadata."""
    ctx = next(iter(net.collect_params().values())).list_ctx()
    load_parameters(net, checkpoint.path / PARAMS_FILE, ctx, what="Checkpoint parameters")
    try:
        arrays = mx.nd.load(str(checkpoint.path / OPTIMIZER_FILE))
    except mx.base.MXNetError as err:
        raise UsageError(f"{checkpoint.path / OPTIMIZER_FILE} is unreadable: {err}") from None
    if not isinstance(arrays, dict):  # nd.save of an empty dict loads as an empty list
        arrays = {}
    restore_optimizer_state(trainer, net, arrays, checkpoint.meta["optimizer"])
    return checkpoint.meta
