"""Figures: learning curves, image grids, confusion matrices, precision-recall curves. Files
first, notebooks too.

Every function draws on its own figure and, given a path, saves a PNG there and closes the
figure, so long runs leak no memory; without a path it returns the figure for a notebook.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt

from gluon_ft.paths import replacing


def _finish(fig, path: str | Path | None):
    if path is None:
        return fig
    path = Path(path)
    try:
        with replacing(path, suffix=".png") as tmp:  # savefig picks the format by the suffix
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_curves(
    history: Sequence[dict],
    path: str | Path | None = None,
    title: str = "",
    best_epoch: int | None = None,
):
    """Train loss and accuracy per epoch, as in the book's plot, with the val loss and
    accuracy, or without a val part the book's test accuracy; ``best_epoch`` (the weights the
    run keeps) as a vertical line."""
    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(epochs, [row["loss"] for row in history], "-o", label="train loss")
    ax.plot(epochs, [row["train_acc"] for row in history], "--o", label="train acc")
    for key, style in (("val_loss", "-.s"), ("val_acc", ":s"), ("test_acc", ":o")):
        if key in history[0]:
            ax.plot(epochs, [row[key] for row in history], style, label=key.replace("_", " "))
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best: epoch {best_epoch}")
    ax.set_xlabel("epoch")
    ax.set_xlim(0.5, max(epochs) + 0.5)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _finish(fig, path)


def plot_lr_find(lrs, losses, smoothed, suggestion: float | None = None, path=None):
    """The LR range test: each step's loss and the smoothed curve against the rate (log
    axis), the suggested rate marked."""
    import math

    fig, ax = plt.subplots(figsize=(5, 3.4))
    finite = [(lr, x, s) for lr, x, s in zip(lrs, losses, smoothed) if math.isfinite(s)]
    ax.plot(lrs, losses, ".", color="0.7", label="loss per step")
    ax.plot([f[0] for f in finite], [f[2] for f in finite], "-", label="smoothed")
    if finite:  # a blown-up last loss would squash the curve: the smoothed range sets the axis
        low = min(f[2] for f in finite)
        high = max(f[2] for f in finite)
        margin = 0.05 * (high - low or 1.0)
        ax.set_ylim(low - margin, high + margin)
    if suggestion is not None:
        ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested {suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (--lr, per batch)")
    ax.set_ylabel("training loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _finish(fig, path)


def plot_comparison(histories: dict[str, Sequence[dict]], path=None, metric: str = "test_acc"):
    """One line per run (e.g. fine-tuned, scratch, frozen) of ``metric`` against epoch."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, history in histories.items():
        ax.plot([r["epoch"] for r in history], [r[metric] for r in history], "-o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _finish(fig, path)


def show_images(images, titles: Sequence[str] | None = None, cols: int = 8, path=None, scale=1.5):
    """A grid of HWC uint8 images (arrays or PIL images) with optional titles."""
    import numpy as np

    images = [np.asarray(img) for img in images]
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * scale, rows * scale), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i])
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    return _finish(fig, path)


