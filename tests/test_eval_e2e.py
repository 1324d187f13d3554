"""Both eval scripts end to end on the embedded SmolLM2 with vLLM on CPU, and re-grading."""
import json

import pytest
import yaml

from conftest import DATA, run_here, run_script

from personamath.evaluation import build_parser, run
from personamath.jsonl import read_jsonl, write_jsonl

ROW_FIELDS = {"task", "id", "question", "gold", "prompt", "prompt_version", "completion", "finish_reason",
              "prompt_tokens", "completion_tokens", "paper_extracted", "paper_correct", "verify_extracted",
              "verify_correct", "grading_errors"}


def check_outputs(out_dir, task, n, protocol):
    rows = read_jsonl(out_dir / "generations.jsonl")
    summary = json.loads((out_dir / "summary.json").read_text())
    assert len(rows) == n == summary["n"]
    for row in rows:
        assert ROW_FIELDS <= set(row)
        assert row["finish_reason"] in {"stop", "length"}
        assert row["completion_tokens"] > 0 or row["completion"] == ""
    assert sum(r["completion_tokens"] > 0 for r in rows) >= n // 2  # the model really generated
    for g in ("paper", "verify"):
        assert summary["correct"][g] == sum(r[f"{g}_correct"] for r in rows)
        assert summary["no_answer"][g] == sum(r[f"{g}_extracted"] is None for r in rows)
    assert summary["disagreements"]["count"] == sum(r["paper_correct"] != r["verify_correct"] for r in rows)
    assert summary["tokens"]["completion"] == sum(r["completion_tokens"] for r in rows) > 0
    assert summary["wall_s"]["generation"] > 0 and summary["completion_tokens_per_s"] > 0
    # the protocol, recorded in the summary and in every row (so that re-grading keeps it)
    assert summary["protocol"]["name"] == protocol
    assert all(r["protocol"] == summary["protocol"] for r in rows)
    assert summary["generation"]["sampling"]["stop"] == summary["protocol"]["stop"]
    markdown = (out_dir / "summary.md").read_text()
    assert f"# {task.upper()} evaluation" in markdown and "| paper |" in markdown and "| verify |" in markdown
    return rows, summary


def check_regrading(script, out_dir, tmp_path, task):
    """--generations reproduces the verdicts, and grades edited completions afresh."""
    rows = read_jsonl(out_dir / "generations.jsonl")
    regraded_dir = tmp_path / f"{task}-regraded"
    result = run_script(script, "--generations", str(out_dir / "generations.jsonl"), "--output_dir", str(regraded_dir))
    assert result.returncode == 0, result.stderr
    regraded = read_jsonl(regraded_dir / "generations.jsonl")
    keys = ("paper_extracted", "paper_correct", "verify_extracted", "verify_correct")
    assert [[r[k] for k in keys] for r in regraded] == [[r[k] for k in keys] for r in rows]
    assert json.loads((regraded_dir / "summary.json").read_text())["protocol"] == rows[0]["protocol"]

    # Give two items the right answer: re-grading must now mark exactly those correct by both graders.
    edited = [dict(r) for r in rows]
    for row in edited[:2]:
        row["completion"] = f"Working it out, the result is $\\boxed{{{row['gold']}}}$."
    write_jsonl(tmp_path / "edited.jsonl", edited)
    result = run_script(script, "--generations", str(tmp_path / "edited.jsonl"), "--output_dir", str(tmp_path / "edited"))
    assert result.returncode == 0, result.stderr
    regraded = read_jsonl(tmp_path / "edited" / "generations.jsonl")
    assert all(r["paper_correct"] and r["verify_correct"] for r in regraded[:2])
    assert [[r[k] for k in keys] for r in regraded[2:]] == [[r[k] for k in keys] for r in rows[2:]]


