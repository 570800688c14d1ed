"""AdamW for ``--optimizer adamw``: Adam with decoupled weight decay, as PyTorch's ``AdamW``.

MXNet 1.9.1 has the operator (``mx.nd.contrib.adamw_update``) but no optimizer class around it,
so :class:`AdamW` is one, registered as ``"adamw"`` for ``gluon.Trainer``. Per step, for a
parameter with rate ``lr`` (``--lr`` times its ``lr_mult`` and the schedule) and decay ``wd``
(``--wd`` times its ``wd_mult``)::

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g**2
    w = w - lr * wd * w - lr * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + epsilon)

which is ``torch.optim.AdamW(lr=lr, weight_decay=wd, eps=epsilon)``: ``--wd 0.01`` means what
PyTorch's ``weight_decay=0.01`` means. The operator computes
``w -= eta * (alpha * m / (sqrt(v) + eps') + wd * w)``: ``eta`` is the rate, ``alpha`` the
bias correction ``sqrt(1 - beta2**t) / (1 - beta1**t)`` and ``eps' = epsilon *
sqrt(1 - beta2**t)``, so that epsilon is added to the bias-corrected root as PyTorch does.
"""

from __future__ import annotations

import math

import mxnet as mx


@mx.optimizer.Optimizer.register
class AdamW(mx.optimizer.Optimizer):
    """Adam with decoupled weight decay through MXNet's ``adamw_update`` operator.

    Parameters
    ----------
    learning_rate : float
        The base rate; each parameter's ``lr_mult`` scales it.
    beta1, beta2 : float
        Decay rates of the first and second moment estimates.
    epsilon : float
        Added to the bias-corrected root of the second moment.
    **kwargs
        ``wd``, ``rescale_grad``, ``clip_gradient``, ``multi_precision`` and the rest of
        :class:`mxnet.optimizer.Optimizer`'s arguments.
    """

    def __init__(
        self,
        learning_rate: float = 0.001,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon

    def create_state(self, index, weight):
        """The first and second moment estimates, zero."""
        zeros = mx.nd.zeros(weight.shape, weight.context, dtype=weight.dtype)
        return zeros, zeros.copy()

    def update(self, index, weight, grad, state) -> None:
        """One AdamW step of ``weight`` in place (see the module's docstring)."""
        self._update_count(index)
        step = self._index_update_count[index]
        first_correction = 1.0 - self.beta1**step
        second_root = math.sqrt(1.0 - self.beta2**step)
        mean, var = state
        mx.nd.contrib.adamw_update(
            weight,
            grad,
            mean,
            var,
            rescale_grad=self.rescale_grad,
            lr=second_root / first_correction,
            eta=self._get_lr(index),
            beta1=self.beta1,
            beta2=self.beta2,
            epsilon=self.epsilon * second_root,
            wd=self._get_wd(index),
            clip_gradient=self.clip_gradient or -1,
            out=weight,
        )
