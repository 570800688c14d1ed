"""The ``gluon-ft`` command: parses arguments, calls the library, chooses exit codes.

Exit codes: 0 success; 2 bad usage or input; 3 training diverged; 130 interrupted. Errors the
user can act on are printed as one paragraph, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

import gluon_ft  # noqa: F401  (sets the OpenMP thread count before mxnet is imported)
from gluon_ft.errors import GluonFTError


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage, as we want; this only adds the hint line."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"gluon-ft: error: {message}\nRun `{self.prog} --help` for the options.\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_train_arguments(p: argparse.ArgumentParser, defaults=None, run_flags=True) -> None:
    """The flags of ``train``; ``pretrain`` shares them with its own defaults and without
    the two ``run_flags`` whose meaning differs there (``--pretrained``, ``--out``)."""
    from gluon_ft.train import TrainConfig

    d = defaults or TrainConfig()
    _add_data_flags(p, d, run_flags)
    _add_optimizer_flags(p, d)
    _add_freeze_flags(p, d)
    _add_device_flags(p, d)
    _add_selection_flags(p, d)
    add_recipe_arguments(p, d)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse a dataset with unreadable images (default: skip them, with a warning)",
    )
    if run_flags:
        p.add_argument(
            "--out", default=d.out, help="run directory (default runs/<data>-<model>-<time>)"
        )
        p.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in --out from its last complete checkpoint",
        )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write each epoch's numbers as TensorBoard event files under RUN/tensorboard/",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no epoch lines (progress bars are drawn only on a terminal)",
    )


def _add_data_flags(p: argparse.ArgumentParser, d, run_flags: bool = True) -> None:
    """The data, the model and its weights."""
    p.add_argument(
        "--data",
        default=d.data,
        help="hotdog, DIR/<class>/* (split for you), DIR with train/<class>/* and test/ "
        "(and optionally val/), or a pack PREFIX",
    )
    p.add_argument(
        "--val-split",
        type=float,
        default=d.val_split,
        metavar="F",
        help="fraction of each class held out for validation, from the train part "
        "(default: 0.1 for DIR/<class>/*, 0 for train/ + test/, the book's)",
    )
    p.add_argument(
        "--test-split",
        type=float,
        default=d.test_split,
        metavar="F",
        help="fraction of each class held out for the test, for DIR/<class>/* (default 0.1)",
    )
    p.add_argument("--model", default=d.model, help="model zoo name (default %(default)s)")
    if run_flags:
        p.add_argument(
            "--pretrained",
            default=d.pretrained,
            help="imagenet | none | FILE.params (default %(default)s)",
        )


def _add_optimizer_flags(p: argparse.ArgumentParser, d) -> None:
    """Epochs, batch, the optimizer, the schedule and the train crops."""
    from gluon_ft.train.schedule import SCHEDULES

    p.add_argument("--epochs", type=_positive_int, default=d.epochs)
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=d.batch_size,
        help="samples per step over all devices and workers (a dist run splits it)",
    )
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=d.lr,
        help="SGD rate per batch: trainer.step(batch_size) divides the summed gradient, as the "
        "book's MXNet recipe (default %(default)s). d2l's text now writes it per sample, "
        "lr / batch size with step(1): its 7.8125e-5 and 7.8125e-4 are --lr 0.01 and 0.1 here",
    )
    p.add_argument(
        "--head-lr-mult",
        type=_positive_float,
        default=None,  # None: not given (see TrainConfig.warnings)
        help=f"lr_mult of the new output layer (default {d.head_lr_mult:g}); from scratch "
        "(--pretrained none, pretrain) there is no new head and it has no effect",
    )
    p.add_argument(
        "--wd",
        type=float,
        default=d.wd,
        help=f"weight decay (default {d.wd:g}): SGD's L2 term; decoupled under --optimizer adamw",
    )
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument(
        "--lr-schedule",
        choices=SCHEDULES,
        default=d.lr_schedule,
        help="constant, or cosine: from --lr down to 0 over the run (default %(default)s)",
    )
    p.add_argument(
        "--warmup-epochs",
        type=float,
        default=d.warmup_epochs,
        metavar="E",
        help="raise the lr linearly to --lr over the first E epochs (default %(default)s)",
    )
    p.add_argument(
        "--image-size",
        type=_positive_int,
        default=d.image_size,
        help="training crop and test size in px (default: the model's, see `gluon-ft models`)",
    )
    p.add_argument(
        "--crop-scale",
        type=_positive_float,
        default=d.crop_scale,
        metavar="S",
        help="random train crops cover S to all of the image's area (default %(default)s, "
        "the book's; small images may need more, e.g. 0.5)",
    )


def _add_freeze_flags(p: argparse.ArgumentParser, d) -> None:
    """What trains, and how fast each part learns."""
    from gluon_ft.model.freeze import BN_MODES

    p.add_argument(
        "--freeze",
        default=d.freeze,
        help="none | a part (features, output, stem, stage1.., tail: `gluon-ft models NAME "
        "--parts`) | a regex on parameter names",
    )
    p.add_argument(
        "--bn",
        choices=BN_MODES,
        default=d.bn,
        help="BatchNorm in frozen parts: freeze (use running statistics) or train; inference: "
        "every BatchNorm uses its running statistics, in the parts that train too (Keras's "
        "advice for fine-tuning; gamma and beta still learn) (default %(default)s)",
    )
    p.add_argument(
        "--layer-lr-decay",
        type=_positive_float,
        default=d.layer_lr_decay,
        metavar="D",
        help="lr_mult D**k for the stage k from the top (the head is 0)",
    )
    p.add_argument(
        "--unfreeze-at",
        default=d.unfreeze_at,
        metavar="EPOCH:PART,...",
        help='gradual unfreezing from a frozen network, e.g. "0:output,2:stage4,4:all"',
    )
    p.add_argument(
        "--accumulate",
        type=_positive_int,
        default=d.accumulate,
        metavar="N",
        help="sum gradients over N micro-batches of each batch, then step once",
    )


def _add_device_flags(p: argparse.ArgumentParser, d) -> None:
    """Devices, workers, precision and the feature cache."""
    p.add_argument("--ctx", default=d.ctx, help="auto | cpu | cpu:N | gpu:0,1")
    p.add_argument(
        "--kvstore",
        default=d.kvstore,
        help="kvstore type (default: fits --ctx); dist_sync under `gluon-ft launch`",
    )
    p.add_argument(
        "--sync-bn-stats",
        action=argparse.BooleanOptionalAction,
        default=d.sync_bn_stats,
        help="average the BatchNorm running statistics over devices and workers at the end of "
        "each epoch, before the test pass and the save (default: on with several devices or "
        "workers)",
    )
    p.add_argument("--workers", type=int, default=d.workers, help="data loader processes")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16", "auto"),
        default=d.dtype,
        help="float32; bfloat16 (CPU with avx512_bf16/amx) or float16 (GPU), through MXNet AMP; "
        "auto: bfloat16 where a short probe measures it faster here, float16 on GPUs",
    )
    p.add_argument(
        "--cache-features",
        action="store_true",
        help="with a frozen backbone (--freeze features), compute its features once and train "
        "the head on them; cached under $MXNET_HOME/features",
    )
    p.add_argument(
        "--cache-views",
        type=_positive_int,
        default=d.cache_views,
        metavar="K",
        help="random train augmentations cached per image; epoch e uses view e %% K (default 1)",
    )


def _add_selection_flags(p: argparse.ArgumentParser, d) -> None:
    """Which epoch is kept, and how the classes are weighed."""
    p.add_argument(
        "--monitor",
        choices=("val_acc", "val_loss"),
        default=d.monitor,
        help="what picks the best epoch, whose weights become model.params (default "
        "%(default)s; needs a val part, else the last epoch is kept)",
    )
    p.add_argument(
        "--early-stop",
        type=_positive_int,
        default=d.early_stop,
        metavar="N",
        help="stop after N epochs without improvement of --monitor (needs a val part)",
    )
    p.add_argument(
        "--keep-checkpoints",
        type=_positive_int,
        default=d.keep_checkpoints,
        metavar="K",
        help="keep the checkpoints of the last K epochs and of the best (default %(default)s)",
    )
    p.add_argument(
        "--class-weights",
        choices=("none", "auto"),
        default=d.class_weights,
        help="auto: weight each sample's loss by the inverse frequency of its class in the "
        "train part (default %(default)s)",
    )
    p.add_argument(
        "--sampler",
        choices=("uniform", "balanced"),
        default=d.sampler,
        help="balanced: draw each epoch's samples so that every class comes equally often "
        "(with replacement, from --seed) (default %(default)s)",
    )


def add_recipe_arguments(p: argparse.ArgumentParser, d) -> None:
    """The flags of "Getting the most out of a small dataset" (README); each is off by
    default, the book's recipe."""
    from gluon_ft.train.config import OPTIMIZERS, RECIPES, describe_preset

    g = p.add_argument_group("recipe", "tricks for small datasets; all off in the book's recipe")
    g.add_argument(
        "--recipe",
        choices=RECIPES,
        default=d.recipe,
        help="book (default): the book's recipe; best: a preset, written out in config.json, "
        f"which flags given explicitly override: {describe_preset('best')}",
    )
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=d.optimizer,
        help="sgd (default, the book's) or adamw (betas 0.9/0.999, eps 1e-8): --wd is then "
        "decoupled, each step takes lr * wd * w off, as PyTorch's AdamW(weight_decay=wd); "
        "try --lr 0.001 --wd 0.01",
    )
    g.add_argument(
        "--label-smoothing",
        type=float,
        default=d.label_smoothing,
        metavar="F",
        help="train on targets of 1 - F + F/K for the class and F/K for each other of the K "
        "classes (default 0)",
    )
    g.add_argument(
        "--mixup",
        type=float,
        default=d.mixup,
        metavar="ALPHA",
        help="mix pairs of images and their targets, weights from Beta(ALPHA, ALPHA) (0: off)",
    )
    g.add_argument(
        "--cutmix",
        type=float,
        default=d.cutmix,
        metavar="ALPHA",
        help="paste a box of another image, targets by area, from Beta(ALPHA, ALPHA) (0: off)",
    )
    g.add_argument(
        "--mixup-off-epoch",
        dest="mix_off_epoch",
        type=_positive_int,
        default=d.mix_off_epoch,
        metavar="E",
        help="no mixup or CutMix from epoch E (1-based) on (default: mix in every epoch)",
    )
    _add_evaluation_flags(g, d)


