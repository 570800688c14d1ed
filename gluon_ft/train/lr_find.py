"""The LR range test (Smith 2015; fastai's ``lr_find``): :func:`range_test` and :func:`lr_find`.

A short run whose base rate grows exponentially, step by step, from a tiny rate to a huge one,
recording the loss of each step. The loss first stays flat, then falls, then blows up; a good
``--lr`` lies on the way down. Each step is a training step (:func:`train_batch`), so the
freeze plan, the head's ``lr_mult``, ``--accumulate``, ``--ctx`` and ``--dtype`` apply as in
training. Afterwards the network and its Trainer are put back bit for bit
(:class:`~gluon_ft.train.snapshot.TrainingSnapshot`): the test changes nothing.

The rate is gluon-ft's ``--lr``: per batch (``trainer.step(batch_size)``), for the base layers;
the new head learns ``--head-lr-mult`` times faster, as in training.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import mxnet as mx
from mxnet import gluon

from gluon_ft import paths
from gluon_ft.data.transforms import normalize_batch
from gluon_ft.deploy.plots import plot_lr_find
from gluon_ft.errors import UsageError
from gluon_ft.train import amp
from gluon_ft.train.config import TrainConfig
from gluon_ft.train.devices import parse_contexts
from gluon_ft.train.feeds import image_loaders, load_dataset
from gluon_ft.train.network import make_loss, make_trainer, ready_network
from gluon_ft.train.rundir import default_out
from gluon_ft.train.snapshot import TrainingSnapshot
from gluon_ft.train.step import MetricSums, StepOptions, train_batch

SMOOTHING = 0.98  # beta of the loss's moving average, fastai's
BLOW_UP = 4.0  # stop once the smoothed loss exceeds this many times the best so far
METHOD = "valley"


@dataclass
class LrFindResult:
    """The curve of one range test and the rate it suggests.

    ``lrs[i]`` is the base rate of step ``i``; ``losses[i]`` its batch's mean loss and
    ``smoothed[i]`` the bias-corrected moving average up to it. ``suggestion`` is None when
    the curve has no descent to choose from; ``how`` says in a sentence how it was chosen.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    method: str
    how: str
    stopped_early: bool
    steps: int

    def as_dict(self) -> dict:
        """JSON-ready: a NaN or infinite loss becomes null."""
        row = asdict(self)
        for key in ("losses", "smoothed"):
            row[key] = [x if math.isfinite(x) else None for x in row[key]]
        return row


def lr_at(step: int, num_steps: int, start_lr: float, end_lr: float) -> float:
    """The base rate of ``step`` (0-based): ``start_lr`` at the first, ``end_lr`` at the last,
    growing by the same factor each step."""
    return start_lr * (end_lr / start_lr) ** (step / (num_steps - 1))


def check_range(num_steps: int, start_lr: float, end_lr: float) -> None:
    """Raise :class:`UsageError` for a range no test can run."""
    if num_steps < 2:
        raise UsageError(f"--steps must be at least 2, got {num_steps}.")
    if not (math.isfinite(start_lr) and math.isfinite(end_lr) and 0 < start_lr < end_lr):
        raise UsageError(
            f"--start-lr {start_lr:g} and --end-lr {end_lr:g}: need 0 < start < end, both finite."
        )


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """The exponential moving average of ``losses``, bias-corrected (fastai's): the first
    values are not pulled towards zero."""
    average, smoothed = 0.0, []
    for i, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta**i))
    return smoothed


