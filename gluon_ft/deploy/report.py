"""The report of a finished run: per-class scores on a split, the confusion matrix, mistakes.

A run evaluated as ``gluon-ft predict`` would (:class:`gluon_ft.deploy.predict.Predictor`, the run's
``model.params`` and test transform), on its test or val part (from ``split.json``) or on any
folder of class folders. It writes, into one folder:

- ``summary.json``: the selection fields a training run passes in (best epoch, monitor, ...),
  then accuracy, loss, balanced accuracy, macro-F1 and the per-class scores;
- ``report.md``: the same as tables, with the split sizes and both figures;
- ``confusion.png`` and ``mistakes.png``: the confusion matrix, and the wrong predictions made
  with the highest confidence, each titled with its file name, the true and predicted class.

A deploy module: it reads a finished run and never imports the training code.
"""

from __future__ import annotations

import json
from pathlib import Path

import mxnet as mx
import numpy as np

from gluon_ft import paths
from gluon_ft.data import splits
from gluon_ft.data.folders import ImageFolderSplit, scan_split
from gluon_ft.data.recordio import load_pack
from gluon_ft.deploy import plots
from gluon_ft.deploy.metrics import class_scores
from gluon_ft.deploy.predict import Predictor, SplitPredictions, predict_split
from gluon_ft.errors import UsageError

SELECTION_KEYS = ("best_epoch", "monitor", "best_value", "stopped_early")
# With --ema: which weights model.params holds ("ema" or "trained") and why.
EMA_KEYS = ("weights", "ema_epoch", "ema_score", "trained_score", "weights_reason")
MISTAKES_SHOWN = 16
THUMBNAIL = 96  # px, the longer side of a mistake's picture


