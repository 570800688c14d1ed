"""Class imbalance: inverse-frequency class weights, balanced sampling, the imbalance ratio.

Base layer: numpy only. ``--class-weights auto`` weights each sample's loss by its class's
:func:`inverse_frequency` weight; ``--sampler balanced`` draws each epoch's samples with the
:func:`balanced_probabilities`, so that every class is drawn equally often on average.
"""

from __future__ import annotations

import numpy as np

IMBALANCE_WARNING = 5.0  # check-data warns above this largest/smallest class ratio


def inverse_frequency(labels, num_classes: int) -> np.ndarray:
    """Per-class weights ``n / (C * n_c)``: 1 for every class when they are balanced.

    A class without samples gets weight 0 (it contributes no loss term anyway).
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    present = np.count_nonzero(counts)
    safe = np.where(counts > 0, counts, 1)
    return np.where(counts > 0, counts.sum() / (present * safe), 0.0).astype(np.float32)


def balanced_probabilities(labels) -> np.ndarray:
    """Per-sample drawing probabilities that give every present class the same total."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    return weights / weights.sum()


def imbalance_ratio(counts) -> float:
    """Largest class over smallest (inf when a class is empty)."""
    counts = np.asarray(list(counts), dtype=np.float64)
    if not len(counts):
        return 1.0
    return float(counts.max() / counts.min()) if counts.min() > 0 else float("inf")
