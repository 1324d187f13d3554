"""--protocol authors|ours: what each asks vLLM for, what a real generation then does, what the summary
records, and how report.py labels and compares the results. Also GSM8K golds read as the authors did."""
import json

import pytest
from conftest import DATA, run_script

import report
from personamath import evaluation
from personamath.errors import UserError
from personamath.evaluation import ALPACA_STOP, AUTHORS_STOP, build_parser, resolve_protocol, run
from personamath.jsonl import read_jsonl, write_jsonl

# The authors' eval_gsm8k.py / eval_math.py, as read from their repository.
THEIR_STOP = ["Question:", "Question", "USER:", "USER", "ASSISTANT:", "ASSISTANT", "Instruction:", "Instruction",
              "Response:", "Response"]
THEIR_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request.\n\n### Instruction:\n{instruction}\n\n### Response: Let's think step by step.")


def parse(task, *argv):
    return build_parser(task).parse_args(list(argv))


# --- flags ---------------------------------------------------------------------------------------------


def test_protocols_as_resolved_from_the_flags(capsys):
    ours = resolve_protocol(parse("gsm8k", "--protocol", "ours"))
    assert (ours["name"], ours["stop"], ours["max_tokens"], ours["comparable"]) == ("ours", ALPACA_STOP, 4096, False)
    assert resolve_protocol(parse("gsm8k", "--protocol", "ours", "--prompt", "chat"))["stop"] == []
    assert resolve_protocol(parse("gsm8k", "--protocol", "ours", "--max_tokens", "64"))["max_tokens"] == 64

    authors = resolve_protocol(parse("math", "--protocol", "authors"))
    assert AUTHORS_STOP == THEIR_STOP
    assert authors == {"name": "authors", "prompt": "alpaca", "temperature": 0.0, "top_p": 1.0, "max_tokens": 4096,
                       "stop": THEIR_STOP, "deviations": [], "comparable": True}
    assert resolve_protocol(parse("math", "--protocol", "authors", "--max_tokens", "4096")) == authors
    assert capsys.readouterr().err == ""

    # Another budget: applied, warned about, recorded, and no longer comparable.
    shorter = resolve_protocol(parse("gsm8k", "--protocol", "authors", "--max_tokens", "64"))
    assert shorter["max_tokens"] == 64 and shorter["stop"] == THEIR_STOP
    assert shorter["deviations"] == ["max_tokens 64 (authors: 4096)"] and not shorter["comparable"]
    assert "warning: --protocol authors with --max_tokens 64" in capsys.readouterr().err


def test_authors_protocol_refuses_the_chat_prompt_before_loading_a_model():
    result = run_script("eval_math.py", "--protocol", "authors", "--prompt", "chat", "--model", "no/such-model",
                        "--data_file", str(DATA / "MATH_test.jsonl"), timeout=120)
    assert result.returncode == 2
    assert "error: --protocol authors uses the authors' Alpaca prompt; --prompt chat contradicts it" in result.stderr
    with pytest.raises(UserError):
        resolve_protocol(parse("gsm8k", "--protocol", "authors", "--prompt", "chat"))


def test_authors_prompt_is_their_template_character_for_character():
    from personamath.prompts import load_prompt

    prompt = load_prompt("alpaca", evaluation.AUTHORS_PROMPT_VERSION)
    question = "What is {x}? Use \\boxed{}."
    assert prompt.render(instruction=question) == THEIR_TEMPLATE.replace("{instruction}", question)


# --- what vLLM is asked for, and what it does ------------------------------------------------------------


class Recording:
    """The session's engine, recording the SamplingParams each generate call is given; `cap` shortens the
    generation actually run (the request as recorded is left untouched)."""

    def __init__(self, llm, cap=None):
        self.llm, self.cap, self.params = llm, cap, []

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def generate(self, prompts, params, **kwargs):
        self.params += params
        if self.cap:
            params = [p.clone() for p in params]
            for p in params:
                p.max_tokens = min(p.max_tokens, self.cap)
        return self.llm.generate(prompts, params, **kwargs)


@pytest.mark.parametrize("task,data_file", [("gsm8k", DATA / "GSM8K_test.jsonl"),
                                            ("math", DATA / "math" / "math500_test.jsonl")])
