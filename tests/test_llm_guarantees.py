"""The LLM client's promises, tried against the fake server over real HTTP: a hard budget at any
concurrency, a cache keyed by the exact request and its endpoint, permanent errors as rejections that
let a run finish, and persona rewrites checked before a request is spent on solving them."""
import json

import pytest
from conftest import DATA, run_here

from personamath.data import load_problems
from fake_server import FakeServerConfig, start_in_thread
from personamath.jsonl import read_jsonl, write_jsonl
from personamath.llm import cost_of, price_of, prompt_tokens_bound
from personamath.rewrites import numbers, rewrite_problem

GSM8K = DATA / "gsm8k" / "train.jsonl"
MATH = DATA / "math" / "MATH_train.jsonl"
N = 12


def problems():
    return load_problems("gsm8k", GSM8K)[:N] + load_problems("math", MATH)[:N]


def server(**overrides):
    return start_in_thread(FakeServerConfig(problems=problems(), **overrides))


def gen_cot(srv, out, *extra, concurrency=8):
    return run_here("gen_cot.py", "--base_url", srv.url, "--model", "fake-llm", "--output_dir", out, "--inputs", GSM8K,
                    MATH, "--limit", 2 * N, "--num_samples", 2, "--concurrency", concurrency, "--timeout", 5, *extra)


def server_spend(srv, model="gpt-4o-mini") -> float:
    """What the server billed: every answer it sent, at the usage it reported."""
    usage = srv.stats()["usage"]
    return cost_of(price_of(model, "https://api.openai.com/v1"), usage["prompt_tokens"], usage["completion_tokens"])


# --- a hard budget ---------------------------------------------------------------------------------


def test_prices_file_of_ones_own(tmp_path):
    """--prices prices a model the package does not know, and the cap holds at that price; a broken
    prices file is named."""
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"models": {"my-model": {"input": 1000.0, "output": 1000.0}}}))
    with server() as srv:
        result = gen_cot(srv, tmp_path / "out", "--model", "my-model", "--prices", str(prices), "--max_cost", "0.5",
                         "--max_tokens", "64")
        usage = srv.stats()["usage"]
    stats = json.loads((tmp_path / "out" / "cot.stats.json").read_text())
    assert result.returncode == 3 and stats["ledger"]["cost_usd"] > 0  # $1000/M tokens: the cap stops it
    assert cost_of(price_of("my-model", srv.url, prices), usage["prompt_tokens"], usage["completion_tokens"]) <= 0.5
    prices.write_text("{not json")
    with server() as srv:
        broken = gen_cot(srv, tmp_path / "out2", "--model", "my-model", "--prices", str(prices))
    assert broken.returncode == 2 and str(prices) in broken.stderr and "not a prices file" in broken.stderr


@pytest.mark.parametrize("concurrency", [1, 64])
@pytest.mark.parametrize("cap", [0.00002, 0.0002, 0.002])
def test_max_cost_is_never_exceeded(tmp_path, concurrency, cap):
    with server() as srv:
        result = gen_cot(srv, tmp_path, "--model", "gpt-4o-mini", "--max_cost", str(cap), "--max_tokens", "256",
                         concurrency=concurrency)
        spent_by_server = server_spend(srv)
        sent = srv.stats()["requests"]
    stats = json.loads((tmp_path / "cot.stats.json").read_text())
    assert spent_by_server <= cap and stats["spent_usd_at_most"] <= cap, (spent_by_server, stats["spent_usd_at_most"])
    # the client's account is an upper bound (summed in another order than the server's: a float's rounding)
    assert stats["spent_usd_at_most"] >= spent_by_server * (1 - 1e-9)
    if result.returncode == 3:  # stopped at the cap: said so, with what was spent and how to go on
        assert "spent at most $" in result.stderr and f"--max_cost ${cap}" in result.stderr
        assert "rerun with a higher --max_cost" in result.stderr and not stats["complete"]
    else:  # the cap was enough for everything
        assert result.returncode == 0, result.stderr[-2000:]
        assert stats["complete"]
    if cap == 0.00002:  # not even one request's worst case fits: none is sent
        assert sent == 0 and result.returncode == 3


