"""Which train questions a run takes, and in which order (personamath/data.py Selection): gen_cot.py's --slice,
--levels, --subjects and --max_solution_chars, and chain.py's --slice, checked on the real data/ files against
orders and counts computed here from the raw records; and gen_cot run on the easy slice."""
import argparse
import json

import pytest
import yaml
from conftest import DATA, run_here

import chain
from fake_server import FakeServerConfig, start_in_thread
from personamath.data import Selection, load_any, load_problems, load_selected, select_records
from personamath.errors import UserError
from personamath.jsonl import read_jsonl

GSM8K = DATA / "gsm8k" / "train.jsonl"
MATH = DATA / "math" / "MATH_train.jsonl"


def raw(path) -> list[tuple[int, dict]]:
    """(line, record) of a JSONL file, read here without the package."""
    with open(path, encoding="utf-8") as f:
        return list(enumerate(map(json.loads, f), start=1))


def gsm8k_easy() -> list[str]:
    """GSM8K ids, fewest <<calculation>> steps of the reference answer first, then the shortest."""
    ordered = sorted(raw(GSM8K), key=lambda lr: (lr[1]["answer"].count("<<"), len(lr[1]["answer"])))
    return [f"train:{line}" for line, _ in ordered]


def math_easy() -> list[str]:
    """MATH ids, level 1 first, then by the length of the solution."""
    ordered = sorted(raw(MATH), key=lambda lr: (lr[1]["level"] != "Level 1", len(lr[1]["solution"])))
    return [record["unique_id"] for _, record in ordered]


def ids(problems) -> list[str]:
    return [p.id for p in problems]


def test_easy_orders_each_task_from_its_easiest_and_keeps_the_files_ids():
    gsm8k_task, gsm8k = load_selected(GSM8K, Selection(order="easy"))
    math_task, math = load_selected(MATH, Selection(order="easy"))
    assert (gsm8k_task, math_task) == ("gsm8k", "math")
    assert ids(gsm8k) == gsm8k_easy() and ids(math) == math_easy()
    assert gsm8k[0].solution.count("<<") == 0 and {p.level for p in math[:564]} == {"1"} and math[564].level != "1"
    lines = dict(raw(GSM8K))
    assert all(lines[p.line]["question"] == p.question for p in gsm8k[:50])  # the id names its line
    # --limit comes after the order; `first` reads only the first lines
    assert ids(load_selected(GSM8K, Selection(order="easy"), limit=7)[1]) == gsm8k_easy()[:7]
    assert ids(load_selected(GSM8K, Selection(), limit=3)[1]) == ["train:1", "train:2", "train:3"]


def test_levels_subjects_and_solution_length_select_what_they_say():
    records = [record for _, record in raw(MATH)]
    levels = load_selected(MATH, Selection(levels=("1", "2")))[1]
    assert ids(levels) == [r["unique_id"] for r in records if r["level"] in ("Level 1", "Level 2")]
    assert len(levels) == 564 + 1348
    counting = load_selected(MATH, Selection(subjects=("Counting & Probability", "Geometry"), levels=("5",)))[1]
    assert ids(counting) == [r["unique_id"] for r in records
                             if r["type"] in ("Counting & Probability", "Geometry") and r["level"] == "Level 5"]
    short = load_selected(MATH, Selection(max_solution_chars=200, order="easy"))[1]
    assert sorted(ids(short)) == sorted(r["unique_id"] for r in records if len(r["solution"]) <= 200)
    assert all(len(p.solution) <= 200 for p in short) and short[0].level == "1"
    # GSM8K has no levels or subjects: those filters leave it whole; the length filter applies to it
    assert len(load_selected(GSM8K, Selection(levels=("1",), subjects=("Algebra",)))[1]) == len(raw(GSM8K))
    assert len(load_selected(GSM8K, Selection(max_solution_chars=100))[1]) == sum(
        len(r["answer"]) <= 100 for _, r in raw(GSM8K))


def test_a_selection_that_keeps_nothing_or_a_bad_value_is_named(tmp_path):
    with pytest.raises(UserError, match=r"MATH_train\.jsonl: none of its 7500 questions passes --slice first "
                                        r"--max_solution_chars 5"):
        load_selected(MATH, Selection(max_solution_chars=5))
    with pytest.raises(UserError, match="--max_solution_chars 0: must be at least 1"):
        Selection(max_solution_chars=0)
    no_solution = tmp_path / "math500.jsonl"
    no_solution.write_text(json.dumps({"problem": "What is 1+1?", "answer": "2", "level": 1}) + "\n")
    with pytest.raises(UserError, match=r"math500\.jsonl: record 1 has no reference solution, which --slice easy "):
        load_selected(no_solution, Selection(order="easy"))
    result = run_here("gen_cot.py", "--levels", "6", "--dry_run")
    assert result.returncode == 2 and "argument --levels: invalid choice: '6'" in result.stderr


def test_chain_slices_are_gen_cots_selection_with_the_train_files_ids(tmp_path):
    """chain.py writes the questions gen_cot.py --slice takes, and a stage reading them gets the train files' ids."""
    run = chain.Chain(argparse.Namespace(runs_dir=tmp_path, name="run", n_gsm8k=3, n_math=5, slice="easy"))
    gsm8k_slice, math_slice = run.write_slices()
    assert ids(load_any(gsm8k_slice)[1]) == gsm8k_easy()[:3] and ids(load_any(math_slice)[1]) == math_easy()[:5]
    assert read_jsonl(gsm8k_slice) == select_records("gsm8k", GSM8K, Selection(order="easy"), 3)
    lines = dict(raw(GSM8K))
    assert [{k: v for k, v in r.items() if k != "idx"} for r in read_jsonl(gsm8k_slice)] == [
        lines[int(i.split(":")[1])] for i in gsm8k_easy()[:3]]  # the records as they are, plus their id


def test_gen_cot_takes_the_easy_slice_by_itself(tmp_path):
    """gen_cot --slice easy --levels 1 --limit 6 against the fake server: the three easiest GSM8K questions
    and the three easiest level-1 MATH ones, under their train files' ids; the run names its settings."""
    problems = load_problems("gsm8k", GSM8K) + load_problems("math", MATH)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"gen_cot": {"timeout": 30, "num_samples": 1}}))
    with start_in_thread(FakeServerConfig(problems=problems)) as server:
        result = run_here("gen_cot.py", "--config", recipe, "--base_url", server.url, "--model", "fake-llm",
                          "--output_dir", tmp_path, "--inputs", GSM8K, MATH, "--slice", "easy", "--levels", "1",
                          "--limit", 6)
    assert result.returncode == 0, result.stderr[-3000:]
    processed = [r["id"] for r in read_jsonl(tmp_path / "cot.jsonl") + read_jsonl(tmp_path / "cot_failed.jsonl")]
    expected = [f"gsm8k/{i}" for i in gsm8k_easy()[:3]] + [f"math/{i}" for i in math_easy()[:3]]
    assert sorted(processed) == sorted(expected)
    assert (f"gen_cot.py: settings not at their defaults: from {recipe}: timeout=30.0; from the command line: "
            in result.stderr)
    assert "levels=[1], limit=6, model=fake-llm" in result.stderr and "slice=easy" in result.stderr
    settings = yaml.safe_load((tmp_path / "settings.gen_cot.yaml").read_text())
    assert (settings["settings"]["slice"], settings["settings"]["levels"]) == ("easy", ["1"])