def _add_evaluation_flags(g, d) -> None:
    """The recipe flags of what is evaluated and kept: EMA, TTA, and the head epochs."""
    from gluon_ft.train.config import EMA_SAVES

    g.add_argument(
        "--ema",
        type=float,
        default=d.ema,
        metavar="DECAY",
        help="keep an exponential moving average (EMA) of the weights, e.g. 0.999: after each "
        "step ema = d*ema + (1-d)*w with d = min(DECAY, (1+t)/(10+t)), t the updates so far, "
        "so that short runs move it too; it is evaluated each epoch too, and saved as the "
        "model when better on validation (see --ema-save); 0: off (default)",
    )
    g.add_argument(
        "--ema-save",
        choices=EMA_SAVES,
        default=d.ema_save,
        help="if-better (default): model.params is the last epoch's EMA when it beats the "
        "kept weights by --monitor on validation (without a val part: the weights); "
        "always: the EMA",
    )
    g.add_argument(
        "--tta",
        type=_positive_int,
        default=d.tta,
        metavar="N",
        help="test-time augmentation in each epoch's evaluation and the report: average the "
        "logits of N views (1-12: plain, its flip, then crops of a 1.14x larger resize and "
        "their flips; not with --cache-features) (default 1: the plain center crop)",
    )
    g.add_argument(
        "--head-epochs",
        type=int,
        default=d.head_epochs,
        metavar="E",
        help="train the new head alone for the first E of --epochs, on cached features, "
        "then the whole network (default 0)",
    )


