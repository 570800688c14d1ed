"""The run directory: where a run keeps its files, each replaced atomically.

``config.json``, ``classes.json``, ``split.json``, ``metrics.json``, ``curves.png``,
``metrics.csv``, ``trainable.txt``, ``model.params``, ``checkpoints/`` and, with
``--tensorboard``, ``tensorboard/``. Only the writer (rank 0 of a
distributed run) has one. Each epoch ends here: :meth:`RunDirectory.keep` its checkpoint,
:meth:`RunDirectory.prune` the older ones, :meth:`RunDirectory.record` the rows so far.
"""

from __future__ import annotations

import csv
import io
import shutil
import time
from pathlib import Path

import mxnet as mx
from mxnet import gluon

from gluon_ft import paths
from gluon_ft.deploy.plots import plot_curves
from gluon_ft.errors import UsageError
from gluon_ft.train.checkpoint import Checkpoint, prune_checkpoints, save_checkpoint
from gluon_ft.train.config import TrainConfig

SPLIT_FILE = "split.json"  # which dataset file is in which part; --resume reuses it


class RunDirectory:
    """The files of one run; every write goes to a temporary name and is renamed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        # The folders prepare() created, deepest first: a run that fails before it writes
        # anything removes them again (the default ./runs/ included).
        self.created: list[Path] = []
        self.tensorboard: TensorBoardLog | None = None  # --tensorboard: log_events()

    def prepare(self, resume: bool = False) -> None:
        """Create the folder, refusing to overwrite a finished or started run.

        A run has started once it wrote ``config.json`` (before its first step).
        """
        if not resume and (self.path / "metrics.json").exists():
            state = "with finished epochs in metrics.json"
        elif not resume and (self.path / "config.json").exists():
            state = "started, with no finished epoch yet (it has config.json)"
        else:
            state = None
        if state:
            raise UsageError(
                f"{self.path} already holds a run, {state}. Pass another --out, or --resume "
                "to continue it; nothing was overwritten."
            )
        missing = [self.path / "checkpoints", self.path, *self.path.parents]
        self.created = [folder for folder in missing if not folder.exists()]
        try:
            (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise UsageError(f"Cannot write the run directory {self.path}: {err}") from None

    def remove_if_unused(self) -> None:
        """Remove the folder :meth:`prepare` created, if the run wrote nothing into it.

        A run that fails on its data or settings leaves no empty run behind (``prepare``
        runs first on purpose: an unwritable ``--out`` must fail before a download).
        """
        for folder in self.created:
            try:
                folder.rmdir()  # only an empty folder goes
            except OSError:
                return

    def log_events(self) -> None:
        """``--tensorboard``: :meth:`record` logs each row in ``tensorboard/`` from now on.

        Raises
        ------
        UsageError
            tensorboardX is not installed.
        """
        self.tensorboard = TensorBoardLog(self.path / "tensorboard")

    def close(self) -> None:
        """Close the TensorBoard log, if one is open."""
        if self.tensorboard is not None:
            self.tensorboard.close()

    def keep(
        self,
        net: gluon.Block,
        trainer: gluon.Trainer,
        meta: dict,
        running_stats: mx.nd.NDArray | None = None,
        ema=None,
    ) -> Checkpoint:
        """A checkpoint in ``checkpoints/`` (:func:`~gluon_ft.train.checkpoint.save_checkpoint`,
        which says what ``meta``, ``running_stats`` and ``ema`` hold)."""
        return save_checkpoint(self.path / "checkpoints", net, trainer, meta, running_stats, ema)

    def prune(self, keep_last: int, keep_epochs=()) -> list[Path]:
        """Remove the end-of-epoch checkpoints but the newest ``keep_last`` and those of
        ``keep_epochs`` (:func:`~gluon_ft.train.checkpoint.prune_checkpoints`)."""
        return prune_checkpoints(self.path / "checkpoints", keep_last, keep_epochs)

    def record(self, history: list[dict], best_epoch: int | None = None) -> None:
        """The epochs' rows so far: :meth:`write_metrics`, the newest row in the TensorBoard
        log (with ``--tensorboard``), and the curves in ``curves.png`` (``best_epoch``, the
        one ``model.params`` will hold, marked)."""
        self.write_metrics(history)
        if self.tensorboard is not None:
            self.tensorboard.add_epoch(history[-1])
        plot_curves(history, self.path / "curves.png", best_epoch=best_epoch)

    def write_json(self, name: str, obj) -> Path:
        return paths.write_json(self.path / name, obj)

    def write_metrics(self, history: list[dict]) -> None:
        """``metrics.json`` and the same rows as ``metrics.csv`` (lists joined by ``;``)."""
        self.write_json("metrics.json", history)
        columns = list(dict.fromkeys(key for row in history for key in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow(
                {k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()}
            )
        paths.write_text(self.path / "metrics.csv", text.getvalue())

    def copy_params(self, source: Path, name: str = "model.params") -> Path:
        """``name`` becomes a byte-for-byte copy of ``source`` (the best checkpoint's)."""
        with paths.replacing(self.path / name) as tmp:
            shutil.copyfile(source, tmp)
        return self.path / name

    def save_params(self, net: gluon.Block, name: str = "model.params") -> Path:
        with paths.replacing(self.path / name) as tmp:
            net.save_parameters(str(tmp))
        return self.path / name


class TensorBoardLog:
    """``--tensorboard``: every number of each epoch's row as a scalar, under ``folder``.

    Written with tensorboardX, which needs no TensorFlow; ``tensorboard --logdir RUN`` shows it.
    """

    def __init__(self, folder: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise UsageError(
                "--tensorboard needs tensorboardX: pip install tensorboardX "
                "(with requirements/constraints.txt)."
            ) from None
        self.folder = folder
        self.writer_class = SummaryWriter
        self.writer = None  # opened at the first epoch: a run that fails before leaves no file

    def add_epoch(self, row: dict) -> None:
        if self.writer is None:
            self.writer = self.writer_class(str(self.folder))
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def default_out(config: TrainConfig) -> str:
    """``runs/<data>-<model>-<time>`` for a run without ``--out``."""
    data = "hotdog" if config.data == "hotdog" else Path(config.data).name or "data"
    return str(Path("runs") / f"{data}-{config.model}-{time.strftime('%Y%m%d-%H%M%S')}")