def suggest_valley(lrs: list[float], smoothed: list[float]) -> tuple[float | None, str]:
    """fastai's "valley" rule on the smoothed curve; returns ``(rate, how)``.

    The first tenth of the steps is left out (the average is still settling there). Among the
    rest, the longest descending run is the longest sequence of steps whose smoothed loss
    falls at each (not necessarily adjacent: noise may interrupt the descent); it ends at step
    ``e`` and has length ``L``, so it starts at ``s = e - L + 1`` when unbroken. The suggestion
    is the rate at step ``s + int(L / 3) + int(L / 6)``: halfway down, clear of both the flat
    start and the blow-up. Robust where the steepest point of a noisy curve is not. (fastai
    takes ``s = e - L``, one step earlier, which can point before the first step.)
    """
    first = len(smoothed) // 10
    losses = [x if math.isfinite(x) else math.inf for x in smoothed[first:]]
    n = len(losses)
    if n < 2:
        return None, "no suggestion: too few steps to find a descent"
    run = [1] * n  # run[i]: length of the longest descending sequence ending at step i
    end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[end] < run[i]:
            end = i
    length = run[end]
    if length < 2:
        return None, "no suggestion: the smoothed loss never fell"
    start = end - length + 1
    index = first + start + int(length / 3) + int(length / 3 / 2)
    how = (
        f"valley: halfway down the longest descent of the smoothed loss "
        f"({length} steps, lr {lrs[first + start]:.2g} to {lrs[first + end]:.2g})"
    )
    return lrs[index], how


def _passes(loader):
    """The batches of ``loader`` that hold a readable image, pass after pass; each pass is the
    next epoch's order and augmentation when the loader has them (gluon-ft's)."""
    sampler = getattr(loader, "_batch_sampler", None)
    epoch = 0
    while True:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        empty = True
        for images, labels, _ in loader:
            if images is not None:
                empty = False
                yield images, labels
        if empty:
            raise UsageError("The LR range test found no readable image in the training part.")
        epoch += 1


def range_test(
    net: gluon.Block,
    trainer: gluon.Trainer,
    loader,
    ctx: list[mx.Context],
    loss_fn,
    config: TrainConfig,
    num_steps: int = 100,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    prepare=normalize_batch,
) -> LrFindResult:
    """Train ``num_steps`` steps at exponentially growing rates; put everything back.

    Parameters
    ----------
    net, trainer
        The network and its Trainer as a run would train them (frozen, hybridized). Both are
        restored bit for bit afterwards, every device's copy of every parameter and the
        optimizer state included; the gradients are zeroed.
    loader
        Training batches ``(images, labels, unreadable)``; it is gone over again if shorter
        than ``num_steps``. Batches with no readable image are passed over.
    ctx, loss_fn, config, prepare
        As for :func:`~gluon_ft.train.step.train_batch` (``prepare``: identity for cached
        features, with the head as ``net``).
    num_steps, start_lr, end_lr
        The base rate of step ``i`` is :func:`lr_at`; the test stops early once the smoothed
        loss exceeds ``BLOW_UP`` times the best so far, or is not finite.

    Returns
    -------
    LrFindResult
        The curve and the rate of :func:`suggest_valley`.
    """
    check_range(num_steps, start_lr, end_lr)
    options = StepOptions.of(config, prepare=prepare)
    with _put_back(net, trainer, loader):
        mx.random.seed(config.seed)  # the same settings give the same curve
        batches = _passes(loader)
        try:
            rates = [lr_at(step, num_steps, start_lr, end_lr) for step in range(num_steps)]
            lrs, losses, smoothed = _sweep(net, trainer, batches, ctx, loss_fn, options, rates)
        finally:
            batches.close()  # ends the loader's pass (and its worker processes) now
    blew_up = _blew_up(smoothed)
    # The step that blew up is kept in the curve, but no suggestion comes from it.
    suggestion, how = suggest_valley(lrs, smoothed[:-1] if blew_up else smoothed)
    stopped_early = blew_up and len(lrs) < num_steps
    return LrFindResult(lrs, losses, smoothed, suggestion, METHOD, how, stopped_early, len(lrs))


