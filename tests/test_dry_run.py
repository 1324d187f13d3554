"""--dry_run prices a run before anything is sent: expected (at the stated yields and answer length) and
the worst case (every request a stage may send, each at the prompt bound --max_cost reserves plus
--max_tokens), for each stage before its input exists, and for the whole chain. Against the fake server,
which counts every request it gets: none may reach it."""
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import DATA, ROOT, run_here, run_script

from fake_server import FakeServerConfig, start_in_thread
from personamath.data import load_problems
from personamath.jsonl import write_jsonl
from personamath.llm import cost_of, price_of, prompt_tokens_bound
from personamath.stage import usd
from personamath.steps import solve_messages

GSM8K = DATA / "gsm8k" / "train.jsonl"
N = 10
PRICE = price_of("gpt-4o-mini", "https://api.openai.com/v1")


@pytest.fixture(scope="module")
def server():
    with start_in_thread(FakeServerConfig(problems=load_problems("gsm8k", GSM8K)[:N])) as srv:
        yield srv


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    """N GSM8K train questions, as gen_cot is given them."""
    path = tmp_path_factory.mktemp("questions") / "gsm8k_train_slice.jsonl"
    write_jsonl(path, [json.loads(line) for line in GSM8K.read_text().splitlines()[:N]])
    return path


