"""Every input format the eval scripts accept, detected per file, and the errors for bad input."""
import json

import pytest
from conftest import DATA, run_script

from personamath.data import load_problems
from personamath.errors import UserError
from personamath.evaluation import ALPACA_STOP
from personamath.prompts import load_prompt


@pytest.mark.parametrize("task,path,n,first_gold", [
    ("gsm8k", "GSM8K_test.jsonl", 1319, "18"),              # authors' query/response
    ("gsm8k", "gsm8k/test.jsonl", 1319, "18"),              # original question/answer
    ("gsm8k", "gsm8k/train.jsonl", 7473, "72"),
    ("math", "MATH_test.jsonl", 5000, "2"),                 # authors' instruction/output
    ("math", "math/MATH_test.jsonl", 5000, "2"),            # original problem/solution
    ("math", "math/math500_test.jsonl", 500, "\\left( 3, \\frac{\\pi}{2} \\right)"),  # MATH-500 answer
])
def test_formats(task, path, n, first_gold):
    problems = load_problems(task, DATA / path)
    assert len(problems) == n
    assert problems[0].gold == first_gold
    if task == "math":
        assert problems[0].level in {"1", "2", "3", "4", "5"} and problems[0].subject


def test_authors_files_match_the_originals():
    authors, original = load_problems("math", DATA / "MATH_test.jsonl"), load_problems("math", DATA / "math/MATH_test.jsonl")
    assert [(p.question, p.gold, p.level, p.subject) for p in authors] == \
           [(p.question, p.gold, p.level, p.subject) for p in original]
    assert [p.gold for p in load_problems("gsm8k", DATA / "GSM8K_test.jsonl")] == \
           [p.gold for p in load_problems("gsm8k", DATA / "gsm8k/test.jsonl")]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def good_gsm8k(i):
    return json.dumps({"query": f"What is {i}+1?", "response": f"{i}+1={i + 1}\n#### {i + 1}"})


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [good_gsm8k(1), good_gsm8k(2), '{"query": "x", "resp'])
    with pytest.raises(UserError, match=r"bad\.jsonl:3: malformed JSON"):
        load_problems("gsm8k", path)


def test_a_limit_reads_only_its_records_and_still_names_a_bad_one(tmp_path):
    """gen_cot --limit stops reading at the limit: a bad line after it is not read; one within it is named."""
    path = write_lines(tmp_path / "bad.jsonl", [good_gsm8k(1), good_gsm8k(2), '{"query": "x", "resp'])
    assert [p.gold for p in load_problems("gsm8k", path, limit=2)] == [p.gold for p in load_problems(
        "gsm8k", write_lines(tmp_path / "good.jsonl", [good_gsm8k(1), good_gsm8k(2)]))]
    with pytest.raises(UserError, match=r"bad\.jsonl:3: malformed JSON"):
        load_problems("gsm8k", path, limit=3)
    assert load_problems("gsm8k", path, limit=0) == []


def test_record_without_gold_names_line(tmp_path):
    no_box = json.dumps({"problem": "p", "solution": "no boxed answer"})
    path = write_lines(tmp_path / "m.jsonl", [json.dumps({"problem": "p", "solution": "\\boxed{1}"}), no_box])
    with pytest.raises(UserError, match=r"m\.jsonl:2: no gold answer"):
        load_problems("math", path)
    path = write_lines(tmp_path / "g.jsonl", [good_gsm8k(1), json.dumps({"query": "q", "response": "42"})])
    with pytest.raises(UserError, match=r"g\.jsonl:2: no gold answer"):
        load_problems("gsm8k", path)


def test_wrong_task_format(tmp_path):
    with pytest.raises(UserError, match="not a math record"):
        load_problems("math", DATA / "GSM8K_test.jsonl")


def cli_error(script, *args):
    result = run_script(script, *args, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_cli_bad_input_is_one_line_error(tmp_path, embedded_model):
    model = str(embedded_model)
    assert "no such file" in cli_error("eval_gsm8k.py", "--model", model, "--data_file", str(tmp_path / "none.jsonl"))
    bad = write_lines(tmp_path / "bad.jsonl", [good_gsm8k(1), "{not json"])
    assert f"{bad}:2: malformed JSON" in cli_error("eval_gsm8k.py", "--model", model, "--data_file", str(bad))
    nogold = write_lines(tmp_path / "nogold.jsonl", [json.dumps({"instruction": "p", "output": "no box"})])
    assert f"{nogold}:1: no gold answer" in cli_error("eval_math.py", "--model", model, "--data_file", str(nogold))
    assert "no such directory" in cli_error("eval_math.py", "--model", str(tmp_path / "missing-model"),
                                            "--data_file", str(DATA / "MATH_test.jsonl"))
    assert "--generations" in cli_error("eval_math.py", "--data_file", str(DATA / "MATH_test.jsonl"))


def test_nothing_written_on_bad_input(tmp_path):
    bad = write_lines(tmp_path / "bad.jsonl", ["{not json"])
    out = tmp_path / "out"
    cli_error("eval_gsm8k.py", "--model", "x/y", "--data_file", str(bad), "--output_dir", str(out))
    assert not out.exists()


def test_prompt_templates():
    alpaca = load_prompt("alpaca")
    assert alpaca.version == "alpaca.v1"
    text = alpaca.render(instruction="What is {x}? Put it in \\boxed{}.")
    assert text.endswith("### Instruction:\nWhat is {x}? Put it in \\boxed{}.\n\n### Response: Let's think step by step.")
    assert "\\boxed{}" in load_prompt("chat_math").render(instruction="q")
    with pytest.raises(KeyError):
        alpaca.render(instruction="q", question="a field the template lacks")


def test_stop_strings_do_not_cut_solutions():
    # The authors stopped at bare words; a solution may well use them.
    solutions = ["Question 2 asks for the total. The Response time is 5 s. Instruction: add them. \\boxed{7}",
                 "### Step 1\nUSER input: 3 apples. ASSISTANT count: 4."]
    for text in solutions:
        assert not any(stop in text for stop in ALPACA_STOP)
    next_example = load_prompt("alpaca").render(instruction="q")
    assert any(stop in next_example for stop in ALPACA_STOP)