def _config_from(args: argparse.Namespace):
    from dataclasses import fields

    from gluon_ft.train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if given["head_lr_mult"] is None:
        del given["head_lr_mult"]  # the default
    config = TrainConfig(**given)
    if config.recipe != "book":
        applied = config.apply_recipe(_flags_given(args.command_line))
        print(f"gluon-ft: --recipe {config.recipe}: {_flags_of(applied)}", file=sys.stderr)
    return config


def _flags_given(words: list[str]) -> set[str]:
    """The train settings written on the command line ``words``, whatever their values:
    what a ``--recipe`` preset leaves alone."""
    parser = argparse.ArgumentParser(add_help=False)
    add_train_arguments(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # unset, rather than its default
    given, _ = parser.parse_known_args(words)
    return set(vars(given))


def _flags_of(settings: dict) -> str:
    """``{"lr_schedule": "cosine"}`` as ``--lr-schedule cosine``."""
    from gluon_ft.train.config import flags_of

    return flags_of(settings)


def _warn_about_settings(config, args: argparse.Namespace) -> None:
    """One line on stderr for each setting that most likely does not do what was meant."""
    for warning in config.warnings(head_lr_mult_given=args.head_lr_mult is not None):
        print(f"gluon-ft: warning: {warning}", file=sys.stderr)


def _run_train(args: argparse.Namespace) -> int:
    from gluon_ft.train import train

    config = _config_from(args)
    _warn_about_settings(config, args)
    with _exit_at_once_on_failure(config.kvstore):
        result = train(config)
    summary, epochs = result["summary"], len(result["history"])
    if summary is None:  # a worker other than rank 0: the report is rank 0's
        last = result["history"][-1]
        key = "test_acc" if "test_acc" in last else "val_acc"
        print(
            f"done: {key.replace('_', ' ')} {last[key]:.3f} after {epochs} epoch(s); "
            f"rank 0 writes the run directory"
        )
        return 0
    kept = (
        f"epoch {summary['best_epoch']}, the best by {summary['monitor']}"
        if summary["monitor"]
        else f"epoch {summary['best_epoch']}, the last"
    )
    if summary.get("weights") == "ema":
        kept = f"the EMA after epoch {summary['ema_epoch']}"
    stopped = ", stopped early" if summary["stopped_early"] else ""
    tested = f"test acc {summary['test_acc']:.3f}" if "test_acc" in summary else "no report"
    print(
        f"done: {tested} with the weights of {kept} "
        f"({epochs} epoch(s){stopped}); run directory {result['run_dir']}"
    )
    return 0


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    """``train``'s flags with scratch defaults; ``--out`` is the params file to write."""
    from gluon_ft.train import TrainConfig

    add_train_arguments(p, TrainConfig(lr=0.1, head_lr_mult=1.0), run_flags=False)
    p.add_argument("--out", required=True, help="FILE.params to write (+ FILE.json beside it)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted pretraining (FILE.run) from its last complete checkpoint",
    )


def _run_pretrain(args: argparse.Namespace) -> int:
    from gluon_ft.train import pretrain

    out_file = args.out
    args.out = None
    config = _config_from(args)
    config.pretrained = "none"  # as pretrain() sets it: a source model starts from scratch
    _warn_about_settings(config, args)
    with _exit_at_once_on_failure(config.kvstore):
        result = pretrain(config, out_file)
    test_acc = (result["summary"] or {}).get("test_acc", float("nan"))
    print(
        f"done: source test acc {test_acc:.3f} over {len(result['classes'])} classes; "
        f"wrote {result['params_file']} (use it with --pretrained {result['params_file']})"
    )
    return 0


class _OnlyFlags:
    """Stands for a parser, keeping only the flags in ``names``: another command takes some
    of ``train``'s flags from :func:`add_train_arguments` itself, not from a copy."""

    def __init__(self, parser, names: frozenset[str]):
        self.parser = parser
        self.names = names

    def add_argument(self, *flags, **kwargs):
        if flags[0] in self.names:
            self.parser.add_argument(*flags, **kwargs)

    def add_argument_group(self, *args, **kwargs):
        return _OnlyFlags(self.parser.add_argument_group(*args, **kwargs), self.names)


# train's flags that shape a training step, so the range test measures the planned training.
LR_FIND_TRAIN_FLAGS = frozenset(
    "--data --val-split --test-split --model --pretrained --batch-size --head-lr-mult --wd "
    "--momentum --optimizer --image-size --crop-scale --freeze --bn --layer-lr-decay "
    "--accumulate --class-weights --sampler --label-smoothing --ctx --dtype "
    "--workers --seed".split()
)


def add_lr_find_arguments(p: argparse.ArgumentParser) -> None:
    """``train``'s flags that shape a step, and the range of the test."""
    add_train_arguments(_OnlyFlags(p, LR_FIND_TRAIN_FLAGS))
    p.add_argument(
        "--steps", type=_positive_int, default=100, help="steps of the test (default %(default)s)"
    )
    p.add_argument(
        "--start-lr",
        type=_positive_float,
        default=1e-7,
        help="--lr of the first step (default %(default)g)",
    )
    p.add_argument(
        "--end-lr",
        type=_positive_float,
        default=10.0,
        help="--lr of the last step; the test stops earlier when the loss blows up "
        "(default %(default)g)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="folder for lr_find.json and lr_find.png (default runs/lr-find-<data>-<model>-<time>)",
    )


def _run_lr_find(args: argparse.Namespace) -> int:
    from gluon_ft.train.lr_find import lr_find

    result, out = lr_find(_config_from(args), args.out, args.steps, args.start_lr, args.end_lr)
    if result.suggestion is None:
        print(f"no suggested lr: {result.how}")
    else:
        print(f"suggested lr: {result.suggestion:.3g} ({result.how})")
    stopped = ", stopped early: the loss blew up" if result.stopped_early else ""
    print(f"{result.steps} step(s){stopped}; wrote {out / 'lr_find.json'} and lr_find.png")
    return 0


def add_pack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="image folder with train/<class>/* and test/<class>/*")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX-{train,test}.rec")
    p.add_argument(
        "--resize",
        type=int,
        default=256,
        help="shorter side of the stored images, never enlarged; 0 keeps sizes (default 256)",
    )


