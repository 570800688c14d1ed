"""The training loop: contexts, split_and_load, hybridize, Trainer, metrics, run directory.

``python -m gluon_ft.train`` is ``gluon-ft train``. The defaults are the book's MXNet recipe:
SGD with lr 0.01, wd 0.001, batch 128, 5 epochs, the new head learning 10x faster, and
``trainer.step(batch_size)`` once per step with the global batch size.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import gluon_ft
from gluon_ft import data as gdata
from gluon_ft.errors import DivergedError, UsageError
from gluon_ft.freeze import log_table, micro_batches
from gluon_ft.model import graft_new_head, load_source_model, scratch_twin


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
    image_size: int = 224
    ctx: str = "auto"
    kvstore: str | None = None
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

    def validate(self) -> None:
        """Raise :class:`UsageError` for values no run can use."""
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1.")
        for name in ("lr", "head_lr_mult"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive number.")
        if self.wd < 0 or not 0 <= self.momentum < 1:
            raise UsageError("--wd must be >= 0 and --momentum in [0, 1).")
        if self.workers < 0:
            raise UsageError("--workers must be >= 0.")
        if self.accumulate > self.batch_size:
            raise UsageError("--accumulate cannot exceed --batch-size (its micro-batches).")
        self.freeze_plan().validate(self.epochs)

    def freeze_plan(self):
        """The :class:`gluon_ft.freeze.FreezePlan` of these settings."""
        from gluon_ft.freeze import FreezePlan

        return FreezePlan(
            self.freeze, self.bn, self.layer_lr_decay, self.unfreeze_at, self.accumulate
        )


@dataclass
class EpochStats:
    """One row of ``metrics.json``."""

    epoch: int
    loss: float
    train_acc: float
    test_acc: float
    examples_per_sec: float
    seconds: float
    skipped: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        row = asdict(self)
        row.update(row.pop("extra"))
        return row


def parse_contexts(spec: str) -> list[mx.Context]:
    """Turn ``auto``, ``cpu``, ``cpu:N`` or ``gpu:0,1`` into a list of contexts.

    ``auto`` is every GPU MXNet sees, else the CPU. ``cpu:N`` makes N CPU contexts, which
    MXNet treats as separate devices: the multi-device path without a GPU.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        gpus = mx.context.num_gpus()
        return [mx.gpu(i) for i in range(gpus)] if gpus else [mx.cpu()]
    kind, _, rest = spec.partition(":")
    try:
        if kind == "cpu":
            count = int(rest) if rest else 1
            if count < 1:
                raise ValueError
            return [mx.cpu(i) for i in range(count)]
        if kind == "gpu":
            ids = [int(i) for i in rest.split(",")] if rest else [0]
            available = mx.context.num_gpus()
            missing = [i for i in ids if i >= available]
            if missing:
                raise UsageError(f"--ctx {spec}: MXNet sees {available} GPU(s), not {missing}.")
            return [mx.gpu(i) for i in ids]
    except ValueError:
        pass
    raise UsageError(f"--ctx {spec!r}: use auto, cpu, cpu:N or gpu:0,1.")


def load_dataset(spec: str) -> tuple[gdata.ImageFolderSplit, gdata.ImageFolderSplit]:
    """Return the train and test splits for ``--data hotdog`` or ``--data DIR``."""
    root = gdata.hotdog_root() if spec == "hotdog" else Path(spec).expanduser()
    return gdata.scan_dataset(root)


def build_network(config: TrainConfig, num_classes: int, ctx: list[mx.Context]):
    """Return ``(net, source)``: the graft for pretrained weights, else the scratch twin."""
    if config.pretrained == "none":
        return scratch_twin(config.model, num_classes, ctx), None
    source = load_source_model(config.model, config.pretrained)
    return graft_new_head(source, num_classes, config.head_lr_mult, ctx), source


