"""Which epoch is the best, and when to stop: selection on the validation part.

Everything here reads the ``metrics.json`` rows, which a checkpoint carries: a resumed run
selects and stops exactly as the uninterrupted one would.
"""

from __future__ import annotations

import math

# --monitor: the row key, and whether larger is better.
# val_map: the mean average precision of a multi-label run, which picks its best epoch.
MONITORS = {"val_acc": True, "val_loss": False, "val_map": True}


def best_row(history: list[dict], monitor: str) -> dict | None:
    """The first row whose ``monitor`` value no later row improves on, or None without one.

    A later epoch must be strictly better to replace an earlier one; NaN never is.
    """
    higher_is_better = MONITORS[monitor]
    best = None
    for row in history:
        value = row.get(monitor)
        if value is None or math.isnan(value):
            continue
        if best is None or (value > best[monitor] if higher_is_better else value < best[monitor]):
            best = row
    return best


def epochs_without_improvement(history: list[dict], monitor: str) -> int:
    """Epochs since the best one (all of them if none has a value)."""
    best = best_row(history, monitor)
    return len(history) - (best["epoch"] if best else 0)


def selection(history: list[dict], monitor: str, validated: bool, epochs: int) -> dict:
    """The selection fields of ``summary.json``.

    With a validation part: the best epoch by ``monitor`` and its value. Without one there is
    nothing to select on: the last epoch, and ``monitor``/``best_value`` are None.
    ``stopped_early`` is whether the run ended before ``epochs``.
    """
    best = best_row(history, monitor) if validated else None
    if best is None:
        best = history[-1]
        monitor = None
    return {
        "best_epoch": best["epoch"],
        "monitor": monitor,
        "best_value": best[monitor] if monitor else None,
        "stopped_early": len(history) < epochs,
    }