def test_budget_stop_then_higher_cap_pays_nothing_twice(tmp_path):
    # the whole run costs ~$0.0012 at these answers' lengths; $0.0006 stops it whatever the timing (a cap
    # above the whole cost stops it only while enough requests in flight reserve their worst case)
    with server() as srv:
        stopped = gen_cot(srv, tmp_path, "--model", "gpt-4o-mini", "--max_tokens", "256", "--max_cost", "0.0006",
                          concurrency=16)
        assert stopped.returncode == 3, stopped.stderr[-2000:]
        answered_before = srv.stats()["completed"]
        finished = gen_cot(srv, tmp_path, "--model", "gpt-4o-mini", "--max_tokens", "256", "--max_cost", "1",
                           concurrency=16)
        assert finished.returncode == 0, finished.stderr[-2000:]
        after = srv.stats()
    with server() as fresh:
        straight = gen_cot(fresh, tmp_path / "straight", "--model", "gpt-4o-mini", "--max_tokens", "256")
        assert straight.returncode == 0
        needed = fresh.stats()["completed"]
        assert server_spend(fresh) > 0.0006  # so the cap above stops the run by what is spent, not by timing
    assert answered_before > 0 and after["completed"] == needed  # every answer was paid for once
    assert read_jsonl(tmp_path / "cot.jsonl") == read_jsonl(tmp_path / "straight" / "cot.jsonl")


