"""``train`` and ``pretrain``: the recipe as a short list of named phases.

Open the run (devices, cluster, run directory, the checkpoint to resume), load the data,
build the network and its Trainer, make the feeds, run the epochs, close the run. Each phase
is a function below; the step and the epoch are :mod:`gluon_ft.train.step`'s. Each epoch is
three phases, as d2l's ``train_ch13``: train one epoch, validate, record; checkpoints and the
files of the run are :mod:`~gluon_ft.train.rundir`'s, stopping and resuming
:mod:`~gluon_ft.train.resume`'s.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import mxnet as mx
from mxnet import gluon

import gluon_ft
from gluon_ft import paths
from gluon_ft.data import splits
from gluon_ft.data.folders import unreadable_items
from gluon_ft.data.loaders import global_batch_sizes, set_epoch
from gluon_ft.data.splits import DatasetParts
from gluon_ft.deploy.metrics import mean_average_precision
from gluon_ft.deploy.report import build_report, write_thresholds
from gluon_ft.errors import DivergedError, UsageError
from gluon_ft.model import zoo
from gluon_ft.model.freeze import FreezePlan, ParamTable, log_table, needs_input_grad
from gluon_ft.model.graft import get_head, sidecar_path
from gluon_ft.train import amp
from gluon_ft.train.bn_stats import restore_copy, sync_bn_stats, wants_sync
from gluon_ft.train.checkpoint import (
    PARAMS_FILE,
    Checkpoint,
    checkpoint_name,
    restore_checkpoint,
    saved_ema,
    saved_running_stats,
)
from gluon_ft.train.config import TrainConfig, flags_of
from gluon_ft.train.devices import parse_contexts
from gluon_ft.train.dist import DistContext, connect
from gluon_ft.train.ema import WeightAverage, choose_weights
from gluon_ft.train.feeds import (
    Feeds,
    LabelsFile,
    check_batch_fits,
    image_loaders,
    load_dataset,
    make_feeds,
    require_readable,
)
from gluon_ft.train.mixing import Mixer
from gluon_ft.train.network import (
    build_network,
    check_image_size,
    make_loss,
    make_trainer,
    ready_network,
)
from gluon_ft.train.resume import (
    EpochSteps,
    StopRequest,
    add_steps_before,
    agree_on_checkpoint,
    check_same_data,
    checkpoint_meta,
    data_fingerprint,
    diverged_since,
    find_resume_checkpoint,
    interrupted_at,
    read_run_file,
    save_interrupted,
)
from gluon_ft.train.rundir import SPLIT_FILE, RunDirectory, default_out
from gluon_ft.train.schedule import LrSchedule
from gluon_ft.train.selection import epochs_without_improvement, selection
from gluon_ft.train.step import (
    MetricSums,
    StepOptions,
    check_finite,
    check_params_finite,
    evaluate,
    evaluate_multilabel,
    evaluate_sums,
    sum_over_workers,
    train_epoch,
)


@dataclass
class EpochStats:
    """One row of ``metrics.json``."""

    epoch: int
    loss: float
    train_acc: float
    scores: dict  # val_loss and val_acc; without a val part, the book's test_acc
    examples_per_sec: float
    seconds: float
    skipped: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        row = asdict(self)
        scores, extra = row.pop("scores"), row.pop("extra")
        first = {key: row.pop(key) for key in ("epoch", "loss", "train_acc")}
        return {**first, **scores, **row, **extra}


@dataclass
class Session:
    """Where a run computes and writes: its devices, its cluster and its directory."""

    ctx: list[mx.Context]
    dist: DistContext
    run: RunDirectory
    resumed: Checkpoint | None  # the checkpoint --resume continues from
    dtype_choice: dict = field(default_factory=dict)  # amp.choose_dtype's record

    @property
    def writer(self) -> bool:
        """Rank 0 writes the run directory; other workers only log."""
        return self.dist.is_writer


@dataclass
class Model:
    """The network being trained, its freeze plan, parameter table and Trainer."""

    net: gluon.Block
    source: object  # the SourceModel of a graft, None from scratch
    plan: FreezePlan
    table: ParamTable
    table_log: Path
    trainer: gluon.Trainer | None = None
    loss_fn: gluon.Block = field(default_factory=gluon.loss.SoftmaxCrossEntropyLoss)
    mixer: Mixer | None = None  # --mixup/--cutmix, None when both are off
    ema: WeightAverage | None = None  # --ema: the moving average of the weights


@dataclass
class Progress:
    """What the epochs have produced so far: the metrics rows and the last checkpoint."""

    history: list[dict]
    last_checkpoint: Checkpoint | None


def log(message: str) -> None:
    """A line for people, above the progress bar if one is drawn."""
    from tqdm.auto import tqdm

    tqdm.write(message)


# Set to 1 to draw the bars into a pipe too: a launcher that shows its workers' lines live.
FORCE_BARS_VARIABLE = "GLUON_FT_PROGRESS_BARS"


def bars_render() -> bool:
    """Progress bars only where they redraw in place: a terminal, or a Jupyter kernel (a
    widget), unless ``$GLUON_FT_PROGRESS_BARS=1``. Into a file or a pipe, their
    carriage-return redraws would fill the log; there the epoch's one plain line says enough."""
    forced = os.environ.get(FORCE_BARS_VARIABLE) == "1"
    return forced or sys.stderr.isatty() or "ipykernel" in sys.modules