def dry_run(script, server, out, *extra):
    """The stage's --dry_run, priced at gpt-4o-mini's prices: its output and its estimate.json."""
    before = server.stats()["requests"]
    result = run_here(script, "--base_url", server.url, "--model", "gpt-4o-mini", "--output_dir", out, *extra,
                      "--dry_run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert server.stats()["requests"] == before  # nothing sent
    name = {"gen_cot.py": "gen_cot", "persona_augment.py": "persona_augment", "reflection.py": "reflection"}[script]
    return result.stdout, json.loads((out / f"{name}.estimate.json").read_text())


def test_worst_case_is_every_request_at_its_bound_and_max_tokens(server, questions, tmp_path):
    prompts = [prompt_tokens_bound(solve_messages(p.question)) for p in load_problems("gsm8k", questions)]
    worst = {}
    for max_tokens in (1000, 2000):
        out, est = dry_run("gen_cot.py", server, tmp_path / str(max_tokens), "--inputs", questions,
                           "--max_tokens", max_tokens, "--num_samples", 2)
        # 2 attempts per question at most; the second only for the 30% not solved at once (expected)
        assert (est["requests"], est["to_send"]) == (2 * N, 2 * N) and est["requests_expected"] == pytest.approx(1.3 * N)
        assert (est["prompt_tokens_worst"], est["completion_tokens_worst"]) == (2 * sum(prompts), 2 * N * max_tokens)
        assert est["cost_usd_worst"] == pytest.approx(cost_of(PRICE, 2 * sum(prompts), 2 * N * max_tokens))
        assert est["completion_tokens_est"] == round(1.3 * N * 400)  # --dry_run_output_tokens
        assert est["cost_usd_worst"] > est["cost_usd_est"] > 0
        assert f"estimated cost {usd(est['cost_usd_est'])} expected, {usd(est['cost_usd_worst'])} worst case" in out
        assert f"every answer {max_tokens:,} tokens" in out and "--dry_run_solved_share" in out
        worst[max_tokens] = est["cost_usd_worst"]
    assert worst[2000] - worst[1000] == pytest.approx(2 * N * 1000 * PRICE["output"] / 1e6)

    # an expected answer is never longer than --max_tokens allows
    _, short = dry_run("gen_cot.py", server, tmp_path / "short", "--inputs", questions, "--max_tokens", 100)
    assert short["output_tokens_expected"] == 100 and short["cost_usd_worst"] >= short["cost_usd_est"]


def test_later_stages_are_priced_before_their_inputs_exist(server, questions, tmp_path):
    k, max_tokens = 2, 500
    common = ["--k", k, "--max_tokens", max_tokens, "--dry_run_inputs", questions]

    out, persona = dry_run("persona_augment.py", server, tmp_path, *common)
    # rewrite + solve per persona: 70% of the questions solved (expected), every one (worst case)
    assert (persona["to_send"], persona["requests_expected"]) == (N * k * 2, pytest.approx(0.7 * N * k * 2))
    assert f"{tmp_path / 'cot.jsonl'} does not exist yet" in out and "70% of them solved by gen_cot" in out
    assert persona["assumed"] in out

    out, reflection = dry_run("reflection.py", server, tmp_path, *common)
    # reflect; then, for the corrected half, k x (rewrite + solve + a reflection for 30% of them)
    assert reflection["to_send"] == N * (1 + k * 3)
    assert reflection["requests_expected"] == pytest.approx(0.3 * N * (1 + 0.5 * k * (2 + 0.3)), abs=0.05)
    assert "30% of them failed by gen_cot" in out and "--dry_run_corrected_share" in out
    # each of the N x (1 + k) reflections quotes a wrong attempt not known yet: --max_tokens long in the worst case
    _, longer = dry_run("reflection.py", server, tmp_path, *common, "--max_tokens", 2 * max_tokens)
    assert longer["prompt_tokens_worst"] - reflection["prompt_tokens_worst"] == N * (1 + k) * max_tokens
    assert longer["prompt_tokens_est"] == reflection["prompt_tokens_est"]  # expected: answers of 400 tokens
    assert reflection["cost_usd_worst"] == pytest.approx(cost_of(PRICE, reflection["prompt_tokens_worst"],
                                                                 reflection["to_send"] * max_tokens))
    assert reflection["cost_usd_worst"] > reflection["cost_usd_est"] > 0

    _, likelier = dry_run("reflection.py", server, tmp_path, *common, "--dry_run_solved_share", "0.9")
    assert likelier["cost_usd_est"] == pytest.approx(reflection["cost_usd_est"] / 3, rel=0.01)
    assert likelier["cost_usd_worst"] == reflection["cost_usd_worst"]  # every question, whatever the yield

    # Once gen_cot has written its output, that is what is priced, each row for sure.
    write_jsonl(tmp_path / "cot.jsonl", [{"id": f"gsm8k/{p.id}", "source": "gsm8k", "problem": p.question,
                                          "gold": p.gold} for p in load_problems("gsm8k", questions)[:5]])
    out, real = dry_run("persona_augment.py", server, tmp_path, *common)
    assert (real["to_send"], real["requests_expected"]) == (5 * k * 2, 5 * k * 2) and "does not exist" not in out

    # A run that sends needs its input.
    missing = run_here("reflection.py", "--base_url", server.url, "--output_dir", tmp_path / "none")
    assert missing.returncode == 2 and "cot_failed.jsonl: no such file" in missing.stderr


def test_chain_dry_run_prices_every_stage_expected_and_worst(server, tmp_path):
    result = run_script("chain.py", "--runs_dir", str(tmp_path), "--name", "dry", "chain.n_gsm8k=5", "chain.n_math=5",
                        "chain.serve_embedded=false", f"x-llm.base_url={server.url}", "x-llm.model=gpt-4o-mini",
                        "--dry_run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert server.stats()["requests"] == 0
    out = result.stdout
    plan = tmp_path / "dry" / "dry_run"
    estimates = {name: json.loads((plan / f"{name}.estimate.json").read_text())
                 for name in ("gen_cot", "persona_augment", "reflection")}
    for name, est in estimates.items():
        assert f"{name} --dry_run: " in out and est["cost_usd_worst"] >= est["cost_usd_est"] > 0
        assert re.search(rf"chain --dry_run: {name} +{est['requests_expected']:,.0f} +{est['to_send']:,} ", out)
    assert "70% of them solved by gen_cot" in out and "30% of them failed by gen_cot" in out
    # the embedded recipe's max_tokens (288) is below --dry_run_output_tokens (400): answers of 288 expected
    assert estimates["gen_cot"]["output_tokens_expected"] == 288
    total = re.search(r"chain --dry_run: at most ([\d,]+) requests to send, estimated cost \$([\d.,]+) expected, "
                      r"\$([\d.,]+) worst case", out)
    assert float(total[2]) == pytest.approx(sum(e["cost_usd_est"] for e in estimates.values()), abs=0.0006)
    # The worst case of the run: each question solved or failed, whichever costs more. Reflection (limit 8)
    # prices the first 8 of the 10 questions: reflect, then 2 x (rewrite, solve, reflect), more than
    # persona_augment's 2 x (rewrite, solve) for the same question; the last 2 only persona_augment prices.
    gen_cot, persona, reflection = estimates.values()
    assert (gen_cot["to_send"], persona["to_send"], reflection["to_send"]) == (10 * 3, 10 * 2 * 2, 8 * (1 + 2 * 3))
    assert int(total[1]) == 10 * 3 + 8 * (1 + 2 * 3) + 2 * 2 * 2
    last_two = sum(cost_of(PRICE, prompt, n * 288) for question, (n, prompt) in persona["worst_by_question"].items()
                   if question not in reflection["worst_by_question"])
    assert float(total[3]) == pytest.approx(gen_cot["cost_usd_worst"] + reflection["cost_usd_worst"] + last_two,
                                            abs=0.0006)
    assert float(total[3]) < sum(e["cost_usd_worst"] for e in estimates.values())


def test_chain_dry_run_of_a_paper_recipe_needs_no_key(tmp_path):
    """The README's pricing command, on OpenAI's endpoint without a key: nothing is sent, so none is needed."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    result = subprocess.run([sys.executable, "chain.py", "--recipe", "paper-v2", "--runs_dir", str(tmp_path),
                             "chain.n_gsm8k=3", "chain.n_math=3", "--dry_run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # gen_cot 6, then for each question the costlier way: reflection's 1 + 3 x (rewrite + solve + reflect)
    assert "chain --dry_run: at most 66 requests to send" in result.stdout, result.stdout
