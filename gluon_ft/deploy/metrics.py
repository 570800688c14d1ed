"""Classification scores from a confusion matrix: per class, and over the classes.

Base layer: numpy only. Rows of the matrix are the true classes, columns the predicted ones.
A score whose denominator is zero (precision of a class never predicted, recall of a class
with no example) is 0, as scikit-learn's ``zero_division=0``. The averages (balanced accuracy,
macro-F1) run over the classes that occur: balanced accuracy over those with examples (the
mean recall), macro-F1 over those with examples or predictions (scikit-learn's labels).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    safe = np.where(denominator > 0, denominator, 1)
    return np.where(denominator > 0, numerator / safe, 0.0)


def class_scores(confusion, classes: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1 and per-class precision, recall, F1, support.

    Parameters
    ----------
    confusion : array-like, (C, C)
        Counts; ``confusion[i, j]`` images of class ``i`` predicted as ``j``.
    classes : sequence of str
        The C class names, in the matrix's order.

    Returns
    -------
    dict
        ``{"accuracy", "balanced_acc", "macro_f1", "per_class": [{"class", "precision",
        "recall", "f1", "support"}]}``.
    """
    matrix = np.asarray(confusion, dtype=np.float64)
    true_positives = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = _ratio(true_positives, predicted)
    recall = _ratio(true_positives, support)
    f1 = _ratio(2 * true_positives, support + predicted)  # = 2PR / (P + R)
    occurs = (support > 0) | (predicted > 0)
    total = matrix.sum()
    return {
        "accuracy": float(true_positives.sum() / total) if total else float("nan"),
        "balanced_acc": float(recall[support > 0].mean()) if total else float("nan"),
        "macro_f1": float(f1[occurs].mean()) if total else float("nan"),
        "per_class": [
            {
                "class": name,
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        ],
    }
