"""The three generation stages against the fault-injecting fake server over real HTTP: transient faults
change nothing, a kill -9 costs at most the requests in flight, budgets stop cleanly, keys stay secret."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import DATA, ROOT, run_here

from personamath.data import load_problems
from fake_server import FakeServerConfig, start_in_thread
from personamath.jsonl import read_jsonl, write_jsonl
from personamath.stage import EXIT_GRADING_FAILED

GSM8K = DATA / "gsm8k" / "train.jsonl"
MATH = DATA / "math" / "MATH_train.jsonl"
N_PER_SOURCE = 12
TRANSIENT = {"429": 0.1, "500": 0.1, "slow": 0.05, "malformed": 0.05, "empty": 0.05}
# (script, extra flags, files it writes); each stage reads what the one before wrote in the same folder
STAGES = [
    ("gen_cot.py", ["--inputs", str(GSM8K), str(MATH), "--limit", str(2 * N_PER_SOURCE), "--num_samples", "2"],
     ["cot", "cot_failed"]),
    ("persona_augment.py", ["--k", "2"], ["persona", "persona_rejected"]),
    ("reflection.py", ["--k", "2", "--format", "reflection"], ["reflection", "reflection_failed", "reflection_persona",
                                     "reflection_persona_rejected"]),
]


def problems():
    return load_problems("gsm8k", GSM8K)[:N_PER_SOURCE] + load_problems("math", MATH)[:N_PER_SOURCE]


def server(**overrides):
    return start_in_thread(FakeServerConfig(problems=problems(), **overrides))


def flags(srv, out, concurrency=8):
    return ["--base_url", srv.url, "--model", "fake-llm", "--output_dir", str(out), "--concurrency", str(concurrency),
            "--timeout", "1.5", "--max_retries", "6"]


def run_stage(script, srv, out, extra, env=None, concurrency=8):
    result = run_here(script, *flags(srv, out, concurrency), *extra, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def outputs(out, names):
    return {name: read_jsonl(out / f"{name}.jsonl") for name in names}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """All three stages against a well-behaved server: the rows every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    requests = {}
    with server() as srv:
        for script, extra, names in STAGES:
            srv.reset_stats()
            run_stage(script, srv, out, extra)
            requests[script] = srv.stats()["requests"]
    rows = {name: read_jsonl(out / f"{name}.jsonl") for _, _, names in STAGES for name in names}
    # The fake LLM solves 70% at once and fixes most of the rest by reflection: every kind of row occurs.
    assert all(rows[name] for name in ("cot", "cot_failed", "persona", "reflection", "reflection_persona"))
    return out, rows, requests


def test_reference_counts_agree(reference):
    out, rows, requests = reference
    assert len(rows["cot"]) + len(rows["cot_failed"]) == 2 * N_PER_SOURCE
    assert len(rows["persona"]) + len(rows["persona_rejected"]) == 2 * len(rows["cot"])
    assert {r["parent_id"] for r in rows["persona"]} <= {r["id"] for r in rows["cot"]}
    assert len(rows["reflection"]) + len(rows["reflection_failed"]) == len(rows["cot_failed"])
    assert len(rows["reflection_persona"]) + len(rows["reflection_persona_rejected"]) == 2 * len(rows["reflection"])
    # --format reflection: the response reflects on a wrong attempt, which the row keeps for the training prompt.
    failed = {r["id"]: r for r in rows["cot_failed"]}
    for row in rows["reflection"]:
        assert row["response"].startswith("Reflection: ") and "\\boxed" in row["response"]
        assert row["wrong_attempt"] == failed[row["id"]]["attempts"][-1]["response"]
    for row in rows["reflection_persona"]:
        assert (row["wrong_attempt"] is not None) == row["response"].startswith("Reflection: ")
    isco = {r["persona_id"] for r in rows["persona"]}
    assert all(pid.startswith(("isco-", "everyday-")) for pid in isco)


