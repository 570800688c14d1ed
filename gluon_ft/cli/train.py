"""``train``, ``pretrain`` and ``lr-find``: the settings of a run from the command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import TYPE_CHECKING

from gluon_ft.cli.common import Command, positive_float, positive_int, report_error
from gluon_ft.cli.recipe import add_config_argument, take_preset
from gluon_ft.cli.train_flags import add_train_arguments

if TYPE_CHECKING:
    from gluon_ft.train import TrainConfig


def config_from(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` that ``args`` give, with what their ``--recipe`` preset set
    (said on stderr)."""
    from dataclasses import fields

    from gluon_ft.train import TrainConfig
    from gluon_ft.train.config import flags_of

    applied = take_preset(args)
    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if given["head_lr_mult"] is None:
        del given["head_lr_mult"]  # the default
    config = TrainConfig(**given)
    config.preset = list(applied)
    if config.recipe != "book":
        print(f"gluon-ft: --recipe {config.recipe}: {flags_of(applied)}", file=sys.stderr)
    return config


def _warn_about_settings(config, args: argparse.Namespace) -> None:
    """One line on stderr for each setting that most likely does not do what was meant."""
    for warning in config.warnings(head_lr_mult_given=args.head_lr_mult is not None):
        print(f"gluon-ft: warning: {warning}", file=sys.stderr)


def _run_train(args: argparse.Namespace) -> int:
    from gluon_ft.train import train

    config = config_from(args)
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
    if summary.get("test_map") is not None:  # multi-label: mAP and micro-F1 say more
        tested = f"test mAP {summary['test_map']:.3f}, micro-F1 {summary['f1_micro']:.3f}"
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
    config = config_from(args)
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
        "--steps", type=positive_int, default=100, help="steps of the test (default %(default)s)"
    )
    p.add_argument(
        "--start-lr",
        type=positive_float,
        default=1e-7,
        help="--lr of the first step (default %(default)g)",
    )
    p.add_argument(
        "--end-lr",
        type=positive_float,
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

    result, out = lr_find(config_from(args), args.out, args.steps, args.start_lr, args.end_lr)
    if result.suggestion is None:
        print(f"no suggested lr: {result.how}")
    else:
        print(f"suggested lr: {result.suggestion:.3g} ({result.how})")
    stopped = ", stopped early: the loss blew up" if result.stopped_early else ""
    print(f"{result.steps} step(s){stopped}; wrote {out / 'lr_find.json'} and lr_find.png")
    return 0


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
        code = report_error(err)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _add_train_command_arguments(p: argparse.ArgumentParser) -> None:
    add_train_arguments(p)
    add_config_argument(p)


TRAIN = Command(
    "fine-tune (or train from scratch) on a dataset; writes a run directory",
    _add_train_command_arguments,
    _run_train,
)
PRETRAIN = Command(
    "train a source model on a source dataset; writes a params file",
    add_pretrain_arguments,
    _run_pretrain,
)
LR_FIND = Command(
    "LR range test: the loss against a growing --lr, and a suggested rate; changes nothing",
    add_lr_find_arguments,
    _run_lr_find,
)