def test_authors_protocol_requests_their_sampling(tmp_path, vllm_engine, embedded_model, task, data_file):
    """What run() passes to vLLM under `authors`, with no --max_tokens: their stop list and 4096 tokens
    (generation itself is capped at 8 tokens here, to keep the test short)."""
    engine = Recording(vllm_engine, cap=8)
    args = parse(task, "--model", str(embedded_model), "--data_file", str(data_file), "--limit", "3",
                 "--protocol", "authors", "--output_dir", str(tmp_path))
    summary = run(task, args, llm=engine)
    assert len(engine.params) == 3
    for p in engine.params:
        assert (p.temperature, p.top_p, p.max_tokens, p.stop) == (0.0, 1.0, 4096, THEIR_STOP)
        assert not p.include_stop_str_in_output and not p.ignore_eos
    assert summary["protocol"] == resolve_protocol(parse(task, "--protocol", "authors"))
    assert summary["generation"]["sampling"]["max_tokens"] == 4096
    assert summary["generation"]["sampling"]["stop"] == THEIR_STOP
    assert summary["generation"]["prompt_version"] == "alpaca.v1"
    rows = read_jsonl(tmp_path / "generations.jsonl")
    assert all(r["protocol"]["name"] == "authors" and r["max_tokens"] == 4096 for r in rows)
    assert rows[0]["prompt"] == THEIR_TEMPLATE.replace("{instruction}", rows[0]["question"])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["protocol"]["name"] == "authors" and on_disk["protocol"]["comparable"]
    assert "- protocol: `authors`" in (tmp_path / "summary.md").read_text()


def test_ours_requests_alpaca_stops_and_records_it(tmp_path, vllm_engine, embedded_model):
    engine = Recording(vllm_engine)
    args = parse("gsm8k", "--model", str(embedded_model), "--data_file", str(DATA / "GSM8K_test.jsonl"),
                 "--protocol", "ours", "--limit", "2", "--max_tokens", "8", "--output_dir", str(tmp_path))
    summary = run("gsm8k", args, llm=engine)
    assert [(p.max_tokens, p.stop) for p in engine.params] == [(8, ALPACA_STOP)] * 2
    assert summary["protocol"]["name"] == "ours" and summary["protocol"]["stop"] == ALPACA_STOP
    assert not summary["protocol"]["comparable"]
    assert "- protocol: `ours`" in (tmp_path / "summary.md").read_text()


# Questions after which SmolLM2-135M-Instruct, greedy, writes a bare word of the authors' stop list within
# its first 20 characters (found by generating): the last one in a legitimate solution ("If we know that
# Question A is worth 3 points..."), which the authors' protocol cuts after 4 tokens.
STOP_WORD_QUESTIONS = [
    "Write two quiz questions about adding fractions. Label them Question 1 and Question 2.",
    "Write a short dialogue in which USER asks how many legs 3 cats have and ASSISTANT replies.",
    "A quiz has Question A and Question B. Question A is worth 3 points and Question B is worth 5 points. "
    "How many points is the quiz worth?",
]


def test_stop_lists_in_a_real_generation(tmp_path, vllm_engine, embedded_model):
    """Under `authors` a completion ends right before the first of their stop strings; under `ours` the
    same greedy completion goes on past it (and stops only at the next Alpaca block)."""
    data_file = tmp_path / "questions.jsonl"
    write_jsonl(data_file, [{"query": q, "response": "#### 0"} for q in STOP_WORD_QUESTIONS])
    outputs = {}
    for protocol in ("authors", "ours"):
        out_dir = tmp_path / protocol
        args = parse("gsm8k", "--model", str(embedded_model), "--data_file", str(data_file), "--protocol", protocol,
                     "--max_tokens", "96", "--output_dir", str(out_dir), "--grader", "paper")
        run("gsm8k", args, llm=vllm_engine)
        outputs[protocol] = read_jsonl(out_dir / "generations.jsonl")

    cut = 0
    for authors, ours in zip(outputs["authors"], outputs["ours"], strict=True):
        assert not any(s in authors["completion"] for s in THEIR_STOP)
        assert not any(s in ours["completion"] for s in ALPACA_STOP)
        if authors["finish_reason"] == "stop":
            assert authors["stop_reason"] in THEIR_STOP
        else:
            assert authors["finish_reason"] == "length" and authors["completion_tokens"] == 96
        if ours["finish_reason"] == "stop":
            assert ours["stop_reason"] in ALPACA_STOP or ours["stop_reason"] is None  # None: the EOS token
        # One greedy decoding, cut at the first of their stop strings: ours holds theirs, then the stop word.
        assert ours["completion"].startswith(authors["completion"])
        if authors["finish_reason"] == "stop" and authors["stop_reason"] not in ALPACA_STOP:
            rest = ours["completion"][len(authors["completion"]):]
            assert rest.startswith(authors["stop_reason"]) and len(rest) > len(authors["stop_reason"])
            cut += 1
    assert cut == len(STOP_WORD_QUESTIONS), [(r["completion"], r["finish_reason"]) for r in outputs["ours"]]
    solution = outputs["ours"][2]["completion"]
    assert "Question A is worth" in solution and outputs["authors"][2]["stop_reason"] == "Question"


