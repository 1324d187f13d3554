"""Recipes as data: one file, a section per script in the script's own argument names, read by the script
itself (--config); flags override it; every value says where it comes from; a bad recipe is named with
its file, line, section and key; each script writes the settings it used beside its outputs."""
import subprocess
import sys

import pytest
import yaml

import chain
from conftest import ROOT, run_here
from personamath.config import SECTIONS, SHARED_PREFIX

RECIPES = sorted(p.stem for p in (ROOT / "configs" / "recipes").glob("*.yaml"))
SEEDS = {"gen_cot": "sampling_seed", "persona_augment": "persona_seed", "build_dataset": "shuffle_seed",
         "train": "seed", "eval_math": "sampling_seed"}


def raw(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / "recipes" / f"{name}.yaml").read_text())


def test_the_three_recipes_exist():
    assert {"embedded", "paper-v1", "paper-v2"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_every_section_is_read_by_its_script_and_every_value_has_its_source(name):
    args = chain.parse_args(["--recipe", name])  # every section parsed by its script's own parser
    recipe = raw(name)
    assert set(args.recipe) == set(SECTIONS) | {"description", "notes"} and recipe["description"].strip()
    notes = recipe["notes"]
    for section in SECTIONS:
        anchors = [a for a in recipe if str(a).startswith(SHARED_PREFIX) and set(recipe[a]) <= set(recipe[section])]
        for key in recipe[section]:
            note = (notes.get(section) or {}).get(key) or next((notes[a][key] for a in anchors
                                                                 if key in (notes.get(a) or {})), None)
            assert note, f"{name}: {section}.{key} has no note"
    for section, seed in SEEDS.items():  # one seed per purpose, each by its own name, all in the recipe
        assert seed in recipe[section], (section, seed)
    assert args.name == name


@pytest.mark.parametrize("name", ["paper-v1", "paper-v2"])
def test_paper_recipes_follow_the_published_protocol(name):
    r = chain.parse_args(["--recipe", name]).recipe
    assert (r["eval_math"]["protocol"], r["train"]["model_max_length"], r["train"]["learning_rate"],
            r["train"]["num_train_epochs"], r["gen_cot"]["answer_format"]) == ("authors", 4096, 2e-5, 3, "boxed")
    assert (r["chain"]["n_gsm8k"], r["chain"]["n_math"], r["eval_gsm8k"]["limit"], r["eval_math"]["limit"]) == (
        "all", "all", None, None)
    assert r["eval_math"]["data_file"] == "data/MATH_test.jsonl" and r["reflection"]["base_url"].startswith("https://")
    assert "not stated" in yaml.safe_dump(raw(name))


def test_overrides_change_the_recipe_an_anchor_changes_every_section_that_merges_it(tmp_path):
    args = chain.parse_args(["--recipe", "paper-v1", "chain.n_math=5", "train.learning_rate=1e-5",
                             "x-llm.temperature=0", "reflection.k=1", "--runs_dir", str(tmp_path)])
    r = args.recipe
    assert (args.n_math, r["chain"]["n_math"], float(r["train"]["learning_rate"])) == (5, 5, 1e-5)
    assert [r[s]["temperature"] for s in ("gen_cot", "persona_augment", "reflection")] == [0, 0, 0]
    assert (r["reflection"]["k"], r["persona_augment"]["k"]) == (1, 3)
    run = chain.Chain(args)
    run.write_recipe()
    written = yaml.safe_load(run.recipe.read_text())
    assert written["chain"]["n_math"] == 5 and written["notes"]["train"]["learning_rate"]
    assert not any(str(k).startswith(SHARED_PREFIX) for k in written)  # anchors expanded: each section whole
    used = yaml.safe_load((run.run_dir / "settings.chain.yaml").read_text())
    assert used["settings"]["n_math"] == 5 and "n_math" in used["from"]["recipe"]


@pytest.mark.parametrize("script,section", [("gen_cot.py", "gen_cot"), ("persona_augment.py", "persona_augment"),
                                            ("reflection.py", "reflection"), ("build_dataset.py", "build_dataset"),
                                            ("train.py", "train"), ("eval_math.py", "eval_math"),
                                            ("eval_gsm8k.py", "eval_gsm8k"), ("chain.py", "chain")])
def test_every_script_names_an_unknown_key_with_file_line_and_section(tmp_path, script, section):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"# mine\n{section}:\n  no_such_setting: 1\n")
    flag = "--recipe" if script == "chain.py" else "--config"
    result = subprocess.run([sys.executable, script, flag, str(recipe)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{recipe}:3: section {section}: unknown setting 'no_such_setting'" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("text,message", [
    ("build_dataset:\n  judge: off\n", ":2: section build_dataset, judge: invalid choice: 'False'"),  # YAML 1.1
    ("gen_cot:\n  num_samples: lots\n", ":2: section gen_cot, num_samples: invalid int value: 'lots'"),
    ("gen_cot:\n  dry_run: 3\n", ":2: section gen_cot, dry_run: --dry_run is a switch: true or false"),
    ("x-llm: &llm\n  nope: 1\ngen_cot:\n  <<: *llm\n", ":2: section gen_cot: unknown setting 'nope'"),  # the anchor's line
    ("gen_cots:\n  num_samples: 2\n", ":1: unknown section 'gen_cots'"),
    ("gen_cot: [\n", ":2: not valid YAML"),
    ("- a list\n", "a recipe is a mapping of sections"),
])
def test_bad_recipe_is_named_and_nothing_is_written(tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    result = subprocess.run([sys.executable, "chain.py", "--recipe", str(recipe), "--runs_dir", str(tmp_path / "runs")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"{recipe}{message}" in result.stderr or (
        message.startswith("a recipe") and message in result.stderr), result.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_a_script_reads_its_section_flags_win_and_it_writes_what_it_used(tmp_path):
    """persona_augment.py --config: the recipe's k and persona_seed, a flag over the recipe's k, and the
    settings it ran with written beside its outputs, each with where it came from."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("x-llm: &llm\n  model: gpt-4o-mini\n  max_tokens: 100\npersona_augment:\n  <<: *llm\n  k: 4\n"
                      "  persona_seed: 7\n  dry_run: true\n")
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen/cot.jsonl").write_text('{"id": "gsm8k/1", "source": "gsm8k", "problem": "What is 2+2?", '
                                            '"gold": "4"}\n')
    result = run_here("persona_augment.py", "--config", str(recipe), "--output_dir", str(tmp_path / "gen"), "--k", "2")
    assert result.returncode == 0, result.stderr
    assert "4 requests" in result.stdout  # k 2 (the flag), not 4 (the recipe): a rewrite and a solve each
    used = yaml.safe_load((tmp_path / "gen/settings.persona_augment.yaml").read_text())
    assert used["config"] == str(recipe) and used["section"] == "persona_augment"
    assert (used["settings"]["k"], used["settings"]["persona_seed"], used["settings"]["max_tokens"]) == (2, 7, 100)
    assert {"k", "output_dir"} <= set(used["from"]["command line"]) and "k" not in used["from"]["recipe"]
    assert {"persona_seed", "max_tokens", "model", "dry_run"} <= set(used["from"]["recipe"])
    assert "temperature" in used["from"]["default"]


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(chain.UserError, match="recipes: .*embedded.*paper-v1"):
        chain.parse_args(["--recipe", "paper-v9"])


def test_an_override_must_name_section_and_key():
    with pytest.raises(chain.UserError, match="SECTION.KEY=VALUE"):
        chain.parse_args(["--recipe", "embedded", "learning_rate=1e-5"])
