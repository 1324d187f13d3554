"""The fake OpenAI-compatible server, over real HTTP with the real openai client."""
import json
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import DATA, ROOT

from personamath.data import load_problems
from fake_server import FakeServerConfig, start_in_thread
from personamath.parser import last_boxed_answer
from personamath.steps import (parse_personas, parse_rewrite, propose_messages, reflect_messages, rewrite_messages,
                               solve_messages, split_reflection)

PERSONA = "I am a nurse who plans medication schedules for night shifts and weekends."


@pytest.fixture(scope="module")
def problems():
    return load_problems("gsm8k", DATA / "gsm8k" / "train.jsonl")[:20]


@pytest.fixture(scope="module")
def server(problems):
    with start_in_thread(FakeServerConfig(problems=problems)) as server:
        yield server


def client_for(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="test", **{"max_retries": 0, **kwargs})


def create(client, messages):
    return client.chat.completions.create(model="fake-llm", messages=messages, temperature=0.7, max_tokens=512)


def ask(client, messages) -> str:
    """The answer's text, re-sending broken answers (as personamath.llm does; the client does not)."""
    for _ in range(3):
        try:
            response = create(client, messages)
        except json.JSONDecodeError:
            continue
        if response.choices:
            return response.choices[0].message.content
    raise AssertionError("no answer after 3 sends")


def get(server, path: str, data: bytes | None = None) -> dict:
    with urllib.request.urlopen(server.url.removesuffix("/v1") + path, data=data, timeout=5) as response:
        assert response.status == 200
        return json.loads(response.read())


def test_solve_is_right_unless_hard(server, problems):
    client = client_for(server)
    hard = [p for p in problems if server.brain.is_hard(p.question)]
    assert 0 < len(hard) < len(problems)
    for p in problems:
        answer = last_boxed_answer(ask(client, solve_messages(p.question)))
        assert (answer != p.gold) if p in hard else (answer == p.gold), p.id
    assert last_boxed_answer(ask(client, solve_messages("What is the colour of the sky?"))) == "0"


def test_rewrite_keeps_the_problem_and_is_solved_like_it(server, problems):
    client = client_for(server)
    for p in problems[:5]:
        rewritten = parse_rewrite(ask(client, rewrite_messages(p.question, PERSONA)))
        assert rewritten.startswith("As I am a nurse who plans medication schedules, I ask: ")
        assert p.question in rewritten
        assert ask(client, solve_messages(rewritten)) == ask(client, solve_messages(p.question))


def test_propose_gives_k_distinct_lines_deterministically(server, problems):
    client = client_for(server)
    text = ask(client, propose_messages(problems[0].question, 5))
    assert len(text.splitlines()) == len(set(text.splitlines())) == 5
    assert len(parse_personas(text, 5)) == 5
    assert ask(client, propose_messages(problems[0].question, 5)) == text
    assert ask(client, propose_messages(problems[1].question, 5)) != text


def test_reflect_fixes_hard_problems_unless_hopeless(server, problems):
    client = client_for(server)
    hard = [p for p in problems if server.brain.is_hard(p.question)]
    hopeless = [p for p in hard if server.brain.is_hopeless(p.question)]
    assert 0 < len(hopeless) < len(hard)
    for p in hard:
        wrong = ask(client, solve_messages(p.question))
        reflection, solution = split_reflection(ask(client, reflect_messages(p.question, wrong)))
        assert reflection.startswith("Reflection:")
        assert (last_boxed_answer(solution) == p.gold) == (p not in hopeless), p.id


def test_endpoints_and_stats(server, problems):
    assert get(server, "/health")["status"] == "ok"
    assert [m["id"] for m in get(server, "/v1/models")["data"]] == ["fake-llm"]
    get(server, "/stats/reset", data=b"")
    client = client_for(server)
    response = create(client, solve_messages(problems[0].question))
    assert response.object == "chat.completion" and response.choices[0].finish_reason == "stop"
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    ask(client, rewrite_messages(problems[0].question, PERSONA))
    ask(client, [{"role": "user", "content": "hello"}])
    stats = get(server, "/stats")
    assert stats == server.stats()
    assert stats["requests"] == stats["completed"] == 3
    assert stats["by_kind"] == {"solve": 1, "rewrite": 1, "propose": 0, "reflect": 0, "judge": 0, "unknown": 1}
    server.reset_stats()
    assert server.stats()["requests"] == 0


@pytest.mark.parametrize("fault", ["429", "500", "slow"])
def test_retried_faults_happen_once_per_body(problems, fault):
    config = FakeServerConfig(problems=problems, faults={fault: 1.0}, slow_seconds=3)
    with start_in_thread(config) as server:
        client = client_for(server, max_retries=3, timeout=1.0)
        start = time.perf_counter()
        assert last_boxed_answer(ask(client, solve_messages(problems[0].question))) == problems[0].gold
        assert time.perf_counter() - start < 2.5  # the slow answer was not waited for
        assert ask(client, solve_messages(problems[0].question))  # the same body again: no fault
        stats = server.stats()
        assert stats["faults"][fault] == 1 and stats["requests"] == 3 and stats["completed"] == 2