# --- the gold as the authors read it --------------------------------------------------------------------


def test_gsm8k_golds_with_separators_and_spaces_are_read_as_the_authors_did(tmp_path):
    """The authors' int(gold.replace(',', '')): `2,125` and ` 2125 ` are 2125; through the real CLI."""
    rows = [("2,125", "So the total is \\boxed{2125}.", True),
            (" 2125 ", "So the total is \\boxed{2125}.", True),
            ("2125\n", "So the total is \\boxed{2,125}.", True),
            ("1,234,567", "In total \\boxed{1234567}.", True),
            ("Work: 2000 + 125.\n#### 2,125", "So the total is \\boxed{2125}.", True),  # a whole reference answer
            ("2,125", "So the total is \\boxed{2.125}.", False),  # 2.125 rounds to 2
            ("2,125", "So the total is \\boxed{2125.6}.", False),  # rounds to 2126
            ("2,125", "So the total is 2125.", False),  # no box: the authors extract nothing
            ("2125.5", "So the total is \\boxed{2125.5}.", False)]  # int() fails: it stopped their script
    write_jsonl(tmp_path / "generations.jsonl",
                [{"id": str(i), "question": "How much?", "gold": gold, "completion": completion}
                 for i, (gold, completion, _) in enumerate(rows)])
    result = run_script("eval_gsm8k.py", "--generations", str(tmp_path / "generations.jsonl"), "--grader", "paper",
                        "--output_dir", str(tmp_path / "out"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    graded = read_jsonl(tmp_path / "out" / "generations.jsonl")
    assert [r["paper_correct"] for r in graded] == [expected for _, _, expected in rows]
    assert [r["id"] for r in graded if r["grading_errors"]] == ["8"]
    assert "ValueError" in graded[8]["grading_errors"]["paper"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["correct"] == {"paper": 5} and summary["grading_errors"] == {"paper": 1}
    assert summary["protocol"]["name"] == "unrecorded"  # these rows do not say how they were generated


# --- re-grading keeps the protocol ----------------------------------------------------------------------


def test_regrading_reads_the_protocol_from_the_rows(tmp_path):
    protocol = resolve_protocol(parse("gsm8k", "--protocol", "authors"))
    rows = [{"id": "1", "question": "How much?", "gold": "18", "completion": "\\boxed{18}", "protocol": protocol}]
    write_jsonl(tmp_path / "generations.jsonl", rows)
    summary = run("gsm8k", parse("gsm8k", "--generations", str(tmp_path / "generations.jsonl"), "--grader", "paper",
                                 "--output_dir", str(tmp_path / "out")))
    assert summary["protocol"] == protocol
    with pytest.raises(UserError, match="generated under --protocol authors, not ours"):
        run("gsm8k", parse("gsm8k", "--generations", str(tmp_path / "generations.jsonl"), "--protocol", "ours",
                           "--output_dir", str(tmp_path / "out2")))
    write_jsonl(tmp_path / "mixed.jsonl",
                rows + [{**rows[0], "protocol": resolve_protocol(parse("gsm8k", "--protocol", "ours"))}])
    with pytest.raises(UserError, match="different protocols"):
        run("gsm8k", parse("gsm8k", "--generations", str(tmp_path / "mixed.jsonl"), "--output_dir",
                           str(tmp_path / "out3")))


# --- report.py ------------------------------------------------------------------------------------------


def write_summary(run_dir, label, task, protocol_argv, correct=30, n=100):
    """A summary.json as evaluation.run writes it, for the fields report.py reads."""
    protocol = resolve_protocol(parse(task, *protocol_argv)) if protocol_argv is not None else None
    summary = {"task": task, "model": f"/models/{label}", "n": n, "graders": ["paper", "verify"],
               "accuracy": {"paper": correct / n, "verify": (correct + 1) / n},
               "correct": {"paper": correct, "verify": correct + 1},
               "generation": {"data_file": f"data/{task}.jsonl", "prompt_version": "alpaca.v1",
                              "sampling": {"max_tokens": protocol["max_tokens"] if protocol else 4096}}}
    if protocol is not None:
        summary["protocol"] = protocol
    path = run_dir / "eval" / label / task / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))


def results_rows(run_dir):
    text = report.write_report(run_dir)
    results = text.split("## Results")[1].split("\n## ")[0]
    lines = [line for line in results.splitlines() if line.startswith("| ")]
    return lines[0], {line.split(" | ")[0][2:]: line for line in lines[1:]}, results


def test_report_labels_columns_and_compares_only_under_authors(tmp_path):
    for task in ("gsm8k", "math"):
        write_summary(tmp_path, "PersonaMath-Qwen2.5-7B", task, ["--protocol", "authors"])
    header, rows, _ = results_rows(tmp_path)
    assert header.startswith("| model | GSM8K paper (authors) | GSM8K verify (authors) | MATH paper (authors) |")
    assert rows["PersonaMath-Qwen2.5-7B"].endswith("| 30.0 (30/100) | 31.0 (31/100) | 84.3 | 56.6 |")

    ours = tmp_path / "ours"
    for task in ("gsm8k", "math"):
        write_summary(ours, "PersonaMath-Qwen2.5-7B", task, ["--protocol", "ours"])
    header, rows, results = results_rows(ours)
    assert "GSM8K paper (ours)" in header and "MATH verify (ours)" in header and "(authors)" not in header
    assert rows["PersonaMath-Qwen2.5-7B"].endswith("| not shown (ours) | not shown (ours) |")
    assert "84.3" not in results and "Published figures are shown only beside evaluations generated under " \
                                       "the authors' protocol" in results
    assert "PersonaMath-Qwen2.5-7B / gsm8k (protocol ours)" in results


def test_report_mixed_protocols_deviations_and_unrecorded(tmp_path):
    write_summary(tmp_path, "PersonaMath-Qwen2.5-7B", "gsm8k", ["--protocol", "authors"])
    write_summary(tmp_path, "PersonaMath-Qwen2.5-7B", "math", ["--protocol", "authors", "--max_tokens", "512"])
    write_summary(tmp_path, "Llama-2-7b-hf", "gsm8k", ["--protocol", "ours"])
    write_summary(tmp_path, "Llama-2-7b-hf", "math", None)  # written before protocols were recorded
    write_summary(tmp_path, "mine", "gsm8k", ["--protocol", "ours"])
    header, rows, results = results_rows(tmp_path)
    assert "| GSM8K paper (authors/ours) |" in header and "| MATH paper (authors*/unrecorded) |" in header
    # Mixed columns tag each cell; only the unchanged authors' run sits beside a published figure.
    assert rows["PersonaMath-Qwen2.5-7B"].startswith("| PersonaMath-Qwen2.5-7B | 30.0 (30/100) [authors] |")
    assert rows["PersonaMath-Qwen2.5-7B"].endswith("| 84.3 | not shown (authors*) |")
    assert rows["Llama-2-7b-hf"].endswith("| not shown (ours) | not shown (unrecorded) |")
    assert rows["mine"].endswith("| — | — |")  # not a published model: nothing to show or explain
    assert "PersonaMath-Qwen2.5-7B / math (protocol authors with max_tokens 512 (authors: 4096))" in results
    assert "Llama-2-7b-hf / math (protocol not recorded" in results
    assert "mine / gsm8k" not in results.split("Not shown for:")[1].split("\n")[0]