def plot_mistakes(images, titles: Sequence[str], path=None, cols: int = 8, tile: int = 96):
    """The wrong predictions as a titled grid, or a note that there were none.

    The pictures are pasted into one montage on one axes: a grid of subplots costs a second
    or more of layout, at the end of every run.
    """
    import numpy as np
    from PIL import Image

    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    band, gap = 46, 8  # px above each picture for its three-line title; px between pictures
    width, height = tile + gap, tile + band
    montage = np.full((rows * height, cols * width, 3), 255, dtype=np.uint8)
    fig, ax = plt.subplots(figsize=(cols * width / 60, max(rows, 1) * height / 60))
    ax.axis("off")
    for i, (image, title) in enumerate(zip(images, titles)):
        picture = Image.fromarray(np.asarray(image)).convert("RGB")
        scale = tile / max(picture.size)  # fit the tile, small pictures enlarged
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        pixels = np.asarray(picture.resize(size, Image.BILINEAR))
        top, left = (i // cols) * height + band, (i % cols) * width + gap // 2
        y, x = top + (tile - pixels.shape[0]) // 2, left + (tile - pixels.shape[1]) // 2
        montage[y : y + pixels.shape[0], x : x + pixels.shape[1]] = pixels
        ax.text(left + tile / 2, top - 3, title, ha="center", va="bottom", fontsize=7)
    if images:
        ax.imshow(montage)
    else:
        ax.text(0.5, 0.5, "no mistakes", ha="center", va="center", transform=ax.transAxes)
    return _finish(fig, path)


def plot_confusion(matrix, classes: Sequence[str], path=None):
    """A confusion matrix (rows: true class, columns: predicted) twice: the counts, and each
    row divided by its total (the share of each true class predicted as each class, so a
    rare class's errors show as plainly as a common one's)."""
    import numpy as np

    matrix = np.asarray(matrix)
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    side = 1 + 0.6 * len(classes)
    fig, axes = plt.subplots(1, 2, figsize=(2 * (side + 0.2), side))
    for ax, values, title, text in (
        (axes[0], matrix, "counts", lambda v: str(v)),
        (axes[1], shares, "share of each true class", lambda v: f"{v:.2f}"),
    ):
        ax.imshow(values, cmap="Blues", vmin=0)
        ax.set_title(title)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for (i, j), value in np.ndenumerate(values):
            color = "white" if value > values.max() / 2 else "black"
            ax.text(j, i, text(value), ha="center", va="center", color=color)
    fig.tight_layout()
    return _finish(fig, path)


def plot_pr_curves(curves, labels: Sequence[str], points=None, path=None):
    """Precision-recall curves, one per class, on one axes (a multi-label run's report).

    Parameters
    ----------
    curves : sequence of (recall, precision) or None
        Each class's curve (:func:`gluon_ft.deploy.metrics.precision_recall_curve`), drawn as
        the steps that its average precision sums; None for a class without positives, which
        is named in the legend only.
    labels : sequence of str
        Each class's legend entry, e.g. ``"red (AP 0.912)"``.
    points : sequence of (recall, precision), optional
        Each class's scores at its threshold: a dot on its curve.
    path : str or Path, optional
        Where to save the PNG; without it the figure is returned.
    """
    fig, ax = plt.subplots(figsize=(5.6, 4))
    for c, (curve, label) in enumerate(zip(curves, labels)):
        if curve is None:
            ax.plot([], [], " ", label=f"{label}: no positive")
            continue
        (line,) = ax.plot(curve[0], curve[1], drawstyle="steps-pre", label=label)
        if points is not None:
            ax.plot(*points[c], "o", color=line.get_color(), ms=5)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.05)
    ax.grid(True, alpha=0.3)
    title = "dots: at each class's threshold" if points is not None else ""
    ax.set_title(title, fontsize=9)
    columns = -(-len(labels) // 24)  # a long list of classes in several columns
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, ncol=columns)
    return _finish(fig, path)


def plot_lr_sweep(results: dict[str, dict[float, float]], path=None, metric: str = "test accuracy"):
    """``metric`` against learning rate (log axis), one line per recipe (fine-tuned, scratch).

    A NaN value (a diverged run) is left out of its line and marked with an x on the axis.
    """
    import math

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, by_lr in results.items():
        lrs = sorted(by_lr)
        kept = [lr for lr in lrs if not math.isnan(by_lr[lr])]
        (line,) = ax.plot(kept, [by_lr[lr] for lr in kept], "-o", label=label)
        diverged = [lr for lr in lrs if math.isnan(by_lr[lr])]
        if diverged:
            ax.plot(diverged, [0.0] * len(diverged), "x", color=line.get_color(), ms=9)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(metric)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _finish(fig, path)
