"""``--ema DECAY``: an exponential moving average of the weights, updated after every step.

After optimizer step ``t + 1`` (``t`` updates so far)::

    d_t = min(DECAY, (1 + t) / (10 + t))
    ema = d_t * ema + (1 - d_t) * w

for every parameter of the network, trained or frozen, BatchNorm running statistics too (as
timm's ``ModelEmaV2`` averages buffers). The warmup of ``d_t`` is TensorFlow's
``ExponentialMovingAverage(num_updates=...)`` rule: the runs here are short (70 steps in a
5-epoch food10-64 run), and a fixed 0.999 would leave the average near the starting weights.

The average starts as the weights before the first step and lives on one device (``ctx[0]``)
in float32; with several devices every copy of a trained weight is the same after a step,
and the running statistics are ``ctx[0]``'s, as in the saved model. The update is written as
``ema += (1 - d_t) * (w - ema)``, so a frozen parameter's average stays its value bit for bit;
frozen parameters (``grad_req='null'``, but not running statistics) are therefore skipped.
"""

from __future__ import annotations

import contextlib
import re

import mxnet as mx
from mxnet import gluon

from gluon_ft.train.bn_stats import RUNNING_STATS
from gluon_ft.train.selection import MONITORS

WARMUP = 10  # d_t = (1 + t) / (WARMUP + t) until that reaches DECAY


def decay_at(decay: float, updates: int) -> float:
    """The decay of the update after ``updates`` earlier ones: the warmup, capped at ``decay``."""
    return min(decay, (1 + updates) / (WARMUP + updates))


class WeightAverage:
    """The EMA of ``net``'s parameters (see the module docstring).

    Parameters
    ----------
    net : Block
        The network being trained, initialized.
    decay : float
        ``--ema DECAY``, in (0, 1).
    """

    def __init__(self, net: gluon.Block, decay: float):
        self.decay = decay
        self.updates = 0
        # Structural names ('features.0.weight'), as save_parameters and checkpoints use.
        self.params = dict(net._collect_params_with_prefix().items())
        self.shadow = {
            name: p.list_data()[0].astype("float32", copy=True) for name, p in self.params.items()
        }
        # BatchNorm running statistics move without a gradient (grad_req 'null').
        self.statistics = {name: bool(re.match(RUNNING_STATS, name)) for name in self.params}

    def update(self) -> None:
        """Fold the current weights into the average: one call after each optimizer step."""
        # Measured: without this wait, the average of the BatchNorm running statistics differs
        # from run to run. The hybridized (static_alloc) forward pass writes them without the
        # engine ordering our reads after the write; waiting for the step makes it exact.
        mx.nd.waitall()
        keep = decay_at(self.decay, self.updates)
        for name, param in self.params.items():
            if param.grad_req == "null" and not self.statistics[name]:
                continue  # frozen: its average is its value, which the update would keep
            shadow = self.shadow[name]
            weight = param.list_data()[0].astype("float32", copy=False)
            shadow += (weight - shadow) * (1 - keep)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside the block the network (every device's copy) holds the EMA; after it, its own
        weights again, bit for bit (each device's BatchNorm statistics included)."""
        saved = {name: [d.copy() for d in p.list_data()] for name, p in self.params.items()}
        try:
            # Copied into each device's array: Parameter.set_data may reset a kvstore.
            for name, param in self.params.items():
                average = self.shadow[name].astype(param.dtype, copy=False)
                for target in param.list_data():
                    average.copyto(target)
            yield
        finally:
            for name, param in self.params.items():
                for target, kept in zip(param.list_data(), saved[name]):
                    kept.copyto(target)

    def state(self) -> tuple[dict, dict]:
        """``(arrays, info)`` for a checkpoint: the averages by name, and the JSON counters."""
        arrays = {name: shadow.as_in_context(mx.cpu()) for name, shadow in self.shadow.items()}
        return arrays, {"decay": self.decay, "updates": self.updates}

    def load_state(self, arrays: dict, info: dict) -> None:
        """Continue from :meth:`state`'s output (``--resume``).

        Raises
        ------
        ValueError
            The arrays do not name this network's parameters with their shapes.
        """
        if set(arrays) != set(self.shadow):
            missing = sorted(set(self.shadow) ^ set(arrays))[:5]
            raise ValueError(f"it averages other parameters ({', '.join(missing)})")
        for name, shadow in self.shadow.items():
            if arrays[name].shape != shadow.shape:
                raise ValueError(f"{name} has shape {arrays[name].shape}, not {shadow.shape}")
            arrays[name].astype("float32").copyto(shadow)
        self.updates = int(info["updates"])


def choose_weights(history: list[dict], chosen: dict, ema_save: str, validated: bool) -> dict:
    """Which weights become ``model.params``: the summary fields of the decision.

    ``chosen`` is :func:`gluon_ft.train.selection.selection`'s (the trained weights' epoch and
    score). ``always`` takes the EMA; ``if-better`` takes it when its score after the last
    epoch (``ema_<monitor>`` of the last row) beats the chosen epoch's strictly, and keeps the
    trained weights without a validation part, where there is nothing to compare on.

    Returns
    -------
    dict
        ``weights`` ("ema" or "trained"), ``ema_epoch``, ``ema_score`` (None without
        validation), ``trained_score`` and ``weights_reason``, a sentence for people.
    """
    last = history[-1]
    monitor = chosen["monitor"]
    ema_score = last.get(f"ema_{monitor}") if monitor else None
    fields = {"ema_epoch": last["epoch"], "ema_score": ema_score}
    fields["trained_score"] = chosen["best_value"]
    if ema_save == "always":
        reason = "--ema-save always"
        return {"weights": "ema", **fields, "weights_reason": reason}
    if not validated or ema_score is None:
        reason = "no validation part to compare them on (--ema-save if-better)"
        return {"weights": "trained", **fields, "weights_reason": reason}
    trained = chosen["best_value"]
    better = ema_score > trained if MONITORS[monitor] else ema_score < trained
    reason = (
        f"{monitor} {ema_score:.4f} for the EMA after epoch {last['epoch']}, "
        f"{trained:.4f} for the weights of epoch {chosen['best_epoch']}"
    )
    return {"weights": "ema" if better else "trained", **fields, "weights_reason": reason}
