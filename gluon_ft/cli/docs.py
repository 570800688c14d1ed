"""docs/cli.md, written from the parser itself: every command's usage and flags, with defaults.

``make docs`` runs ``python -m gluon_ft.cli.docs docs/cli.md`` (without a file it prints the
text); tests/test_cli.py fails when the committed file is not :func:`markdown`'s text.
argparse has no public way to list a parser's flags, so this reads its ``_actions`` and
formats them with its own ``HelpFormatter``, as ``--help`` does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gluon_ft.cli import build_parser

# The usage lines wrap at this width whatever the terminal, so the file is the same everywhere.
WIDTH = 100
HEADER = """\
# The gluon-ft command line

<!-- Written by `make docs` (python -m gluon_ft.cli.docs docs/cli.md) from the argparse parser;
edit the flags in gluon_ft/cli/, not this file. -->
"""


def markdown() -> str:
    """Every command of ``gluon-ft``: its usage and a table of its flags, as Markdown."""
    parser = build_parser()
    sections = [HEADER, parser.description, "", _usage(parser), "", *_command_table(parser)]
    for command in parser.commands.values():
        sections += ["", *_command_section(command)]
    return "\n".join(sections) + "\n"


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = parser.formatter_class(prog=parser.prog, width=WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return f"```text\n{formatter.format_help().strip()}\n```"


def _command_table(parser) -> list[str]:
    rows = ["| command | what it does |", "|---|---|"]
    for name, command in parser.commands.items():
        anchor = command.prog.replace(" ", "-")
        rows.append(f"| [`{name}`](#{anchor}) | {_escape(command.description)} |")
    return rows


def _command_section(parser: argparse.ArgumentParser) -> list[str]:
    """``## gluon-ft NAME``: the description, the usage, a table per group of flags."""
    lines = [f"## {parser.prog}", "", _escape(parser.description), "", _usage(parser)]
    formatter = parser.formatter_class(prog=parser.prog, width=WIDTH)
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        lines += ["", f"### {group.title}", ""]
        if group.description:
            lines += [_escape(group.description), ""]
        column = "flag" if any(a.option_strings for a in actions) else "argument"
        lines += [f"| {column} | default | what it does |", "|---|---|---|"]
        lines += [_flag_row(action, formatter) for action in actions]
    return lines


def _flag_row(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    """One table row: the flag as ``--help`` writes it, its default, its help expanded."""
    flag = formatter._format_action_invocation(action)
    text = formatter._expand_help(action) if action.help else ""
    return f"| `{flag}` | {_default(action)} | {_escape(text)} |"


def _default(action: argparse.Action) -> str:
    if action.required and action.option_strings:
        return "required"
    if not action.option_strings or action.nargs == 0 or action.default is None:
        return ""  # a positional, a switch, or no default value
    return f"`{action.default}`"


def _escape(text: str) -> str:
    """``text`` on one line, its Markdown and HTML characters shown as they are."""
    for char in "\\|<*":
        text = text.replace(char, "\\" + char)
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Write :func:`markdown` to the file ``argv[0]``, or print it."""
    words = sys.argv[1:] if argv is None else argv
    if words:
        Path(words[0]).write_text(markdown())
    else:
        sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
