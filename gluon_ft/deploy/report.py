"""The report of a finished run: per-class scores on a split, the confusion matrix, mistakes.

A run evaluated as ``gluon-ft predict`` would (:class:`gluon_ft.deploy.predict.Predictor`, the run's
``model.params`` and test transform), on its test or val part (from ``split.json``) or on any
folder of class folders. It writes, into one folder:

- ``summary.json``: the selection fields a training run passes in (best epoch, monitor, ...),
  then accuracy, loss, balanced accuracy, macro-F1 and the per-class scores;
- ``report.md``: the same as tables, with the split sizes and both figures;
- ``confusion.png`` and ``mistakes.png``: the confusion matrix, and the wrong predictions made
  with the highest confidence, each titled with its file name, the true and predicted class.

A multi-label run's report has no confusion matrix: ``summary.json`` and ``report.md`` give
mAP, F1 and per-class AP, precision, recall and F1, and list the images whose predicted set
is most wrong (file, true set, predicted set, missed and spurious labels); ``pr_curves.png``
draws each class's precision-recall curve, and ``mistakes.png`` the most wrong images.

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
from gluon_ft.deploy import plots
from gluon_ft.deploy.metrics import (
    choose_thresholds,
    class_scores,
    multilabel_scores,
    precision_recall_curve,
    set_mistakes,
)
from gluon_ft.deploy.predict import THRESHOLDS_FILE, Predictor, SplitPredictions, predict_split
from gluon_ft.deploy.runparts import run_parts
from gluon_ft.errors import UsageError

SELECTION_KEYS = ("best_epoch", "monitor", "best_value", "stopped_early")
# With --ema: which weights model.params holds ("ema" or "trained") and why.
EMA_KEYS = ("weights", "ema_epoch", "ema_score", "trained_score", "weights_reason")
MISTAKES_SHOWN = 16
MISTAKES_LISTED = 20  # a multi-label report's table and summary.json
THUMBNAIL = 96  # px, the longer side of a mistake's picture


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
    name, images = _evaluated_split(run_dir, split, predictor.classes, predictor.multi_label)
    out = Path(out) if out else run_dir if name == "test" else run_dir / f"report-{name}"
    out.mkdir(parents=True, exist_ok=True)
    predictions = predict_split(predictor, images)
    if not len(predictions.labels):
        raise UsageError(f"No readable image in the {name} split ({images.root}).")
    if selection is None:
        selection = _saved_selection(run_dir)
    sizes = _part_sizes(predictor.run.config)
    if predictor.multi_label:
        wrong = set_mistakes(
            predictions.probabilities, predictions.labels, predictor.thresholds, MISTAKES_LISTED
        )
        summary = _multilabel_summary(name, images, predictions, predictor, selection, wrong)
        _write_multilabel_report(run_dir, out, summary, sizes)
        _plot_multilabel(out, summary, predictions, images, wrong)
        return summary, out
    summary = _summary(name, images, predictions, predictor.classes, selection, predictor.tta)
    _write_report(run_dir, out, summary, predictions, images, predictor.classes, sizes)
    return summary, out


def write_thresholds(run_dir: str | Path, ctx: mx.Context | None = None) -> np.ndarray:
    """``--thresholds auto``: each class's threshold, the best F1 of the run's
    ``model.params`` on its val part (never the test part); written to ``thresholds.json``,
    which :class:`Predictor` and the report then use.

    Raises
    ------
    UsageError
        The run has no val part, or no readable image in it.
    """
    run_dir = Path(run_dir)
    (run_dir / THRESHOLDS_FILE).unlink(missing_ok=True)  # chosen with no earlier choice
    predictor = Predictor(run_dir, ctx)
    _, images = _evaluated_split(run_dir, "val", predictor.classes)
    predictions = predict_split(predictor, images)
    if not len(predictions.labels):
        raise UsageError(f"No readable image in the val part of {run_dir}.")
    chosen = choose_thresholds(predictions.probabilities, predictions.labels)
    record = {
        "thresholds": [float(t) for t in chosen],
        "classes": list(predictor.classes),
        "chosen_on": "val",
        "images": len(predictions.labels),
    }
    paths.write_json(run_dir / THRESHOLDS_FILE, record)
    return chosen


def _multilabel_summary(
    name, images, predictions, predictor: Predictor, selection, wrong: list[int]
) -> dict:
    """``summary.json`` of a multi-label run: mAP, F1 (micro, macro), exact match, the loss,
    per-label accuracy, per class AP, precision, recall and F1 at the run's thresholds, and
    the ``mistakes`` at positions ``wrong``."""
    probs, targets = predictions.probabilities, predictions.labels
    scores = multilabel_scores(probs, targets, predictor.classes, predictor.thresholds)
    prefix = name if name in ("test", "val") else "folder"
    clipped = np.clip(probs.astype(np.float64), 1e-12, 1 - 1e-12)
    loss = -(targets * np.log(clipped) + (1 - targets) * np.log(1 - clipped)).mean()
    decided = (probs >= predictor.thresholds) == (targets > 0)
    return {
        **selection,
        f"{prefix}_map": scores.pop("map"),
        f"{prefix}_acc": float(decided.mean()),  # per label, at the thresholds
        f"{prefix}_loss": float(loss),
        **scores,
        "multi_label": True,
        "split": name if name in ("test", "val") else str(images.root),
        "images": len(targets),
        "unreadable": len(images) - len(targets),
        "tta": predictor.tta,
        "mistakes": [
            _set_mistake(predictions, images, predictor.classes, predictor.thresholds, position)
            for position in wrong
        ],
    }


def _set_mistake(predictions: SplitPredictions, images, classes, thresholds, position) -> dict:
    """One entry of ``summary.json``'s ``mistakes`` (the images whose predicted set is not
    their set, the most wrong first: :func:`~gluon_ft.deploy.metrics.set_mistakes`): its file
    (under the dataset root), its sets, the labels missed and the spurious ones, its error and
    the probabilities of the classes in either set."""
    row = predictions.probabilities[position].astype(np.float64)
    true = predictions.labels[position] > 0
    predicted = row >= thresholds
    return {
        "file": _file_name(images, int(predictions.indices[position])),
        "true": _names(classes, true),
        "predicted": _names(classes, predicted),
        "missed": _names(classes, true & ~predicted),
        "spurious": _names(classes, predicted & ~true),
        "error": float(np.abs(row - true).sum()),
        "probabilities": {classes[c]: float(row[c]) for c in np.flatnonzero(true | predicted)},
    }


def _names(classes, chosen: np.ndarray) -> list[str]:
    return [classes[c] for c in np.flatnonzero(chosen)]


def _file_name(images, index: int) -> str:
    """Item ``index``'s file, relative to the dataset root when it lies under it."""
    path = Path(images.items[index][0])
    try:
        return path.relative_to(images.root).as_posix()
    except ValueError:
        return str(path)


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
    sizes: dict,
) -> None:
    """The report's four files in ``out``: summary, confusion matrix, mistakes, markdown."""
    paths.write_json(out / "summary.json", summary)
    plots.plot_confusion(predictions.confusion_matrix(), classes, out / "confusion.png")
    _plot_mistakes(predictions, images, classes, out / "mistakes.png")
    paths.write_text(out / "report.md", report_markdown(run_dir, summary, sizes))