def _run_pack(args: argparse.Namespace) -> int:
    from gluon_ft.data.recordio import manifest_path, pack_dataset

    manifest = pack_dataset(args.dir, args.out, args.resize)
    for name, split in manifest["splits"].items():
        print(f"{name}: {len(split['labels'])} image(s) packed, {len(split['skipped'])} skipped")
        for bad in split["skipped"]:
            print(f"  skipped {bad['path']}: {bad['reason']}")
    print(f"wrote {manifest_path(args.out)}; train on it with --data {args.out}")
    return 0


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-n", "--num-workers", type=_positive_int, required=True, help="worker processes"
    )
    p.add_argument(
        "-s",
        "--num-servers",
        type=int,
        default=1,
        help="server processes (default 1; per host with --nnodes, where 0 is allowed on a "
        "host while another runs one)",
    )
    p.add_argument("--port", type=int, help="the scheduler's port on 127.0.0.1 (default: free)")
    hosts = p.add_argument_group(
        "several hosts", "run the same command on every host, each with its --node-rank"
    )
    hosts.add_argument("--nnodes", type=_positive_int, help="number of hosts")
    hosts.add_argument("--node-rank", type=int, help="this host's rank, 0 to NNODES-1")
    hosts.add_argument(
        "--scheduler",
        metavar="HOST:PORT",
        help="node 0's address, where its launcher listens for the others",
    )
    hosts.add_argument(
        "--join-timeout",
        type=_positive_float,
        default=300.0,
        metavar="S",
        help="how long the nodes wait for each other at the start (default %(default)g s)",
    )
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="what each worker runs, e.g. -- gluon-ft train --kvstore dist_sync ...",
    )


def _run_launch(args: argparse.Namespace) -> int:
    from gluon_ft.cluster.launch import launch, launch_node
    from gluon_ft.errors import UsageError

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    several = (args.nnodes, args.node_rank, args.scheduler)
    if all(value is None for value in several):
        return launch(command, args.num_workers, args.num_servers, port=args.port)
    if any(value is None for value in several) or args.port is not None:
        raise UsageError(
            "Several hosts need --nnodes, --node-rank and --scheduler HOST:PORT together "
            "(and no --port), e.g. `gluon-ft launch --nnodes 2 --node-rank 0 --scheduler "
            "10.0.0.1:29400 -n 1 -- gluon-ft train --kvstore dist_sync ...` on node 0."
        )
    return launch_node(
        command,
        args.nnodes,
        args.node_rank,
        args.scheduler,
        args.num_workers,
        args.num_servers,
        join_timeout=args.join_timeout,
    )


