"""Learning-rate schedules: ``--lr-schedule constant|cosine`` with ``--warmup-epochs``.

The learning rate is a pure function of the position in the run (epoch, step), not a counter
kept by the optimizer, so a resumed run and every worker of a distributed run set exactly the
rate an uninterrupted single run would have set. Parameters keep their ``lr_mult`` (the head's
x10, ``--layer-lr-decay``): the Trainer multiplies the scheduled rate by it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class LrSchedule:
    """The learning rate of every step of a run.

    Parameters
    ----------
    base_lr : float
        ``--lr``: the rate after warmup (the peak of a cosine schedule).
    kind : str
        ``constant``, or ``cosine``: from ``base_lr`` down to 0 at the end of the last epoch
        (Loshchilov and Hutter's SGDR without restarts, as ``mx.lr_scheduler.CosineScheduler``).
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
        trains its head in a cycle of its own.
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

        return set_lr

    def lr(self, epoch: int, step: int) -> float:
        """The rate of step ``step`` (0-based) of epoch ``epoch`` (0-based)."""
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