def say(config: TrainConfig, message: str) -> None:
    """:func:`log`, unless ``--no-progress``."""
    if config.progress:
        log(message)


def train(config: TrainConfig) -> dict:
    """Run the fine-tuning (or scratch) recipe and write the run directory.

    Every epoch ends with a checkpoint (``checkpoints/epoch-NNNN``); ``config.resume``
    continues from the last complete one, and gives the same parameters as a run that was
    never stopped. SIGINT or SIGTERM stops between two steps and saves a checkpoint first.

    Returns
    -------
    dict
        ``{"run_dir": Path, "history": [epoch rows], "classes": [...], "rank": int}``.

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
        config.validate()
        check_image_size(config)  # before a download or a run folder
        session = open_run(config)
        stop.dist = session.dist  # the workers of a distributed run stop together
        try:
            parts = load_data(config, session)
            data_files = data_fingerprint(parts.root, parts.named())
            if config.resume:  # before any work: the same classes, the same files
                check_same_data(session.run.path, list(parts.classes), data_files)
            model = build_model(config, session, len(parts.classes))
            check_batch_fits(config.batch_size, parts)  # after the model's own refusals
            train_labels = parts.train.targets() if parts.multi_label else parts.train.labels()
            model.loss_fn = make_loss(config, train_labels, len(parts.classes), session.ctx)
            model.mixer = Mixer.of(config, len(parts.classes))
            adapt_bn(config, session, model, parts.train)  # before the head epochs cache
            first_epoch = session.resumed.position[0] if session.resumed else 0
            feeds = make_feeds(config, model.net, parts, session.ctx, session.dist, first_epoch)
            find_lr(config, session, model, feeds)
            write_config(config, session, model, feeds, parts, data_files)
            history = run_epochs(config, session, model, feeds, stop)
        except BaseException:
            session.run.remove_if_unused()
            raise
        finally:
            session.run.close()
        return close_run(config, session, model, parts, history)


def adapt_bn(config: TrainConfig, session: Session, model: Model, train_part, when="first") -> None:
    """``--adapt-bn`` (``when`` "first"): AdaBN on the train part's plain view, once (a
    resumed run has the adapted statistics in its checkpoint); ``--precise-bn`` ("last"): the
    same after the last epoch's steps, before its evaluation and save. Every worker passes
    over the whole train part in the same order, so that each gets the same statistics."""
    if when == "first" and (not config.adapt_bn or session.resumed is not None):
        return
    if when == "last" and not config.precise_bn:
        return
    from gluon_ft.train.adabn import adapt_batchnorm

    plain = replace(config, tta=1)
    loader = image_loaders(plain, train_part, train_part)[1]  # the eval transform, in order
    with phase(config, session, "BatchNorm statistics of the train part"):
        batches = adapt_batchnorm(model.net, loader, session.ctx[0])
    say(config, f"BatchNorm statistics re-estimated on {batches} train batches ({when})")


def open_run(config: TrainConfig) -> Session:
    """Devices, AMP, the cluster, the run directory and the checkpoint to resume."""
    ctx = parse_contexts(config.ctx)
    dtype_choice = amp.choose_dtype(config, ctx)  # --dtype auto runs its probe here
    config.dtype = dtype_choice["dtype"]
    if dtype_choice["requested"] == "auto":
        log(amp.describe_choice(dtype_choice))
    amp.enable(config.dtype)  # before the first forward pass builds a graph
    # A dist kvstore joins its cluster here, before the data: the rank picks the shard and the
    # writer. From here on, a worker that fails must os._exit (see gluon_ft.train.dist).
    dist = connect(config.kvstore, config.batch_size)
    run = RunDirectory(config.out or default_out(config))
    if dist.distributed:
        say(
            config,
            f"worker rank {dist.rank} of {dist.num_workers} ({config.kvstore}): "
            f"{'writing' if dist.is_writer else 'rank 0 writes'} {run.path}",
        )
    resumed, notes = None, []
    if config.resume:  # what the run resolved when it started: its measured rate, its data
        adopt_resolved(config, read_run_file(run.path, "config.json") or {})
    if config.resume:  # every worker reads rank 0's checkpoint from --out (shared storage)
        resumed, notes = find_resume_checkpoint(run.path, config, tidy=dist.is_writer)
        agree_on_checkpoint(dist, resumed)
    for note in notes:
        log(f"warning: --resume passed over checkpoints/{note}")
    if config.resume and resumed is None:
        log(f"--resume: {run.path} stopped before its first checkpoint; starting from step 1")
    saved_epochs = resumed.meta["config"].get("epochs") if resumed else config.epochs
    if config.lr_schedule != "constant" and saved_epochs != config.epochs:
        log(
            f"warning: --epochs changed from {saved_epochs} to {config.epochs} under --lr-schedule "
            f"{config.lr_schedule}: the remaining steps follow the schedule of {config.epochs} "
            "epochs, so the result differs from a run that had that many from the start"
        )
    if dist.is_writer:  # before the data: an unwritable --out fails before a download
        run.prepare(resume=config.resume)
    if config.tensorboard and dist.is_writer:
        run.log_events()
    return Session(ctx, dist, run, resumed, dtype_choice)


def adopt_resolved(config: TrainConfig, saved: dict) -> None:
    """``--resume``: take the settings the run resolved from ``saved`` (its ``config.json``)
    rather than from the flags: the rate ``--recipe best`` measured, and what a labels file
    with several labels per row made of the defaults (``--multi-label``, ``--monitor
    val_map``; :func:`check_multi_label`)."""
    if config.lr_find:
        config.lr = saved.get("lr", config.lr)
    if config.labels and saved.get("multi_label") is True:
        config.multi_label = True
        if config.monitor == "val_acc" and saved.get("monitor") == "val_map":
            config.monitor = "val_map"


def load_data(config: TrainConfig, session: Session) -> DatasetParts:
    """The parts of ``--data`` (a resumed run: those of its ``split.json``); ``--strict``
    refuses unreadable files."""
    saved = None
    split_file = session.run.path / SPLIT_FILE
    if config.resume and split_file.is_file():
        try:
            saved = json.loads(split_file.read_text())
        except ValueError as err:
            raise UsageError(f"--resume: {split_file} is not valid JSON: {err}") from None
    labels, notes = LabelsFile.of(config), []
    fractions = (config.val_split, config.test_split, config.seed)
    try:
        parts = load_dataset(config.data, *fractions, saved, labels, notes)
    except UsageError:
        if saved is None:
            raise
        # The folders lack split.json's files: say what changed (a renamed class folder
        # reorders the outputs) when the data as it is now tells; else split.json's message.
        now = load_dataset(config.data, *fractions, labels=labels)
        check_same_data(session.run.path, list(now.classes), {})
        raise
    if session.writer:
        used = splits.fractions_used(parts.layout, config.val_split, config.test_split)
        for line in splits.describe_split(parts, used, config.seed):
            # The counts are progress talk (--no-progress keeps stdout for results); a warning
            # is said whatever the flags.
            (log if line.startswith("warning:") else lambda text: say(config, text))(line)
    if saved is None and session.writer:  # said once, when the split is made
        for line in notes + parts.warnings():
            log(line)
    check_multi_label(config, session, parts)
    if config.strict and parts.layout != splits.PACK:  # packs: at pack time
        require_readable(parts, config.image_size)
    if config.early_stop and parts.val is None:
        raise UsageError(
            f"--early-stop {config.early_stop} needs a validation part to watch: add "
            "--val-split F (or a val/ folder) to --data."
        )
    return parts


def check_multi_label(config: TrainConfig, session: Session, parts: DatasetParts) -> None:
    """Settle ``config.multi_label`` by the parts (a labels file with a row of several labels
    is multi-label), pick ``--monitor val_map`` for one, and refuse what it cannot do."""
    config.multi_label = parts.multi_label
    if not parts.multi_label:
        if config.monitor == "val_map":
            raise UsageError("--monitor val_map scores a multi-label run; use val_acc or val_loss.")
        if config.thresholds:
            raise UsageError("--thresholds auto chooses the thresholds of a multi-label run.")
        return
    if config.monitor == "val_acc":  # the default: per-label accuracy says little here
        config.monitor = "val_map"
    changed = config.apply_multi_label_preset()  # before the feeds: it sets their transforms
    if changed and session.writer:
        say(config, f"--recipe {config.recipe} on a multi-label run: {flags_of(changed)}")
    refused = {
        "--sampler balanced": config.sampler == "balanced",
        "a distributed kvstore": session.dist.distributed,
    }
    named = [flag for flag, given in refused.items() if given]
    if named:
        raise UsageError(
            f"A multi-label run cannot use {', '.join(named)} yet (it draws by one class per "
            "image, or scores mAP in one process); leave it out."
        )
    if config.thresholds == "auto" and parts.val is None:
        raise UsageError(
            "--thresholds auto chooses each class's threshold on the val part: add "
            "--val-split F (or val rows in the labels file)."
        )


def build_model(config: TrainConfig, session: Session, num_classes: int) -> Model:
    """The graft (or scratch twin), frozen as planned, hybridized, with its Trainer."""
    ctx = session.ctx
    # build_network by its name here: tests put a tiny network in its place.
    net, source, plan = ready_network(config, num_classes, ctx, build_network)
    # The parameter table, at the start and each change (rank 0's file only).
    table_log = session.run.path / "trainable.txt" if session.writer else Path(os.devnull)
    table = log_table(table_log, net, "epoch 1: at the start")
    if session.writer:
        say(config, f"{table.summary()} (table: {table_log})")
    model = Model(net, source, plan, table, table_log)
    model.trainer = make_trainer(net, config, ctx, session.dist)
    if session.resumed is not None:
        resume_from(config, session.resumed, model, session.dist)
    model.ema = start_average(config, model.net, session.resumed)
    return model


# Steps of --recipe best's range test: on the head epochs' cached features they cost little.
RECIPE_LR_FIND_STEPS = 60


def find_lr(config: TrainConfig, session: Session, model: Model, feeds: Feeds) -> None:
    """``--recipe best`` without ``--lr``: set ``config.lr`` by a short LR range test on the
    train part, in the state the first epoch trains (the head alone, on cached features,
    with ``--head-epochs``); every weight is restored. Writes ``lr_find.json`` and
    ``lr_find.png``. A resumed run keeps the rate it measured (:func:`open_run`)."""
    if not config.lr_find or config.resume:
        return
    if session.dist.distributed:
        raise UsageError(
            "--recipe best measures --lr in one process; for a distributed run, measure it "
            "with `gluon-ft lr-find` and give --lr."
        )
    from gluon_ft.train.lr_find import range_test, write_lr_find

    steps = RECIPE_LR_FIND_STEPS
    result = range_test(
        feeds.net,
        model.trainer,
        feeds.train,
        session.ctx,
        model.loss_fn,
        config,
        steps,
        prepare=feeds.prepare,
    )
    if result.suggestion is None:
        raise UsageError(
            f"--recipe best: the LR range test found no descent of the loss to pick --lr "
            f"from ({result.how}); give --lr, or look at `gluon-ft lr-find`'s curve."
        )
    config.lr = result.suggestion
    settings = {"num_steps": steps, "on": "cached features" if feeds.cache else "images"}
    if session.writer:
        write_lr_find(result, session.run.path, settings)
    say(config, f"lr-find: --lr {config.lr:.3g}: {result.how} (lr_find.png)")


def start_average(config, net, resumed: Checkpoint | None) -> WeightAverage | None:
    """``--ema``: the average of the weights, from the start or the resumed checkpoint's."""
    if config.ema is None:
        return None
    average = WeightAverage(net, config.ema)
    saved = saved_ema(resumed) if resumed is not None else None
    if saved is not None:
        try:
            average.load_state(*saved)
        except ValueError as err:
            raise UsageError(f"--resume: {resumed.path}'s EMA does not fit: {err}") from None
    elif resumed is not None:
        log(f"warning: {resumed.path} holds no EMA; it restarts from the resumed weights")
    return average


