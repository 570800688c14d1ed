"""Stopping and resuming: signals, per-step seeds, and checking what ``--resume`` continues.

A run stops between two steps on SIGINT or SIGTERM (:class:`StopRequest`) and saves a
checkpoint first (:func:`save_interrupted`); the resumed epoch adds the metrics of the steps
it took before (:func:`add_steps_before`). Every step draws from ``mx.random`` under its own
seed and sets its own scheduled rate (:class:`EpochSteps`), so a resumed run, even one
stopped mid-epoch, computes exactly what an uninterrupted run would. ``--resume`` continues
only the same run: the settings of ``config.json`` (:func:`find_resume_checkpoint`), and the
classes and image files the run started with (:func:`check_same_data`). The checkpoint files
themselves are :mod:`gluon_ft.train.checkpoint`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import mxnet as mx
import numpy as np

from gluon_ft.errors import DivergedError, Interrupted, UsageError
from gluon_ft.train.bn_stats import every_copy
from gluon_ft.train.checkpoint import Checkpoint, latest_checkpoint, remove_stale_temporaries
from gluon_ft.train.config import TrainConfig
from gluon_ft.train.dist import DistContext
from gluon_ft.train.step import sum_over_workers

# Settings that a resumed run may change, because
# they do not change what is computed:
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "workers",
        "progress",
        "log_every",
        "resume",
        "strict",
        "out",
        "tensorboard",  # what is logged, not what is computed
        "keep_checkpoints",  # which old checkpoints are kept
    }
)
RESUMABLE_FLAGS = (
    "--epochs, --workers, --strict, --tensorboard, --keep-checkpoints and --no-progress"
)


class StopRequest:
    """SIGINT and SIGTERM ask the loop to stop between two steps; a second signal stops at once.

    Signals can only be caught in the main thread; elsewhere this never fires. The workers of
    a distributed run must stop at the same step, or those that go on wait forever for the
    others' gradients: once :attr:`dist` is set, :meth:`requested` asks every worker.
    """

    def __init__(self):
        self.signal: str | None = None
        self.dist: DistContext | None = None
        self._previous: dict = {}
        self._pid = os.getpid()

    def requested(self) -> bool:
        """Whether to stop here: a signal came to this process, or to any worker.

        In a distributed run every worker must call it at the same points (an allreduce).
        """
        if self.dist is None or not self.dist.distributed:
            return self.signal is not None
        (signalled,) = self.dist.allreduce_sum([self.signal is not None])
        if signalled and self.signal is None:
            self.signal = "a signal to another worker"
        return bool(signalled)

    def __enter__(self) -> StopRequest:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # A forked DataLoader worker inherits this handler; it must die as a process does,
            # or Pool.terminate() (the DataLoader's cleanup) waits for it forever.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name


def step_seed(seed: int, epoch: int, step: int, rank: int | None = None) -> int:
    """The ``mx.random`` seed of one step, so a resumed run draws what the whole run drew.

    ``rank`` is the worker of a distributed run (None in one process): each worker draws its
    own Dropout masks, rather than the same ones on other samples.
    """
    entropy = [seed, epoch, step] if rank is None else [seed, epoch, step, rank]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0]) % 2**31


class EpochSteps:
    """An epoch's batches from ``first_step`` on, each step under its own ``mx.random`` seed
    and its scheduled learning rate.

    Stops between two steps once ``stop`` has fired. ``done`` counts the epoch's finished
    steps (those before ``first_step`` included); ``total`` is the epoch's step count.
    ``rank`` is the worker of a distributed run, None in one process (see :func:`step_seed`).
    """

    def __init__(
        self,
        loader,
        seed: int,
        epoch: int,
        first_step: int,
        stop: StopRequest,
        set_lr=None,
        rank: int | None = None,
    ):
        self.loader = loader
        self.seed = seed
        self.epoch = epoch
        self.stop = stop
        self.set_lr = set_lr  # set_lr(epoch, step), 0-based, before each step
        self.rank = rank
        self.first_step = first_step
        self.done = first_step
        self.total = first_step + len(loader)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def stopped(self) -> bool:
        """A signal stopped the epoch between two steps, before its last."""
        return self.done < self.total

    def __iter__(self):
        for step, batch in enumerate(self.loader, self.done + 1):
            if self.stop.requested():
                return
            mx.random.seed(step_seed(self.seed, self.epoch, step, self.rank))
            if self.set_lr is not None:
                self.set_lr(self.epoch, step - 1)
            yield batch
            self.done = step  # the loop asked for the next batch: this step is complete


def checkpoint_meta(
    config: TrainConfig, epoch: int, step: int, history: list, partial: dict | None, reason: str
) -> dict:
    """What a checkpoint records besides the arrays (see :mod:`gluon_ft.train.checkpoint`)."""
    return {
        "epoch": epoch,
        "step": step,
        "reason": reason,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": asdict(config),
        "history": history,
        "partial": partial,
        "rng": {
            "seed": config.seed,
            "order": "np.random.default_rng([seed, epoch]).permutation",
            "augmentation": "np.random.default_rng([seed, epoch, sample index])",
            "mxnet": "mx.random.seed(step_seed(seed, epoch, step[, rank])) before each step",
        },
    }


def save_interrupted(steps: EpochSteps, totals: tuple, net, dist: DistContext, keep) -> None:
    """Keep the checkpoint of an epoch that a signal stopped between two steps, unless it
    stopped before taking one (the last checkpoint is then the place to resume).

    ``totals`` are this worker's ``(MetricSums, skipped files, seconds)`` of the epoch so far,
    which the checkpoint keeps as ``partial`` (:func:`add_steps_before` adds them back).
    ``keep(position, partial=..., reason=..., copies=...)`` saves it, the signal's name as the
    reason; None on a worker that does not write. Every worker of a distributed run calls
    this: the sums are taken over every worker, and every worker's (and device's) BatchNorm
    statistics are kept, which is what the resumed run needs to end bit for bit as if never
    stopped.
    """
    if steps.done == steps.first_step:
        return
    sums, skipped, seconds = totals
    sums, skipped = sum_over_workers(dist, sums, skipped)
    copies = every_copy(net, dist)
    if keep is not None:
        partial = {"sums": sums.totals(), "skipped": skipped, "seconds": seconds}
        position = (steps.epoch, steps.done)
        keep(position, partial=partial, reason=steps.stop.signal, copies=copies)


def add_steps_before(resumed: Checkpoint | None, epoch: int, totals: tuple) -> tuple:
    """``totals`` (``(MetricSums, skipped files, seconds)``) of ``epoch``, with those of the
    steps it took before the interruption that ``resumed`` was saved on.

    The checkpoint's ``partial`` totals are over every worker: only the writer adds them,
    before the sums over the workers.
    """
    if resumed is None or not resumed.step or epoch != resumed.epoch:
        return totals
    sums, skipped, seconds = totals
    partial = resumed.meta["partial"]
    sums.add_totals(partial["sums"])
    return sums, skipped + partial["skipped"], seconds + partial["seconds"]


def read_run_file(run_dir: Path, name: str):
    """The JSON file ``name`` of the run in ``run_dir``, or None if it has none.

    Raises
    ------
    UsageError
        The file exists but is not JSON (edited by hand, or from another program).
    """
    path = run_dir / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(
            f"--resume: {path} cannot be read ({err}); it is not the file gluon-ft wrote. "
            "Start a new run (another --out)."
        ) from None


def changed_settings(saved: dict, config: TrainConfig) -> list[str]:
    """``--flag was X, now Y`` for each setting that changes the weights and differs."""
    current = json.loads(json.dumps(asdict(config)))
    return [
        f"--{key.replace('_', '-')} was {saved[key]!r}, now {value!r}"
        for key, value in current.items()
        if key not in RESUMABLE_CHANGES and key in saved and saved[key] != value
    ]


def find_resume_checkpoint(run_dir: Path, config: TrainConfig, tidy: bool = True):
    """Return ``(checkpoint or None, notes)`` for ``--resume`` of ``run_dir`` with ``config``.

    The settings are compared with the run's ``config.json``, so a run stopped before its
    first checkpoint is checked too. ``tidy`` removes the temporary directories of stopped
    processes first: the writer's job (the other workers of a distributed run only read, and
    may run on other machines, where the process ids in those names mean nothing).

    Raises
    ------
    UsageError
        ``run_dir`` holds no run, or its settings differ from ``config`` in more than
        :data:`RESUMABLE_CHANGES`.
    """
    saved = read_run_file(run_dir, "config.json")
    if saved is None:
        raise UsageError(
            f"--resume: {run_dir} holds no run to continue (it has no config.json). Check "
            "--out, or leave out --resume to start a new run. Every worker of a distributed "
            "run reads it: --out must be on storage that they all share."
        )
    changed = changed_settings(saved, config)
    if changed:
        raise UsageError(
            f"--resume: the settings differ from the run in {run_dir}: {'; '.join(changed)}. "
            f"Repeat the original command with --resume; only {RESUMABLE_FLAGS} may change."
        )
    removed = remove_stale_temporaries(run_dir / "checkpoints") if tidy else []
    checkpoint, notes = latest_checkpoint(run_dir / "checkpoints")
    notes = [n for n in notes if not any(n.startswith(p.name) for p in removed)]
    notes += [f"{p.name}: removed, an unfinished checkpoint of a stopped process" for p in removed]
    return checkpoint, notes


def split_files(split, root: Path) -> dict:
    """``{"files": count, "sha256": digest}`` of a split's sorted relative file paths.

    A folder split's paths are relative to the dataset folder ``root`` (``train/dog/001.jpg``),
    so moving the dataset keeps them and renaming a class folder changes them; a pack stores
    them so already. (Relative to ``root``, not to the split's own folder: a part rebuilt from
    ``split.json`` must give the digest of the part first carved out of the folders.)
    """
    if getattr(split, "pack_files", None):
        names = [name for name, _ in split.items]
    else:
        names = [Path(os.path.relpath(path, root)).as_posix() for path, _ in split.items]
    digest = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()
    return {"files": len(names), "sha256": digest}


def data_fingerprint(root: Path, parts: dict) -> dict:
    """What ``config.json`` records of the data (``data_files``), for :func:`check_same_data`:
    :func:`split_files` of each of ``parts`` (``{"train": split, "val": ..., "test": ...}``)
    of the dataset folder ``root``."""
    return {name: split_files(split, root) for name, split in parts.items()}


def check_same_data(run_dir: Path, classes: list[str], fingerprint: dict) -> None:
    """Refuse to continue the run in ``run_dir`` on other classes or other image files.

    A renamed class folder reorders the sorted classes: output 0 would silently change
    meaning. ``classes.json`` holds the run's classes, ``config.json`` its ``data_files``
    (:func:`data_fingerprint`; runs from before it are checked by their classes only).

    Raises
    ------
    UsageError
        The classes (names or order) or a split's files differ.
    """
    saved_classes = read_run_file(run_dir, "classes.json")
    if saved_classes is not None and list(saved_classes) != list(classes):
        raise UsageError(
            f"--resume: the classes of --data differ from those of the run in {run_dir}: "
            f"{describe_class_change(saved_classes, classes)}. Continuing would change what "
            "the outputs mean. Restore the class folders' names, or start a new run "
            "(another --out)."
        )
    saved = (read_run_file(run_dir, "config.json") or {}).get("data_files")
    if not saved:
        return
    changed = [
        f"{name}: {saved[name]['files']} file(s) then, {now['files']} now"
        if saved[name]["files"] != now["files"]
        else f"{name}: {now['files']} file(s) as then, but not the same ones"
        for name, now in fingerprint.items()
        if name in saved and saved[name] != now
    ]
    if changed:
        raise UsageError(
            f"--resume: the image files of --data differ from those the run in {run_dir} "
            f"started with ({'; '.join(changed)}): files were added, removed or renamed. "
            "Resume with the data it started with, or start a new run (another --out)."
        )


def describe_class_change(saved: list[str], now: list[str]) -> str:
    """``output 1 was 'dog', now 'puppy'``, or both lists when their lengths differ."""
    if len(saved) != len(now):
        return f"the run has {len(saved)} class(es) {saved}, the data {len(now)} {now}"
    moved = [
        f"output {i} was {a!r}, now {b!r}" for i, (a, b) in enumerate(zip(saved, now)) if a != b
    ]
    shown = "; ".join(moved[:5]) + (f"; and {len(moved) - 5} more" if len(moved) > 5 else "")
    return shown


def agree_on_checkpoint(dist: DistContext, checkpoint) -> None:
    """Refuse a distributed resume whose workers found different checkpoints.

    Every worker reads rank 0's checkpoint from ``--out``; a worker that sees another one (a
    copy of the run directory, storage that is not shared) would train another model.
    Every worker gets the same answer, so they all refuse together.

    Raises
    ------
    UsageError
        The workers' checkpoints differ.
    """
    if not dist.distributed:
        return
    epoch, step = checkpoint.position if checkpoint is not None else (-1, -1)
    values = [epoch, step, epoch * epoch, step * step]
    sums = dist.allreduce_sum(values)
    n = dist.num_workers
    # All equal exactly when each variance over the workers is zero.
    if sums[2] * n != sums[0] ** 2 or sums[3] * n != sums[1] ** 2:
        raise UsageError(
            "--resume: the workers found different checkpoints in --out (this one: "
            f"{checkpoint.path.name if checkpoint else 'none'}). Every worker must read the "
            "same run directory: put --out on storage that every machine shares."
        )


def diverged_since(err: DivergedError, epoch: int, last) -> DivergedError:
    """``err`` with the epoch and the last good checkpoint, for the exit-3 message."""
    if last is None:
        where = "No checkpoint was saved before it diverged."
    else:
        where = f"The last good checkpoint is {last.path} ({last.describe()})."
    return DivergedError(f"Epoch {epoch + 1}: {err} {where}")


def interrupted_at(stop: StopRequest, last, writer: bool = True) -> Interrupted:
    """The exit-130 error once a signal stopped the run and its checkpoint is saved."""
    if not writer:
        return Interrupted(f"Stopped by {stop.signal}; rank 0 saves the checkpoint.")
    if last is None:
        return Interrupted(f"Stopped by {stop.signal} before the first step; nothing to save.")
    return Interrupted(
        f"Stopped by {stop.signal}; saved checkpoint {last.path} ({last.describe()}). "
        "Continue with the same command and --resume."
    )
