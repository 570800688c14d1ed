"""The command line's own texts: ``--help`` gives the defaults, and docs/cli.md is current."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

from gluon_ft.cli import main
from gluon_ft.cli.docs import markdown


def help_of(command: str, capsys) -> dict[str, str]:
    """``gluon-ft COMMAND --help``: each option's text, on one line, by its first flag."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    entries = re.split(r"\n  (?=-)", capsys.readouterr().out)
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries[1:]}


@pytest.mark.parametrize(
    ("command", "defaults"),
    [
        ("train", {"--epochs": 5, "--batch-size": 128, "--momentum": 0.0, "--workers": 0}),
        ("pretrain", {"--epochs": 5, "--batch-size": 128, "--momentum": 0.0, "--workers": 0}),
        ("lr-find", {"--batch-size": 128, "--momentum": 0.0, "--workers": 0, "--seed": 0}),
    ],
)
def test_help_shows_the_defaults_of_the_everyday_flags(command, defaults, capsys):
    options = help_of(command, capsys)
    for flag, default in defaults.items():
        assert f"(default {default})" in options[flag], options[flag]


def test_help_says_what_the_seed_seeds(capsys):
    seed = help_of("train", capsys)["--seed"]
    assert "initialization" in seed and "(default 0)" in seed


def test_docs_cli_md_is_the_parser_written_out():
    written = (REPO / "docs" / "cli.md").read_text()
    assert written == markdown(), (
        "docs/cli.md is not current: regenerate it with `make docs` "
        "(python -m gluon_ft.cli.docs docs/cli.md) and commit it"
    )


def test_docs_cli_md_lists_every_flag_with_its_default():
    text = markdown()
    assert "## gluon-ft train" in text and "## gluon-ft export" in text
    assert "| `--epochs EPOCHS` | `5` |" in text  # train's
    assert "| `--lr LR` | `0.1` |" in text  # pretrain's own default
    assert "| `--out OUT` | required |" in text