def _write_multilabel_report(run_dir: Path, out: Path, summary: dict, sizes: dict) -> None:
    """A multi-label run's ``summary.json`` and ``report.md`` (no confusion matrix)."""
    paths.write_json(out / "summary.json", summary)
    paths.write_text(out / "report.md", multilabel_markdown(run_dir, summary, sizes))


def _plot_multilabel(out: Path, summary: dict, predictions, images, wrong: list[int]) -> None:
    """A multi-label report's figures: ``pr_curves.png``, each class's precision-recall curve
    with its AP, and ``mistakes.png``, the most wrong images (positions ``wrong``, as
    ``summary["mistakes"]`` lists them) titled with the labels missed and the spurious ones."""
    per_class = summary["per_class"]
    positive = predictions.labels > 0
    curves = [
        precision_recall_curve(predictions.probabilities[:, c], positive[:, c])
        for c in range(len(per_class))
    ]
    plots.plot_pr_curves(
        [None if curve is None else curve[:2] for curve in curves],
        [f"{row['class']} (AP {_number(row['ap'], 3)})" for row in per_class],
        [(row["recall"], row["precision"]) for row in per_class],
        out / "pr_curves.png",
    )
    shown = [images.load(int(predictions.indices[i])) for i in wrong[:MISTAKES_SHOWN]]
    titles = [
        f"{_short_name(entry['file'])}\n"
        f"missed {_elided(', '.join(entry['missed']) or '-', 14)}\n"
        f"spurious {_elided(', '.join(entry['spurious']) or '-', 12)}"
        for entry in summary["mistakes"][:MISTAKES_SHOWN]
    ]
    plots.plot_mistakes(shown, titles, out / "mistakes.png", tile=THUMBNAIL)


