"""The training loop: contexts, split_and_load, hybridize, Trainer, metrics, run directory.

``python -m gluon_ft.train`` is ``gluon-ft train``. The defaults are the book's MXNet recipe:
SGD with lr 0.01, wd 0.001, batch 128, 5 epochs, the new head learning 10x faster, and
``trainer.step(batch_size)`` once per step with the global batch size.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import gluon_ft
from gluon_ft import amp, zoo
from gluon_ft import data as gdata
from gluon_ft.dist import DistContext, connect, is_distributed
from gluon_ft.errors import DivergedError, Interrupted, UsageError
from gluon_ft.freeze import log_table, micro_batches
from gluon_ft.model import get_head, graft_new_head, load_source_model, scratch_twin
from gluon_ft.schedule import SCHEDULES, LrSchedule


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
        if self.resume and is_distributed(self.kvstore):
            raise UsageError(
                f"--resume does not work with --kvstore {self.kvstore} yet: only rank 0 holds "
                "the checkpoints. Start a new run (another --out)."
            )
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
    """Return the train and test splits for ``--data hotdog``, ``DIR`` or a RecordIO ``PREFIX``.

    A pack (``gluon-ft pack``) gives splits with the same interface, classes and labels.
    """
    from gluon_ft.recordio import load_pack, pack_prefix

    if spec != "hotdog" and pack_prefix(spec) is not None:
        return load_pack(spec)
    root = gdata.hotdog_root() if spec == "hotdog" else Path(spec).expanduser()
    return gdata.scan_dataset(root)


def build_network(config: TrainConfig, num_classes: int, ctx: list[mx.Context]):
    """Return ``(net, source)``: the graft for pretrained weights, else the scratch twin."""
    if config.pretrained == "none":
        return scratch_twin(config.model, num_classes, ctx, config.image_size), None
    source = load_source_model(config.model, config.pretrained, config.image_size)
    return graft_new_head(source, num_classes, config.head_lr_mult, ctx), source


def make_trainer(
    net: gluon.Block, config: TrainConfig, ctx: list[mx.Context], dist: DistContext | None = None
) -> gluon.Trainer:
    """SGD over every parameter; ``grad_req='null'`` ones are skipped by the Trainer itself.

    A distributed ``dist`` brings its own kvstore (see :meth:`DistContext.trainer_options`).
    """
    params = {"learning_rate": config.lr, "wd": config.wd}
    if config.momentum:
        params["momentum"] = config.momentum
    if dist is not None and dist.distributed:
        options = dist.trainer_options()
    else:
        # One context needs no kvstore; several aggregate on the device kvstore.
        kvstore = config.kvstore or ("device" if len(ctx) > 1 else None)
        options = {"kvstore": kvstore, **amp.trainer_kwargs(config.dtype)}
    trainer = gluon.Trainer(net.collect_params(), "sgd", params, **options)
    amp.prepare_trainer(trainer, config.dtype)
    if dist is not None:
        dist.broadcast_initial_parameters(trainer)
    return trainer


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


def split_batch(images: np.ndarray, labels: np.ndarray, ctx: list[mx.Context]):
    """Load a host batch onto the contexts in near-equal slices, as ``split_and_load``.

    A batch smaller than the context count uses fewer contexts. (MXNet 1.9.1's
    ``split_and_load(even_split=False)`` fails on a 1-sample batch over 2 contexts.)
    """
    used = ctx[: min(len(ctx), len(labels))]
    image_parts = np.array_split(images, len(used))
    label_parts = np.array_split(labels, len(used))
    xs = [mx.nd.array(part, ctx=c, dtype=part.dtype) for part, c in zip(image_parts, used)]
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


def evaluate(
    net: gluon.Block,
    loader,
    ctx: list[mx.Context],
    dist: DistContext | None = None,
    prepare=gdata.normalize_batch,
) -> float:
    """Accuracy of ``net`` over every readable sample of ``loader``, in predict mode.

    ``prepare`` turns a device batch into the network's input (cached features: identity).

    With a distributed ``dist``, ``loader`` is this worker's shard and the accuracy is over
    every worker's.
    """
    sums = MetricSums(ctx)
    for images, labels, _ in loader:
        if images is None:
            continue
        xs, ys = split_batch(images, labels, ctx)
        outs = [net(prepare(x)) for x in xs]
        sums.add(outs, ys)
    if dist is not None:
        sums, _ = sum_over_workers(dist, sums)
    return sums.read()[1]


def train_epoch(
    net,
    trainer,
    loader,
    ctx,
    loss_fn,
    config: TrainConfig,
    bar=None,
    step_samples=None,
    prepare=gdata.normalize_batch,
):
    """One pass over ``loader``; returns ``(MetricSums, skipped files, seconds)``.

    ``prepare`` turns a device batch into the network's input (cached features: identity).
    The host reads the metrics every ``config.log_every`` steps only.

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
        reached = 0  # contexts that got a slice of some micro-batch of this step
        parts = [] if images is None else micro_batches(images, labels, config.accumulate)
        for part_images, part_labels in parts:
            xs, ys = split_batch(part_images, part_labels, ctx)
            with autograd.record():
                outs = [net(prepare(x)) for x in xs]
                losses = [loss_fn(out, y) for out, y in zip(outs, ys)]
            # With --accumulate, grad_req is 'add': the micro-batches' gradients sum up.
            amp.backward(losses, trainer, config.dtype)
            sums.add(outs, ys, losses)
            reached = max(reached, len(xs))
        if reached < len(ctx):
            zero_unused_grads(net, ctx[reached:])
        # The summed gradient is divided by the samples in this step, over all contexts.
        trainer.step(len(labels) if step_samples is None else step_samples[step - 1])
        if config.accumulate > 1:
            net.collect_params().zero_grad()
        if bar is not None:
            bar.update(1)
        if step % config.log_every == 0 and sums.count:
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