def test_transient_faults_change_nothing(tmp_path, reference):
    _, expected, _ = reference
    with server(faults=TRANSIENT, slow_seconds=3) as srv:
        for script, extra, names in STAGES:
            run_stage(script, srv, tmp_path, extra, concurrency=16)  # more in flight: the backoffs overlap
            assert outputs(tmp_path, names) == {n: expected[n] for n in names}, script
        faults = srv.stats()["faults"]
    assert all(faults[kind] > 0 for kind in TRANSIENT), faults


def test_truncated_answers_are_not_kept(tmp_path, reference):
    _, expected, _ = reference
    script, extra, names = STAGES[0]
    with server(faults={"length": 0.2}) as srv:
        run_stage(script, srv, tmp_path, extra)
        truncated = {pid for kind, pid in srv.stats()["truncated"] if kind == "solve"}
    assert truncated
    kept = {r["id"].split("/", 1)[1] for r in read_jsonl(tmp_path / "cot.jsonl")}
    reference_kept = {r["id"].split("/", 1)[1] for r in expected["cot"]}
    # A question is lost only if every one of its attempts was cut; none is gained.
    assert kept <= reference_kept and reference_kept - kept <= truncated
    assert len(kept) + len(read_jsonl(tmp_path / "cot_failed.jsonl")) == 2 * N_PER_SOURCE


