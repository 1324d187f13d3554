"""Recipes: one YAML or JSON file with a section per script, named after it, in the script's own argument
names. Every script takes `--config FILE` and reads its own section; flags on its command line override it.

    gen_cot:                 # python gen_cot.py --config FILE
      num_samples: 3
    train:                   # python train.py --config FILE   (and bash run_zero2.sh --config FILE)
      learning_rate: 2.0e-5
    notes:                   # where each value comes from, by section and key
      train: {learning_rate: "the paper's 2e-5"}

A key the script does not take, a value its flag would refuse, a section no script reads: each an error
naming the file, its line, the section and the key. `null` leaves the script's own default. Top-level
keys starting with `x-` are read by no script: they hold YAML anchors for settings several sections
share (`<<: *name`), so that such a setting is written once. A script writes the settings it used,
and where each came from, beside its outputs (`settings_used`), and says on stderr which are not at its
defaults (`settings_line`), so that a run that differs from a hand run with the same flags shows why.
Every script's --help shows each option's default (`DefaultsHelpFormatter`).
"""
import argparse
import copy
import json
import re
import sys
from pathlib import Path

import yaml

from .errors import UserError

SECTIONS = ("chain", "gen_cot", "persona_augment", "reflection", "build_dataset", "train", "eval_gsm8k", "eval_math")
TOP_LEVEL = ("description", "notes")
SHARED_PREFIX = "x-"


def read_recipe(path) -> dict:
    """The whole file, checked: sections, notes and description only, each section a mapping."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        recipe = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else getattr(e, "lineno", None)
        where = f"{path}:{line}" if line else str(path)
        raise UserError(f"{where}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                        f"({getattr(e, 'problem', None) or e})") from None
    if not isinstance(recipe, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections ({', '.join(SECTIONS)})")
    for key, value in recipe.items():
        where = f"{path}:{key_line(path, [key])}"
        if str(key).startswith(SHARED_PREFIX) or key == "description":
            continue
        if key not in SECTIONS + TOP_LEVEL:
            raise UserError(f"{where}: unknown section {key!r} (sections: {', '.join(SECTIONS)}; also description, "
                            f"notes, and {SHARED_PREFIX}NAME for shared anchors)")
        if value is not None and not isinstance(value, dict):
            raise UserError(f"{where}: section {key!r} must be a mapping of settings")
    return recipe


def key_line(path, keys: list[str]) -> int | str:
    """The line of a key (section, then setting) in a YAML file, for error messages; '?' when unknown."""
    try:
        node = yaml.compose(Path(path).read_text())
    except yaml.YAMLError:
        return "?"
    line = "?"
    for key in keys:
        found = None
        for key_node, value_node in (node.value if isinstance(node, yaml.MappingNode) else []):
            if key_node.value == "<<" and isinstance(value_node, yaml.MappingNode):  # a merged anchor
                found = found or next(((k, v) for k, v in value_node.value if k.value == key), None)
            elif key_node.value == key:
                found = (key_node, value_node)
        if found is None:
            return line
        line, node = found[0].start_mark.line + 1, found[1]
    return line


def section(path, name: str) -> dict:
    return read_recipe(path).get(name) or {}


STATES_DEFAULT = re.compile(r"\(default\b")


def shown_default(default) -> str | None:
    """A default as --help shows it, as it is typed on a command line; None where it means "not set"."""
    if default is None or default is False or default is argparse.SUPPRESS or default in ("", []):
        return None
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default))
    return str(default)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help with each option's default after its help, unless the help states it itself, as "(default: X)",
    "(default X, why)" or "X (default): what X does"."""

    def _format_action(self, action):
        shown = shown_default(action.default)
        if shown is not None and not STATES_DEFAULT.search(action.help or ""):
            action = copy.copy(action)
            action.help = " ".join(filter(None, [action.help, f"(default: {shown.replace('%', '%%')})"]))
        return super()._format_action(action)


class RawDescriptionDefaultsHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The same, keeping the description's line breaks (a script's docstring as its description)."""


class RecipeMixin:
    """An argument parser that takes `--config FILE` and reads its `section` of it before the command line.

    The section's settings become flags placed before the command line's, so each goes through the same
    type and choice checks as a flag, and a flag given on the command line wins (argparse keeps the last)."""

    def setup_recipe(self, section_name: str) -> None:
        self.recipe_section = section_name
        raw = issubclass(self.formatter_class, argparse.RawDescriptionHelpFormatter)
        self.formatter_class = RawDescriptionDefaultsHelpFormatter if raw else DefaultsHelpFormatter
        self.allow_abbrev = False  # a recipe's `lr` must not pass for --lr_scheduler_type
        self.add_argument("--config", default=None,
                          help=f"a recipe (YAML or JSON): its `{section_name}` section sets this script's arguments, "
                               "flags given here override them (configs/recipes/, personamath/config.py)")
        self._recipe_origin = None  # (path, section settings, command line) of the last parse
        self._parsing_recipe = None  # the same, while the section is being parsed

    def parse_known_args(self, args=None, namespace=None):
        argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        path = config_path(argv)
        if path is None:
            self._recipe_origin = (None, {}, argv)
            return super().parse_known_args(argv, namespace)
        settings = section(path, self.recipe_section)
        self._recipe_origin = self._parsing_recipe = (path, settings, argv)
        try:
            flags = self.recipe_flags(path, settings)
            return super().parse_known_args(flags + argv, namespace)
        finally:
            self._parsing_recipe = None

    def recipe_flags(self, path, settings: dict) -> list[str]:
        """The section as command-line words; a key no argument of the script takes is an error."""
        actions = {option: action for action in self._actions for option in action.option_strings}
        flags = []
        for key, value in settings.items():
            action = actions.get(f"--{key}")
            if action is None or key == "config":
                known = sorted(o[2:] for o in actions if o.startswith("--") and o not in ("--help", "--config"))
                raise UserError(f"{path}:{key_line(path, [self.recipe_section, key])}: section {self.recipe_section}: "
                                f"unknown setting {key!r} ({self.prog} takes: {', '.join(known)})")
            if value is None:
                continue  # the script's own default
            option = f"--{key}"
            if action.nargs == 0:  # a switch: true sets it, false leaves it off
                if not isinstance(value, bool):
                    self.recipe_error(key, f"{option} is a switch: true or false, not {value!r}")
                if value != bool(action.default):
                    flags.append(option)
            elif isinstance(value, (list, tuple)):
                if action.nargs not in ("+", "*") and not isinstance(action.nargs, int):
                    self.recipe_error(key, f"{option} takes one value, not a list")
                flags += [option, *map(str, value)]
            elif isinstance(value, dict):
                self.recipe_error(key, f"{option} takes a value, not a mapping")
            else:
                flags.append(f"{option}={value}")
        return flags

    def recipe_error(self, key: str, message: str):
        path = self._parsing_recipe[0]
        raise UserError(f"{path}:{key_line(path, [self.recipe_section, key])}: section {self.recipe_section}, "
                        f"{key}: {message}")

    def error(self, message):
        """A bad value in the recipe is named with its file, line, section and key; one on the command line
        is argparse's usual error."""
        parsing = self._parsing_recipe
        if parsing:
            path, settings, argv = parsing
            for key in settings:
                given_here = any(w == f"--{key}" or w.startswith(f"--{key}=") for w in argv)
                if f"argument --{key}:" in message or f"argument --{key}/" in message:
                    if not given_here:
                        hint = (" (YAML reads an unquoted off/no/yes as a boolean: quote it)"
                                if "'False'" in message or "'True'" in message else "")
                        self.recipe_error(key, message.split(": ", 1)[-1] + hint)
        super().error(message)

    def settings_used(self, args: argparse.Namespace | dict) -> dict:
        """Every setting of the last parse with where its value came from: the command line, the recipe
        (its file and section), or the script's default; and those given a value other than the default."""
        path, settings, argv = self._recipe_origin or (None, {}, [])
        values = vars(args) if isinstance(args, argparse.Namespace) else args
        given = {a.dest for a in self._actions for o in a.option_strings
                 if any(w == o or w.startswith(o + "=") for w in argv)}
        from_recipe = {a.dest for a in self._actions for o in a.option_strings
                       if o.startswith("--") and o[2:] in settings and settings[o[2:]] is not None}
        origin = {name: "command line" if name in given else "recipe" if name in from_recipe else "default"
                  for name in values}
        defaults = {a.dest: a.default for a in self._actions}
        changed = sorted(k for k, o in origin.items()
                         if o != "default" and k != "config" and plain(values[k]) != plain(defaults.get(k)))
        return {"script": self.prog, "config": str(path) if path else None, "section": self.recipe_section,
                "command_line": argv, "settings": {k: plain(v) for k, v in values.items()},
                "from": {src: sorted(k for k, o in origin.items() if o == src)
                         for src in ("command line", "recipe", "default")},
                "not_default": changed}


class RecipeParser(RecipeMixin, argparse.ArgumentParser):
    def __init__(self, section_name: str, **kwargs):
        super().__init__(**kwargs)
        self.setup_recipe(section_name)


def config_path(argv: list[str]) -> Path | None:
    """--config FILE (or --config=FILE) of a command line, read before the rest."""
    for i, word in enumerate(argv):
        if word == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config needs a file")
            return Path(argv[i + 1])
        if word.startswith("--config="):
            return Path(word.split("=", 1)[1])
    return None


def plain(value):
    """A value as YAML can write it."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def read_settings_used(output_dir, section_name: str) -> dict:
    """The settings a script wrote to OUTPUT_DIR/settings.SECTION.yaml ({} where it wrote none)."""
    path = Path(output_dir) / f"settings.{section_name}.yaml"
    return ((yaml.safe_load(path.read_text()) or {}).get("settings") or {}) if path.is_file() else {}


def settings_line(used: dict) -> str:
    """One line naming the settings not at the script's defaults, with their values, by where they came from:
    `gen_cot.py: settings not at their defaults: from RECIPE: k=v, ...; from the command line: k=v, ...`."""
    def shown(value):
        return f"[{', '.join(map(str, value))}]" if isinstance(value, list) else str(value)

    groups = []
    for source, where in (("recipe", used["config"]), ("command line", "the command line")):
        named = [f"{k}={shown(used['settings'][k])}" for k in used["from"][source] if k in used["not_default"]]
        if named:
            groups.append(f"from {where}: {', '.join(named)}")
    return f"{used['script']}: settings not at their defaults: {'; '.join(groups) or 'none'}"


def write_settings_used(output_dir, used: dict) -> Path:
    """OUTPUT_DIR/settings.SECTION.yaml: what the script ran with (personamath.config.RecipeMixin.settings_used);
    and its settings_line on stderr, where the run's log shows it first."""
    print(settings_line(used), file=sys.stderr, flush=True)
    path = Path(output_dir) / f"settings.{used['section']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(used, sort_keys=False, allow_unicode=True, width=110))
    return path