# Checkpoints, --resume and interruption. Settings that a resumed run may change, because
# they do not change what is computed:
RESUMABLE_CHANGES = frozenset(
    {"epochs", "workers", "progress", "log_every", "resume", "strict", "out"}
)


class StopRequest:
    """SIGINT and SIGTERM ask the loop to stop between two steps; a second signal stops at once.

    Signals can only be caught in the main thread; elsewhere this never fires.
    """

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopRequest:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # A forked DataLoader worker inherits this handler; it must die as a process does,
            # or Pool.terminate() (the DataLoader's cleanup) waits for it forever.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name


def step_seed(seed: int, epoch: int, step: int) -> int:
    """The ``mx.random`` seed of one step, so a resumed run draws what the whole run drew."""
    return int(np.random.SeedSequence([seed, epoch, step]).generate_state(1)[0]) % 2**31


class EpochSteps:
    """An epoch's batches from ``first_step`` on, each step under its own ``mx.random`` seed
    and its scheduled learning rate.

    Stops between two steps once ``stop`` has fired. ``done`` counts the epoch's finished
    steps (those before ``first_step`` included); ``total`` is the epoch's step count.
    """

    def __init__(
        self,
        loader,
        seed: int,
        epoch: int,
        first_step: int,
        stop: StopRequest,
        set_lr=None,
    ):
        self.loader = loader
        self.seed = seed
        self.epoch = epoch
        self.stop = stop
        self.set_lr = set_lr  # set_lr(epoch, step), 0-based, before each step
        self.done = first_step
        self.total = first_step + len(loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for step, batch in enumerate(self.loader, self.done + 1):
            if self.stop.signal:
                return
            mx.random.seed(step_seed(self.seed, self.epoch, step))
            if self.set_lr is not None:
                self.set_lr(self.epoch, step - 1)
            yield batch
            self.done = step  # the loop asked for the next batch: this step is complete


def checkpoint_meta(
    config: TrainConfig, epoch: int, step: int, history: list, partial: dict | None, reason: str
) -> dict:
    """What a checkpoint records besides the arrays (see :mod:`gluon_ft.checkpoint`)."""
    return {
        "epoch": epoch,
        "step": step,
        "reason": reason,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": asdict(config),
        "history": history,
        "partial": partial,
        "rng": {
            "seed": config.seed,
            "order": "np.random.default_rng([seed, epoch]).permutation",
            "augmentation": "np.random.default_rng([seed, epoch, sample index])",
            "mxnet": "mx.random.seed(step_seed(seed, epoch, step)) before each step",
        },
    }


def find_resume_checkpoint(run_dir: Path, config: TrainConfig):
    """Return ``(checkpoint or None, notes)`` for ``--resume`` of ``run_dir`` with ``config``.

    Raises
    ------
    UsageError
        ``run_dir`` holds no run, or its settings differ from ``config`` in more than
        :data:`RESUMABLE_CHANGES`.
    """
    from gluon_ft.checkpoint import latest_checkpoint, remove_stale_temporaries

    if not (run_dir / "config.json").is_file():
        raise UsageError(
            f"--resume: {run_dir} holds no run to continue (it has no config.json). Check "
            "--out, or leave out --resume to start a new run."
        )
    removed = remove_stale_temporaries(run_dir / "checkpoints")
    checkpoint, notes = latest_checkpoint(run_dir / "checkpoints")
    notes = [n for n in notes if not any(n.startswith(p.name) for p in removed)]
    notes += [f"{p.name}: removed, an unfinished checkpoint of a stopped process" for p in removed]
    if checkpoint is not None:
        saved = checkpoint.meta.get("config", {})
        current = json.loads(json.dumps(asdict(config)))
        changed = [
            f"--{key.replace('_', '-')} was {saved[key]!r}, now {value!r}"
            for key, value in current.items()
            if key not in RESUMABLE_CHANGES and key in saved and saved[key] != value
        ]
        if changed:
            raise UsageError(
                f"--resume: the settings differ from the run in {run_dir}: {'; '.join(changed)}. "
                "Repeat the original command with --resume; only --epochs, --workers and "
                "--no-progress may change."
            )
    return checkpoint, notes


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


def diverged_since(err: DivergedError, epoch: int, last) -> DivergedError:
    """``err`` with the epoch and the last good checkpoint, for the exit-3 message."""
    if last is None:
        where = "No checkpoint was saved before it diverged."
    else:
        where = f"The last good checkpoint is {last.path} ({last.describe()})."
    return DivergedError(f"Epoch {epoch + 1}: {err} {where}")


def interrupted_at(stop: StopRequest, last) -> Interrupted:
    """The exit-130 error once a signal stopped the run and its checkpoint is saved."""
    if last is None:
        return Interrupted(f"Stopped by {stop.signal} before the first step; nothing to save.")
    return Interrupted(
        f"Stopped by {stop.signal}; saved checkpoint {last.path} ({last.describe()}). "
        "Continue with the same command and --resume."
    )


def require_readable(train_split: gdata.ImageFolderSplit, image_size: int) -> None:
    """``--strict``: refuse a dataset with any unreadable image, listing them."""
    report = gdata.check_dataset(train_split.root.parent, image_size)
    bad = gdata.unreadable_in(report)
    if bad:
        shown = "; ".join(f"{b['path']} ({b['reason']})" for b in bad[:20])
        more = f"; and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise UsageError(
            f"--strict: {len(bad)} unreadable image file(s) in {report['root']}: {shown}{more}. "
            "Remove or replace them, or leave out --strict to skip them."
        )


