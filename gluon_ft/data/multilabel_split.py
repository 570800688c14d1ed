"""Iterative stratification: train, val and test parts of a multi-label dataset.

Sechidis, Tsoumakas and Vlahavas, "On the Stratification of Multi-Label Data" (ECML PKDD
2011), Algorithm 1. A per-class stratified split does not apply when an image has several
labels, and a random split can leave a rare label out of a part altogether. Iterative
stratification places the images of the rarest label first, each in the part that still wants
most of that label, so that every part gets each label's share as closely as it can.

Base layer: numpy only. Ties are broken by a generator seeded with ``--seed``, and the images
of a label are visited in a seeded order: the same targets and seed give the same parts.
"""

from __future__ import annotations

import numpy as np


def iterative_stratification(
    targets, fractions: dict[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Split item indices into parts with the given fractions of every label.

    Parameters
    ----------
    targets : array-like, (N, C)
        Multi-hot labels: nonzero where item ``n`` has class ``c``.
    fractions : dict
        ``{part name: fraction}`` of the parts to carve out (e.g. ``{"test": 0.1, "val": 0.1}``);
        ``"train"`` takes the rest.
    seed : int
        The split's seed (``--seed``).

    Returns
    -------
    dict
        ``{"train": indices, **{name: indices}}``, each sorted; disjoint and complete, as
        :func:`gluon_ft.data.splits.stratified_split` gives them.
    """
    positive = np.asarray(targets) > 0
    names = ["train", *fractions]
    shares = np.array([1.0 - sum(fractions.values()), *fractions.values()])
    rng = np.random.default_rng(seed)
    # How many items each part still wants in all (c_j), and of each label (c_j^i).
    wanted = shares * len(positive)
    wanted_of_label = shares[:, None] * positive.sum(axis=0)[None, :]
    left = positive.sum(axis=0)  # items not yet placed, per label
    order = rng.permutation(len(positive))
    part = np.full(len(positive), -1)
    while left.any():
        label = _tie_broken(np.where(left > 0, -left, -np.inf), rng)  # the rarest label left
        for item in order[(part[order] < 0) & positive[order, label]]:
            chosen = _chosen_part(wanted_of_label[:, label], wanted, shares, rng)
            part[item] = chosen
            wanted_of_label[chosen] -= positive[item]
            wanted[chosen] -= 1
            left -= positive[item]
    for item in order[part[order] < 0]:  # items without any label: by the total wanted
        chosen = _chosen_part(wanted, wanted, shares, rng)
        part[item] = chosen
        wanted[chosen] -= 1
    return {name: np.flatnonzero(part == j) for j, name in enumerate(names)}


def _chosen_part(want_label: np.ndarray, want_all: np.ndarray, shares, rng) -> int:
    """The part that wants most of the label; ties by the most items wanted, then at random.

    A part with a zero share never gets an item."""
    open_parts = shares > 0
    best = open_parts & (want_label == want_label[open_parts].max())
    if best.sum() > 1:
        best &= want_all == want_all[best].max()
    return _tie_broken(np.where(best, 0.0, -np.inf), rng)


def _tie_broken(scores: np.ndarray, rng) -> int:
    """The index of the largest score; one of the largest at random when several tie."""
    return int(rng.choice(np.flatnonzero(scores == scores.max())))
