"""`--batch` through the real stage CLIs, against a fake of the Files and Batches endpoints over real HTTP
(tests/fake_batch_server.py, answering with tests/fake_server.py's fake LLM): batch and online runs keep
the same rows, every request ends answered or refused exactly once, a client killed while polling resumes
without resubmitting, lost/expired/failed lines are retried, --batch_fallback online finishes the rest, the
ledger is at batch prices and --max_cost holds. The last test runs vLLM's own batch runner on the embedded
model (slow)."""
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import DATA, ROOT, run_here

from fake_batch_server import FakeBatchConfig, start_in_thread as start_batch_server
from fake_server import FakeServerConfig, start_in_thread as start_llm_server
from personamath.batch_runners import read_result_line, split_files
from personamath.batch_state import STATE_FILE
from personamath.data import load_problems
from personamath.jsonl import read_jsonl, write_jsonl
from personamath.llm import ResponseCache, cost_of
from personamath.stage import EXIT_BUDGET, EXIT_FAILED_REQUESTS, EXIT_STALLED

GSM8K = DATA / "gsm8k" / "train.jsonl"
MATH = DATA / "math" / "MATH_train.jsonl"
N = 8  # questions per source
MODEL = "gpt-4o-mini"  # priced (online and batch) in personamath/resources/prices.json; the fake answers any name
ONLINE_PRICE, BATCH_PRICE = {"input": 0.15, "output": 0.60}, {"input": 0.075, "output": 0.30}
STAGES = [
    ("gen_cot.py", ["--inputs", str(GSM8K), str(MATH), "--limit", str(2 * N), "--num_samples", "2"],
     ["cot", "cot_failed"]),
    ("persona_augment.py", ["--k", "2"], ["persona", "persona_rejected"]),
    ("reflection.py", ["--k", "2", "--format", "reflection"],
     ["reflection", "reflection_failed", "reflection_persona", "reflection_persona_rejected"]),
]
BATCH = ["--batch", "--batch_poll_interval", "0.1"]


def problems():
    return load_problems("gsm8k", GSM8K)[:N] + load_problems("math", MATH)[:N]


def batch_server(**config):
    return start_batch_server(FakeServerConfig(problems=problems()), FakeBatchConfig(**config))


def command(script, url, out, extra):
    return [sys.executable, script, "--base_url", url, "--model", MODEL, "--output_dir", str(out), "--timeout", "5",
            *extra]


def run(script, url, out, extra, expect=0):
    result = run_here(*command(script, url, out, extra)[1:])
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def outputs(out, names):
    return {name: read_jsonl(out / f"{name}.jsonl") for name in names}


def stats_of(out, name="cot"):
    return json.loads((out / f"{name}.stats.json").read_text())


def seed_inputs(out, expected, stage):
    """This stage's inputs, as the stages before it wrote them."""
    for _, _, earlier in STAGES[:stage]:
        for name in earlier:
            write_jsonl(out / f"{name}.jsonl", expected[name])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """All three stages online: the rows every batch run must reproduce."""
    out = tmp_path_factory.mktemp("online")
    with start_llm_server(FakeServerConfig(problems=problems())) as srv:
        for script, extra, _ in STAGES:
            run(script, srv.url, out, extra)
    rows = {name: read_jsonl(out / f"{name}.jsonl") for _, _, names in STAGES for name in names}
    assert all(rows[name] for name in ("cot", "cot_failed", "persona", "reflection", "reflection_persona"))
    return rows