@pytest.mark.slow
def test_eval_gsm8k_cli(tmp_path, embedded_model):
    """The real script, with the authors' flags (--start/--end/--batch_size), their prompt and by default their
    protocol (a shorter --max_tokens is its one deviation, recorded)."""
    out_dir = tmp_path / "gsm8k"
    result = run_script("eval_gsm8k.py", "--model", str(embedded_model), "--data_file", str(DATA / "GSM8K_test.jsonl"),
                        "--start", "100", "--end", "108", "--batch_size", "8", "--max_tokens", "192",
                        "--output_dir", str(out_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| verify |" in result.stdout
    rows, summary = check_outputs(out_dir, "gsm8k", 8, "authors")
    assert summary["protocol"]["deviations"] == ["max_tokens 192 (authors: 4096)"]
    assert [r["id"] for r in rows] == [f"GSM8K_test:{i}" for i in range(101, 109)]
    assert rows[0]["prompt"].endswith("### Response: Let's think step by step.")
    assert summary["generation"]["prompt_version"] == "alpaca.v1"
    check_regrading("eval_gsm8k.py", out_dir, tmp_path, "gsm8k")


def test_eval_math_chat_prompt(tmp_path, vllm_engine, embedded_model):
    out_dir = tmp_path / "math"
    args = build_parser("math").parse_args(["--model", str(embedded_model), "--data_file", str(DATA / "MATH_test.jsonl"),
                                            "--limit", "8", "--max_tokens", "192", "--protocol", "ours",
                                            "--prompt", "chat", "--output_dir", str(out_dir)])
    run("math", args, llm=vllm_engine)
    rows, summary = check_outputs(out_dir, "math", 8, "ours")
    assert rows[0]["prompt"].startswith("<|im_start|>") and "\\boxed{}" in rows[0]["prompt"]
    assert sum(t["paper"]["n"] for t in summary["by_level"].values()) == 8
    assert sum(t["verify"]["n"] for t in summary["by_subject"].values()) == 8
    check_regrading("eval_math.py", out_dir, tmp_path, "math")


def test_eval_math500(tmp_path, vllm_engine, embedded_model):
    args = build_parser("math").parse_args(["--model", str(embedded_model), "--data_file",
                                            str(DATA / "math" / "math500_test.jsonl"), "--limit", "4",
                                            "--max_tokens", "64", "--output_dir", str(tmp_path)])
    summary = run("math", args, llm=vllm_engine)
    assert summary["n"] == 4 and set(summary["by_level"]) <= {"1", "2", "3", "4", "5"}


def test_grading_errors_are_counted_per_grader(tmp_path):
    """Re-grading without a model: each grader's failures, of any kind, are counted apart."""
    nested = "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}"
    completions = ["So she pays \\boxed{5/00}.",  # crashes the authors' GSM8K extraction
                   nested * 20,  # math-verify times out
                   "So she pays \\boxed{18}."]
    write_jsonl(tmp_path / "generations.jsonl", [{"id": str(i), "question": "How much does she pay?", "gold": "18",
                                                  "completion": c} for i, c in enumerate(completions)])
    args = build_parser("gsm8k").parse_args(["--generations", str(tmp_path / "generations.jsonl"), "--output_dir",
                                             str(tmp_path / "out"), "--grading_timeout", "0.5",
                                             "--grading_workers", "1"])
    summary = run("gsm8k", args)
    assert summary["grading_errors"] == {"paper": 1, "verify": 1}
    assert summary["correct"] == {"paper": 1, "verify": 1}
    assert "grading errors (exceptions, timeouts, crashes; graded wrong): paper 1, verify 1" in (
        tmp_path / "out" / "summary.md").read_text()


def eval_recipe(path, gsm8k: dict | None = None, math: dict | None = None):
    """A recipe with both eval sections, small enough for a CPU; `gsm8k` / `math` override a section's keys."""
    shared = {"protocol": "ours", "max_tokens": 24, "limit": 3, "tensor_parallel_size": 1, "sampling_seed": 0}
    path.write_text(yaml.safe_dump({
        "eval_gsm8k": {**shared, "data_file": "data/GSM8K_test.jsonl", **(gsm8k or {})},
        "eval_math": {**shared, "data_file": "data/math/math500_test.jsonl", **(math or {})}}))
    return path


@pytest.mark.slow
def test_evaluate_one_engine_matches_the_scripts_apart(tmp_path, embedded_model):
    """evaluate.py (one engine for both test sets) writes the rows and verdicts that eval_gsm8k.py and
    eval_math.py write run apart (an engine each), from the same recipe."""
    recipe = str(eval_recipe(tmp_path / "recipe.yaml"))
    together, apart = tmp_path / "together", tmp_path / "apart"
    result = run_script("evaluate.py", "--config", recipe, "--model", str(embedded_model), "--output_dir", str(together))
    assert result.returncode == 0, result.stderr[-3000:]
    for task in ("gsm8k", "math"):
        result = run_script(f"eval_{task}.py", "--config", recipe, "--model", str(embedded_model),
                            "--output_dir", str(apart / task))
        assert result.returncode == 0, result.stderr[-3000:]

    keys = ("id", "completion", "paper_correct", "verify_correct", "paper_extracted", "verify_extracted")
    for task in ("gsm8k", "math"):
        rows, summary = check_outputs(together / task, task, 3, "ours")
        rows_apart, summary_apart = check_outputs(apart / task, task, 3, "ours")
        assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in rows_apart], task
        assert summary["correct"] == summary_apart["correct"]
        assert summary["generation"]["sampling"] == summary_apart["generation"]["sampling"]
        assert summary["generation"]["sampling"]["max_tokens"] == 24  # the recipe's section was read
        settings = yaml.safe_load((together / task / f"settings.eval_{task}.yaml").read_text())
        assert settings["config"] == recipe and settings["section"] == f"eval_{task}"
        assert {"data_file", "limit", "max_tokens", "protocol"} <= set(settings["from"]["recipe"])


@pytest.mark.parametrize("setting", ["tensor_parallel_size", "sampling_seed"])
def test_evaluate_refuses_sections_asking_for_different_engines(tmp_path, setting):
    """One engine serves both test sets: sections that want different engines are refused before one starts."""
    recipe = eval_recipe(tmp_path / "recipe.yaml", math={setting: 2})
    result = run_here("evaluate.py", "--config", recipe, "--model", tmp_path / "no-model", "--output_dir", tmp_path / "out")
    assert result.returncode == 2
    assert f"eval_gsm8k and eval_math ask for different {setting}" in result.stderr
    assert not (tmp_path / "out").exists()