def train(config: TrainConfig) -> dict:
    """Run the fine-tuning (or scratch) recipe and write the run directory.

    Every epoch ends with a checkpoint (``checkpoints/epoch-NNNN``); ``config.resume``
    continues from the last complete one, and gives the same parameters as a run that was
    never stopped. SIGINT or SIGTERM stops between two steps and saves a checkpoint first.

    Returns
    -------
    dict
        ``{"run_dir": Path, "history": [epoch rows], "classes": [...]}``.

    Raises
    ------
    UsageError
        Bad settings or data (exit 2).
    DivergedError
        NaN or infinite loss (exit 3); the message names the last good checkpoint.
    Interrupted
        SIGINT or SIGTERM (exit 130), after the checkpoint is saved.
    """
    with StopRequest() as stop:
        return _train(config, stop)


def _train(config: TrainConfig, stop: StopRequest) -> dict:
    from tqdm.auto import tqdm

    from gluon_ft.plots import plot_curves

    config.validate()
    ctx = parse_contexts(config.ctx)
    amp.check_dtype(config.dtype, ctx)
    amp.enable(config.dtype)  # before the first forward pass builds a graph
    # A dist kvstore joins its cluster here, before the data: the rank picks the shard and the
    # writer. From here on, a worker that fails must os._exit (see gluon_ft.dist).
    dist = connect(config.kvstore, config.batch_size)
    writer = dist.is_writer  # rank 0 writes the run directory; other workers only log
    run = RunDirectory(config.out or default_out(config))
    if dist.distributed and config.progress:
        tqdm.write(
            f"worker rank {dist.rank} of {dist.num_workers} ({config.kvstore}): "
            f"{'writing' if writer else 'rank 0 writes'} {run.path}"
        )
    resumed, notes = find_resume_checkpoint(run.path, config) if config.resume else (None, [])
    for note in notes:
        tqdm.write(f"warning: --resume passed over checkpoints/{note}")
    saved_epochs = resumed.meta["config"].get("epochs") if resumed else config.epochs
    if config.lr_schedule != "constant" and saved_epochs != config.epochs:
        tqdm.write(
            f"warning: --epochs changed from {saved_epochs} to {config.epochs} under --lr-schedule "
            f"{config.lr_schedule}: the remaining steps follow the schedule of {config.epochs} "
            "epochs, so the result differs from a run that had that many from the start"
        )
    if writer:  # before the data: an unwritable --out fails before a download
        run.prepare(resume=config.resume)
    train_split, test_split = load_dataset(config.data)
    if config.strict and isinstance(train_split, gdata.ImageFolderSplit):  # packs: at pack time
        require_readable(train_split, config.image_size)
    classes = list(train_split.classes)
    mx.random.seed(config.seed)  # before the graft: the new head's initialization draws from it
    net, source = build_network(config, len(classes), ctx)
    zoo.check_input_size(net, config.model, config.image_size)  # e.g. SqueezeNet below 224 px
    plan = config.freeze_plan()
    plan.setup(net)
    # MXNet defers shapes to the first batch; one predict-mode pass of zeros (no statistics
    # move) gives the parameter table its shapes and counts.
    blank = mx.nd.zeros((1, config.image_size, config.image_size, 3), ctx=ctx[0], dtype="uint8")
    net(gdata.normalize_batch(blank))  # float32 in: under --dtype, AMP casts inside
    # The parameter table, at the start and each change (rank 0's file only).
    table_log = run.path / "trainable.txt" if writer else Path(os.devnull)
    table = log_table(table_log, net, "epoch 1: at the start")
    if config.progress and writer:
        tqdm.write(f"{table.summary()} (table: {table_log})")
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = make_trainer(net, config, ctx, dist)
    if resumed is not None:
        from gluon_ft.checkpoint import restore_checkpoint

        restore_checkpoint(resumed, net, trainer)
        tqdm.write(f"resuming from {resumed.path} ({resumed.describe()})")
        if not resumed.meta["optimizer"]["states_available"] and config.momentum:
            tqdm.write(
                "warning: the checkpoint holds no momentum (a dist kvstore keeps it on its "
                "servers); it restarts from zero, so the resumed run is not bit-exact"
            )

    fit_net, prepare, cache = net, gdata.normalize_batch, None  # what each step runs, on what
    if config.cache_features:
        from gluon_ft.features_cache import feature_loaders

        train_loader, test_loader, cache = feature_loaders(
            net, train_split, test_split, ctx, config, dist.rank, dist.num_workers
        )
        fit_net, prepare = get_head(net)[1], (lambda features: features)
        if config.progress:
            tqdm.write(cache.summary())
    else:
        train_loader = gdata.make_loader(
            train_split,
            config.train_transform(),
            config.batch_size,
            shuffle=True,
            seed=config.seed,
            workers=config.workers,
            shard=dist.rank,
            num_shards=dist.num_workers,
        )
        test_loader = gdata.make_loader(
            test_split,
            gdata.TestTransform(config.image_size),
            config.batch_size,
            shuffle=False,
            workers=config.workers,
            shard=dist.rank,
            num_shards=dist.num_workers,
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
        "cluster": dist.describe(),
        "feature_cache": asdict(cache) if cache else None,
    }
    if writer:
        run.write_json("config.json", resolved)
        run.write_json("classes.json", classes)

    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    from gluon_ft.checkpoint import save_checkpoint

    history: list[dict] = list(resumed.meta["history"]) if resumed else []
    start_epoch, start_step = resumed.position if resumed else (0, 0)
    partial = resumed.meta.get("partial") if resumed and resumed.step else None
    last_checkpoint = resumed
    schedule = LrSchedule(
        config.lr,
        config.lr_schedule,
        config.epochs,
        len(train_loader),  # steps per epoch: no set_epoch has skipped any yet
        config.warmup_epochs,
    )

    def set_lr(epoch: int, step: int) -> None:
        trainer.set_learning_rate(schedule.lr(epoch, step))

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        first_step = start_step if epoch == start_epoch else 0
        gdata.set_epoch(train_loader, epoch, first_step)
        steps = EpochSteps(train_loader, config.seed, epoch, first_step, stop, set_lr)
        # Workers step together; each step's gradient is divided by its global batch.
        step_samples = gdata.global_batch_sizes(train_loader) if dist.distributed else None
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
            disable=not (config.progress and writer),
            leave=False,
        ) as bar:
            try:
                sums, skipped, train_seconds = train_epoch(
                    fit_net, trainer, steps, ctx, loss_fn, config, bar, step_samples, prepare
                )
            except DivergedError as err:
                raise diverged_since(err, epoch, last_checkpoint) from None
        if epoch == start_epoch and partial:  # the steps taken before the interruption
            sums.add_totals(partial["sums"])
            skipped += partial["skipped"]
            train_seconds += partial["seconds"]
        loss, train_acc = sums.read()
        try:
            if sums.count:
                check_finite(loss, steps.done, trainer.learning_rate)
            check_params_finite(net, trainer.learning_rate)
        except DivergedError as err:
            raise diverged_since(err, epoch, last_checkpoint) from None
        if steps.done < steps.total:  # a signal stopped the epoch between two steps
            if steps.done > first_step and writer:
                progress = {"sums": sums.totals(), "skipped": skipped, "seconds": train_seconds}
                meta = checkpoint_meta(config, epoch, steps.done, history, progress, stop.signal)
                last_checkpoint = save_checkpoint(run.path / "checkpoints", net, trainer, meta)
            raise interrupted_at(stop, last_checkpoint)
        if dist.distributed:  # the epoch's metrics over every worker's shard
            sums, skipped = sum_over_workers(dist, sums, skipped)
            loss, train_acc = sums.read()
        test_acc = evaluate(fit_net, test_loader, ctx, dist, prepare)
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
                "train_samples": sums.count,  # over every worker of a distributed run
                "lr": trainer.learning_rate,  # at the epoch's last step (see --lr-schedule)
                **({"unfrozen": unfrozen} if unfrozen else {}),
            },
        ).as_dict()
        history.append(row)
        if skipped and not any(row.get("skipped") for row in history[:-1]):
            tqdm.write(
                f"warning: skipped {skipped} unreadable image file(s) in epoch {epoch + 1}, and "
                "will in every epoch (metrics.json counts them; `gluon-ft check-data` lists "
                "them; --strict refuses them)"
            )
        if config.progress:
            tqdm.write(
                f"epoch {epoch + 1}: loss {loss:.3f}, train acc {train_acc:.3f}, "
                f"test acc {test_acc:.3f}, {row['examples_per_sec']:.1f} examples/sec"
            )
        if writer:
            meta = checkpoint_meta(config, epoch + 1, 0, history, None, "epoch")
            last_checkpoint = save_checkpoint(run.path / "checkpoints", net, trainer, meta)
            run.write_json("metrics.json", history)
            plot_curves(history, run.path / "curves.png")
        if stop.signal and epoch + 1 < config.epochs:
            raise interrupted_at(stop, last_checkpoint)
    if resumed is not None and start_epoch >= config.epochs:
        run.write_json("metrics.json", history)
    if writer:
        run.save_params(net)
    return {"run_dir": run.path, "history": history, "classes": classes, "rank": dist.rank}


