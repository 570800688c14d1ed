"""What every command shares: the parser class, argument types, and the exit code of an error.

Exit codes: 0 success; 2 bad usage or input; 3 training diverged; 130 interrupted. Errors the
user can act on are printed as one paragraph, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import NamedTuple

from gluon_ft.errors import GluonFTError


class Command(NamedTuple):
    """One ``gluon-ft`` command: its one-line help, what adds its flags, what runs it.

    Each command keeps its imports inside ``run`` (and ``add_arguments``), so that
    ``gluon-ft --help`` stays fast and one command's dependencies never break another.
    ``environment`` holds variables the command needs set before mxnet loads (building the
    parser imports it).
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    environment: Mapping[str, str] = {}


class Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage, as we want; this only adds the hint line.

    ``commands`` maps each command's name to its subparser (set on the top parser).
    """

    commands: dict[str, argparse.ArgumentParser]

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"gluon-ft: error: {message}\nRun `{self.prog} --help` for the options.\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


# argparse names a type in its message ("argument --epochs: invalid _positive_int value: 'x'"):
# the names they had when the whole command line lived in one module, so messages stay the same.
positive_int.__name__ = "_positive_int"
positive_float.__name__ = "_positive_float"


def report_error(err: BaseException) -> int:
    """Print ``err`` for people and return its exit code; a bug gets its traceback and 1."""
    if isinstance(err, GluonFTError):
        print(f"gluon-ft: error: {err}", file=sys.stderr)
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        print("gluon-ft: interrupted", file=sys.stderr)
        return 130
    traceback.print_exception(err)
    return 1
