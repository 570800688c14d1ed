"""``--recipe``: a named preset of train's flags, given to the command's parser as defaults.

A tiny parser reads ``--recipe`` first; its preset then becomes the defaults of the command's
flags, and one real parse gives each setting its value: the flag on the command line, else the
preset's, else the built-in default.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from gluon_ft.cli.common import Parser


class PresetValue:
    """A default that a preset gave. Marked, so that ``--recipe best: ...`` lists what the
    preset set and not the flags given with the same value; and not a ``str``, which argparse
    would run through the flag's type (``--lr`` has no type that reads the preset's "find").
    """

    def __init__(self, value, built_in):
        self.value = value
        self.built_in = built_in  # the flag's own default: --lr's, while lr-find measures it


def read_recipe(words: Sequence[str]) -> str | None:
    """The recipe whose preset ``words`` ask for: their ``--recipe``, if known (the real parse
    reports a missing or unknown one), and none with ``--help``, which shows the built-in
    defaults (its text calls them the book's)."""
    from gluon_ft.train.config import RECIPES

    reader = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    reader.add_argument("--recipe", choices=RECIPES)
    reader.add_argument("-h", "--help", action="store_true")
    try:
        known, _ = reader.parse_known_args(words)
    except argparse.ArgumentError:
        return None
    return None if known.help else known.recipe


def use_preset_defaults(parser: argparse.ArgumentParser, recipe: str) -> None:
    """Make the settings of ``recipe``'s preset the defaults of ``parser``'s flags."""
    from gluon_ft.train.config import RECIPE_PRESETS

    parser.set_defaults(
        **{
            name: PresetValue(value, parser.get_default(name))
            for name, value in RECIPE_PRESETS[recipe].items()
        }
    )


def parse_command_line(parser: Parser, words: Sequence[str]) -> argparse.Namespace:
    """``words`` parsed once, a command with ``--recipe`` taking its preset as its defaults."""
    command = parser.commands.get(words[0]) if words else None
    # get_default: None when the command has no --recipe (lr-find, and all but train, pretrain)
    if command is not None and command.get_default("recipe") is not None:
        recipe = read_recipe(words[1:])
        if recipe is not None:
            use_preset_defaults(command, recipe)
    return parser.parse_args(words)


def take_preset(args: argparse.Namespace) -> dict:
    """Put each :class:`PresetValue` of ``args`` by its value; return what the preset set, in
    its order. A preset's ``--lr`` of "find" sets ``lr_find``: train() measures the rate first,
    and ``--lr`` keeps its own default until then."""
    from gluon_ft.train.config import FIND_LR, RECIPE_PRESETS

    applied = {}
    for name in RECIPE_PRESETS[getattr(args, "recipe", "book")]:
        preset = getattr(args, name)
        if not isinstance(preset, PresetValue):
            continue  # given on the command line
        applied[name] = preset.value
        if name == "lr" and preset.value == FIND_LR:
            args.lr_find = True
            setattr(args, name, preset.built_in)
        else:
            setattr(args, name, preset.value)
    return applied