def test_broken_answers_happen_once_per_body(problems):
    with start_in_thread(FakeServerConfig(problems=problems, faults={"malformed": 1.0})) as server:
        client = client_for(server)
        with pytest.raises(json.JSONDecodeError):
            create(client, solve_messages(problems[0].question))
        assert create(client, solve_messages(problems[0].question)).choices[0].finish_reason == "stop"
        assert server.stats()["faults"]["malformed"] == 1 and server.stats()["completed"] == 1
    with start_in_thread(FakeServerConfig(problems=problems, faults={"empty": 1.0})) as server:
        client = client_for(server)
        assert create(client, solve_messages(problems[0].question)).choices == []
        assert create(client, solve_messages(problems[0].question)).choices[0].finish_reason == "stop"
        assert server.stats()["faults"]["empty"] == 1 and server.stats()["completed"] == 1


def test_length_cuts_every_time(problems):
    with start_in_thread(FakeServerConfig(problems=problems, faults={"length": 1.0})) as server:
        client = client_for(server)
        for _ in range(2):
            choice = create(client, solve_messages(problems[0].question)).choices[0]
            assert choice.finish_reason == "length" and "\\boxed" not in choice.message.content
        assert server.stats()["truncated"] == [["solve", problems[0].id]] * 2


def test_retrying_client_gets_the_fault_free_results(server, problems):
    requests = [(kind, p, messages) for p in problems
                for kind, messages in (("solve", solve_messages(p.question)),
                                       ("rewrite", rewrite_messages(p.question, PERSONA)))]
    with ThreadPoolExecutor(8) as pool:
        expected = list(pool.map(lambda r: ask(client_for(server), r[2]), requests))
    faults = {"429": 0.2, "500": 0.2, "malformed": 0.2, "empty": 0.2, "length": 0.2}
    with start_in_thread(FakeServerConfig(problems=problems, faults=faults)) as faulty, ThreadPoolExecutor(8) as pool:
        client = client_for(faulty, max_retries=3)
        got = list(pool.map(lambda r: ask(client, r[2]), requests))
        stats = faulty.stats()
    assert all(stats["faults"][f] > 0 for f in faults), stats["faults"]
    assert stats["completed"] == len(requests)
    truncated = {tuple(t) for t in stats["truncated"]}
    for (kind, p, _), want, answer in zip(requests, expected, got):
        if (kind, p.id) in truncated:
            assert "\\boxed" not in answer and want.startswith(answer)
        else:
            assert answer == want


@pytest.mark.parametrize("slots, min_s, max_s", [(2, 0.8, 1.5), (8, 0.2, 0.6)])
def test_slots_and_latency_bound_throughput(problems, slots, min_s, max_s):
    with start_in_thread(FakeServerConfig(problems=problems, latency=0.2, slots=slots)) as server:
        client = client_for(server)
        ask(client, solve_messages(problems[0].question))  # connect once before timing
        server.reset_stats()
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: ask(client, solve_messages(p.question)), problems[:8]))
        assert min_s <= time.perf_counter() - start < max_s
        assert server.stats()["max_concurrent"] == 8


def test_latencies_have_a_long_tail_and_each_body_its_own(problems):
    """latency_sigma: log-normal around the median latency, the same for the same body every time."""
    from fake_server import FakeServer

    server = FakeServer(FakeServerConfig(problems=problems, latency=1.0, latency_sigma=0.7))
    draws = sorted(server._latency(json.dumps({"n": i})) for i in range(4000))
    assert draws[2000] == pytest.approx(1.0, rel=0.05)  # the median
    assert draws[3960] == pytest.approx(5.1, rel=0.2)  # p99: exp(0.7 * 2.33)
    assert server._latency('{"n": 7}') == server._latency('{"n": 7}')
    assert FakeServer(FakeServerConfig(problems=problems, latency=0.3))._latency('{"n": 7}') == 0.3


def test_a_body_answered_twice_is_counted_as_paid_twice(problems):
    with start_in_thread(FakeServerConfig(problems=problems)) as server:
        client = client_for(server)
        for messages in (solve_messages(problems[0].question), solve_messages(problems[0].question),
                         solve_messages(problems[1].question)):
            create(client, messages)
        assert server.stats()["completed"] == 3 and server.stats()["paid_twice"] == 1


def test_cli_serves_until_sigterm(tmp_path):
    port_file = tmp_path / "port"
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_server.py"), "--problems",
                                str(DATA / "gsm8k" / "train.jsonl"), "--latency", "0.01", "--slots", "4",
                                "--faults", "429=0.1,length=0.02", "--port_file", str(port_file)],
                               cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:") and line.strip().endswith("/v1")
        port = int(port_file.read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
