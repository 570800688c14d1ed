"""``gluon-ft bench --recipes``: the book's recipe, ``--recipe best`` and its ablation.

Each row is a whole ``gluon-ft train`` command, as a user runs it, with a fresh
``$MXNET_HOME`` (so the head epochs pay for their feature cache every time) and its own run
directory. The rows take turns within each seed (book, best, best without X, ...), so a
machine that slows down during the benchmark slows every row alike. Test accuracy is read
from each run's ``summary.json``; wall time is the command's, start to exit.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gluon_ft.errors import UsageError

# "best without X": the flags that take ingredient X out of the preset.
ABLATIONS: dict[str, list[str]] = {
    "sgd (momentum 0.9) for adamw": ["--optimizer", "sgd", "--momentum", "0.9", "--wd", "0.001"],
    "a fixed --lr for lr-find": ["--lr", "0.0003"],
    "no head epoch": ["--head-epochs", "0"],
    "no label smoothing": ["--label-smoothing", "0"],
    "BatchNorm trains (--bn freeze)": ["--bn", "freeze"],
    "no layer-wise lr decay": ["--layer-lr-decay", "1"],
    "constant lr, no warmup": ["--lr-schedule", "constant", "--warmup-epochs", "0"],
    "the book's crops (0.08)": ["--crop-scale", "0.08"],
    "no TTA": ["--tta", "1"],
}


def recipe_rows(ablation: bool = True) -> dict[str, list[str]]:
    """``{row name: extra train flags}``: the book, the preset, and the preset less each
    ingredient."""
    rows = {"book": [], "best": ["--recipe", "best"]}
    if ablation:
        rows.update(
            {f"best, {name}": ["--recipe", "best", *flags] for name, flags in ABLATIONS.items()}
        )
    return rows


def run_row(common: list[str], flags: list[str], seed: int, scratch: Path) -> dict:
    """One ``gluon-ft train`` command: its test accuracy and wall seconds."""
    home, out = tempfile.mkdtemp(dir=scratch), tempfile.mkdtemp(dir=scratch)
    command = [sys.executable, "-m", "gluon_ft", "train", *common, *flags, "--seed", str(seed)]
    command += ["--out", f"{out}/run", "--no-progress"]
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "MXNET_HOME": home}
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise UsageError(f"bench --recipes: {' '.join(command)} failed: {done.stderr[-2000:]}")
    summary = json.loads((Path(out) / "run" / "summary.json").read_text())
    return {"test_acc": summary["test_acc"], "seconds": seconds}


def run_recipe_bench(
    data: str,
    pretrained: str,
    image_size: int = 64,
    batch_size: int = 64,
    epochs: int = 5,
    seeds: int = 3,
    ablation: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train every row of :func:`recipe_rows` once per seed; return the figures.

    Returns
    -------
    dict
        ``{"settings": {...}, "rows": {name: {"flags", "test_acc": [...], "seconds": [...],
        "acc_mean", "acc_spread", "seconds_median", "time_vs_book"}}}``.
    """
    common = ["--data", data, "--pretrained", pretrained, "--image-size", str(image_size)]
    common += ["--batch-size", str(batch_size), "--epochs", str(epochs)]
    rows = recipe_rows(ablation)
    figures = {
        name: {"flags": flags, "test_acc": [], "seconds": []} for name, flags in rows.items()
    }
    with tempfile.TemporaryDirectory(prefix="gluon-ft-recipes-") as scratch:
        for seed in range(seeds):
            for name, flags in rows.items():
                row = run_row(common, flags, seed, Path(scratch))
                figures[name]["test_acc"].append(row["test_acc"])
                figures[name]["seconds"].append(row["seconds"])
                if log is not None:
                    acc, seconds = row["test_acc"], row["seconds"]
                    log(f"seed {seed}: {name}: test acc {acc:.3f}, {seconds:.1f} s")
    book = statistics.median(figures["book"]["seconds"])
    for row in figures.values():
        row["acc_mean"] = statistics.mean(row["test_acc"])
        row["acc_spread"] = max(row["test_acc"]) - min(row["test_acc"])
        row["seconds_median"] = statistics.median(row["seconds"])
        row["time_vs_book"] = row["seconds_median"] / book
    settings = {"data": data, "pretrained": pretrained, "image_size": image_size}
    settings.update(batch_size=batch_size, epochs=epochs, seeds=seeds)
    return {"settings": settings, "rows": figures}


def markdown_table(result: dict) -> str:
    """The table of docs/recipes.md from a :func:`run_recipe_bench` result."""
    lines = [
        "| recipe | test accuracy, mean (min-max) | wall time, median | vs book |",
        "|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        accs = row["test_acc"]
        lines.append(
            f"| {name} | {row['acc_mean']:.3f} ({min(accs):.3f}-{max(accs):.3f}) | "
            f"{row['seconds_median']:.1f} s | {row['time_vs_book']:.2f}x |"
        )
    return "\n".join(lines)