@contextlib.contextmanager
def _exit_at_once_on_failure(kvstore: str | None):
    """A worker of a ``dist_*`` run reports its failure, then leaves with ``os._exit``.

    After ``mx.kv.create`` a normal exit waits in the kvstore's shutdown barrier for peers
    that never arrive, and the whole cluster would hang; a process that is gone lets the
    launcher stop the others.
    """
    from gluon_ft.train.dist import is_distributed

    if not is_distributed(kvstore):
        yield
        return
    try:
        yield
    except (Exception, KeyboardInterrupt) as err:
        code = _report(err)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _report(err: BaseException) -> int:
    """Print ``err`` for people and return its exit code; a bug gets its traceback and 1."""
    if isinstance(err, GluonFTError):
        print(f"gluon-ft: error: {err}", file=sys.stderr)
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        print("gluon-ft: interrupted", file=sys.stderr)
        return 130
    traceback.print_exception(err)
    return 1


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes: under a minute when idle")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data loader processes for the loader and epoch figures (default: train's)",
    )
    p.add_argument("--out", metavar="FILE", help="also write the JSON object to FILE")
    g = p.add_argument_group(
        "recipes", "instead of the speed figures: the book's recipe against --recipe best"
    )
    g.add_argument(
        "--recipes",
        metavar="DATA",
        help="train the book's recipe, --recipe best and best without each ingredient on DATA, "
        "each seed in turn; prints test accuracy and wall time",
    )
    g.add_argument("--pretrained", metavar="FILE", help="the source model of --recipes")
    g.add_argument("--image-size", type=_positive_int, default=64)
    g.add_argument("--batch-size", type=_positive_int, default=64)
    g.add_argument("--epochs", type=_positive_int, default=5)
    g.add_argument("--seeds", type=_positive_int, default=3)
    g.add_argument(
        "--no-ablation", dest="ablation", action="store_false", help="book and best only"
    )


