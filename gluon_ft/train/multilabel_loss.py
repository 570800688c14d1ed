"""The multi-label loss: a sigmoid binary cross-entropy per class.

With multi-label targets every class is its own yes/no question, so the network's C outputs
are C logits, each against a target of 0 or 1. Per sample, for logits ``x``, targets ``y``,
label smoothing ``eps`` and per-class positive weights ``w``::

    t = y * (1 - eps) + eps / 2
    loss = mean over c of  -(w_c * t_c * log(sigmoid(x_c)) + (1 - t_c) * log(1 - sigmoid(x_c)))

Smoothing pulls every target ``eps / 2`` towards one half (1 becomes ``1 - eps / 2``, 0
becomes ``eps / 2``), the binary form of softmax label smoothing. ``w_c`` weights the positive
term of class ``c`` as PyTorch's ``BCEWithLogitsLoss(pos_weight=...)`` does (e.g. negatives
over positives in the train part, for rare classes). The mean over the classes is what Gluon's
``SigmoidBinaryCrossEntropyLoss`` and PyTorch's default return, so ``trainer.step(batch_size)``
on the summed per-sample losses gives PyTorch's ``reduction="mean"``.
"""

from __future__ import annotations

import mxnet as mx
from mxnet import gluon


class MultiLabelLoss:
    """Sigmoid binary cross-entropy on logits, with label smoothing and positive weights.

    Parameters
    ----------
    smoothing : float
        ``eps`` in [0, 1): the targets become ``y * (1 - eps) + eps / 2``.
    positive_weights : array-like of C floats, optional
        The weight of each class's positive term; None weights every term 1.
    ctx : list of mx.Context
        The contexts the loss is computed on (the weights are copied to each).

    Calling it with logits ``(N, C)`` and 0/1 targets ``(N, C)`` gives the ``(N,)``
    per-sample losses, numerically stable for large logits (computed from the logits, never
    from a rounded sigmoid).
    """

    def __init__(
        self, smoothing: float = 0.0, positive_weights=None, ctx: list[mx.Context] | None = None
    ):
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing
        self.loss = gluon.loss.SigmoidBinaryCrossEntropyLoss(from_sigmoid=False)
        self.weights = None
        if positive_weights is not None:
            contexts = ctx or [mx.cpu()]
            self.weights = {
                c: mx.nd.array(positive_weights, ctx=c).reshape((1, -1)) for c in contexts
            }

    def __call__(self, logits: mx.nd.NDArray, targets: mx.nd.NDArray) -> mx.nd.NDArray:
        targets = targets.astype(logits.dtype, copy=False)
        if self.smoothing:
            targets = targets * (1.0 - self.smoothing) + self.smoothing / 2
        weights = None if self.weights is None else self.weights[logits.context]
        return self.loss(logits, targets, None, weights)