def resume_from(config: TrainConfig, checkpoint: Checkpoint, model: Model, dist) -> None:
    """Load ``checkpoint``'s parameters and optimizer state into ``model``, and each device's
    (and worker's) own BatchNorm statistics when it was saved mid-epoch."""
    restore_checkpoint(checkpoint, model.net, model.trainer)
    log(f"resuming from {checkpoint.path} ({checkpoint.describe()})")
    copies = saved_running_stats(checkpoint)
    if copies is not None and not restore_copy(model.net, copies, dist):
        log(
            "warning: the checkpoint keeps the BatchNorm statistics of another number of "
            "workers or devices; every copy starts from rank 0's, so the resumed run is not "
            "bit-exact"
        )
    if not checkpoint.meta["optimizer"]["states_available"] and config.momentum:
        log(
            "warning: the checkpoint holds no momentum (its optimizer ran on a kvstore's "
            "servers, which gluon-ft's runs never do); it restarts from zero, so the resumed "
            "run is not bit-exact"
        )


def write_config(config, session, model, feeds, parts: DatasetParts, data_files: dict) -> None:
    """``config.json`` (the settings and what they resolved to), ``classes.json`` and
    ``split.json`` (which file is in which part).

    ``data_files`` is :func:`data_fingerprint` of the parts, which ``--resume`` compares.
    """
    classes = list(parts.classes)
    resolved = {
        **asdict(config),
        "out": str(session.run.path),
        "contexts": [str(c) for c in session.ctx],
        "num_classes": len(classes),
        "source_classes": model.source.num_classes if model.source else None,
        # From scratch there is no new head: the output layer learns at --lr like the rest.
        "head_lr_mult_used": get_head(model.net)[1].weight.lr_mult,
        "layout": parts.layout,
        # --val-split / --test-split as applied: the flags record None for the defaults.
        **dict(
            zip(
                ("val_split_used", "test_split_used"),
                splits.fractions_used(parts.layout, config.val_split, config.test_split),
            )
        ),
        "train_size": len(parts.train),
        "val_size": len(parts.val) if parts.val is not None else 0,
        "test_size": len(parts.test),
        "data_files": data_files,
        "mxnet": mx.__version__,
        "gluon_ft": gluon_ft.__version__,
        "threads": gluon_ft.THREAD_SETTINGS,
        "dtype_choice": session.dtype_choice,
        "isa": gluon_ft.ISA_SETTINGS,
        "frozen": model.plan.record(model.net),
        "cluster": session.dist.describe(),
        "feature_cache": asdict(feeds.cache) if feeds.cache else None,
    }
    if feeds.cache:
        say(config, feeds.cache.summary())
    if session.writer:  # classes.json first: a run with a config.json has both
        session.run.write_json("classes.json", classes)
        settings = {"seed": config.seed, "val_split": config.val_split}
        session.run.write_json(SPLIT_FILE, parts.record(**settings, test_split=config.test_split))
        session.run.write_json("config.json", resolved)