def _run_recipe_bench(args: argparse.Namespace) -> dict:
    from gluon_ft.bench.recipes import markdown_table, run_recipe_bench
    from gluon_ft.errors import UsageError

    if not args.pretrained:
        raise UsageError("bench --recipes DATA needs --pretrained FILE (or imagenet).")
    result = run_recipe_bench(
        args.recipes,
        args.pretrained,
        args.image_size,
        args.batch_size,
        args.epochs,
        args.seeds,
        args.ablation,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(markdown_table(result))
    return result


def _run_bench(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from gluon_ft.bench.throughput import run_bench
    from gluon_ft.errors import UsageError

    if args.recipes:
        result = _run_recipe_bench(args)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if args.workers is not None and args.workers < 0:
        raise UsageError("--workers must be >= 0.")
    result = run_bench(args.quick, args.workers, log=lambda line: print(line, file=sys.stderr))
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def add_check_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "dir", metavar="DIR", help="dataset folder: DIR/<class>/*, or DIR/train/<class>/* and test/"
    )
    p.add_argument(
        "--image-size", type=_positive_int, default=224, help="the training crop (default 224)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _format_check_report(report: dict, shown: int = 20) -> str:
    lines = [f"{report['root']} (crop {report['crop']} px)"]
    if report["splits"]:
        lines.append(
            f"  {'split':<6} {'class':<24} {'images':>7} {'unreadable':>11} {'small':>6}"
            f" {'ignored':>8} {'skipped':>8}"
        )
    unreadable, small, ignored, skipped = [], [], [], []
    for split, classes in report["splits"].items():
        for name, counts in classes.items():
            lines.append(
                f"  {split:<6} {name:<24} {counts['images']:>7} "
                f"{len(counts['unreadable']):>11} {len(counts['small']):>6}"
                f" {len(counts['ignored']):>8} {len(counts['skipped']):>8}"
            )
            unreadable += counts["unreadable"]
            small += [f"{s['path']}: {s['size'][0]}x{s['size'][1]}" for s in counts["small"]]
            ignored += counts["ignored"]
            skipped += counts["skipped"]
    for beside in report["beside_classes"].values():
        ignored += beside["ignored"]
        skipped += [f"{path} (not in a class folder)" for path in beside["skipped"]]
    if unreadable:
        lines.append(f"unreadable ({len(unreadable)}; training skips them, --strict refuses):")
        lines += [f"  {bad['path']}: {bad['reason']}" for bad in unreadable]
    crop = report["crop"]
    lines += _listing(f"smaller than the {crop}-px crop ({len(small)}; upscaled)", small, shown)
    lines += _listing(f"ignored ({len(ignored)} hidden names, never read)", ignored, shown)
    lines += _listing(
        f"skipped ({len(skipped)} files of no format Pillow decodes, or beside the classes)",
        skipped,
        shown,
    )
    copies = [" = ".join(group) for group in report["duplicates"]]
    lines += _listing(
        f"byte-identical files ({len(copies)} groups; a split keeps each group in one part, "
        "folders you split yourself are not moved)",
        copies,
        shown,
    )
    lines += [f"problem: {problem}" for problem in report["problems"]]
    lines += imbalance_warnings(report)
    return "\n".join(lines)


def _listing(title: str, entries: list[str], shown: int) -> list[str]:
    """``title:`` and the first ``shown`` entries, indented; nothing when there are none."""
    if not entries:
        return []
    lines = [f"{title}:"] + [f"  {entry}" for entry in entries[:shown]]
    if len(entries) > shown:
        lines.append(f"  ... and {len(entries) - shown} more (--json lists all)")
    return lines


def imbalance_warnings(report: dict) -> list[str]:
    """A line for each split whose largest class has over 5 times the smallest's images."""
    from gluon_ft.data.balance import IMBALANCE_WARNING, imbalance_ratio

    lines = []
    for split, classes in report["splits"].items():
        counts = {name: c["images"] for name, c in classes.items()}
        if counts and imbalance_ratio(counts.values()) > IMBALANCE_WARNING:
            largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
            where = report["root"] if split == "." else f"{split}/"
            lines.append(
                f"warning: the classes of {where} are imbalanced: {largest} has "
                f"{counts[largest]} images, {smallest} {counts[smallest]} (over "
                f"{IMBALANCE_WARNING:g}x). Consider --class-weights auto or --sampler balanced, "
                "and judge the run by its balanced accuracy and per-class recall (the report)."
            )
    return lines


def _run_check_data(args: argparse.Namespace) -> int:
    import json

    from gluon_ft.data.folders import check_dataset, unreadable_in

    report = check_dataset(args.dir, args.image_size)
    print(json.dumps(report, indent=2) if args.json else _format_check_report(report))
    for line in imbalance_warnings(report) if args.json else []:
        print(line, file=sys.stderr)
    bad = unreadable_in(report)
    if report["problems"] or bad:
        return 2
    return 0


def _add_inference_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "auto"),
        default="float32",
        help="float32; bfloat16: the fused oneDNN graph (CPUs with avx512_bf16/amx); auto: "
        "bfloat16 where a short probe measures it faster here (default %(default)s)",
    )


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    p.add_argument("images", metavar="IMG", nargs="+", help="image files")
    p.add_argument("--top-k", type=_positive_int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON list of results")
    _add_inference_dtype(p)
    add_tta_argument(p)


def add_tta_argument(p: argparse.ArgumentParser) -> None:
    """``--tta N`` of predict and serve."""
    from gluon_ft.data.tta import MAX_VIEWS

    p.add_argument(
        "--tta",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"test-time augmentation: average the logits of N views (1-{MAX_VIEWS}: plain, "
        "its flip, then crops of a 1.14x larger resize and their flips; see README) "
        "(default: the run's own --tta, as its report scored it; 1 is the plain center crop)",
    )


def _run_predict(args: argparse.Namespace) -> int:
    import json

    from gluon_ft.deploy.predict import Predictor

    predictor = Predictor(args.run_dir, dtype=args.dtype, tta=args.tta)
    if args.dtype == "auto":
        print(f"gluon-ft: --dtype auto: {_describe_form(predictor.run.inference)}", file=sys.stderr)
    results = predictor.predict_images(args.images, top_k=args.top_k)
    if args.json:
        print(json.dumps(results, indent=2))
    for result in results:
        if not result["ok"]:
            print(f"{result['source']}: error: {result['error']}", file=sys.stderr)
        elif not args.json:
            top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top"])
            print(f"{result['source']}: {top}")
    # Exit 2 (bad input) when any file could not be classified; the others were.
    return 0 if all(r["ok"] for r in results) else 2


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    p.add_argument(
        "--split",
        default="test",
        metavar="test|val|DIR",
        help="the run's test or val part (from its split.json), or a folder DIR/<class>/* "
        "(default %(default)s)",
    )
    p.add_argument("--out", help="output folder (default RUN for test, else RUN/report-<name>)")


def _run_report(args: argparse.Namespace) -> int:
    from gluon_ft.deploy.report import build_report

    summary, out = build_report(args.run_dir, args.split, args.out)
    accuracy = next(value for key, value in summary.items() if key.endswith("_acc"))
    print(
        f"{summary['split']}: {summary['images']} images, accuracy {accuracy:.3f}, balanced "
        f"accuracy {summary['balanced_acc']:.3f}, macro-F1 {summary['macro_f1']:.3f}"
    )
    for row in summary["per_class"]:
        print(
            f"  {row['class']:<24} precision {row['precision']:.3f}  recall {row['recall']:.3f}"
            f"  F1 {row['f1']:.3f}  support {row['support']}"
        )
    print(f"wrote {out / 'report.md'}, confusion.png, mistakes.png and summary.json")
    return 0


def _describe_form(inference: dict) -> str:
    """What an inference ``--dtype auto`` chose, with the probe's figures."""
    line = f"{inference['dtype']} ({inference['why']}"
    probe = inference.get("probe")
    if probe:
        line += (
            f"; batch {probe['batch_size']}: float32 {probe['float32_img_s']:.1f} img/s, "
            f"fused bfloat16 {probe['bfloat16_img_s']:.1f} img/s"
        )
    return line + ")"


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    p.add_argument("--format", choices=("mxnet", "onnx", "all"), default="all", help="default: all")
    p.add_argument("--out", help="output folder (default RUN/export)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="bfloat16: the fused oneDNN graph, MXNet format only (default %(default)s)",
    )


def _run_export(args: argparse.Namespace) -> int:
    from gluon_ft.deploy.export import FORMATS, export_run

    formats = FORMATS if args.format == "all" else (args.format,)
    if args.format == "all" and args.dtype == "bfloat16":
        formats = ("mxnet",)
        print("gluon-ft: --dtype bfloat16 exports the MXNet format only", file=sys.stderr)
    for fmt in formats:
        result = export_run(args.run_dir, fmt, args.out, args.dtype)
        print(
            f"{fmt}: wrote {', '.join(result['files'])} to {result['out_dir']}; checked with "
            f"{result['checked_with']}: max abs diff {result['max_abs_diff']:.3g} "
            f"(<= {result['tolerance']:g})"
        )
    return 0


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    from gluon_ft.demo import DemoConfig

    d = DemoConfig()
    p.add_argument("--seed", type=int, default=d.seed, help="task, init and order seed")
    p.add_argument(
        "--size",
        choices=["default", "small"],
        default="default",
        help="small: a tiny task for smoke tests (accuracy means nothing there)",
    )
    p.add_argument("--epochs", type=_positive_int, default=d.epochs, help="target epochs")
    p.add_argument("--pretrain-epochs", type=_positive_int, default=d.pretrain_epochs)
    p.add_argument("--out", default=None, help="output folder (default runs/demo-<time>)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="task and source model cache (default $MXNET_HOME/gluon-ft/demo)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gluon_ft.data.synthetic import DEFAULT_SPEC, SMALL_SPEC
    from gluon_ft.demo import REAL_RUN_NOTE, DemoConfig, format_table, run_demo

    config = DemoConfig(
        seed=args.seed,
        spec=SMALL_SPEC if args.size == "small" else DEFAULT_SPEC,
        epochs=args.epochs,
        pretrain_epochs=args.pretrain_epochs,
        out=Path(args.out) if args.out else None,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        progress=args.progress,
    )
    result = run_demo(config)
    results = result["results"]
    print()
    print("test accuracy on the target task")
    print(format_table(results))
    if {"fine-tuned", "scratch"} <= results.keys():
        gain = results["fine-tuned"]["test_acc"] - results["scratch"]["test_acc"]
        epochs = f"{args.epochs} epoch{'s' if args.epochs > 1 else ''}"
        print(f"\nfine-tuned - scratch: {100 * gain:+.1f} points after {epochs}")
    print(f"\nplots: {result['comparison_png']}, {result['samples_png']}")
    print(f"runs and summary.json: {result['out']} ({result['total_seconds']:.0f} s in all)")
    print()
    print(REAL_RUN_NOTE)
    return 0


# name -> (help, add_arguments, run). Each command keeps its imports inside `run`, so that
# `gluon-ft --help` stays fast and one command's dependencies never break another.
def add_models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", help="only names matching this regex (e.g. resnet50)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--parts",
        action="store_true",
        help="also list the parts --freeze, --unfreeze-at and --layer-lr-decay name (stem, "
        "stage1.., tail, output): their scale, parameters and blocks",
    )


def _print_parts(parts: list) -> None:
    for part in parts:
        blocks = " ".join(part.blocks)
        print(f"  {part.name:<8} {part.scale:>5} {part.params / 1e6:>7.2f}M  {blocks}")


def _run_models(args: argparse.Namespace) -> int:
    import json

    from gluon_ft.model.zoo import describe, matching_names

    names = matching_names(args.pattern)
    row = "{name:<24} {zoo:<8} {family:<22} {input_size:>5} {params:>8}  {weights}"
    if not args.json:
        print(
            row.format(
                name="name",
                zoo="zoo",
                family="family",
                input_size="input",
                params="params",
                weights="imagenet weights",
            )
        )
    for name in names:  # each row builds its network (about 0.1 s): print as we go
        info = describe(name).as_dict()
        parts = _model_parts(name, info["input_size"]) if args.parts else None
        if args.json:
            extra = {"parts": [part.as_dict() for part in parts]} if parts else {}
            print(json.dumps({**info, **extra}), flush=True)
            continue
        print(row.format(**{**info, "params": f"{info['params'] / 1e6:.1f}M"}), flush=True)
        if parts:
            _print_parts(parts)
    return 0


def _model_parts(name: str, image_size: int) -> list:
    from gluon_ft.model.graft import build_model
    from gluon_ft.model.parts import summarize_parts

    return summarize_parts(build_model(name, 1000), image_size)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help="a finished run directory (gluon-ft train)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default %(default)s: only programs on this machine can "
        "connect). --host 0.0.0.0 listens on every network interface: anyone who can reach this "
        "machine can then use the model and upload files to it, over plain HTTP, without a "
        "password",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s)")
    p.add_argument(
        "--max-upload-mb",
        type=_positive_float,
        default=10.0,
        metavar="MB",
        help="largest upload accepted, in MiB (default %(default)s); larger ones get HTTP 413",
    )
    p.add_argument(
        "--max-pixels",
        type=_pixel_cap,
        default=24_000_000,
        metavar="N",
        help="largest image decoded, in pixels (default %(default)s: a 6000x4000 photo; the "
        "decode costs 8 to 20 bytes a pixel). Larger ones get HTTP 413 from their header, "
        "before any decoding; a baseline JPEG is decoded at 1/2, 1/4 or 1/8 scale instead when "
        "that fits",
    )
    p.add_argument(
        "--max-queue",
        type=_positive_int,
        default=16,
        metavar="N",
        help="most /predict requests in progress at once (default %(default)s); more get HTTP "
        "503 with Retry-After",
    )
    p.add_argument("--ctx", default="cpu", help="the one device to run on: cpu | gpu:N")
    _add_inference_dtype(p)
    add_tta_argument(p)