@pytest.mark.parametrize("stage", range(len(STAGES)))
def test_kill_9_then_rerun(tmp_path, reference, stage):
    ref_out, expected, ref_requests = reference
    script, extra, names = STAGES[stage]
    for _, _, earlier in STAGES[:stage]:  # this stage's inputs, as the earlier stages wrote them
        for name in earlier:
            write_jsonl(tmp_path / f"{name}.jsonl", expected[name])
    concurrency = 4
    with server(latency=0.15, slots=concurrency) as srv:
        process = subprocess.Popen([sys.executable, script, *flags(srv, tmp_path, concurrency), *extra], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while srv.stats()["completed"] < ref_requests[script] // 2 and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)  # the stage and its grading workers, mid-run
        assert process.wait() == -signal.SIGKILL
        sent_before_kill = srv.stats()["requests"]
        assert 0 < sent_before_kill < ref_requests[script]

        run_stage(script, srv, tmp_path, extra, concurrency=concurrency)
        assert outputs(tmp_path, names) == {n: expected[n] for n in names}
        total = srv.stats()["requests"]
        assert total - ref_requests[script] <= concurrency  # re-sent: at most what was in flight

        srv.reset_stats()
        run_stage(script, srv, tmp_path, extra, concurrency=concurrency)
        assert srv.stats()["requests"] == 0  # a completed rerun sends nothing
        assert outputs(tmp_path, names) == {n: expected[n] for n in names}


def test_dry_run_sends_nothing_and_prices_the_work(tmp_path):
    with server() as srv:
        result = run_here("gen_cot.py", *flags(srv, tmp_path), "--model", "gpt-4o-mini", "--inputs", str(GSM8K),
                          "--limit", "10", "--dry_run")
        assert srv.stats()["requests"] == 0
    assert result.returncode == 0, result.stderr
    assert "10 requests (0 cached, 10 to send)" in result.stdout and "estimated cost $" in result.stdout


def test_max_cost_stops_cleanly_and_resumes_without_repaying(tmp_path, reference):
    _, expected, ref_requests = reference
    script, extra, names = STAGES[0]
    with server() as srv:
        # gpt-4o-mini is priced in configs/prices.json; the fake server answers to any model name.
        priced = [*flags(srv, tmp_path, concurrency=1), "--model", "gpt-4o-mini", "--max_tokens", "256", *extra]
        stopped = run_here(script, *priced, "--max_cost", "0.001")
        assert stopped.returncode == 3, stopped.stderr[-2000:]
        assert "--max_cost" in stopped.stderr
        partial = read_jsonl(tmp_path / "cot.jsonl") + read_jsonl(tmp_path / "cot_failed.jsonl")
        sent = srv.stats()["requests"]
        assert 0 < len(partial) < 2 * N_PER_SOURCE and sent < ref_requests[script]

        finished = run_here(script, *priced)
        assert finished.returncode == 0, finished.stderr[-2000:]
        assert srv.stats()["requests"] == ref_requests[script]  # nothing paid twice
    assert [r["id"] for r in read_jsonl(tmp_path / "cot.jsonl")] == [r["id"] for r in expected["cot"]]


def test_api_key_never_written(tmp_path):
    secret = "sk-test-DO-NOT-LEAK-4242"
    env = {"OPENAI_API_KEY": secret}
    with server(faults={"500": 0.3}) as srv:
        results = [run_stage(script, srv, tmp_path, extra, env=env, concurrency=16) for script, extra, _ in STAGES]
    for result in results:
        assert secret not in result.stdout + result.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_no_api_key_for_a_remote_server_fails_before_any_work(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    result = subprocess.run([sys.executable, "gen_cot.py", "--output_dir", str(tmp_path / "out"), "--limit", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: OPENAI_API_KEY is not set, and https://api.openai.com/v1 is not a local server"]
    assert not (tmp_path / "out").exists()


def test_malformed_stage_input_names_file_and_line(tmp_path):
    write_jsonl(tmp_path / "cot.jsonl", [{"id": "a", "source": "gsm8k", "problem": "p", "gold": "1"}])
    with (tmp_path / "cot.jsonl").open("a") as f:
        f.write('{"id": "b", "source": \n')
    result = run_here("persona_augment.py", "--output_dir", str(tmp_path), "--base_url", "http://127.0.0.1:9/v1")
    assert result.returncode == 2
    assert f"{tmp_path / 'cot.jsonl'}:2: malformed JSON" in result.stderr and "Traceback" not in result.stderr


def test_only_stated_answers_that_solve_the_problem_are_kept():
    import asyncio

    from personamath.async_grading import AsyncGrader

    async def check(grader, task, gold, problem, texts):
        return await asyncio.gather(*(grader.correct(task, text, gold, problem) for text in texts))

    boxed, stated = AsyncGrader(timeout=10), AsyncGrader(timeout=10, answer_format="stated")
    try:
        eggs = "Janet sells 9 eggs at $2 each. How many dollars does she make?"
        texts = ("So she makes 18 dollars.", "So she makes $\\boxed{18}$ dollars.", "\\boxed{17}",
                 "9 * 2 = 18.\nThe final answer is 18.")
        assert asyncio.run(check(boxed, "gsm8k", "18", eggs, texts)) == [False, True, False, False]
        assert asyncio.run(check(stated, "gsm8k", "18", eggs, texts)) == [False, True, False, True]
        power = "Evaluate $81^{3/4}$."
        texts = ("It is $\\boxed{81^{3/4}}$.", "The final answer is $81^{3/4}$.", "$(3^4)^{3/4} = \\boxed{27}$")
        assert asyncio.run(check(stated, "math", "27", power, texts)) == [False, False, True]
    finally:
        boxed.close()
        stated.close()


PROGRESS_LINE = re.compile(r"^gen_cot: +(\d+)%\|.*\| (\d+)/(\d+) \[.*kept (\d+), [\d.]+ output tok/s\]$", re.M)


def test_progress_counts_requests_and_total_shrinks_to_what_was_needed(tmp_path, reference):
    """The bar advances per request (cached or sent), not per question, and its upper bound falls to
    the requests actually needed as questions are solved before their last attempt."""
    _, expected, ref_requests = reference
    script, extra, names = STAGES[0]
    with server() as srv:
        result = run_stage(script, srv, tmp_path, extra)
    lines = PROGRESS_LINE.findall(result.stderr)
    assert lines, result.stderr[-2000:]
    first_total, (percent, done, total, kept) = int(lines[0][2]), lines[-1]
    assert first_total == 2 * 2 * N_PER_SOURCE  # --num_samples 2 for every question, at first
    assert (percent, done, total) == ("100", str(ref_requests[script]), str(ref_requests[script]))
    assert int(total) < first_total and int(kept) == len(expected["cot"])


def test_stall_watchdog_stops_keeps_what_finished_and_rerun_resumes(tmp_path, reference):
    """A server that stays up but answers nothing (as a bf16 server does on a CPU without native bf16):
    the stage stops after --stall_timeout with a message naming the cause, keeps every answered item,
    and the same command then finishes sending only what was never answered."""
    _, expected, ref_requests = reference
    script, extra, names = STAGES[0]
    answered = 10
    command = [*extra, "--stall_timeout", "3"]
    with server(stall_after=answered) as srv:
        started = time.time()
        stopped = run_here(script, *flags(srv, tmp_path, concurrency=4), "--timeout", "120", *command)
        took = time.time() - started
        message = stopped.stderr
        assert stopped.returncode == 5, message[-2000:]
        assert took < 60  # the watchdog, not the 120 s request timeout (times 7 attempts), ended it
        assert "answered none of the 4 requests waiting on it in 3 s (--stall_timeout)" in message
        assert "--dtype float32" in message and "the same command resumes" in message
        stats = json.loads((tmp_path / "cot.stats.json").read_text())
        assert stats["complete"] is False and "--stall_timeout" in stats["stalled"]
        partial = {n: read_jsonl(tmp_path / f"{n}.jsonl") for n in names}
        finished = partial["cot"] + partial["cot_failed"]
        assert 0 < len(finished) == stats["finished_items"] < 2 * N_PER_SOURCE
        for name in names:  # what finished is exactly what a run that never stalled wrote for those items
            ids = {r["id"] for r in partial[name]}
            assert partial[name] == [r for r in expected[name] if r["id"] in ids]

        srv.config.stall_after = None  # the server recovers (the same endpoint: the cache is keyed by it)
        srv.reset_stats()
        run_stage(script, srv, tmp_path, command)
        resent = srv.stats()["requests"]
    assert outputs(tmp_path, names) == {n: expected[n] for n in names}
    assert resent == ref_requests[script] - answered  # every answer before the stall came from the cache


BROKEN_MATH_VERIFY = """# A math-verify whose every comparison raises, as a broken install's does.
def parse(text, *args, **kwargs):
    return [text, text]


def verify(gold, target, *args, **kwargs):
    raise RuntimeError("math-verify is broken")
"""


def test_failing_grading_stops_the_stage_and_the_same_command_resumes(tmp_path, reference):
    """Every grading fails (a broken math-verify shadows the real one in the grading processes): the stage
    stops on the second failure, exit 6, with a message naming the error and the errors in its stats.
    Counted as wrong answers instead, the failures would cost both attempts of every question and keep
    nothing. With math-verify working again, the same command ends as if nothing had happened."""
    _, expected, _ = reference
    script, extra, names = STAGES[0]
    shadow = tmp_path / "shadow" / "math_verify"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(BROKEN_MATH_VERIFY)
    broken = {**os.environ, "PYTHONPATH": str(shadow.parent)}
    out = tmp_path / "out"
    with server() as srv:
        stopped = subprocess.run([sys.executable, script, *flags(srv, out), *extra], cwd=ROOT, capture_output=True,
                                 text=True, timeout=300, env=broken)
        assert stopped.returncode == EXIT_GRADING_FAILED, stopped.stderr[-2000:]
        assert ("cot: stopped: grading failed on 2 of the 2 answers graded so far, first with: RuntimeError: "
                "math-verify is broken") in stopped.stderr
        stats = json.loads((out / "cot.stats.json").read_text())
        grading = stats["grading"]
        assert (grading["graded"], grading["errors"], grading["judged"], grading["wrong"]["grading failed"]) == (2, 2, 2, 2)
        assert grading["examples"] == ["RuntimeError: math-verify is broken"] * 2
        assert stats["complete"] is False and read_jsonl(out / "cot.jsonl") == []
        assert srv.stats()["requests"] < 2 * 2 * N_PER_SOURCE  # what grading every answer wrong would send

        run_stage(script, srv, out, extra)
    assert outputs(out, names) == {n: expected[n] for n in names}
    grading = json.loads((out / "cot.stats.json").read_text())["grading"]
    assert grading["errors"] == 0 and grading["graded"] >= 2 * N_PER_SOURCE
