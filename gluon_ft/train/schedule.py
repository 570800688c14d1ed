"""Learning-rate schedules: ``--lr-schedule constant|cosine|onecycle`` with ``--warmup-epochs``.

The learning rate is a pure function of the position in the run (epoch, step), not a counter
kept by the optimizer, so a resumed run and every worker of a distributed run set exactly the
rate an uninterrupted single run would have set. Parameters keep their ``lr_mult`` (the head's
x10, ``--layer-lr-decay``): the Trainer multiplies the scheduled rate by it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

SCHEDULES = ("constant", "cosine", "onecycle")
# One-cycle as PyTorch's OneCycleLR defaults (fastai's fit_one_cycle): from lr / DIV up to lr
# over the first ONECYCLE_PCT of the steps, then down to lr / (DIV * FINAL_DIV), both halves
# cosine; AdamW's beta1 goes the other way, BETA_HIGH -> BETA_LOW -> BETA_HIGH (SGD's momentum
# is not cycled: only an optimizer with a beta1 takes it, LrSchedule.setter).
ONECYCLE_PCT = 0.25
ONECYCLE_DIV = 25.0
ONECYCLE_FINAL_DIV = 1e4
BETA_HIGH, BETA_LOW = 0.95, 0.85


def _anneal(start: float, end: float, fraction: float) -> float:
    """Cosine from ``start`` (fraction 0) to ``end`` (fraction 1)."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * fraction) + 1.0)


def one_cycle(position: int, total: int) -> tuple[float, float]:
    """``(rate factor, beta1)`` of step ``position`` (0-based) of a one-cycle of ``total``
    steps: the factor of the peak rate, and the momentum, as ``torch.optim.lr_scheduler.
    OneCycleLR(pct_start=max(0.25, 2.5 / total))`` sets them for that step."""
    pct = max(ONECYCLE_PCT, 2.5 / total)  # at least two warm-up steps on tiny sets
    up_end = float(pct * total) - 1.0
    low = 1.0 / ONECYCLE_DIV
    if position <= up_end:
        fraction = position / up_end
        return _anneal(low, 1.0, fraction), _anneal(BETA_HIGH, BETA_LOW, fraction)
    fraction = min(1.0, (position - up_end) / max(1e-12, total - 1 - up_end))
    return _anneal(1.0, low / ONECYCLE_FINAL_DIV, fraction), _anneal(BETA_LOW, BETA_HIGH, fraction)


@dataclass(frozen=True)
class LrSchedule:
    """The learning rate of every step of a run.

    Parameters
    ----------
    base_lr : float
        ``--lr``: the rate after warmup (the peak of a cosine schedule).
    kind : str
        ``constant``, or ``cosine``: from ``base_lr`` down to 0 at the end of the last epoch
        (Loshchilov and Hutter's SGDR without restarts, as ``mx.lr_scheduler.CosineScheduler``);
        or ``onecycle`` (:func:`one_cycle`): one cycle over the head epochs, another over the
        rest, as fastai's ``fine_tune``, with AdamW's beta1 cycled too (:meth:`beta1`).
    epochs : int
        Epochs of the whole run.
    steps_per_epoch : int
        Optimizer steps in one epoch.
    warmup_epochs : float
        Linear warmup from ``base_lr / warmup_steps`` to ``base_lr`` first; 0 for none.
        Large rates with momentum diverge without it in the first steps from scratch.
    start_epoch : int
        The schedule (warmup, cosine) starts at this epoch; before it the rate is ``base_lr``:
        the head epochs (``--head-epochs``), on a frozen body, as fastai's ``fine_tune``
        trains its head in a cycle of its own (``onecycle``: a cycle of their own here too).
    """

    base_lr: float
    kind: str = "constant"
    epochs: int = 1
    steps_per_epoch: int = 1
    warmup_epochs: float = 0.0
    start_epoch: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.kind!r}; use one of {SCHEDULES}")

    @property
    def total_steps(self) -> int:
        return max(1, (self.epochs - self.start_epoch) * self.steps_per_epoch)

    @property
    def warmup_steps(self) -> int:
        return min(self.total_steps, round(self.warmup_epochs * self.steps_per_epoch))

    @classmethod
    def of(cls, config, steps_per_epoch: int) -> LrSchedule:
        """The schedule of a :class:`~gluon_ft.train.config.TrainConfig`."""
        return cls(
            config.lr,
            config.lr_schedule,
            config.epochs,
            steps_per_epoch,
            config.warmup_epochs,
            config.head_epochs,
        )

    def setter(self, trainer) -> Callable[[int, int], None]:
        """``set_lr(epoch, step)`` for :class:`~gluon_ft.train.resume.EpochSteps`: sets
        ``trainer``'s rate before each step."""

        def set_lr(epoch: int, step: int) -> None:
            trainer.set_learning_rate(self.lr(epoch, step))
            beta1 = self.beta1(epoch, step)
            if beta1 is not None and hasattr(trainer._optimizer, "beta1"):
                trainer._optimizer.beta1 = beta1

        return set_lr

    def _cycle(self, epoch: int, step: int) -> tuple[float, float]:
        """``onecycle``: :func:`one_cycle` of the step in its phase (head epochs, or the rest)."""
        start, end = (
            (0, self.start_epoch) if epoch < self.start_epoch else (self.start_epoch, self.epochs)
        )
        total = max(1, (end - start) * self.steps_per_epoch)
        return one_cycle((epoch - start) * self.steps_per_epoch + step, total)

    def beta1(self, epoch: int, step: int) -> float | None:
        """AdamW's beta1 for the step under ``onecycle``; None (the optimizer's own) else."""
        return self._cycle(epoch, step)[1] if self.kind == "onecycle" else None

    def lr(self, epoch: int, step: int) -> float:
        """The rate of step ``step`` (0-based) of epoch ``epoch`` (0-based)."""
        if self.kind == "onecycle":
            return self.base_lr * self._cycle(epoch, step)[0]
        if epoch < self.start_epoch:
            return self.base_lr
        position = (epoch - self.start_epoch) * self.steps_per_epoch + step
        if position < self.warmup_steps:
            return self.base_lr * (position + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (position - self.warmup_steps) / decay_steps)
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