def _pixel_cap(text: str) -> int:
    from PIL import Image

    value = _positive_int(text)
    if value > Image.MAX_IMAGE_PIXELS:
        raise argparse.ArgumentTypeError(
            f"must be at most {Image.MAX_IMAGE_PIXELS} (the image decoder refuses more as a "
            f"possible decompression bomb), got {value}"
        )
    return value


def _run_serve(args: argparse.Namespace) -> int:
    from gluon_ft.errors import UsageError

    try:
        from gluon_ft.deploy.serve import is_loopback_name, serve
    except ImportError as err:
        raise UsageError(
            f"gluon-ft serve needs the serve extra ({err.name} is missing): "
            "pip install 'gluon-ft[serve]'"
        ) from None
    from gluon_ft.train import parse_contexts

    contexts = parse_contexts(args.ctx)
    if len(contexts) != 1:
        raise UsageError(f"--ctx {args.ctx}: gluon-ft serve runs on one device, e.g. gpu:0.")
    if not is_loopback_name(args.host):
        print(
            f"gluon-ft: warning: --host {args.host} lets other machines reach this server; "
            "it has no password and uses plain HTTP.",
            file=sys.stderr,
        )
    url = f"http://{args.host}:{args.port}/"
    print(f"gluon-ft: loading {args.run_dir}; then open {url}", flush=True)
    serve(
        args.run_dir,
        args.host,
        args.port,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
        max_queue=args.max_queue,
        ctx=contexts[0],
        dtype=args.dtype,
        on_loaded=lambda run: print(
            f"gluon-ft: serving in {_describe_form(run.inference)}", flush=True
        ),
        tta=args.tta,
    )
    return 0