def run_parts(run_dir: Path) -> splits.DatasetParts:
    """The parts a run trained and was tested on, from its ``split.json``.

    Raises
    ------
    UsageError
        The run has no readable ``split.json``, or its files are gone.
    """
    split_file = run_dir / "split.json"
    if not split_file.is_file():
        raise UsageError(
            f"{run_dir} has no split.json (a run from before it was written): give the images "
            "to report on as --split DIR (DIR/<class>/*)."
        )
    try:
        record = json.loads(split_file.read_text())
        root = record["root"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{split_file} is not a split record: {err}") from None
    if record.get("layout") == splits.PACK:
        train, test = load_pack(root)
        return splits.DatasetParts(Path(root), splits.PACK, train, test)
    return splits.parts_from_record(root, record)


def folder_split(folder: Path, classes: list[str]) -> ImageFolderSplit:
    """``folder/<class>/*`` labelled with the run's class indices.

    Raises
    ------
    UsageError
        Not a folder of class folders, or a class the run does not know.
    """
    scanned = scan_split(folder)
    unknown = [name for name in scanned.classes if name not in classes]
    if unknown:
        raise UsageError(
            f"{folder} has class folder(s) the run does not know: {', '.join(unknown)}. "
            f"The run's classes: {', '.join(classes)}."
        )
    items = tuple((path, classes.index(scanned.classes[label])) for path, label in scanned.items)
    return ImageFolderSplit(folder, tuple(classes), items)


def build_report(
    run_dir: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    selection: dict | None = None,
    ctx: mx.Context | None = None,
    tta: int | None = None,
) -> tuple[dict, Path]:
    """Evaluate a finished run on ``split`` and write the report.

    Returns
    -------
    (dict, Path)
        The content of ``summary.json``, and the folder the report went to.

    Parameters
    ----------
    run_dir : str or Path
        A finished run directory.
    split : str
        ``"test"`` or ``"val"`` (the run's parts, from ``split.json``), or a folder
        ``DIR/<class>/*``.
    out : str or Path, optional
        Where the files go: the run directory for its test part, else ``RUN/report-<name>``.
    selection : dict, optional
        The selection fields (:data:`SELECTION_KEYS`); by default those of the run's
        ``summary.json``, if it has one.
    ctx : Context, optional
        Where to run the network; the CPU by default.
    tta : int, optional
        Test-time augmentation views (:mod:`gluon_ft.data.tta`); by default the run's ``--tta``
        (``config.json``).

    Raises
    ------
    UsageError
        Not a finished run, no such split, or no readable image in it.
    """
    run_dir = Path(run_dir).expanduser()
    predictor = Predictor(run_dir, ctx, tta=tta)  # None: the run's own --tta
    name, images = _evaluated_split(run_dir, split, predictor.classes)
    out = Path(out) if out else run_dir if name == "test" else run_dir / f"report-{name}"
    out.mkdir(parents=True, exist_ok=True)
    predictions = predict_split(predictor, images)
    if not len(predictions.labels):
        raise UsageError(f"No readable image in the {name} split ({images.root}).")
    if selection is None:
        selection = _saved_selection(run_dir)
    summary = _summary(name, images, predictions, predictor.classes, selection, predictor.tta)
    _write_report(run_dir, out, summary, predictions, images, predictor.classes)
    return summary, out


def _summary(
    name: str,
    images,
    predictions: SplitPredictions,
    classes: list[str],
    selection: dict,
    tta: int,
) -> dict:
    """``summary.json``: the selection fields, the scores, and what was evaluated how."""
    return {
        **selection,
        **_scores(name, predictions, classes),
        "split": name if name in ("test", "val") else str(images.root),
        "images": len(predictions.labels),
        "unreadable": len(images) - len(predictions.labels),
        "tta": tta,
    }


def _write_report(
    run_dir: Path,
    out: Path,
    summary: dict,
    predictions: SplitPredictions,
    images,
    classes: list[str],
) -> None:
    """The report's four files in ``out``: summary, confusion matrix, mistakes, markdown."""
    paths.write_json(out / "summary.json", summary)
    plots.plot_confusion(predictions.confusion_matrix(), classes, out / "confusion.png")
    _plot_mistakes(predictions, images, classes, out / "mistakes.png")
    paths.write_text(out / "report.md", report_markdown(run_dir, summary, _part_sizes(run_dir)))


def _evaluated_split(run_dir: Path, split: str, classes: list[str]):
    """``(name, ImageFolderSplit)`` of ``--split``: a part of the run, or a folder."""
    if split in ("test", "val"):
        part = run_parts(run_dir).named().get(split)
        if part is None:
            raise UsageError(f"{run_dir} was trained without a {split} part.")
        return split, part
    folder = Path(split).expanduser()
    if not folder.is_dir():
        raise UsageError(f"--split {split}: expected test, val or a folder DIR/<class>/*.")
    return folder.name or "folder", folder_split(folder, classes)


def _saved_selection(run_dir: Path) -> dict:
    try:
        saved = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return {key: saved[key] for key in SELECTION_KEYS + EMA_KEYS if key in saved}


def _scores(name: str, predictions: SplitPredictions, classes: list[str]) -> dict:
    """Accuracy and loss (keyed ``test_`` or ``val_`` for the run's parts), and the rest."""
    scores = class_scores(predictions.confusion_matrix(), classes)
    picked = predictions.probabilities[np.arange(len(predictions.labels)), predictions.labels]
    loss = float(-np.log(np.maximum(picked, np.finfo(np.float32).tiny)).mean())
    prefix = name if name in ("test", "val") else "folder"
    return {
        f"{prefix}_acc": scores.pop("accuracy"),
        f"{prefix}_loss": loss,
        **scores,
    }


def _run_settings(run_dir: Path) -> dict:
    """The run's ``config.json``; empty if unreadable (:class:`Predictor` then says why)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _part_sizes(run_dir: Path) -> dict:
    config = _run_settings(run_dir)
    if not config:
        return {}
    return {part: config.get(f"{part}_size") for part in splits.PART_NAMES}


def _short_name(path: str, limit: int = 18) -> str:
    """A file's name that fits a thumbnail's title: its middle elided when long."""
    name = Path(path).name
    return name if len(name) <= limit else f"{name[: limit // 2 - 1]}...{name[-(limit // 2 - 2) :]}"


def _plot_mistakes(predictions: SplitPredictions, images, classes: list[str], path: Path) -> None:
    """The surest wrong predictions: thumbnails titled true / predicted (probability)."""
    shown, titles = [], []
    for position in predictions.confident_mistakes(MISTAKES_SHOWN):
        index = int(predictions.indices[position])
        picture = images.load(index)
        predicted = int(predictions.predicted[position])
        probability = float(predictions.probabilities[position, predicted])
        shown.append(picture)
        titles.append(
            f"{_short_name(images.items[index][0])}\n"
            f"true {classes[predictions.labels[position]]}\n"
            f"pred {classes[predicted]} ({probability:.2f})"
        )
    plots.plot_mistakes(shown, titles, path, tile=THUMBNAIL)


def report_markdown(run_dir: Path, summary: dict, sizes: dict) -> str:
    """``report.md``: what was evaluated, the overall figures and the table per class."""
    prefix = next(key[: -len("_acc")] for key in summary if key.endswith("_acc"))
    lines = [f"# Report: {run_dir.name}", ""]
    lines.append(
        f"Evaluated on the {summary['split']} split: {summary['images']} images"
        + (f" ({summary['unreadable']} unreadable, left out)." if summary["unreadable"] else ".")
        + (f" Test-time augmentation: {summary['tta']} views." if summary.get("tta", 1) > 1 else "")
    )
    if summary.get("best_epoch") is not None:
        kept = (
            f"the best epoch by {summary['monitor']} ({summary['best_value']:.4f})"
            if summary.get("monitor")
            else "the last epoch (no validation part to select on)"
        )
        stopped = " The run stopped early." if summary.get("stopped_early") else ""
        if summary.get("weights") == "ema":
            kept = f"the EMA of the weights after epoch {summary['ema_epoch']}"
            lines.append(f"Weights: {kept} ({summary['weights_reason']}).{stopped}")
        else:
            lines.append(f"Weights: epoch {summary['best_epoch']}, {kept}.{stopped}")
        if summary.get("weights") == "trained":
            lines.append(f"The EMA of the weights was not kept: {summary['weights_reason']}.")
    if any(sizes.values()):
        lines.append(
            "Split sizes: " + ", ".join(f"{k} {v}" for k, v in sizes.items() if v is not None) + "."
        )
    lines += ["", "| overall | value |", "|---|---|"]
    lines += [
        f"| accuracy | {summary[prefix + '_acc']:.4f} |",
        f"| balanced accuracy | {summary['balanced_acc']:.4f} |",
        f"| macro-F1 | {summary['macro_f1']:.4f} |",
        f"| loss | {summary[prefix + '_loss']:.4f} |",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['class']} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} "
        f"| {row['support']} |"
        for row in summary["per_class"]
    ]
    lines += [
        "",
        "![confusion matrix (rows: true class)](confusion.png)",
        "",
        "![the surest mistakes](mistakes.png)",
        "",
    ]
    return "\n".join(lines)