def run_epochs(config, session: Session, model: Model, feeds: Feeds, stop: StopRequest) -> list:
    """Train from the start, or the resumed position, to ``config.epochs``; return the rows.

    As d2l's ``train_ch13``: each epoch trains (:func:`train_one_epoch`), validates
    (:func:`validate`) and is recorded (:func:`record_epoch`), until ``--early-stop`` says
    enough or a signal stops the run.
    """
    resumed = session.resumed
    progress = Progress(list(resumed.meta["history"]) if resumed else [], resumed)
    start_epoch, start_step = resumed.position if resumed else (0, 0)
    # Steps per epoch from the loader's length: no set_epoch has skipped any yet.
    set_lr = LrSchedule.of(config, len(feeds.train)).setter(model.trainer)
    ema_update = model.ema.update if model.ema is not None else None
    options = StepOptions.of(config, after_step=ema_update)
    if feeds.eval_part == "test" and session.writer:
        say(config, NO_VALIDATION_NOTE)
    for epoch in range(start_epoch, config.epochs):
        if should_stop_early(config, progress.history):
            break
        started = time.perf_counter()
        # Train one epoch: the resumed one from its next step.
        feeds = epoch_feeds(config, feeds, epoch)
        first_step = start_step if epoch == start_epoch else 0
        steps = epoch_steps(config, session, feeds, epoch, first_step, stop, set_lr)
        trained = train_one_epoch(config, session, model, feeds, steps, options, progress)
        if epoch + 1 == config.epochs:
            adapt_bn(config, session, model, feeds.train_split, "last")
        # Validate: the weights, and --ema's average of them.
        with phase(config, session, f"epoch {epoch + 1}/{config.epochs}: validating"):
            scores = validate(config, session, model, feeds)
        # Record: the epoch's line, its checkpoint and the run directory's files.
        row = epoch_row(model, trained, scores, started)
        with phase(config, session, f"epoch {epoch + 1}/{config.epochs}: saving"):
            record_epoch(config, session, model, feeds, progress, row)
        if epoch + 1 < config.epochs and stop.requested():
            raise interrupted_at(stop, progress.last_checkpoint, session.writer)
    return progress.history