COMMANDS = {
    "train": (
        "fine-tune (or train from scratch) on a dataset; writes a run directory",
        add_train_arguments,
        _run_train,
    ),
    "pretrain": (
        "train a source model on a source dataset; writes a params file",
        add_pretrain_arguments,
        _run_pretrain,
    ),
    "lr-find": (
        "LR range test: the loss against a growing --lr, and a suggested rate; changes nothing",
        add_lr_find_arguments,
        _run_lr_find,
    ),
    "demo": (
        "the offline end-to-end demo on the built-in synthetic transfer task",
        add_demo_arguments,
        _run_demo,
    ),
    "launch": (
        "start a local ps-lite cluster and run a command as each worker",
        add_launch_arguments,
        _run_launch,
    ),
    "bench": (
        "measure throughput; print one JSON object",
        add_bench_arguments,
        _run_bench,
    ),
    "pack": (
        "pack an image folder into RecordIO (.rec/.idx) per split, pre-resized",
        add_pack_arguments,
        _run_pack,
    ),
    "models": (
        "list every fine-tunable model name with family, input size, parameters",
        add_models_arguments,
        _run_models,
    ),
    "serve": (
        "serve a finished run: a web page and a JSON API, on 127.0.0.1 by default",
        add_serve_arguments,
        _run_serve,
    ),
    "check-data": (
        "validate an image-folder dataset and list unreadable files",
        add_check_data_arguments,
        _run_check_data,
    ),
    "predict": (
        "classify image files with a finished run",
        add_predict_arguments,
        _run_predict,
    ),
    "report": (
        "per-class report of a finished run on its test split or any folder",
        add_report_arguments,
        _run_report,
    ),
    "export": (
        "export a run as MXNet symbol+params and as ONNX, each verified",
        add_export_arguments,
        _run_export,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``gluon-ft`` parser with one subparser per command."""
    parser = _Parser(
        prog="gluon-ft",
        description="Fine-tune pretrained Apache MXNet Gluon models on your image folders.",
        epilog="Run `gluon-ft COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"gluon-ft {gluon_ft.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


# Environment a command needs before mxnet loads (building the parser imports it). A server
# idles between requests and shares the cores with its clients: OpenMP threads that spin-wait
# starve them (8 clients x 25 requests on 2 busy cores: 2 to 12 requests/s, p95 1.2 to 9.4 s;
# passive: 53 to 64 requests/s, p95 0.18 to 0.24 s).
COMMAND_ENVIRONMENT = {"serve": {"OMP_WAIT_POLICY": "PASSIVE"}}


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code."""
    words = sys.argv[1:] if argv is None else argv
    for name, value in COMMAND_ENVIRONMENT.get(words[0] if words else "", {}).items():
        os.environ.setdefault(name, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = words[1:]  # what a --recipe preset may not override
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (GluonFTError, KeyboardInterrupt) as err:
        return _report(err)


if __name__ == "__main__":
    raise SystemExit(main())
