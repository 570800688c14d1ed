"""The step and the epoch: ``train_batch``, ``train_epoch`` and ``evaluate``.

As d2l's ``train_batch_ch13``/``train_ch13``: one optimizer step on a batch spread over the
devices, a pass over a loader, and a predict-mode pass for accuracy. What a step needs of the
run's settings is a :class:`StepOptions`, built once by :meth:`StepOptions.of`. Loss and
accuracy are summed on each device (:class:`MetricSums`) and read on the host only every
``log_every`` steps, so a step never waits for the host.

``Trainer.step`` divides the summed gradient by the samples of the step over all devices
(and, in a distributed run, all workers), exactly once per step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from gluon_ft.data.transforms import normalize_batch
from gluon_ft.data.tta import view_logits
from gluon_ft.errors import DivergedError
from gluon_ft.train import amp
from gluon_ft.train.config import TrainConfig
from gluon_ft.train.devices import micro_batches, split_batch, split_rows, zero_unused_grads
from gluon_ft.train.dist import DistContext
from gluon_ft.train.mixing import Mixer
from gluon_ft.train.multilabel_loss import MultiLabelLoss


@dataclass(frozen=True)
class StepOptions:
    """How :func:`train_batch` and :func:`train_epoch` step, besides the network, its Trainer,
    the batches, the devices and the loss.

    :meth:`of` builds them from a run's settings; an epoch that trains on other inputs or
    mixes otherwise gets its own with :func:`dataclasses.replace`.
    """

    dtype: str  # --dtype: the loss scaling of the backward pass (see amp.backward)
    accumulate: int  # --accumulate: micro-batches per step, their gradients summed
    log_every: int  # steps between host reads of the running metrics
    prepare: Callable = normalize_batch  # a device batch -> the network's input
    mixer: Mixer | None = None  # mixup/CutMix of each host batch; None mixes nothing
    after_step: Callable | None = None  # after each optimizer step (--ema's update)
    # The input gets a gradient too: MXNet moves a BatchNorm's running statistics in its
    # backward pass, which it skips for a layer nothing before or in it trains (ResNet v2's
    # input BatchNorm); see gluon_ft.model.freeze.needs_input_grad.
    input_grad: bool = False

    @classmethod
    def of(cls, config: TrainConfig, **others) -> StepOptions:
        """The options ``config`` sets; ``others`` gives ``prepare``, ``mixer``, ``after_step``."""
        return cls(config.dtype, config.accumulate, config.log_every, **others)


class MetricSums:
    """Loss and accuracy summed on each device; read on the host only when asked.

    Multi-label targets (``(N, C)`` rows) count per-label accuracy: each sample adds the
    share of its classes decided right at probability 0.5 (a logit above 0).
    """

    def __init__(self, ctx: list[mx.Context]):
        self.loss = [mx.nd.zeros((1,), ctx=c) for c in ctx]
        self.correct = [mx.nd.zeros((1,), ctx=c) for c in ctx]
        self.count = 0

    def add(self, outputs, labels, losses=None) -> None:
        for i, (out, y) in enumerate(zip(outputs, labels)):
            if losses is not None:
                self.loss[i] += losses[i].sum()
            if y.ndim == 2:
                decided = (out.astype("float32", copy=False) > 0) == (y > 0.5)
                self.correct[i] += decided.mean(axis=1).sum()
                self.count += y.shape[0]
                continue
            # argmax in float32: bfloat16 (AMP's output) holds class indices exactly up to 256.
            predicted = out.astype("float32", copy=False).argmax(axis=1)
            self.correct[i] += (predicted == y.astype("float32")).sum()
            self.count += y.shape[0]

    def read(self) -> tuple[float, float]:
        """Return ``(mean loss, accuracy)`` over the samples added so far."""
        if not self.count:
            return float("nan"), float("nan")
        loss = sum(x.asscalar() for x in self.loss)
        correct = sum(x.asscalar() for x in self.correct)
        return float(loss) / self.count, float(correct) / self.count

    def totals(self) -> dict:
        """The raw sums as JSON numbers, for the checkpoint of an interrupted epoch."""
        return {
            "loss": float(sum(x.asscalar() for x in self.loss)),
            "correct": float(sum(x.asscalar() for x in self.correct)),
            "count": self.count,
        }

    def add_totals(self, totals: dict) -> None:
        """Add sums saved by :meth:`totals`: the steps a resumed epoch took before."""
        self.loss[0] += totals["loss"]
        self.correct[0] += totals["correct"]
        self.count += int(totals["count"])


def sum_over_workers(dist: DistContext, sums: MetricSums, skipped: int = 0):
    """Return ``(MetricSums, skipped)`` added up over every worker of a distributed run.

    Every worker must call it at the same point (it is an allreduce); a one-process run gets
    its own values back.
    """
    if not dist.distributed:
        return sums, skipped
    mine = sums.totals()
    loss, correct, count, skipped = dist.allreduce_sum(
        [mine["loss"], mine["correct"], mine["count"], skipped]
    )
    summed = MetricSums([mx.cpu()])
    summed.add_totals({"loss": loss, "correct": correct, "count": round(count)})
    return summed, round(skipped)


def evaluate_sums(
    net: gluon.Block,
    loader,
    ctx: list[mx.Context],
    dist: DistContext | None = None,
    prepare=normalize_batch,
    loss_fn=None,
) -> MetricSums:
    """Accuracy (and with ``loss_fn`` the loss) of ``net`` over ``loader``, in predict mode.

    Every readable sample counts. ``prepare`` turns a device batch into the network's input
    (cached features: identity). A loader of ``--tta`` views scores each sample by the mean
    of its views' logits (:func:`gluon_ft.data.tta.view_logits`). With a distributed ``dist``,
    ``loader`` is this worker's shard and the sums are over every worker's.
    """
    sums = MetricSums(ctx)
    for images, labels, _ in loader:
        if images is None:
            continue
        xs, ys = split_batch(images, labels, ctx)
        outs = [view_logits(net, x, prepare) for x in xs]  # with --tta, the views' mean
        losses = [loss_fn(out, y) for out, y in zip(outs, ys)] if loss_fn else None
        sums.add(outs, ys, losses)
    if dist is not None:
        sums, _ = sum_over_workers(dist, sums)
    return sums


def evaluate_multilabel(
    net: gluon.Block, loader, ctx: list[mx.Context], prepare=normalize_batch
) -> tuple[MetricSums, np.ndarray, np.ndarray]:
    """A multi-label pass over ``loader`` in predict mode: ``(sums, probabilities,
    targets)``, the sums with the plain sigmoid loss, the ``(N, C)`` arrays on the host for
    the ranking scores (average precision) that device sums cannot give. One process only."""
    loss_fn = MultiLabelLoss()
    sums, probabilities, targets = MetricSums(ctx), [], []
    for images, labels, _ in loader:
        if images is None:
            continue
        xs, ys = split_batch(images, labels, ctx)
        outs = [view_logits(net, x, prepare).astype("float32", copy=False) for x in xs]
        sums.add(outs, ys, [loss_fn(out, y) for out, y in zip(outs, ys)])
        probabilities += [out.sigmoid().asnumpy() for out in outs]
        targets += [y.asnumpy() for y in ys]
    if not probabilities:
        return sums, np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return sums, np.concatenate(probabilities), np.concatenate(targets)


def evaluate(
    net: gluon.Block,
    loader,
    ctx: list[mx.Context],
    dist: DistContext | None = None,
    prepare=normalize_batch,
) -> float:
    """Accuracy of ``net`` over every readable sample of ``loader`` (see :func:`evaluate_sums`)."""
    return evaluate_sums(net, loader, ctx, dist, prepare).read()[1]


def train_batch(
    net,
    trainer: gluon.Trainer,
    images,
    labels,
    ctx: list[mx.Context],
    loss_fn,
    sums: MetricSums,
    *,
    options: StepOptions,
    step_size: int | None = None,
) -> None:
    """One optimizer step on a host batch, its loss and accuracy added to ``sums``.

    ``images is None`` (every file of the batch unreadable) takes a step with zero gradients,
    which a distributed worker must, since the others wait for it. ``step_size`` is the
    step's global batch in a distributed run; else the batch's own size. The options' mixer
    mixes the host batch first (before it is split, so alike on any number of devices); the
    loss then gets its soft targets, and accuracy counts the dominant label of each sample.
    The options' ``after_step()`` runs once the step is taken.
    """
    extra = ()  # the mixed batch's soft targets, cut alongside the images and labels
    if images is not None and options.mixer is not None:
        mixed = options.mixer(images, labels)
        images, labels, extra = mixed.images, mixed.labels, (mixed.targets,)
    reached = 0  # contexts that got a slice of some micro-batch of this step
    parts = [] if images is None else micro_batches(images, labels, options.accumulate, *extra)
    for part_images, part_labels, *part_targets in parts:
        xs, ys = split_batch(part_images, part_labels, ctx)
        targets = split_rows(part_targets[0], ctx) if part_targets else ys
        inputs = [options.prepare(x) for x in xs]
        if options.input_grad:
            for x in inputs:
                x.attach_grad()
        with autograd.record():
            outs = [net(x) for x in inputs]
            losses = [loss_fn(out, t) for out, t in zip(outs, targets)]
        # With --accumulate, grad_req is 'add': the micro-batches' gradients sum up.
        amp.backward(losses, trainer, options.dtype)
        sums.add(outs, ys, losses)
        reached = max(reached, len(xs))
    if reached < len(ctx):
        zero_unused_grads(net, ctx[reached:])
    # The summed gradient is divided by the samples in this step, over all contexts.
    trainer.step(len(labels) if step_size is None else step_size)
    if options.accumulate > 1:
        net.collect_params().zero_grad()
    if options.after_step is not None:
        options.after_step()


def train_epoch(
    net,
    trainer: gluon.Trainer,
    loader,
    ctx: list[mx.Context],
    loss_fn,
    *,
    options: StepOptions,
    bar=None,
    step_samples: list[int] | None = None,
):
    """One pass over ``loader``; returns ``(MetricSums, skipped files, seconds)``.

    Each batch is one :func:`train_batch` under ``options``. The host reads the metrics every
    ``options.log_every`` steps only, and then advances the progress ``bar`` (tqdm's, if any).

    ``step_samples`` (distributed runs) lists the global batch size of each step: the summed
    gradient of all workers is divided by it, and a worker takes every step, with zero
    gradients when its part of the batch is empty, since the others wait for it.
    """
    sums = MetricSums(ctx)
    skipped = 0
    start = time.perf_counter()
    for step, (images, labels, bad) in enumerate(loader, 1):
        skipped += bad
        if images is None and step_samples is None:
            continue
        step_size = None if step_samples is None else step_samples[step - 1]
        train_batch(
            net, trainer, images, labels, ctx, loss_fn, sums, options=options, step_size=step_size
        )
        if bar is not None:
            bar.update(1)
        if step % options.log_every == 0 and sums.count:
            loss, acc = sums.read()
            check_finite(loss, step, trainer.learning_rate)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
    mx.nd.waitall()
    return sums, skipped, time.perf_counter() - start


def check_finite(loss: float, step: int, lr: float) -> None:
    """Stop a run whose loss became NaN or infinite."""
    if not math.isfinite(loss):
        raise DivergedError(
            f"The training loss became {loss} by step {step} (lr {lr:g}). Lower --lr or "
            "check the data."
        )


def check_params_finite(net: gluon.Block, lr: float) -> None:
    """Stop a run whose weights overflowed: a last step can do so while its loss was finite.

    Only trained parameters are read: frozen ones cannot change, and reading a whole backbone
    costs more than a cached-features epoch.
    """
    params = [p for p in net.collect_params().values() if p.grad_req != "null"]
    sums = [p.list_data()[0].astype("float32").sum() for p in params]
    if sums and not math.isfinite(float(mx.nd.add_n(*sums).asscalar())):
        raise DivergedError(
            f"The parameters became NaN or infinite (lr {lr:g}). Lower --lr or check the data."
        )