NO_VALIDATION_NOTE = (
    "note: no validation part, so each epoch reports the book's test accuracy; it is not a "
    "selection metric: the last epoch is kept (--val-split F holds out a validation part)"
)


def should_stop_early(config: TrainConfig, history: list[dict]) -> bool:
    """``--early-stop N``: N epochs have passed without an improvement of ``--monitor``."""
    if not config.early_stop or not history:
        return False
    return epochs_without_improvement(history, config.monitor) >= config.early_stop


def epoch_feeds(config: TrainConfig, feeds: Feeds, epoch: int) -> Feeds:
    """The feeds ``epoch`` trains on: after ``--head-epochs``, images rather than features."""
    if epoch == config.head_epochs and feeds.after_head is not None:
        return feeds.after_head()  # the body trains from here
    return feeds


def epoch_steps(config, session: Session, feeds: Feeds, epoch, first_step, stop, set_lr):
    """The :class:`EpochSteps` of ``epoch`` from ``first_step`` on, in the epoch's order."""
    set_epoch(feeds.train, epoch, first_step)
    rank = session.dist.rank if session.dist.distributed else None  # one process: no rank
    return EpochSteps(feeds.train, config.seed, epoch, first_step, stop, set_lr, rank)


@dataclass
class TrainedEpoch:
    """What an epoch's training leaves for its row."""

    epoch: int  # 0-based
    sums: MetricSums  # over every worker, with the steps a resumed epoch took before
    skipped: int  # unreadable files passed over
    seconds: float  # in the steps
    unfrozen: list[str]  # what --unfreeze-at opened at its start