@contextmanager
def _put_back(net: gluon.Block, trainer: gluon.Trainer, loader):
    """Restore the network, its Trainer and the loader's epoch and batch position on leaving,
    bit for bit (:class:`~gluon_ft.train.snapshot.TrainingSnapshot`)."""
    snapshot = TrainingSnapshot(net, trainer)
    sampler = getattr(loader, "_batch_sampler", None)
    position = (sampler.epoch, sampler.first_batch) if hasattr(sampler, "set_epoch") else None
    try:
        yield
    finally:
        snapshot.restore()
        if position is not None:
            sampler.set_epoch(*position)


def _sweep(net, trainer, batches, ctx, loss_fn, options: StepOptions, rates: list[float]):
    """One training step per rate of ``rates``, in order, until the loss blows up (see
    :func:`_blew_up`); returns the ``(lrs, losses, smoothed)`` of the steps taken."""
    lrs, losses, smoothed = [], [], []
    for rate in rates:
        images, labels = next(batches)
        lrs.append(rate)
        trainer.set_learning_rate(rate)
        sums = MetricSums(ctx)
        train_batch(net, trainer, images, labels, ctx, loss_fn, sums, options=options)
        losses.append(sums.read()[0])
        smoothed = smooth(losses)
        if _blew_up(smoothed):
            break
    return lrs, losses, smoothed


def _blew_up(smoothed: list[float]) -> bool:
    """The newest smoothed loss is not finite, or over ``BLOW_UP`` times the best so far."""
    if not smoothed:
        return False
    return not math.isfinite(smoothed[-1]) or smoothed[-1] > BLOW_UP * min(smoothed)


def default_lr_find_out(config: TrainConfig) -> Path:
    """``runs/lr-find-<data>-<model>-<time>``: beside the runs of :func:`default_out`."""
    run = Path(default_out(config))
    return run.with_name(f"lr-find-{run.name}")


def lr_find(
    config: TrainConfig,
    out_dir: str | Path | None = None,
    num_steps: int = 100,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
) -> tuple[LrFindResult, Path]:
    """The range test of ``config``'s training, on its training part only; writes
    ``lr_find.json`` and ``lr_find.png`` into ``out_dir``.

    The data is split as ``train`` would split it (``--val-split``, ``--test-split``,
    ``--seed``), and only the train part is read; the network is built as ``train`` builds
    it. Nothing else is written: ``--pretrained FILE`` is only read.

    Returns
    -------
    (LrFindResult, Path)
        The result, and the folder holding the two files.

    Raises
    ------
    UsageError
        Bad settings or data, or an unwritable ``out_dir``.
    """
    check_range(num_steps, start_lr, end_lr)
    config.validate()
    ctx = parse_contexts(config.ctx)
    config.dtype = amp.choose_dtype(config, ctx)["dtype"]  # auto: the probe's choice
    amp.enable(config.dtype)  # before the first forward pass builds a graph
    parts = load_dataset(config.data, config.val_split, config.test_split, config.seed)
    net, _, _ = ready_network(config, len(parts.classes), ctx)
    trainer = make_trainer(net, config, ctx)
    loss_fn = make_loss(config, parts.train.labels(), len(parts.classes), ctx)
    loader, _ = image_loaders(config, parts.train, parts.train)  # the second is never read
    out = Path(out_dir or default_lr_find_out(config)).expanduser()
    try:  # before the steps, after the checks of the data and the weights
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"Cannot write --out {out}: {err}") from None
    result = range_test(net, trainer, loader, ctx, loss_fn, config, num_steps, start_lr, end_lr)
    settings = {
        "start_lr": start_lr,
        "end_lr": end_lr,
        "num_steps": num_steps,
        "train_size": len(parts.train),
        "config": asdict(config),
    }
    write_lr_find(result, out, settings)
    return result, out


def write_lr_find(result: LrFindResult, out: Path, settings: dict) -> None:
    """``lr_find.json`` (the curve, the suggestion, ``settings``) and ``lr_find.png`` in
    ``out``."""
    paths.write_json(out / "lr_find.json", {**result.as_dict(), "settings": settings})
    plot_lr_find(result.lrs, result.losses, result.smoothed, result.suggestion, out / "lr_find.png")
