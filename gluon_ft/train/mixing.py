"""Mixup and CutMix of a host batch (``--mixup``, ``--cutmix``, ``--mixup-off-epoch``), timm's way.

Each step draws ``lam`` from Beta(alpha, alpha) and pairs the batch with itself reversed (timm's
flip pairing). Mixup blends whole images, ``lam * x + (1 - lam) * x'``; CutMix pastes a box of
the partner covering ``1 - lam`` of the image, clipped to it, and then sets ``lam`` to the
area that is really kept (timm's ``correct_lam``). With both on, each step picks one with
probability 0.5 (timm's ``switch_prob``). The targets are ``lam * onehot(y) + (1 - lam) *
onehot(y')`` (multi-label: the same blend of the multi-hot rows); the loss
(:class:`~gluon_ft.train.network.SoftTargetLoss`) adds label smoothing.

The host batch is mixed before it is split over the devices, so that the draws and the mix do
not depend on how many devices there are. Mixup blends raw pixel values: normalization is
per channel affine, so the normalized blend equals the blend of normalized images. The draws
come from a generator seeded from ``mx.random``, which each step reseeds
(:class:`~gluon_ft.train.resume.EpochSteps`): a resumed run mixes as the whole run did.
"""

from __future__ import annotations

from dataclasses import dataclass

import mxnet as mx
import numpy as np

SWITCH_PROBABILITY = 0.5  # with both on, the chance that a step uses CutMix


@dataclass
class MixedBatch:
    """A mixed host batch: images, targets ``(n, classes)``, and for accuracy the dominant
    label of each sample (its own where ``lam >= 0.5``, else its partner's)."""

    images: np.ndarray
    targets: np.ndarray
    labels: np.ndarray
    lam: float


@dataclass
class Mixer:
    """Mixup and CutMix alphas (0: off), the class count, and the first epoch (1-based) with
    no mixing (None: every epoch mixes)."""

    mixup: float
    cutmix: float
    num_classes: int
    off_epoch: int | None = None

    @classmethod
    def of(cls, config, num_classes: int) -> Mixer | None:
        """The mixer of a :class:`~gluon_ft.train.config.TrainConfig`, None when both are 0."""
        if not (config.mixup or config.cutmix):
            return None
        return cls(config.mixup, config.cutmix, num_classes, config.mix_off_epoch)

    def mixes(self, epoch: int) -> bool:
        """Whether the 0-based ``epoch`` mixes: before ``--mixup-off-epoch`` only."""
        return self.off_epoch is None or epoch + 1 < self.off_epoch

    def __call__(self, images: np.ndarray, labels: np.ndarray, rng=None) -> MixedBatch:
        """Mix a host batch (NHWC) with its reverse; ``rng`` defaults to :func:`step_generator`."""
        rng = step_generator() if rng is None else rng
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or rng.random() < SWITCH_PROBABILITY)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(rng.beta(alpha, alpha))
        partner = images[::-1]
        if use_cutmix:
            mixed, lam = paste_box(images, partner, lam, rng)
        else:
            mixed = lam * images.astype(np.float32) + (1.0 - lam) * partner.astype(np.float32)
        labels = np.asarray(labels)
        # Multi-hot rows (multi-label) mix as they are: each class's target is its share.
        rows = labels if labels.ndim == 2 else np.eye(self.num_classes, dtype=np.float32)[labels]
        targets = lam * rows + (1.0 - lam) * rows[::-1]
        dominant = labels if lam >= 0.5 else labels[::-1]
        return MixedBatch(mixed, targets.astype(np.float32), dominant, lam)


def paste_box(images: np.ndarray, partner: np.ndarray, lam: float, rng) -> tuple[np.ndarray, float]:
    """CutMix: ``partner``'s box of area ``1 - lam`` (centre uniform, clipped to the image) over
    ``images``; returns the result and the fraction of each image that is its own."""
    height, width = images.shape[1:3]
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = rng.integers(0, height), rng.integers(0, width)
    top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    pasted = images.copy()
    pasted[:, top:bottom, left:right] = partner[:, top:bottom, left:right]
    return pasted, 1.0 - float((bottom - top) * (right - left)) / (height * width)


def step_generator() -> np.random.Generator:
    """A NumPy generator seeded from ``mx.random`` on the CPU: the same under a step's seed
    whatever the devices, and the same again when a resumed run replays that step."""
    seed = mx.nd.random.randint(0, 2**31 - 1, shape=(1,), ctx=mx.cpu(), dtype="int32")
    return np.random.default_rng(int(seed.asscalar()))
