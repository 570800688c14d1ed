"""The ``gluon-ft`` command: the parser of every command, and the dispatcher.

Each command group lives in its own module, its flags beside its ``run``: ``train`` (train,
pretrain, lr-find; their flags in ``train_flags``), ``deploy`` (predict, export, serve,
report), ``data`` (check-data, pack), ``cluster`` (launch), ``apps`` (demo, bench, models).
``recipe`` gives a ``--recipe`` preset to the parser as defaults, ``common`` holds the exit
codes (only this package and ``__main__`` choose them), and ``docs`` writes docs/cli.md.
"""

from __future__ import annotations

import os
import sys

import gluon_ft  # noqa: F401  (sets the OpenMP thread count before mxnet is imported)
from gluon_ft.cli import apps, cluster, data, deploy, train
from gluon_ft.cli.common import Parser, report_error
from gluon_ft.cli.recipe import parse_command_line
from gluon_ft.errors import GluonFTError

# In the order `gluon-ft --help` lists them.
COMMANDS = {
    "train": train.TRAIN,
    "pretrain": train.PRETRAIN,
    "lr-find": train.LR_FIND,
    "demo": apps.DEMO,
    "launch": cluster.LAUNCH,
    "bench": apps.BENCH,
    "pack": data.PACK,
    "models": apps.MODELS,
    "serve": deploy.SERVE,
    "check-data": data.CHECK_DATA,
    "predict": deploy.PREDICT,
    "report": deploy.REPORT,
    "export": deploy.EXPORT,
}


def build_parser() -> Parser:
    """The ``gluon-ft`` parser with one subparser per command."""
    parser = Parser(
        prog="gluon-ft",
        description="Fine-tune pretrained Apache MXNet Gluon models on your image folders.",
        epilog="Run `gluon-ft COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"gluon-ft {gluon_ft.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    parser.commands = {}
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
        parser.commands[name] = p
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code."""
    words = sys.argv[1:] if argv is None else argv
    command = COMMANDS.get(words[0]) if words else None
    for name, value in (command.environment if command else {}).items():
        os.environ.setdefault(name, value)  # before building the parser imports mxnet
    parser = build_parser()
    args = parse_command_line(parser, words)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (GluonFTError, KeyboardInterrupt) as err:
        return report_error(err)


if __name__ == "__main__":
    raise SystemExit(main())