def train_one_epoch(config, session, model, feeds, steps, options, progress) -> TrainedEpoch:
    """Open what the plan unfreezes, take the epoch's ``steps``, and sum their metrics over
    the workers.

    Raises
    ------
    DivergedError
        The loss or the weights are not finite.
    Interrupted
        A signal stopped the epoch between two steps; its checkpoint is saved first.
    """
    unfrozen = unfreeze_for_epoch(config, session, model, steps.epoch)
    totals = fit_epoch(config, session, model, feeds, steps, options, progress)
    if session.writer:  # the checkpoint's sums are over every worker already: added once
        totals = add_steps_before(session.resumed, steps.epoch, totals)
    check_epoch_finite(model, totals[0], steps, progress)
    if steps.stopped:  # by a signal: keep the steps so far, then stop
        keep = functools.partial(keep_checkpoint, config, session, model, progress)
        save_interrupted(steps, totals, model.net, session.dist, keep if session.writer else None)
        raise interrupted_at(steps.stop, progress.last_checkpoint, session.writer)
    sums, skipped, seconds = totals
    sums, skipped = sum_over_workers(session.dist, sums, skipped)
    return TrainedEpoch(steps.epoch, sums, skipped, seconds, unfrozen)


def unfreeze_for_epoch(config, session: Session, model: Model, epoch: int) -> list[str]:
    """Gradual unfreezing (``--unfreeze-at``): what opens at ``epoch``, logged in the table.

    The Trainer sees the new ``grad_req`` at its next step.
    """
    unfrozen = [change.pattern for change in model.plan.at_epoch(model.net, epoch)]
    if unfrozen:
        heading = f"epoch {epoch + 1}: unfroze {', '.join(unfrozen)}"
        model.table = log_table(model.table_log, model.net, heading)
        say(config, f"{heading}: {model.table.summary()}")
    return unfrozen


def fit_epoch(config, session: Session, model: Model, feeds: Feeds, steps, options, progress):
    """:func:`train_epoch` under a progress bar; returns ``(sums, skipped, seconds)``."""
    # Workers step together; each step's gradient is divided by its global batch.
    step_samples = global_batch_sizes(feeds.train) if session.dist.distributed else None
    # The epoch's input (cached features in the head epochs) and mixing.
    mixer = epoch_mixer(model, feeds, steps.epoch)
    options = replace(
        options, prepare=feeds.prepare, mixer=mixer, input_grad=needs_input_grad(feeds.net)
    )
    with epoch_bar(config, session, len(feeds.train), steps.epoch) as bar:
        try:
            return train_epoch(
                feeds.net,
                model.trainer,
                steps,
                session.ctx,
                model.loss_fn,
                options=options,
                bar=bar,
                step_samples=step_samples,
            )
        except DivergedError as err:
            raise diverged_since(err, steps.epoch, progress.last_checkpoint) from None


def epoch_bar(config, session: Session, total: int, epoch: int):
    """The epoch's progress bar of ``total`` steps: drawn on the writer only, where it
    redraws in place (:func:`bars_render`), unless ``--no-progress``."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        unit="batch",
        disable=not (config.progress and session.writer and bars_render()),
        leave=False,
    )


def epoch_mixer(model: Model, feeds: Feeds, epoch: int):
    """The epoch's mixup/CutMix, or None: off from ``--mixup-off-epoch``, and in the head
    epochs, whose batches are cached features rather than images."""
    if model.mixer is None or feeds.cache is not None or not model.mixer.mixes(epoch):
        return None
    return model.mixer


def check_epoch_finite(model: Model, sums: MetricSums, steps, progress) -> None:
    """Stop with exit 3 if the epoch's loss or the trained weights are not finite."""
    lr = model.trainer.learning_rate
    try:
        if sums.count:
            check_finite(sums.read()[0], steps.done, lr)
        check_params_finite(model.net, lr)
    except DivergedError as err:
        raise diverged_since(err, steps.epoch, progress.last_checkpoint) from None


def validate(config, session: Session, model: Model, feeds: Feeds) -> dict:
    """The epoch's scores (:func:`score_epoch`), and with ``--ema`` its average's as
    ``ema_*``; with one set of BatchNorm statistics, the one that is saved."""
    share_bn_stats(config, session, model)
    multi = config.multi_label
    scores = score_epoch(feeds, session, multi)
    if model.ema is not None:
        with model.ema.swapped_in():
            scores.update({f"ema_{k}": v for k, v in score_epoch(feeds, session, multi).items()})
    return scores


def share_bn_stats(config, session: Session, model: Model) -> None:
    """``--sync-bn-stats``: one set of BatchNorm running statistics over the devices and
    workers, so that the test pass measures the statistics that are saved."""
    if wants_sync(config.sync_bn_stats, len(session.ctx), session.dist):
        sync_bn_stats(model.net, session.dist)


