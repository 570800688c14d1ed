"""The command line's own texts: ``--help`` gives the defaults, and docs/cli.md is current."""

from __future__ import annotations

import re

import pytest

from gluon_ft.cli import main


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
