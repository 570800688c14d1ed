"""The settings of a training run: :class:`TrainConfig` and its validation.

``config.json`` in a run directory is this, plus what the run resolved (contexts, sizes).
The defaults are the book's MXNet recipe: SGD with lr 0.01, wd 0.001, batch 128, 5 epochs,
the new head learning 10x faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gluon_ft import data as gdata
from gluon_ft import zoo
from gluon_ft.errors import UsageError
from gluon_ft.freeze import FreezePlan
from gluon_ft.train.schedule import SCHEDULES


@dataclass
class TrainConfig:
    """Every setting of a training run; ``config.json`` is this, plus what was resolved."""

    data: str = "hotdog"
    model: str = "resnet18_v2"
    pretrained: str = "imagenet"
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.01
    head_lr_mult: float = 10.0
    wd: float = 0.001
    momentum: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine (down to 0 at the end of the last epoch)
    warmup_epochs: float = 0.0  # linear warmup to --lr over the first epochs
    image_size: int | None = None  # None: the model's own input size (299 for inceptionv3)
    crop_scale: float = 0.08  # smallest area fraction of the random train crop (the book's)
    ctx: str = "auto"
    kvstore: str | None = None
    sync_bn_stats: bool | None = None  # average BatchNorm running statistics; None: if >1 copy
    dtype: str = "float32"
    workers: int = 0
    seed: int = 0
    out: str | None = None
    freeze: str = "none"  # none | a part (features, stage1..) | a regex on parameter names
    bn: str = "freeze"  # BatchNorm of frozen parts: freeze (running statistics) | train
    layer_lr_decay: float | None = None  # stage k from the top learns D**k as fast
    unfreeze_at: str | None = None  # gradual unfreezing, "0:output,2:stage4,4:all"
    accumulate: int = 1  # micro-batches per step (gradient accumulation, grad_req 'add')
    progress: bool = True
    log_every: int = 10  # steps between host reads of the running metrics
    resume: bool = False  # continue --out from its last complete checkpoint
    strict: bool = False  # refuse a dataset with unreadable images instead of skipping them
    cache_features: bool = False  # frozen backbone: train the head on cached features
    cache_views: int = 1  # cached train augmentations per image; epoch e uses view e % K

    def validate(self) -> None:
        """Raise :class:`UsageError` for values no run can use; fill in the model's defaults."""
        if self.image_size is None:  # also rejects an unknown --model, naming the closest
            self.image_size = zoo.lookup(self.model).input_size
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1.")
        for name in ("lr", "head_lr_mult"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive number.")
        if self.wd < 0 or not 0 <= self.momentum < 1:
            raise UsageError("--wd must be >= 0 and --momentum in [0, 1).")
        if not 0 < self.crop_scale <= 1:
            raise UsageError(f"--crop-scale must be in (0, 1], got {self.crop_scale:g}.")
        if self.lr_schedule not in SCHEDULES:
            raise UsageError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}.")
        if not (math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs):
            raise UsageError(
                f"--warmup-epochs must be between 0 and --epochs ({self.epochs}), "
                f"got {self.warmup_epochs:g}."
            )
        if self.workers < 0:
            raise UsageError("--workers must be >= 0.")
        if self.resume and not self.out:
            raise UsageError("--resume needs --out RUN_DIR: the run directory to continue.")
        if self.cache_views < 1:
            raise UsageError("--cache-views must be at least 1.")
        if self.cache_features and self.unfreeze_at:
            raise UsageError(
                "--cache-features needs a backbone that stays frozen; --unfreeze-at changes it."
            )
        if self.accumulate > self.batch_size:
            raise UsageError("--accumulate cannot exceed --batch-size (its micro-batches).")
        self.freeze_plan().validate(self.epochs)

    def train_transform(self) -> gdata.TrainTransform:
        """The train augmentation of these settings: random crops of ``crop_scale`` or more."""
        return gdata.TrainTransform(self.image_size, scale=(self.crop_scale, 1.0))

    def test_transform(self) -> gdata.TestTransform:
        """The evaluation transform: the book's resize and center crop to ``image_size``."""
        return gdata.TestTransform(self.image_size)

    def freeze_plan(self) -> FreezePlan:
        """The :class:`gluon_ft.freeze.FreezePlan` of these settings."""
        return FreezePlan(
            self.freeze, self.bn, self.layer_lr_decay, self.unfreeze_at, self.accumulate
        )
