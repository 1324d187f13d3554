"""Issue 22, point 4: every script's --help shows each option's default; the eval scripts run as the authors'
README runs them evaluate under the authors' protocol; a script says, as it starts, which settings are not
at its defaults and where each came from (a recipe or the command line)."""
import argparse
import contextlib
import io
import re
import runpy
import sys
from enum import Enum

import pytest
import yaml
from conftest import ROOT

import evaluate
import gen_cot
from personamath.config import read_settings_used, write_settings_used
from personamath.evaluation import AUTHORS_STOP, build_parser, resolve_protocol

SCRIPTS = ["gen_cot.py", "persona_augment.py", "reflection.py", "build_dataset.py", "train.py", "evaluate.py",
           "eval_gsm8k.py", "eval_math.py", "report.py", "chain.py"]
IN_WORDS = {"--end": "(default: the end of the file)"}  # defaults only words can tell (sys.maxsize)


def help_of(script: str, monkeypatch) -> tuple[argparse.ArgumentParser, str]:
    """`python SCRIPT --help` (its __main__ block, run in this process) and the parser that printed it."""
    printed = []
    format_help = argparse.ArgumentParser.format_help

    def recording(parser):
        printed.append(parser)
        return format_help(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "format_help", recording)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    out = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert exit_.value.code in (0, None) and len(printed) == 1, script
    return printed[0], out.getvalue()


def entries(text: str) -> dict[str, str]:
    """The help text of each option in a --help output, by its first option string, spaces made single."""
    found, current = {}, None
    for line in text.splitlines():
        start = re.match(r"  (--?[\w-]+)(.*)", line)  # an option's first line: its invocation, maybe its help
        if start:
            current = start.group(1)
            invocation_and_help = re.split(r"\s{2,}", start.group(2).strip(), maxsplit=1)
            found[current] = invocation_and_help[1] if len(invocation_and_help) == 2 else ""
        elif current and line.startswith("   "):
            found[current] += " " + line.strip()
        else:
            current = None
    return {option: " ".join(help_text.split()) for option, help_text in found.items()}


def typed(default) -> str:
    """A default as one types it, relative to the repository (the help may name a path either way)."""
    if isinstance(default, Enum):
        default = default.value
    text = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
    return text.replace(f"{ROOT}/", "")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default_once(script, monkeypatch):
    parser, text = help_of(script, monkeypatch)
    helps = entries(text)
    checked = 0
    for action in parser._actions:
        default = action.default
        if (not action.option_strings or action.help == argparse.SUPPRESS or default is None or default is False
                or default is argparse.SUPPRESS or default == "" or default == []):
            continue
        option = action.option_strings[0]
        expected = IN_WORDS.get(option, typed(default))
        assert expected in helps[option].replace(f"{ROOT}/", ""), (script, option, expected, helps[option])
        assert helps[option].count("(default: ") <= 1, (script, option, helps[option])
        checked += 1
    assert checked or script in ("report.py",), script  # report.py's one option is required
    assert "(default: None)" not in text and "(default: False)" not in text


def test_help_examples(monkeypatch):
    """What a user reads: the default after the help, or the help's own words where it tells it."""
    gen = entries(help_of("gen_cot.py", monkeypatch)[1])
    assert gen["--num_samples"] == "attempts per question before it goes to reflection (default: 1)"
    assert gen["--concurrency"].endswith("(the paper recipes: 256) (default: 32)")
    assert gen["--inputs"].endswith("(default: data/gsm8k/train.jsonl data/math/MATH_train.jsonl)")
    assert gen["--answer_format"].startswith("what counts as") and "(default: " not in gen["--answer_format"]
    evaluation = entries(help_of("eval_math.py", monkeypatch)[1])
    assert evaluation["--protocol"].startswith("authors (default): the authors' eval scripts exactly")
    assert evaluation["--tensor_parallel_size"] == "(default: 1)"


# --- hand runs as the authors' README writes them --------------------------------------------------------


@pytest.mark.parametrize("task,data_file", [("gsm8k", "data/GSM8K_test.jsonl"), ("math", "data/MATH_test.jsonl")])
def test_the_authors_command_line_evaluates_under_their_protocol(task, data_file):
    """`python eval_TASK.py --model PATH --data_file FILE`, as the authors' README has it, generates as their
    script did and is compared with the published table; the embedded demo's recipe still asks for ours."""
    protocol = resolve_protocol(build_parser(task).parse_args(["--model", "PATH", "--data_file", data_file]))
    assert (protocol["name"], protocol["stop"], protocol["max_tokens"], protocol["comparable"]) == (
        "authors", AUTHORS_STOP, 4096, True)
    for recipe, expected in (("embedded", "ours"), ("paper-v1", "authors")):
        config = str(ROOT / "configs" / "recipes" / f"{recipe}.yaml")
        args, _ = evaluate.task_args(task, argparse.Namespace(config=config, model="PATH", output_dir="out"), [])
        assert resolve_protocol(args)["name"] == expected, recipe


# --- the settings that are not at a script's defaults ------------------------------------------------------


def test_a_script_names_its_settings_not_at_their_defaults_and_where_each_came_from(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    # timeout differs from gen_cot's default; num_samples is the default; max_tokens is overridden by a flag
    recipe.write_text(yaml.safe_dump({"gen_cot": {"timeout": 300, "num_samples": 1, "max_tokens": 288}}))
    parser = gen_cot.build_parser()
    args = parser.parse_args(["--config", str(recipe), "--max_tokens", "100", "--slice", "easy", "--output_dir",
                              str(tmp_path / "out"), "--grading_timeout", "10"])
    write_settings_used(tmp_path / "out", parser.settings_used(args))
    assert capsys.readouterr().err == (
        f"gen_cot.py: settings not at their defaults: from {recipe}: timeout=300.0; from the command line: "
        f"max_tokens=100, output_dir={tmp_path / 'out'}, slice=easy\n")
    assert read_settings_used(tmp_path / "out", "gen_cot")["timeout"] == 300.0

    write_settings_used(tmp_path / "plain", parser.settings_used(parser.parse_args(["--levels", "1", "2"])))
    assert capsys.readouterr().err == ("gen_cot.py: settings not at their defaults: from the command line: "
                                       "levels=[1, 2]\n")
    write_settings_used(tmp_path / "plain", parser.settings_used(parser.parse_args([])))
    assert capsys.readouterr().err == "gen_cot.py: settings not at their defaults: none\n"
