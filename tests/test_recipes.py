"""Recipes as data: every recipe resolves, says where each setting comes from, and is what the chain
uses; flags override it and the override is recorded; a bad recipe is named with its file."""
import subprocess
import sys

import pytest
import yaml

import chain
from conftest import ROOT

RECIPES = sorted(p.stem for p in (ROOT / "configs" / "recipes").glob("*.yaml"))


def test_the_three_recipes_exist():
    assert {"embedded", "paper-v1", "paper-v2"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_resolves_and_every_setting_has_its_source(name):
    recipe = yaml.safe_load((ROOT / "configs" / "recipes" / f"{name}.yaml").read_text())
    args = chain.parse_args(["--recipe", name])
    assert set(recipe["settings"]) == set(chain.recipe_dests(chain.build_parser()))  # all of them, no defaults
    assert set(recipe["notes"]) == set(recipe["settings"]) and all(recipe["notes"].values())
    assert args.overridden == [] and args.name == name and recipe["description"].strip()


@pytest.mark.parametrize("name", ["paper-v1", "paper-v2"])
def test_paper_recipes_follow_the_published_protocol(name):
    a = chain.parse_args(["--recipe", name])
    assert (a.protocol, a.max_length, a.lr, a.epochs, a.answer_format) == ("authors", 4096, 2e-5, 3, "boxed")
    assert (a.n_gsm8k, a.n_math, a.eval_gsm8k, a.eval_math) == (None, None, None, None)  # all of each set
    assert a.math_test_file == ROOT / "data" / "MATH_test.jsonl" and a.llm_url.startswith("https://")
    assert "not stated" in yaml.safe_dump(yaml.safe_load((ROOT / f"configs/recipes/{name}.yaml").read_text()))


def test_flags_override_the_recipe_and_the_resolved_recipe_says_so(tmp_path):
    args = chain.parse_args(["--recipe", "paper-v1", "--n_math", "5", "--lr", "1e-5", "--train_args=--max_steps 2",
                             "--runs_dir", str(tmp_path)])
    assert (args.n_math, args.lr, args.train_args) == (5, 1e-5, "--max_steps 2")
    assert args.overridden == ["lr", "n_math", "train_args"]
    written = yaml.safe_load(chain.write_resolved_recipe(args, tmp_path).read_text())
    assert written["settings"]["n_math"] == 5 and written["settings"]["n_gsm8k"] is None
    assert written["overridden_on_the_command_line"] == ["lr", "n_math", "train_args"]
    assert written["notes"]["lr"] and written["recipe"].endswith("paper-v1.yaml")


@pytest.mark.parametrize("text,message", [
    ("settings:\n  decontam_judge: off\n", "invalid choice: 'False'"),  # YAML 1.1 reads off as false
    ("settings:\n  no_such_setting: 1\n", "unknown settings no_such_setting"),
    ("settings:\n  n_gsm8k: 2\n", "settings missing, and not given as flags: llm_url"),
    ("settings:\n  n_gsm8k: lots\n", "argument --n_gsm8k: invalid count value: 'lots'"),
    ("settings: [\n", ":2: not valid YAML"),
    ("- a list\n", "a recipe is a mapping with `settings`"),
])
def test_bad_recipe_is_named_and_nothing_is_written(tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    result = subprocess.run([sys.executable, "chain.py", "--recipe", str(recipe), "--runs_dir", str(tmp_path / "runs")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and str(recipe) in result.stderr and message in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(chain.UserError, match="recipes: .*embedded.*paper-v1"):
        chain.parse_args(["--recipe", "paper-v9"])
