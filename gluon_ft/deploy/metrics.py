"""Classification scores: from a confusion matrix, and of multi-label probabilities.

Base layer: numpy only. Rows of the matrix are the true classes, columns the predicted ones.
A score whose denominator is zero (precision of a class never predicted, recall of a class
with no example) is 0, as scikit-learn's ``zero_division=0``. The averages (balanced accuracy,
macro-F1) run over the classes that occur: balanced accuracy over those with examples (the
mean recall), macro-F1 over those with examples or predictions (scikit-learn's labels).

Multi-label scores (:func:`multilabel_scores`) take ``(N, C)`` probabilities and 0/1 targets;
an image has class ``c`` predicted when its probability is at least the class's threshold.
Average precision is scikit-learn's ``average_precision_score`` (not interpolated), and
:func:`choose_thresholds` picks each class's F1-best threshold on validation data.
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


def _ranked_counts(scores: np.ndarray, positive: np.ndarray):
    """``(thresholds, true positives, predicted)`` when predicting positive every score at or
    above each distinct score, the thresholds from the highest down."""
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    last_of_ties = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])
    true_positives = np.cumsum(positive[order], dtype=np.int64)[last_of_ties]
    return ranked[last_of_ties], true_positives, last_of_ties + 1


def average_precision(scores, positive) -> float | None:
    """The average precision of one class: None when it has no positive.

    The mean of the precision at each positive's rank, scores from the highest down; tied
    scores count as one threshold (each positive among them gets the precision of taking them
    all), as scikit-learn's ``average_precision_score``.
    """
    positive = np.asarray(positive) > 0
    total = int(positive.sum())
    if not total:
        return None
    _, true_positives, predicted = _ranked_counts(np.asarray(scores, np.float64), positive)
    gained = np.diff(true_positives, prepend=0)
    return float(np.sum(gained * true_positives / predicted) / total)


def precision_recall_curve(scores, positive) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """One class's precision-recall curve: None when it has no positive.

    One point per distinct score, from the highest down: predicting that score and every
    higher one. The curve stops at the first point that recalls every positive (below it only
    precision falls), and starts at (recall 0, precision 1), which has no threshold, as
    scikit-learn's ``precision_recall_curve`` (there in the opposite order). Drawn as steps
    (each point's precision held from the recall before it), its area is
    :func:`average_precision`.

    Returns
    -------
    (recall, precision, thresholds) or None
        ``recall`` rising from 0 and ``precision``, ``K + 1`` each; ``thresholds``, ``K``
        falling scores (point ``k + 1`` predicts the scores at or above ``thresholds[k]``).
    """
    positive = np.asarray(positive) > 0
    total = int(positive.sum())
    if not total:
        return None
    cuts, true_positives, predicted = _ranked_counts(np.asarray(scores, np.float64), positive)
    kept = int(np.searchsorted(true_positives, total)) + 1  # up to the first full recall
    recall = np.r_[0.0, true_positives[:kept] / total]
    precision = np.r_[1.0, true_positives[:kept] / predicted[:kept]]
    return recall, precision, cuts[:kept]


def set_mistakes(probs, targets, threshold=0.5, count: int | None = None) -> list[int]:
    """The images whose predicted set is not their set, the most wrong first.

    How wrong: the sum over the classes of ``|probability - target|`` (a missed label at
    probability 0.1 counts 0.9, a spurious one at 0.8 counts 0.8, and the sure right ones
    little); ties keep the images' order.

    Parameters
    ----------
    probs, targets : array-like, (N, C)
        Probabilities, and 1 where the image has the class.
    threshold : float or array-like of C floats
        A class is predicted at this probability or above.
    count : int, optional
        At most this many; all by default.

    Returns
    -------
    list of int
        Row positions into ``probs``.
    """
    probs, positive = np.asarray(probs, np.float64), np.asarray(targets) > 0
    wrong = np.flatnonzero(((probs >= np.asarray(threshold)) != positive).any(axis=1))
    error = np.abs(probs[wrong] - positive[wrong]).sum(axis=1)
    return [int(i) for i in wrong[np.argsort(-error, kind="stable")][:count]]


def mean_average_precision(probs, targets) -> tuple[float, list[float | None]]:
    """``(mAP, each class's AP)`` of ``(N, C)`` probabilities against 0/1 targets.

    A class without positives has AP None and is left out of the mean (nan when none has).
    """
    probs, positive = np.asarray(probs, np.float64), np.asarray(targets) > 0
    per_class = [average_precision(probs[:, c], positive[:, c]) for c in range(probs.shape[1])]
    scored = [ap for ap in per_class if ap is not None]
    return (float(np.mean(scored)) if scored else float("nan")), per_class


def multilabel_scores(probs, targets, classes: Sequence[str], threshold=0.5) -> dict:
    """F1 (micro and macro), exact-set accuracy, mAP and per-class scores of multi-label output.

    Parameters
    ----------
    probs : array-like, (N, C)
        Each image's probability of each class.
    targets : array-like, (N, C)
        1 where the image has the class, else 0.
    classes : sequence of str
        The C class names.
    threshold : float or array-like of C floats
        A class is predicted when its probability is at least this (one, or one per class).

    Returns
    -------
    dict
        ``{"f1_micro", "f1_macro", "exact_match", "map", "per_class": [{"class",
        "threshold", "precision", "recall", "f1", "support", "ap"}]}``. Micro-F1 pools every
        (image, class) decision; macro-F1 is the mean over the classes with positives or
        predictions; exact match is the share of images whose predicted set is their set.
    """
    probs, positive = np.asarray(probs, np.float64), np.asarray(targets) > 0
    thresholds = np.broadcast_to(np.asarray(threshold, np.float64), (probs.shape[1],))
    predicted = probs >= thresholds
    true_positives = (predicted & positive).sum(axis=0)
    support, predicted_count = positive.sum(axis=0), predicted.sum(axis=0)
    precision = _ratio(true_positives, predicted_count)
    recall = _ratio(true_positives, support)
    f1 = _ratio(2 * true_positives, support + predicted_count)
    occurs = (support > 0) | (predicted_count > 0)
    mean_ap, per_class_ap = mean_average_precision(probs, positive)
    pooled = _ratio(2 * true_positives.sum(), support.sum() + predicted_count.sum())
    return {
        "f1_micro": float(pooled),
        "f1_macro": float(f1[occurs].mean()) if occurs.any() else float("nan"),
        "exact_match": float((predicted == positive).all(axis=1).mean())
        if len(probs)
        else float("nan"),
        "map": mean_ap,
        "per_class": [
            {
                "class": name,
                "threshold": float(thresholds[i]),
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
                "ap": per_class_ap[i],
            }
            for i, name in enumerate(classes)
        ],
    }


def choose_thresholds(probs, targets, default: float = 0.5) -> np.ndarray:
    """One threshold per class, each maximizing the class's F1 on these (validation) data.

    Every distinct probability of a class is tried as the cut (predicting it and all above);
    of equal F1 the highest cut wins. The threshold returned lies halfway between the cut and
    the next lower probability, so it decides these data as the cut does and leaves room on
    both sides; at the lowest probability it is that probability. A class without positives
    here keeps ``default``.

    Returns
    -------
    np.ndarray
        ``(C,)`` thresholds, for :func:`multilabel_scores` and the predictions of a run.
    """
    probs, positive = np.asarray(probs, np.float64), np.asarray(targets) > 0
    chosen = np.full(probs.shape[1], default, dtype=np.float64)
    for c in range(probs.shape[1]):
        total = int(positive[:, c].sum())
        if not total:
            continue
        cuts, true_positives, predicted = _ranked_counts(probs[:, c], positive[:, c])
        best = int(np.argmax(2 * true_positives / (total + predicted)))  # first: the highest
        below = cuts[best + 1] if best + 1 < len(cuts) else cuts[best]
        chosen[c] = (cuts[best] + below) / 2
    return chosen