def test_prompt_token_bound_holds_for_a_real_tokenizer(embedded_model):
    """The bound is above the count of a real tokenizer, for English, LaTeX and other scripts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    texts = [p.question for p in problems()] + ["Ünïcödé ∑ ∫ √ 数学 ½ 🙂" * 20, "\\frac{\\pi}{2}" * 50, " " * 300]
    for text in texts:
        messages = [{"role": "user", "content": text}]
        real = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        assert prompt_tokens_bound(messages) >= real


# --- cache identity ----------------------------------------------------------------------------------


def test_cache_key_is_the_exact_request_and_endpoint(tmp_path):
    cache = tmp_path / "cache.sqlite"
    base = ["--cache", str(cache), "--num_samples", "1", "--limit", "6"]
    with server() as srv, server() as other:
        def sent(target, *extra) -> int:
            before = target.stats()["requests"]
            result = run_here("gen_cot.py", "--base_url", target.url, "--model", "fake-llm", "--output_dir",
                              tmp_path / "out", "--inputs", GSM8K, *base, *extra)
            assert result.returncode in (0, 1), result.stderr[-2000:]
            return target.stats()["requests"] - before

        assert sent(srv) == 6
        assert sent(srv) == 0  # the same run again: all from the cache
        for change in (["--sampling_seed", "1"], ["--temperature", "0.5"], ["--max_tokens", "100"], ["--model", "fake-llm-2"]):
            assert sent(srv, *change) == 6, change
            assert sent(srv, *change) == 0, change
        assert sent(other) == 6  # another endpoint serving a model of the same name
        assert sent(other) == 0


# --- permanent errors --------------------------------------------------------------------------------


def test_permanent_errors_are_rejections_and_the_run_completes(tmp_path):
    with server(faults={"400": 0.25}) as srv:
        result = gen_cot(srv, tmp_path)
        refused = srv.stats()["faults"]["400"]
        again = gen_cot(srv, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]  # completes; a rerun does too
    assert again.returncode == 0, again.stderr[-2000:]
    stats = json.loads((tmp_path / "cot.stats.json").read_text())
    rejected = stats["rejected_by_server"]
    assert 0 < len(rejected) == refused == stats["ledger"]["rejected"]  # each refused once, never retried
    assert all("maximum context length" in r["message"] and "HTTP 400" in r["message"] for r in rejected)
    assert f"the server refused {len(rejected)} items for good" in result.stderr
    kept_or_failed = {r["id"] for r in read_jsonl(tmp_path / "cot.jsonl") + read_jsonl(tmp_path / "cot_failed.jsonl")}
    assert kept_or_failed.isdisjoint(r["id"] for r in rejected)
    assert len(kept_or_failed) + len(rejected) == 2 * N


# --- rewrite validity --------------------------------------------------------------------------------


def test_invalid_rewrites_are_rejected_before_they_are_solved(tmp_path):
    rows = [{"id": f"gsm8k/{p.id}", "source": "gsm8k", "stage": "cot", "problem": p.question, "response": "(given)",
             "gold": p.gold} for p in load_problems("gsm8k", GSM8K)[:N]]
    write_jsonl(tmp_path / "cot.jsonl", rows)
    with server(bad_rewrites=0.5) as srv:
        result = run_here("persona_augment.py", "--base_url", srv.url, "--model", "fake-llm", "--output_dir", tmp_path,
                          "--k", 3)
        by_kind = srv.stats()["by_kind"]
    assert result.returncode == 0, result.stderr[-2000:]
    rejected = read_jsonl(tmp_path / "persona_rejected.jsonl")
    reasons = [r["reason"] for r in rejected]
    dropped = sum(r.startswith("invalid rewrite: drops numbers") for r in reasons)
    told = reasons.count("invalid rewrite: states the answer")
    assert dropped > 0 and told > 0
    assert by_kind["rewrite"] == 3 * N and by_kind["solve"] == 3 * N - dropped - told  # no solve for those
    stats = json.loads((tmp_path / "persona.stats.json").read_text())
    assert stats["invalid_rewrites"] == {"count": dropped + told, "share": (dropped + told) / (3 * N)}
    for row in read_jsonl(tmp_path / "persona.jsonl"):
        assert rewrite_problem(next(r["problem"] for r in rows if r["id"] == row["parent_id"]), row["problem"],
                               row["gold"]) is None


@pytest.mark.parametrize("original, rewrite, gold, expected", [
    ("Tom has 12 apples and gives 5 away. How many are left?",
     "As a grocer, I count twelve apples and give five away. How many are left?", "7", None),
    ("Tom has 1,200 apples and eats 25.", "Tom, a chef, has 1200 apples and eats twenty-five.", "1175", None),
    ("Tom has 12 apples and gives 5 away.", "Tom has 12 apples and gives some away.", "7", "drops numbers"),
    ("Tom has 12 apples and gives 5 away.", "Tom has 12 apples and gives 5 away, leaving 7.", "7", "states the answer"),
    ("Tom has 7 apples; he buys 5 more and gives 5 away.", "A baker has 7 rolls, buys 5 and gives 5 away.", "7", None),
    ("Compute $\\frac12 + \\frac{1}{3}$.", "As a carpenter: what is $\\frac{1}{2}+\\frac13$?", "\\frac{5}{6}", None),
    ("Is $7$ odd or even? Enter \"odd\" or \"even\".", "As a cook: is 7 odd or even?", "odd", None),
    ("Find $x$ if $2x = \\pi$.", "As a surveyor, find $x$ when $2x=\\pi$; it is $\\dfrac{\\pi}{2}$.", "\\frac{\\pi}{2}",
     "states the answer"),
    ("One of the 3 boxes holds 4 pens.", "Each of the three boxes of an office holds four pens.", "12", None),
])
def test_rewrite_rules(original, rewrite, gold, expected):
    reason = rewrite_problem(original, rewrite, gold)
    assert (reason is None) if expected is None else (expected in reason), reason


def test_numbers_in_words_and_digits_agree():
    assert numbers("twenty-five, two hundred and forty, four thousand five hundred") == numbers("25, 240, 4500")
    assert numbers("1,000,000 and 3.50") == numbers("1000000 and 3.5")


# --- Retry-After --------------------------------------------------------------------------------------


def test_retry_after_in_seconds_milliseconds_or_as_an_http_date():
    """RFC 9110 lets a server give Retry-After as seconds or as an HTTP date; either is honoured (capped at
    a minute, never negative); anything unreadable falls back to exponential backoff."""
    import email.utils

    import httpx

    from personamath.llm import retry_delay

    now = 1_800_000_000.0

    def delay(headers, attempt=1):
        return retry_delay(attempt, httpx.Response(429, headers=headers), now=now)

    backoff = retry_delay(1)
    assert backoff == 1.0 and retry_delay(3) == 4.0 and retry_delay(10) == 8.0
    assert delay({"Retry-After": "7"}) == 7.0 and delay({"retry-after-ms": "250", "Retry-After": "7"}) == 0.25
    assert delay({"Retry-After": email.utils.formatdate(now + 12, usegmt=True)}) == 12.0
    assert delay({"Retry-After": email.utils.formatdate(now + 3600, usegmt=True)}) == 60.0  # capped
    assert delay({"Retry-After": email.utils.formatdate(now - 30, usegmt=True)}) == 0.0  # already past
    assert delay({"Retry-After": "Sun, 06 Nov 1994 08:49:37 -0000"}) == 0.0  # no zone given: UTC
    assert delay({"Retry-After": "-5"}) == 0.0
    for unreadable in ("soon", "", "nan", "inf", "Mon, 99 Foo 2026 99:99:99 GMT"):
        assert delay({"Retry-After": unreadable}) == backoff, unreadable
    assert delay({"retry-after-ms": "x", "Retry-After": "2"}) == 2.0  # the next header, when one is unreadable