def score_epoch(feeds: Feeds, session: Session, multi_label: bool = False) -> dict:
    """The epoch's scores: val loss and accuracy, or without a val part the test accuracy.

    A multi-label run adds the mean average precision (``val_map``, ``test_map``); its
    accuracy is per label (:class:`MetricSums`)."""
    ctx, dist = session.ctx, session.dist
    net, prepare = feeds.scorer()
    if multi_label:
        sums, probabilities, targets = evaluate_multilabel(net, feeds.eval, ctx, prepare)
        loss, acc = sums.read()
        mean_ap = mean_average_precision(probabilities, targets)[0] if len(targets) else None
        if feeds.eval_part == "test":
            return {"test_acc": acc, "test_map": mean_ap}
        return {"val_loss": loss, "val_acc": acc, "val_map": mean_ap}
    if feeds.eval_part == "test":
        return {"test_acc": evaluate(net, feeds.eval, ctx, dist, prepare)}
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    loss, acc = evaluate_sums(net, feeds.eval, ctx, dist, prepare, loss_fn).read()
    return {"val_loss": loss, "val_acc": acc}


def epoch_row(model: Model, trained: TrainedEpoch, scores: dict, started: float) -> dict:
    """The ``metrics.json`` row of a finished epoch, which ``started`` at that perf_counter."""
    sums = trained.sums
    loss, train_acc = sums.read()
    return EpochStats(
        epoch=trained.epoch + 1,
        loss=loss,
        train_acc=train_acc,
        scores=scores,
        examples_per_sec=sums.count / trained.seconds if trained.seconds else 0.0,
        seconds=time.perf_counter() - started,
        skipped=trained.skipped,
        extra={
            "trainable_params": model.table.trainable_count,
            "frozen_params": model.table.frozen_count,
            "train_samples": sums.count,  # over every worker of a distributed run
            "lr": model.trainer.learning_rate,  # at the epoch's last step (see --lr-schedule)
            **({"unfrozen": trained.unfrozen} if trained.unfrozen else {}),
        },
    ).as_dict()


def record_epoch(config, session: Session, model: Model, feeds: Feeds, progress, row) -> None:
    """The epoch's line; on the writer, its checkpoint, the pruning of older ones (the best
    epoch's stays) and the run directory's rows (:meth:`RunDirectory.record`)."""
    report_epoch(config, row, progress.history, lambda: name_unreadable(session, feeds))
    progress.history.append(row)
    if session.writer:
        keep_checkpoint(config, session, model, progress, (row["epoch"], 0))
        best = best_epoch(config, feeds, progress.history)
        session.run.prune(config.keep_checkpoints, [best])
        session.run.record(progress.history, best)


def best_epoch(config: TrainConfig, feeds: Feeds, history: list[dict]) -> int:
    """The epoch ``model.params`` will hold: the best by ``--monitor``, else the last."""
    validated = feeds.eval_part == "val"
    return selection(history, config.monitor, validated, config.epochs)["best_epoch"]


def keep_checkpoint(
    config, session, model, progress: Progress, position, partial=None, reason="epoch", copies=None
) -> None:
    """A checkpoint at ``position`` (finished epochs, steps into the next), which becomes
    ``progress.last_checkpoint``; mid-epoch it keeps the ``partial`` sums so far and every
    copy of the BatchNorm statistics (``copies``), and ``reason`` names the signal."""
    epoch, step = position
    meta = checkpoint_meta(config, epoch, step, progress.history, partial, reason)
    progress.last_checkpoint = session.run.keep(model.net, model.trainer, meta, copies, model.ema)


def name_unreadable(session: Session, feeds: Feeds, shown: int = 3) -> str:
    """``": a.jpg, b.jpg and 4 more (all in RUN/unreadable.txt)"``: the train part's unreadable
    files, found by decoding it once, when an epoch first skips some. Only the writer looks
    (the other workers would decode the whole part for a log line); they name none."""
    if not session.writer or feeds.train_split is None:
        return ""
    bad = unreadable_items(feeds.train_split)
    if not bad:
        return ""
    more = f" and {len(bad) - shown} more" if len(bad) > shown else ""
    listing = paths.write_text(session.run.path / "unreadable.txt", "\n".join(bad) + "\n")
    return ": " + ", ".join(bad[:shown]) + f"{more} (all in {listing})"


# The scores of an epoch's line, in this order: the weights', then --ema's average's.
SCORE_KEYS = ("val_loss", "val_acc", "val_map", "test_acc", "test_map")
SCORE_KEYS += tuple(f"ema_{key}" for key in SCORE_KEYS)


