"""The ``gluon-ft`` command: parses arguments, calls the library, chooses exit codes.

Exit codes: 0 success; 2 bad usage or input; 3 training diverged; 130 interrupted. Errors the
user can act on are printed as one paragraph, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

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
    p.add_argument("--data", default=d.data, help="hotdog, or DIR with train/<class>/* and test/")
    p.add_argument("--model", default=d.model, help="model zoo name (default %(default)s)")
    if run_flags:
        p.add_argument(
            "--pretrained",
            default=d.pretrained,
            help="imagenet | none | FILE.params (default %(default)s)",
        )
    p.add_argument("--epochs", type=_positive_int, default=d.epochs)
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    p.add_argument("--lr", type=_positive_float, default=d.lr)
    p.add_argument(
        "--head-lr-mult", type=_positive_float, default=d.head_lr_mult, help="lr_mult of the head"
    )
    p.add_argument("--wd", type=float, default=d.wd)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--image-size", type=_positive_int, default=d.image_size)
    p.add_argument(
        "--freeze",
        default=d.freeze,
        help="none | a part (features, output, stem, stage1..stage4) | a regex on parameter names",
    )
    p.add_argument(
        "--bn",
        choices=("freeze", "train"),
        default=d.bn,
        help="BatchNorm in frozen parts: freeze (use running statistics) or train",
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
    p.add_argument("--ctx", default=d.ctx, help="auto | cpu | cpu:N | gpu:0,1")
    p.add_argument("--kvstore", default=d.kvstore, help="kvstore type (default: fits --ctx)")
    p.add_argument("--workers", type=int, default=d.workers, help="data loader processes")
    p.add_argument("--seed", type=int, default=d.seed)
    if run_flags:
        p.add_argument(
            "--out", default=d.out, help="run directory (default runs/<data>-<model>-<time>)"
        )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _config_from(args: argparse.Namespace):
    from dataclasses import fields

    from gluon_ft.train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def _run_train(args: argparse.Namespace) -> int:
    from gluon_ft.train import train

    result = train(_config_from(args))
    last = result["history"][-1]
    print(
        f"done: test acc {last['test_acc']:.3f} after {last['epoch']} epoch(s); "
        f"run directory {result['run_dir']}"
    )
    return 0


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    """``train``'s flags with scratch defaults; ``--out`` is the params file to write."""
    from gluon_ft.train import TrainConfig

    add_train_arguments(p, TrainConfig(lr=0.1, head_lr_mult=1.0), run_flags=False)
    p.add_argument("--out", required=True, help="FILE.params to write (+ FILE.json beside it)")


def _run_pretrain(args: argparse.Namespace) -> int:
    from gluon_ft.train import pretrain

    out_file = args.out
    args.out = None
    result = pretrain(_config_from(args), out_file)
    last = result["history"][-1]
    print(
        f"done: source test acc {last['test_acc']:.3f} over {len(result['classes'])} classes; "
        f"wrote {result['params_file']} (use it with --pretrained {result['params_file']})"
    )
    return 0


# name -> (help, add_arguments, run). Each command keeps its imports inside `run`, so that
# `gluon-ft --help` stays fast and one command's dependencies never break another.
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
}


def build_parser() -> argparse.ArgumentParser:
    """The ``gluon-ft`` parser with one subparser per command."""
    parser = _Parser(prog="gluon-ft", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gluon-ft {gluon_ft.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except GluonFTError as err:
        print(f"gluon-ft: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("gluon-ft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