def make_trainer(net: gluon.Block, config: TrainConfig, ctx: list[mx.Context]) -> gluon.Trainer:
    """SGD over every parameter; ``grad_req='null'`` ones are skipped by the Trainer itself."""
    params = {"learning_rate": config.lr, "wd": config.wd}
    if config.momentum:
        params["momentum"] = config.momentum
    # One context needs no kvstore; several aggregate on the device kvstore.
    kvstore = config.kvstore or ("device" if len(ctx) > 1 else None)
    return gluon.Trainer(net.collect_params(), "sgd", params, kvstore=kvstore)


class RunDirectory:
    """The files of one run; every write goes to a temporary name and is renamed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def prepare(self, resume: bool = False) -> None:
        """Create the folder, refusing to overwrite a finished or started run."""
        if (self.path / "metrics.json").exists() and not resume:
            raise UsageError(
                f"{self.path} already holds a run. Pass another --out, or --resume to "
                "continue it; nothing was overwritten."
            )
        try:
            (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise UsageError(f"Cannot write the run directory {self.path}: {err}") from None

    def write_json(self, name: str, obj) -> Path:
        target = self.path / name
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, target)
        return target

    def save_params(self, net: gluon.Block, name: str = "model.params") -> Path:
        target = self.path / name
        tmp = target.with_name(f".{target.name}.tmp")
        net.save_parameters(str(tmp))
        os.replace(tmp, target)
        return target


class MetricSums:
    """Loss and accuracy summed on each device; read on the host only when asked."""

    def __init__(self, ctx: list[mx.Context]):
        self.loss = [mx.nd.zeros((1,), ctx=c) for c in ctx]
        self.correct = [mx.nd.zeros((1,), ctx=c) for c in ctx]
        self.count = 0

    def add(self, outputs, labels, losses=None) -> None:
        for i, (out, y) in enumerate(zip(outputs, labels)):
            if losses is not None:
                self.loss[i] += losses[i].sum()
            self.correct[i] += (out.argmax(axis=1) == y.astype(out.dtype)).sum()
            self.count += y.shape[0]

    def read(self) -> tuple[float, float]:
        """Return ``(mean loss, accuracy)`` over the samples added so far."""
        if not self.count:
            return float("nan"), float("nan")
        loss = sum(x.asscalar() for x in self.loss)
        correct = sum(x.asscalar() for x in self.correct)
        return float(loss) / self.count, float(correct) / self.count


def split_batch(images: np.ndarray, labels: np.ndarray, ctx: list[mx.Context]):
    """Load a host batch onto the contexts in near-equal slices, as ``split_and_load``.

    A batch smaller than the context count uses fewer contexts. (MXNet 1.9.1's
    ``split_and_load(even_split=False)`` fails on a 1-sample batch over 2 contexts.)
    """
    used = ctx[: min(len(ctx), len(labels))]
    image_parts = np.array_split(images, len(used))
    label_parts = np.array_split(labels, len(used))
    xs = [mx.nd.array(part, ctx=c, dtype="uint8") for part, c in zip(image_parts, used)]
    ys = [mx.nd.array(part, ctx=c, dtype="int32") for part, c in zip(label_parts, used)]
    return xs, ys


def zero_unused_grads(net: gluon.Block, unused: list[mx.Context]) -> None:
    """Zero the gradients of contexts a short batch did not reach, and mark them fresh.

    Otherwise the kvstore would sum in the previous step's gradient from those devices.
    """
    for param in net.collect_params().values():
        if param.grad_req == "null":
            continue
        for c in unused:
            param.grad(c)[:] = 0
            param.data(c)._fresh_grad = True


def evaluate(net: gluon.Block, loader, ctx: list[mx.Context], dtype: str = "float32") -> float:
    """Accuracy of ``net`` over every readable sample of ``loader``, in predict mode."""
    sums = MetricSums(ctx)
    for images, labels, _ in loader:
        if images is None:
            continue
        xs, ys = split_batch(images, labels, ctx)
        outs = [net(gdata.normalize_batch(x, dtype)) for x in xs]
        sums.add(outs, ys)
    return sums.read()[1]


def train_epoch(net, trainer, loader, ctx, loss_fn, config: TrainConfig, bar=None):
    """One pass over ``loader``; returns ``(MetricSums, skipped files, seconds)``."""
    sums = MetricSums(ctx)
    skipped = 0
    start = time.perf_counter()
    for step, (images, labels, bad) in enumerate(loader, 1):
        skipped += bad
        if images is None:
            continue
        reached = 0  # contexts that got a slice of some micro-batch of this step
        for part_images, part_labels in micro_batches(images, labels, config.accumulate):
            xs, ys = split_batch(part_images, part_labels, ctx)
            with autograd.record():
                outs = [net(gdata.normalize_batch(x, config.dtype)) for x in xs]
                losses = [loss_fn(out, y) for out, y in zip(outs, ys)]
            # With --accumulate, grad_req is 'add': the micro-batches' gradients sum up.
            autograd.backward(losses)
            sums.add(outs, ys, losses)
            reached = max(reached, len(xs))
        if reached < len(ctx):
            zero_unused_grads(net, ctx[reached:])
        # The summed gradient is divided by the samples in this step, over all contexts.
        trainer.step(len(labels))
        if config.accumulate > 1:
            net.collect_params().zero_grad()
        if bar is not None:
            bar.update(1)
        if step % config.log_every == 0:
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


def default_out(config: TrainConfig) -> str:
    """``runs/<data>-<model>-<time>`` for a run without ``--out``."""
    data = "hotdog" if config.data == "hotdog" else Path(config.data).name or "data"
    return str(Path("runs") / f"{data}-{config.model}-{time.strftime('%Y%m%d-%H%M%S')}")


def train(config: TrainConfig) -> dict:
    """Run the fine-tuning (or scratch) recipe and write the run directory.

    Returns
    -------
    dict
        ``{"run_dir": Path, "history": [epoch rows], "classes": [...]}``.

    Raises
    ------
    UsageError
        Bad settings or data (exit 2).
    DivergedError
        NaN or infinite loss (exit 3).
    """
    from tqdm.auto import tqdm

    from gluon_ft.plots import plot_curves

    config.validate()
    ctx = parse_contexts(config.ctx)
    run = RunDirectory(config.out or default_out(config))
    run.prepare()
    train_split, test_split = load_dataset(config.data)
    classes = list(train_split.classes)
    net, source = build_network(config, len(classes), ctx)
    plan = config.freeze_plan()
    plan.setup(net)
    # MXNet defers shapes to the first batch; one predict-mode pass of zeros (no statistics
    # move) gives the parameter table its shapes and counts.
    blank = mx.nd.zeros((1, config.image_size, config.image_size, 3), ctx=ctx[0], dtype="uint8")
    net(gdata.normalize_batch(blank, config.dtype))
    table_log = run.path / "trainable.txt"  # the parameter table, at the start and each change
    table = log_table(table_log, net, "epoch 1: at the start")
    if config.progress:
        tqdm.write(f"{table.summary()} (table: {table_log})")
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = make_trainer(net, config, ctx)
    mx.random.seed(config.seed)

    train_loader = gdata.make_loader(
        train_split,
        gdata.TrainTransform(config.image_size),
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        workers=config.workers,
    )
    test_loader = gdata.make_loader(
        test_split,
        gdata.TestTransform(config.image_size),
        config.batch_size,
        shuffle=False,
        workers=config.workers,
    )
    resolved = {
        **asdict(config),
        "out": str(run.path),
        "contexts": [str(c) for c in ctx],
        "num_classes": len(classes),
        "source_classes": source.num_classes if source else None,
        "train_size": len(train_split),
        "test_size": len(test_split),
        "mxnet": mx.__version__,
        "gluon_ft": gluon_ft.__version__,
        "threads": gluon_ft.THREAD_SETTINGS,
        "frozen": plan.record(net),
    }
    run.write_json("config.json", resolved)
    run.write_json("classes.json", classes)

    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    history: list[dict] = []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        gdata.set_epoch(train_loader, epoch)
        # Gradual unfreezing (--unfreeze-at); the Trainer sees grad_req at its next step.
        unfrozen = [change.pattern for change in plan.at_epoch(net, epoch)]
        if unfrozen:
            heading = f"epoch {epoch + 1}: unfroze {', '.join(unfrozen)}"
            table = log_table(table_log, net, heading)
            if config.progress:
                tqdm.write(f"{heading}: {table.summary()}")
        with tqdm(
            total=len(train_loader),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="batch",
            disable=not config.progress,
            leave=False,
        ) as bar:
            sums, skipped, train_seconds = train_epoch(
                net, trainer, train_loader, ctx, loss_fn, config, bar
            )
        loss, train_acc = sums.read()
        check_finite(loss, len(train_loader), trainer.learning_rate)
        test_acc = evaluate(net, test_loader, ctx, config.dtype)
        row = EpochStats(
            epoch=epoch + 1,
            loss=loss,
            train_acc=train_acc,
            test_acc=test_acc,
            examples_per_sec=sums.count / train_seconds if train_seconds else 0.0,
            seconds=time.perf_counter() - started,
            skipped=skipped,
            extra={
                "trainable_params": table.trainable_count,
                "frozen_params": table.frozen_count,
                **({"unfrozen": unfrozen} if unfrozen else {}),
            },
        ).as_dict()
        history.append(row)
        if skipped:
            tqdm.write(f"warning: skipped {skipped} unreadable image file(s) in epoch {epoch + 1}")
        if config.progress:
            tqdm.write(
                f"epoch {epoch + 1}: loss {loss:.3f}, train acc {train_acc:.3f}, "
                f"test acc {test_acc:.3f}, {row['examples_per_sec']:.1f} examples/sec"
            )
        run.save_params(net, f"checkpoints/epoch-{epoch + 1:04d}.params")
        run.write_json("metrics.json", history)
        plot_curves(history, run.path / "curves.png")
    run.save_params(net)
    return {"run_dir": run.path, "history": history, "classes": classes}


def pretrain(config: TrainConfig, out_file: str | Path) -> dict:
    """Train a source model from scratch on ``config.data`` and save it as a params file.

    Step 1 of the book's recipe. The params file is what ``--pretrained FILE.params``
    accepts; a sidecar ``FILE.json`` keeps the model name and the source classes, so the graft
    knows what it drops. The run directory (curves, metrics) goes to ``FILE.run/``. It is the
    same training loop as :func:`train`, not a copy.

    Raises
    ------
    UsageError
        ``out_file`` is not a ``.params`` path or its folder cannot be written (checked before
        any training), or the data is unusable.
    """
    from gluon_ft.model import sidecar_path

    out_file = Path(out_file).expanduser()
    if out_file.suffix != ".params":
        raise UsageError(f"--out {out_file}: the pretrained model file must end in .params.")
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        probe = out_file.with_name(f".{out_file.name}.write-test")
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"Cannot write {out_file}: {err}") from None
    config.pretrained = "none"
    config.head_lr_mult = 1.0  # there is no new head when training from scratch
    config.out = config.out or str(out_file.with_suffix(".run"))
    result = train(config)
    os.replace(result["run_dir"] / "model.params", out_file)
    meta = {"model": config.model, "classes": result["classes"], "image_size": config.image_size}
    sidecar_path(out_file).write_text(json.dumps(meta, indent=2) + "\n")
    return {**result, "params_file": out_file}


if __name__ == "__main__":
    from gluon_ft.cli import main

    raise SystemExit(main(["train", *os.sys.argv[1:]]))
