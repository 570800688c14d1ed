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

    def __init__(self, value, built_in, order: int = 0):
        self.value = value
        self.built_in = built_in  # the flag's own default: --lr's, while lr-find measures it
        self.order = order  # its place in the preset, which --recipe's line keeps


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


def use_preset_defaults(
    parser: argparse.ArgumentParser,
    recipe: str,
    data: str | None,
    labels: str | None = None,
    delim: str = " ",
) -> None:
    """Make the settings of ``recipe``'s preset for ``--data data``'s shape (images a class,
    of ``--labels labels`` when given) the defaults of ``parser``'s flags; the shape it chose
    by is ``recipe_shape``'s."""
    from gluon_ft.train.config import recipe_preset, task_images_per_class

    shape = task_images_per_class(data, labels, delim) if data else None
    preset, shape = recipe_preset(recipe, shape)
    parser.set_defaults(
        recipe_shape=shape,
        **{
            name: PresetValue(value, parser.get_default(name), order)
            for order, (name, value) in enumerate(preset.items())
        },
    )


def parse_command_line(parser: Parser, words: Sequence[str]) -> argparse.Namespace:
    """``words`` parsed once, a command with ``--recipe`` taking its preset as its defaults,
    and one with ``--config FILE`` the file's settings over those."""
    command = parser.commands.get(words[0]) if words else None
    # get_default: None when the command has no --recipe (lr-find, and all but train, pretrain)
    if command is not None and command.get_default("recipe") is not None:
        recipe = read_recipe(words[1:])
        if recipe is not None:
            rest = words[1:]
            data, labels = read_flag(rest, "--data"), read_flag(rest, "--labels")
            delim = read_flag(rest, "--label-delim") or " "
            use_preset_defaults(command, recipe, data, labels, delim)
    if command is not None and any(a.dest == "config" for a in command._actions):
        path = read_config_path(words[1:])
        if path is not None:
            command.set_defaults(**config_file_defaults(command, path))
    return parser.parse_args(words)


def add_config_argument(p: argparse.ArgumentParser) -> None:
    """``train --config FILE``."""
    p.add_argument(
        "--config",
        metavar="FILE",
        help="take the settings of FILE, a JSON object of flag names and values (a run's own "
        "config.json works: what it records beyond the flags, and its out, are left out; "
        ".yaml/.yml files too where PyYAML is installed); flags given on the command line win",
    )


def read_config_path(words: Sequence[str]) -> str | None:
    """The ``--config`` of ``words``, if any (the real parse reports a missing value)."""
    return read_flag(words, "--config")


def read_flag(words: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``words``, if any (the real parse reports a missing value)."""
    reader = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    reader.add_argument(flag, dest="value")
    try:
        known, _ = reader.parse_known_args(words)
    except argparse.ArgumentError:
        return None
    return known.value


# What a run's config.json holds that is no setting to repeat: the next run's own folder.
_RUN_ONLY = ("out", "resume")


def config_file_defaults(command: argparse.ArgumentParser, path: str) -> dict:
    """The flag values of a ``--config`` file, checked: each key a flag of ``command`` (by its
    name, ``batch_size`` or ``batch-size``), each value one of its choices.

    A run's ``config.json`` (it records the gluon-ft version) is read as its settings: the
    keys that are no flag (sizes, versions, contexts), ``out``, and the values that are the
    defaults are left out.
    """
    from gluon_ft.train import TrainConfig

    settings = _read_settings(command, path)
    actions = {a.dest: a for a in command._actions if a.dest not in ("help", "config")}
    if "gluon_ft" in settings:  # a run's config.json
        # Its defaults stay defaults: given, some would read as chosen (--head-lr-mult warns).
        built_in = vars(TrainConfig())
        settings = {
            k: v
            for k, v in settings.items()
            if k in actions and k in built_in and k not in _RUN_ONLY and v != built_in[k]
        }
    settings = {key.replace("-", "_"): value for key, value in settings.items()}
    unknown = sorted(key for key in settings if key not in actions)
    if unknown:
        command.error(
            f"--config {path}: unknown setting(s) {', '.join(unknown)}; the keys are train's "
            "flag names (batch_size or batch-size). `gluon-ft train --help` lists them."
        )
    for key, value in settings.items():
        choices = actions[key].choices
        if choices is not None and not isinstance(value, list) and value not in choices:
            command.error(f"--config {path}: {key} must be one of {', '.join(map(str, choices))}")
    return settings


def _read_settings(command: argparse.ArgumentParser, path: str) -> dict:
    import json
    from pathlib import Path

    file = Path(path)
    try:
        text = file.read_text()
    except OSError as err:
        command.error(f"--config {path}: cannot read it ({err.strerror or err})")
    if file.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            command.error(f"--config {path}: a YAML file needs PyYAML; give a JSON file")
        try:
            settings = yaml.safe_load(text)
        except yaml.YAMLError as err:
            command.error(f"--config {path} is not valid YAML: {err}")
    else:
        try:
            settings = json.loads(text)
        except ValueError as err:
            command.error(f"--config {path} is not valid JSON: {err}")
    if not isinstance(settings, dict):
        command.error(f"--config {path} must hold one object of settings, by flag name")
    return settings


def take_preset(args: argparse.Namespace) -> dict:
    """Put each :class:`PresetValue` of ``args`` by its value; return what the preset set, in
    its order. A preset's ``--lr`` of "find" sets ``lr_find``: train() measures the rate first,
    and ``--lr`` keeps its own default until then."""
    from gluon_ft.train.config import FIND_LR, replaced_by

    # None is the default of the flags that replace others (--lr-spread, --layer-lr-decay)
    given = {n for n, p in vars(args).items() if p is not None and not isinstance(p, PresetValue)}
    for name in replaced_by(given, getattr(args, "lr_schedule", None)):
        if isinstance(getattr(args, name, None), PresetValue):
            setattr(args, name, getattr(args, name).built_in)  # the flag's own default
    applied = {}
    presets = [(n, p) for n, p in vars(args).items() if isinstance(p, PresetValue)]
    for name, preset in sorted(presets, key=lambda item: item[1].order):  # not given
        applied[name] = preset.value
        if name == "lr" and preset.value == FIND_LR:
            args.lr_find = True
            setattr(args, name, preset.built_in)
        else:
            setattr(args, name, preset.value)
    return applied