def pretrain(config: TrainConfig, out_file: str | Path) -> dict:
    """Train a source model from scratch on ``config.data`` and save it as a params file.

    Step 1 of the book's recipe. The params file is what ``--pretrained FILE.params``
    accepts; a sidecar ``FILE.json`` keeps the model name and the source classes, so the graft
    knows what it drops. The run directory (curves, metrics) goes to ``FILE.run/``. It is the
    same training loop as :func:`train`, not a copy.

    Raises
    ------
    UsageError
        ``out_file`` is not a ``.params`` path, exists already, or its folder cannot be
        written; or its run directory holds an earlier run and ``config.resume`` is not set
        (all checked before any training); or the data is unusable.
    """
    from gluon_ft.model import sidecar_path

    out_file = Path(out_file).expanduser()
    if out_file.suffix != ".params":
        raise UsageError(f"--out {out_file}: the pretrained model file must end in .params.")
    # A finished model, or the run of an earlier pretrain, is never replaced: it may be hours.
    run_dir = Path(config.out or out_file.with_suffix(".run"))
    if out_file.exists() or out_file.is_symlink():
        raise UsageError(
            f"--out {out_file} already exists; nothing was overwritten. Choose another --out, "
            "or remove it to pretrain again."
        )
    if (run_dir / "config.json").exists() and not config.resume:
        raise UsageError(
            f"--out {out_file}: {run_dir} holds an earlier pretraining; nothing was "
            "overwritten. Add --resume to continue it, or remove it to start again."
        )
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        # Per process: the workers of a distributed run probe at once.
        probe = out_file.with_name(f".{out_file.name}.write-test.{os.getpid()}")
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"Cannot write {out_file}: {err}") from None
    config.pretrained = "none"
    config.head_lr_mult = 1.0  # there is no new head when training from scratch
    config.out = str(run_dir)
    result = train(config)
    if result["rank"] != 0:  # rank 0 of a distributed run writes the file
        return {**result, "params_file": out_file}
    os.replace(result["run_dir"] / "model.params", out_file)
    model = zoo.lookup(config.model).name  # the zoo's spelling, which the graft compares
    meta = {"model": model, "classes": result["classes"], "image_size": config.image_size}
    sidecar_path(out_file).write_text(json.dumps(meta, indent=2) + "\n")
    return {**result, "params_file": out_file}


if __name__ == "__main__":
    from gluon_ft.cli import main

    raise SystemExit(main(["train", *os.sys.argv[1:]]))