def report_epoch(
    config: TrainConfig, row: dict, earlier: list[dict], named: Callable[[], str] = str
) -> None:
    """The epoch's line, and once per run the warning about unreadable files, which
    ``named()`` names (by default it names none)."""
    epoch, skipped = row["epoch"], row["skipped"]
    if skipped and not any(r.get("skipped") for r in earlier):
        log(
            f"warning: skipped {skipped} unreadable image file(s) in epoch {epoch}{named()}, "
            "and will in every epoch (metrics.json counts them; `gluon-ft check-data` gives "
            "the reasons; --strict refuses them)"
        )
    scores = ", ".join(
        f"{key.replace('_', ' ')} {row[key]:.3f}" for key in SCORE_KEYS if row.get(key) is not None
    )
    # A head epoch reads cached features: its speed is no measure of the whole network's.
    on_features = config.cache_features or (
        epoch <= config.head_epochs and not config.freeze_plan().live_head
    )
    say(
        config,
        f"epoch {epoch}: loss {row['loss']:.3f}, train acc {row['train_acc']:.3f}, "
        f"{scores}, {row['examples_per_sec']:.1f} examples/sec"
        f"{' (head on cached features)' if on_features else ''}{time_left(config, row)}",
    )


def time_left(config: TrainConfig, row: dict) -> str:
    """``, about 4m10s left``: the epochs to go at this epoch's pace. Nothing after the last
    epoch, nor from a head epoch that full epochs follow (those take far longer)."""
    remaining = config.epochs - row["epoch"]
    if remaining <= 0 or row["epoch"] < config.head_epochs:
        return ""
    seconds = round(remaining * row["seconds"])
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
    return f", about {text} left"


@contextlib.contextmanager
def phase(config: TrainConfig, session: Session, what: str):
    """A status line (``validating``, ``saving``) while the block runs, where progress bars
    are drawn (:func:`epoch_bar`); it is gone when the block ends."""
    from tqdm.auto import tqdm

    shown = config.progress and session.writer and bars_render()
    with tqdm(total=0, desc=what, bar_format="{desc} ...", disable=not shown, leave=False):
        yield


def close_run(config, session: Session, model: Model, parts: DatasetParts, history) -> dict:
    """Keep the best epoch's weights as ``model.params``; test them once, in the report.

    The report (:mod:`gluon_ft.deploy.report`) evaluates the test part as ``gluon-ft predict`` would
    and writes ``summary.json``, ``report.md``, ``confusion.png`` and ``mistakes.png``.

    Returns
    -------
    dict
        ``{"run_dir", "history", "classes", "rank", "summary"}``; the summary (the content of
        ``summary.json``) is None on workers other than rank 0.
    """
    resumed = session.resumed
    summary = None
    if session.writer:
        if resumed is not None and len(history) == len(resumed.meta["history"]):
            session.run.write_metrics(history)  # nothing was left to train
        chosen = selection(history, config.monitor, parts.val is not None, config.epochs)
        if model.ema is not None:
            chosen.update(choose_weights(history, chosen, config.ema_save, parts.val is not None))
            log(f"--ema: model.params holds the {weights_line(chosen)}")
        if chosen.get("weights") == "ema":
            with model.ema.swapped_in():
                session.run.save_params(model.net)
        elif chosen["monitor"] is None:  # the book's: the last epoch's weights
            session.run.save_params(model.net)
        else:
            name = checkpoint_name(chosen["best_epoch"])
            session.run.copy_params(session.run.path / "checkpoints" / name / PARAMS_FILE)
        summary = report_run(session, chosen, config.thresholds == "auto")
    return {
        "run_dir": session.run.path,
        "history": history,
        "classes": list(parts.classes),
        "rank": session.dist.rank,
        "summary": summary,
    }


def weights_line(chosen: dict) -> str:
    """What ``model.params`` holds under ``--ema``, and why, for the console."""
    kept = "EMA of the weights" if chosen["weights"] == "ema" else "trained weights"
    return f"{kept}: {chosen['weights_reason']}"


def report_run(session: Session, chosen: dict, choose_thresholds: bool = False) -> dict:
    """The report on the test part; returns ``summary.json``'s content. With
    ``choose_thresholds`` (``--thresholds auto``) a multi-label run's thresholds are chosen on
    the val part first (``thresholds.json``), and the test part is scored with them.

    The weights are saved by now: a report that cannot be built (a network that the run's
    files do not describe, as a customized ``build_network`` makes) is a warning, and the
    summary then holds the selection alone.
    """
    try:
        # As `gluon-ft predict` scores it: in float32, even after a bfloat16 run's AMP.
        with amp.float32_operators():
            if choose_thresholds:
                write_thresholds(session.run.path, session.ctx[0])
            summary, _ = build_report(
                session.run.path, "test", selection=chosen, ctx=session.ctx[0]
            )
    except UsageError as err:
        log(f"warning: the report could not be built: {err}")
        summary = dict(chosen)
        session.run.write_json("summary.json", summary)
    return summary


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
    paths.write_json(sidecar_path(out_file), meta)
    return {**result, "params_file": out_file}