def test_result_lines_are_read_by_status_not_by_error():
    body = {"choices": [{"message": {"content": "\\boxed{1}"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    ok = read_result_line({"custom_id": "a", "error": None, "response": {"status_code": 200, "body": body}})
    assert ok[0] == "ok" and ok[1].text == "\\boxed{1}" and ok[1].prompt_tokens == 3
    refused = {"status_code": 400, "body": {"error": {"message": "context too long"}}}
    assert read_result_line({"custom_id": "a", "error": None, "response": refused}) == (
        "rejected", "HTTP 400: context too long (in a batch)")
    for line in ({"error": None, "response": {"status_code": 200, "body": {**body, "choices": []}}},
                 {"error": None, "response": {"status_code": 500, "body": {"error": {"message": "oops"}}}},
                 {"error": None, "response": {"status_code": 429, "body": {}}},
                 {"error": {"code": "batch_expired", "message": "expired"}, "response": None},
                 {"error": None, "response": None}):
        assert read_result_line(line)[0] == "failed", line
    assert split_files([b"x" * 10] * 7, max_requests=3, max_bytes=1000) == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_files([b"x" * 10] * 5, max_requests=100, max_bytes=25) == [[0, 1], [2, 3], [4]]


def test_batch_keeps_the_online_rows_and_answers_every_request_once(tmp_path, reference):
    """All three stages in batch mode through every fault at once: lines lost, failed (500), answered
    without a choice, a batch that expires half done, one that fails validation, a create whose answer
    is lost after the batch was made; files split at 7 requests and waves under a token limit."""
    faults = dict(lost=0.15, failed_lines=0.15, no_choice=0.1, expire_batches=1, fail_batches=1,
                  create_response_lost=1)
    flags = [*BATCH, "--batch_max_requests", "7", "--batch_enqueued_token_limit", "2500", "--batch_max_rounds", "8"]
    with batch_server(**faults) as srv:
        for script, extra, names in STAGES:
            run(script, srv.url, tmp_path, [*extra, *flags])
            assert outputs(tmp_path, names) == {n: reference[n] for n in names}, script
        stats = srv.stats()
        # every request sent ended answered, once: no answer was paid for twice, none was dropped
        assert set(stats["answered"]) == set(stats["lines_received"]) and set(stats["answered"].values()) == {1}
        assert stats["lost"] and stats["failed"] and stats["online_requests"] == 0
        assert sorted(stats["batch_status"].values()).count("expired") == 1
        assert sorted(stats["batch_status"].values()).count("failed") == 1
        # The create whose answer was lost was not repeated: the batch it made was found by its file.
        inputs = list(stats["batch_inputs"].values())
        assert stats["creates"] == stats["batches_made"] == stats["uploads"] == len(set(inputs)) == len(inputs)
        summaries = [stats_of(tmp_path, name)["batch"] for name in ("cot", "persona", "reflection",
                                                                      "reflection_persona")]
        assert sum(s.get("batches_adopted", 0) for s in summaries) == 1
        states = [row[0] for row in sqlite3.connect(tmp_path / STATE_FILE).execute("SELECT status FROM batches")]
        assert len(states) == stats["batches_made"] and set(states) == {"read"}  # every batch read, none open
        # the same command again sends nothing, and so does an online run over the batch answers
        run(STAGES[2][0], srv.url, tmp_path, [*STAGES[2][1], *flags])
        run(STAGES[0][0], srv.url, tmp_path, STAGES[0][1])
        again = srv.stats()
        assert again["uploads"] == stats["uploads"] and again["online_requests"] == 0


def test_client_killed_while_polling_resumes_without_resubmitting(tmp_path, reference):
    script, extra, names = STAGES[0]
    with batch_server(hold=True) as srv:
        process = subprocess.Popen(command(script, srv.url, tmp_path, [*extra, *BATCH]), cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while not srv.stats()["retrieves"] and time.time() < deadline:  # polling the first round's batch
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        before = srv.stats()
        assert before["uploads"] == before["creates"] == 1 and len(before["lines_received"]) == 0
        (held,) = before["batch_status"]
        srv.release()  # the batch finishes while no client is there

        result = run(script, srv.url, tmp_path, [*extra, *BATCH])
        after = srv.stats()
    assert outputs(tmp_path, names) == {n: reference[n] for n in names}
    assert "resuming " + held in result.stderr
    assert after["retrieves"][held] > before["retrieves"][held]  # polled again, not submitted again
    assert set(after["lines_received"].values()) == {1}  # no request went in two batches
    assert after["creates"] == after["uploads"] == 2  # the first round's, and the second attempts'
    assert stats_of(tmp_path)["batch"]["batches_resumed"] == 1


def test_endpoint_failing_past_the_stall_timeout_stops_and_the_same_command_resumes(tmp_path, reference):
    """The batch is made, then every poll answers 503: the stage stops after --stall_timeout (exit 5) with
    the cause named, instead of polling forever; once the endpoint is back, the same command resumes
    that batch (made once, each line sent once) and ends with the online rows."""
    script, extra, names = STAGES[0]
    command = [*extra, *BATCH, "--stall_timeout", "2"]
    with batch_server(unavailable=True) as srv:
        started = time.monotonic()
        stopped = run(script, srv.url, tmp_path, command, expect=EXIT_STALLED)
        assert time.monotonic() - started < 60
        assert "kept failing for" in stopped.stderr and "503" in stopped.stderr, stopped.stderr[-2000:]
        assert stats_of(tmp_path)["complete"] is False
        (held,) = srv.stats()["batch_status"]
        assert srv.stats()["retrieves"][held] >= 2  # polled, and polled again, before giving up

        srv.config.unavailable = False
        resumed = run(script, srv.url, tmp_path, command)
        after = srv.stats()
    assert "resuming " + held in resumed.stderr
    assert outputs(tmp_path, names) == {n: reference[n] for n in names}
    assert after["creates"] == after["uploads"] == 2  # the first round's batch (resumed), the second attempts'
    assert set(after["lines_received"].values()) == {1}


def test_lines_lost_every_time_fail_then_fallback_online_finishes(tmp_path, reference):
    script, extra, names = STAGES[0]
    with batch_server(lost=0.25, lost_always=True) as srv:
        failed = run(script, srv.url, tmp_path, [*extra, *BATCH, "--batch_max_rounds", "2"],
                     expect=EXIT_FAILED_REQUESTS)
        assert "no answer after 2 batches" in failed.stderr
        stats = srv.stats()
        lost = set(stats["lost"])
        assert lost and all(stats["lines_received"][key] == 2 for key in lost)  # two rounds, then failed
        assert stats_of(tmp_path)["request_failed_ids"]
        batch_only = stats_of(tmp_path)["ledger"]

        run(script, srv.url, tmp_path, [*extra, *BATCH, "--batch_max_rounds", "2", "--batch_fallback", "online"])
        after = srv.stats()
    assert outputs(tmp_path, names) == {n: reference[n] for n in names}
    assert after["online_requests"] == len(set(after["lost"]))  # each request lost in batches went online once
    # The first run's answers all came from batches, at batch prices.
    assert batch_only["batch_prompt_tokens"] == batch_only["prompt_tokens"] > 0
    assert batch_only["cost_usd"] == pytest.approx(cost_of(
        BATCH_PRICE, batch_only["batch_prompt_tokens"], batch_only["batch_completion_tokens"]))
    # The rerun's lost requests went online, at online prices. Whether a later attempt of theirs also went in
    # a batch depends on which lines the server lost (their custom_ids hold its random port): either way the
    # ledger prices each part at its own rate.
    ledger = stats_of(tmp_path)["ledger"]
    online = (ledger["prompt_tokens"] - ledger["batch_prompt_tokens"],
              ledger["completion_tokens"] - ledger["batch_completion_tokens"])
    assert online[0] > 0 and online[1] > 0
    assert ledger["cost_usd"] == pytest.approx(cost_of(ONLINE_PRICE, *online) + cost_of(
        BATCH_PRICE, ledger["batch_prompt_tokens"], ledger["batch_completion_tokens"]))


def test_refused_lines_with_a_null_error_are_rejected_once(tmp_path):
    """Status 400 in the output file with `error: null` (openai-openapi #302): refused for good, as online."""
    script, extra, _ = STAGES[0]
    with batch_server(refused=0.3) as srv:
        run(script, srv.url, tmp_path, [*extra, *BATCH])
        stats = srv.stats()
    rejected = stats_of(tmp_path)["rejected_by_server"]
    assert rejected and len(rejected) == len(stats["refused"]) == stats_of(tmp_path)["ledger"]["rejected"]
    assert set(stats["refused"].values()) == {1}  # never retried
    assert all(r["message"].startswith("HTTP 400: This model's maximum context length") for r in rejected)
    done = read_jsonl(tmp_path / "cot.jsonl") + read_jsonl(tmp_path / "cot_failed.jsonl")
    assert len(done) + len(rejected) == 2 * N and {r["id"] for r in done}.isdisjoint(r["id"] for r in rejected)


def test_ledger_at_batch_prices_dry_run_and_max_cost(tmp_path):
    script, extra, _ = STAGES[0]
    estimate = re.compile(r"estimated cost \$([\d.]+)")
    with batch_server() as srv:
        dry = [run(script, srv.url, tmp_path / "dry", ["--inputs", str(GSM8K), "--dry_run", *mode]).stdout
               for mode in ([], ["--batch"])]
        assert "at openai batch prices" in dry[1]
        online_usd, batch_usd = (float(estimate.search(text)[1]) for text in dry)
        assert online_usd > 0.5 and batch_usd == pytest.approx(online_usd / 2, abs=0.01)
        assert srv.stats()["uploads"] == 0 and srv.stats()["llm"]["requests"] == 0

        run(script, srv.url, tmp_path / "full", [*extra, *BATCH])
        usage = srv.stats()["llm"]["usage"]
        ledger = stats_of(tmp_path / "full")["ledger"]
        assert (ledger["batch_prompt_tokens"], ledger["batch_completion_tokens"]) == (
            usage["prompt_tokens"], usage["completion_tokens"])
        assert ledger["cost_usd"] == pytest.approx(cost_of(BATCH_PRICE, usage["prompt_tokens"],
                                                           usage["completion_tokens"]))
        assert ledger["batch_price_per_million_tokens"] == BATCH_PRICE

    for cap in (0.00001, 0.0002):
        with batch_server() as srv:
            out = tmp_path / f"cap{cap}"
            result = run(script, srv.url, out, [*extra, *BATCH, "--max_tokens", "256", "--max_cost", str(cap)],
                         expect=EXIT_BUDGET)
            usage = srv.stats()["llm"]["usage"]
            billed = cost_of(BATCH_PRICE, usage["prompt_tokens"], usage["completion_tokens"])
            stats = stats_of(out)
            assert billed <= stats["spent_usd_at_most"] <= cap and "--max_cost" in result.stderr
            if cap == 0.00001:  # not even one line's worst case fits: nothing is submitted
                assert srv.stats()["uploads"] == 0
            else:
                assert 0 < len(srv.stats()["lines_received"]) < 2 * N


@pytest.mark.slow
def test_vllm_run_batch_answers_the_same_jsonl_into_the_same_cache(tmp_path, embedded_model):
    """--batch_runner vllm: the stage's Batch JSONL through `python -m vllm.entrypoints.openai.run_batch` on
    the embedded model (CPU, float32), answers matched by custom_id into the response cache."""
    flags = ["gen_cot.py", "--batch_runner", "vllm", "--model", str(embedded_model), "--vllm_dtype", "float32",
             "--output_dir", str(tmp_path), "--inputs", str(GSM8K), "--limit", "3", "--num_samples", "1",
             "--max_tokens", "48", "--temperature", "0"]
    first = subprocess.run([sys.executable, *flags], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode in (0, 1), first.stderr[-4000:]  # 1: no row kept (a 135M model rarely solves one)
    (sent,) = tmp_path.glob("batches/*.input.jsonl")
    (answered,) = tmp_path.glob("batches/*.output.jsonl")
    requests = read_jsonl(sent)
    assert len(requests) == 3 and all(r["url"] == "/v1/chat/completions" for r in requests)
    cache = ResponseCache(tmp_path / "llm_cache.sqlite")
    for request in requests:  # custom_id is the cache key of the request exactly as sent
        assert request["custom_id"] == ResponseCache.key("vllm://localhost/run_batch", request["body"])
        assert cache.get(request["custom_id"]).text
    assert {r["custom_id"] for r in read_jsonl(answered)} == {r["custom_id"] for r in requests}
    rows = read_jsonl(tmp_path / "cot.jsonl") + read_jsonl(tmp_path / "cot_failed.jsonl")
    assert len(rows) == 3
    stats = stats_of(tmp_path)
    assert stats["batch"]["runner"] == "vllm" and stats["ledger"]["cost_usd"] == 0

    again = subprocess.run([sys.executable, *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == first.returncode and "submitted" not in again.stderr  # all from the cache
    assert len(list(tmp_path.glob("batches/*.input.jsonl"))) == 1