def _evaluated_split(run_dir: Path, split: str, classes: list[str], multi_label: bool = False):
    """``(name, ImageFolderSplit)`` of ``--split``: a part of the run, or a folder (not for a
    ``multi_label`` run, whose images have sets of labels that class folders cannot give)."""
    if split in ("test", "val"):
        part = run_parts(run_dir).named().get(split)
        if part is None:
            raise UsageError(f"{run_dir} was trained without a {split} part.")
        return split, part
    if multi_label:
        raise UsageError(
            f"{run_dir} is a multi-label run: a folder of class folders gives one label per "
            "image; report on its test or val part (--split test or val)."
        )
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


def _part_sizes(config: dict) -> dict:
    """The part sizes that the run's ``config.json`` (already read by :class:`Predictor`)
    records, for the report's heading."""
    return {part: config.get(f"{part}_size") for part in splits.PART_NAMES}


def _short_name(path: str, limit: int = 18) -> str:
    """A file's name that fits a thumbnail's title: its middle elided when long."""
    name = Path(path).name
    return name if len(name) <= limit else f"{name[: limit // 2 - 1]}...{name[-(limit // 2 - 2) :]}"


def _elided(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, its end elided when longer."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _heading_lines(run_dir: Path, summary: dict, sizes: dict) -> list[str]:
    """``report.md``'s title, what was evaluated, which weights, the split sizes."""
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
    return lines


def report_markdown(run_dir: Path, summary: dict, sizes: dict) -> str:
    """``report.md``: what was evaluated, the overall figures and the table per class."""
    prefix = next(key[: -len("_acc")] for key in summary if key.endswith("_acc"))
    lines = _heading_lines(run_dir, summary, sizes)
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


def multilabel_markdown(run_dir: Path, summary: dict, sizes: dict) -> str:
    """``report.md`` of a multi-label run: the overall figures, per class AP, precision,
    recall and F1 at its threshold, the precision-recall curves, and the most wrong images
    (no confusion matrix: an image has several classes)."""
    prefix = next(key[: -len("_map")] for key in summary if key.endswith("_map"))
    lines = _heading_lines(run_dir, summary, sizes)
    lines += ["", "| overall | value |", "|---|---|"]
    lines += [
        f"| mAP | {_number(summary[prefix + '_map'])} |",
        f"| micro-F1 | {_number(summary['f1_micro'])} |",
        f"| macro-F1 | {_number(summary['f1_macro'])} |",
        f"| exact match | {_number(summary['exact_match'])} |",
        f"| per-label accuracy | {_number(summary[prefix + '_acc'])} |",
        f"| loss | {_number(summary[prefix + '_loss'])} |",
        "",
        "| class | AP | threshold | precision | recall | F1 | support |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['class']} | {_number(row['ap'])} | {row['threshold']:.3f} "
        f"| {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |"
        for row in summary["per_class"]
    ]
    lines += ["", "![precision-recall curve of each class](pr_curves.png)", ""]
    return "\n".join(lines + _mistakes_lines(summary))


def _mistakes_lines(summary: dict) -> list[str]:
    """``report.md``'s table of the most wrong images of a multi-label run, and their picture."""
    mistakes = summary["mistakes"]
    wrong = round((1 - summary["exact_match"]) * summary["images"])
    if not mistakes:
        return ["Every image's predicted set is its set.", ""]
    lines = [
        f"{wrong} of {summary['images']} images have a predicted set that is not theirs; "
        f"the {len(mistakes)} most wrong (error: the sum over the classes of each "
        "probability's distance from the truth, 0 or 1; probabilities in brackets):",
        "",
        "| file | true | predicted | missed | spurious | error |",
        "|---|---|---|---|---|---|",
    ]
    for entry in mistakes:
        sets = [", ".join(entry[key]) or "(none)" for key in ("true", "predicted")]
        wrong_labels = [
            ", ".join(f"{name} ({entry['probabilities'][name]:.2f})" for name in entry[key]) or "-"
            for key in ("missed", "spurious")
        ]
        cells = [entry["file"], *sets, *wrong_labels, f"{entry['error']:.2f}"]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return lines + ["", "![the most wrong images](mistakes.png)", ""]


def _cell(text: str) -> str:
    """``text`` safe in a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _number(value, places: int = 4) -> str:
    """A score to 4 places, or a dash for one that is undefined (a class without positives)."""
    return "-" if value is None else f"{value:.{places}f}"
