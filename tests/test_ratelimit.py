"""Pacing under a server's rate limits (personamath/ratelimit.py), tried to break: the limiter alone on
a clock of its own, the limiter against the fake server's token buckets without HTTP, and gen_cot over
real HTTP against the fake server enforcing an RPM and a TPM limit (scaled to a window of seconds):
few 429s, the rows of an unlimited run, plain concurrency without headers, the budget cap, the stall
watchdog."""
import asyncio
import json
import random

import pytest
from conftest import DATA, run_here

from fake_server import FakeServerConfig, RateLimits, format_duration, start_in_thread
from personamath.data import load_problems
from personamath.jsonl import read_jsonl
from personamath.llm import cost_of, price_of
from personamath.ratelimit import (INITIAL_CONCURRENCY, RESERVE_S, RateLimiter, parse_duration,
                                   request_tokens)

GSM8K = DATA / "gsm8k" / "train.jsonl"
MATH = DATA / "math" / "MATH_train.jsonl"


class Clock:
    """A clock that moves only when told."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def unlimited_attempts(clock, ceiling=10_000) -> RateLimiter:
    """A limiter whose attempts out are not what is tried (they never reach its concurrency)."""
    limiter = RateLimiter(ceiling, clock=clock)
    limiter._set_concurrency(ceiling)
    return limiter


def limits(requests=None, tokens=None) -> dict:
    """x-ratelimit-* headers: kind -> (limit, remaining, reset)."""
    headers = {}
    for kind, value in (("requests", requests), ("tokens", tokens)):
        if value:
            limit, remaining, reset = value
            headers.update({f"x-ratelimit-limit-{kind}": str(limit), f"x-ratelimit-remaining-{kind}": str(remaining),
                            f"x-ratelimit-reset-{kind}": reset})
    return headers


# --- the headers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1.5s", 1.5), ("1h2m3.5s", 3723.5), ("6m", 360.0),
    ("250us", 250e-6), ("250µs", 250e-6), ("100ns", 1e-7), ("0s", 0.0), ("2m30s", 150.0), ("0.25ms", 0.00025),
    ("12", 12.0), ("0.5", 0.5), (" 3s ", 3.0), (".5s", 0.5),
    ("", None), ("soon", None), ("1x", None), ("-1", None), ("-1s", None), ("1s later", None), ("s", None),
    ("inf", None), ("nan", None), (None, None),
])
def test_reset_durations_in_every_form(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds) if seconds is not None else parse_duration(text) is None


@pytest.mark.parametrize("seconds", [0.0, 0.0004, 0.02, 0.999, 1.0, 1.234, 59.9999, 60.0, 360.0, 3723.5])
def test_the_fake_servers_resets_read_back(seconds):
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=5e-4)


def test_the_fake_server_enforces_its_limits():
    clock = Clock()
    server = RateLimits(rpm=10, tpm=1000, window_s=2.0, clock=clock)
    answers = [server.admit(50) for _ in range(12)]
    assert [admitted for admitted, _ in answers] == [True] * 10 + [False] * 2  # 10 requests a window
    last = answers[9][1]
    assert (last["x-ratelimit-limit-requests"], last["x-ratelimit-remaining-requests"]) == ("10", "0")
    assert (last["x-ratelimit-limit-tokens"], last["x-ratelimit-remaining-tokens"]) == ("1000", "500")
    assert parse_duration(last["x-ratelimit-reset-requests"]) == pytest.approx(2.0)  # all of it back in
    assert parse_duration(last["x-ratelimit-reset-tokens"]) == pytest.approx(1.0)
    refused = answers[10][1]
    assert (refused["retry-after-ms"], refused["Retry-After"]) == ("200", "1")  # one request back in 0.2 s
    clock.now += 0.2
    assert server.admit(50)[0] and not server.admit(50)[0]
    clock.now += 10  # full again, never more
    assert server.admit(600)[0]
    admitted, refused = server.admit(600)  # 400 tokens left: 200 more in 0.4 s
    assert not admitted and refused["retry-after-ms"] == "400" and refused["x-ratelimit-remaining-tokens"] == "400"


def test_request_tokens_count_the_prompt_and_all_of_max_tokens():
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 256}
    assert 100 + 256 <= request_tokens(body) <= 100 + 256 + 16
    assert request_tokens({**body, "max_tokens": 2048}) - request_tokens(body) == 2048 - 256


# --- the limiter on its own clock --------------------------------------------------------------------


def test_limits_are_read_and_what_remains_goes_down_and_refills():
    clock = Clock()
    limiter = unlimited_attempts(clock)
    first = limiter.try_acquire(10)
    # 100 requests a second (at least 49 of 100 used: back in 0.49 s) and 10000 tokens a minute
    limiter.answered(first, limits(requests=(100, 50, "490ms"), tokens=(10000, 5000, "29.994s")), 200)
    requests, tokens = limiter.buckets["requests"], limiter.buckets["tokens"]
    assert requests.limit == 100 and requests.window == pytest.approx(1.0)
    assert tokens.limit == 10000 and tokens.window == pytest.approx(60.0)
    assert requests.level == 50 and tokens.level == 5000
    reserve = min(100 * RESERVE_S, 5)
    sent = 0
    while limiter.try_acquire(10) is not None:
        sent += 1
    assert sent == 50 - reserve and requests.level == pytest.approx(reserve)  # down by one a request
    assert tokens.level == 5000 - 10 * sent
    assert limiter.delay(10) == pytest.approx(1 / 100, rel=0.05)  # the next one when one more has refilled
    clock.now += 0.25  # a quarter of the window: 25 requests back
    assert limiter.delay(10) == 0
    assert sum(limiter.try_acquire(10) is not None for _ in range(40)) == 25
    clock.now += 10  # refilled, never above the limit
    limiter.delay(10)
    assert requests.level == 100 and tokens.level == pytest.approx(5000 - 10 * (sent + 25) + 10000 / 60 * 10.25)
    assert limiter.stats["rate_limited"] == 0 and limiter.paused_until == 0


def test_the_token_limit_binds_too():
    clock = Clock()
    limiter = unlimited_attempts(clock)
    limiter.answered(limiter.try_acquire(1000), limits(tokens=(6000, 5000, "9.99s")), 200)  # 100 a second
    assert limiter.buckets["requests"].limit is None  # never named: never waited for
    assert limiter.buckets["tokens"].window == pytest.approx(60.0)
    assert all(limiter.try_acquire(1000) is not None for _ in range(4))  # 5000 left, a reserve of 10 kept
    assert limiter.try_acquire(1000) is None  # 1000 left
    assert limiter.delay(1000) == pytest.approx(10 / 100)  # until the reserve has refilled
    assert limiter.try_acquire(990) is not None  # a smaller one fits
    assert limiter.try_acquire(1) is None


def test_answers_correct_the_model_and_older_answers_are_ignored():
    clock = Clock()
    limiter = unlimited_attempts(clock)
    # 1000 a minute, 500 left: 16.67 back a second
    limiter.answered(limiter.try_acquire(1), limits(requests=(1000, 500, "29.94s")), 200)
    tickets = []
    for _ in range(20):  # each 0.6 s after the one before (more than SKEW_S): 10 back, 1 taken
        clock.now += 0.6
        tickets.append(limiter.try_acquire(1))
    bucket = limiter.buckets["requests"]
    assert bucket.level == pytest.approx(500 + 9 * 20)
    limiter.answered(tickets[9], limits(requests=(1000, 540, "27.54s")), 200)  # 50 less than believed then
    assert bucket.level == pytest.approx(540 + 10 * 10 - 10)  # its word, refilled for 6 s, less the 10 sent since
    limiter.answered(tickets[3], limits(requests=(1000, 999, "60ms")), 200)  # older: knows less, ignored
    assert bucket.level == pytest.approx(630)
    limiter.answered(tickets[19], limits(requests=(1000, 630, "22.14s")), 200)  # what is believed now
    assert bucket.level == pytest.approx(630)
    assert bucket.window == pytest.approx(60.0)


def test_the_answers_to_a_blind_start():
    """Attempts sent before the first answer told the limits: each of their answers is read against
    what was sent after it, the first as much as the next."""
    clock = Clock()
    limiter = unlimited_attempts(clock)
    blind = []
    for _ in range(16):
        blind.append(limiter.try_acquire(100))
        clock.now += 0.6
    tokens = limiter.buckets["tokens"]
    limiter.answered(blind[0], limits(tokens=(14000, 13900, "424ms")), 200)  # 100 used of 14000 a minute
    assert tokens.level == pytest.approx(13900 - 15 * 100) and tokens.window == pytest.approx(60, rel=0.01)
    limiter.answered(blind[1], limits(tokens=(14000, 13800, "853ms")), 200)  # just as believed
    assert tokens.level == pytest.approx(13900 - 15 * 100)
    limiter.answered(blind[2], limits(tokens=(14000, 13500, "2.139s")), 200)  # 200 less than believed
    assert tokens.level == pytest.approx(13900 - 15 * 100 - 200)


def test_what_was_sent_just_before_is_taken_as_not_yet_counted():
    """An answer may have reached the server before attempts sent just before it (another connection):
    the model does not count on those having been counted."""
    clock = Clock()
    limiter = unlimited_attempts(clock)
    first = limiter.try_acquire(1)
    limiter.answered(first, limits(requests=(1000, 999, "60ms")), 200)
    before = [limiter.try_acquire(1) for _ in range(5)]
    last = limiter.try_acquire(1)
    limiter.answered(last, limits(requests=(1000, 998, "120ms")), 200)  # the 5 before it not counted yet
    assert limiter.buckets["requests"].level == pytest.approx(998 - 5)
    limiter.answered(before[0], limits(requests=(1000, 997, "180ms")), 200)  # older than `last`: ignored
    assert limiter.buckets["requests"].level == pytest.approx(998 - 5)


def test_a_429_halves_the_concurrency_once_a_round_and_pauses_everything():
    clock = Clock()
    limiter = RateLimiter(64, clock=clock)
    assert limiter.concurrency == INITIAL_CONCURRENCY  # until the server says whether it has limits
    first = limiter.try_acquire(1)
    limiter.answered(first, limits(requests=(100, 99, "600ms")), 200)
    assert limiter.reports_limits and limiter.concurrency == INITIAL_CONCURRENCY + 1
    round1 = [limiter.try_acquire(1) for _ in range(5)]
    limiter.answered(round1[0], limits(requests=(100, 0, "1s")), 429, retry_after=2.0)
    assert limiter.concurrency == (INITIAL_CONCURRENCY + 1) / 2
    assert limiter.delay(1) >= 2.0 and limiter.try_acquire(1) is None  # nobody goes before the Retry-After
    limiter.answered(round1[1], limits(requests=(100, 0, "1s")), 429, retry_after=2.0)  # the same round
    assert limiter.concurrency == (INITIAL_CONCURRENCY + 1) / 2
    clock.now += 2.5
    round2 = limiter.try_acquire(1)
    limiter.answered(round2, limits(requests=(100, 0, "1s")), 429, retry_after=0.5)
    assert limiter.concurrency == (INITIAL_CONCURRENCY + 1) / 4 and limiter.stats["rate_limited"] == 3
    clock.now += 1.0  # past the pause; 7 attempts still out, 4 may be
    assert limiter.delay(1) == 0 and limiter.out == 7 and limiter.try_acquire(1) is None
    for ticket in round1[:3]:
        limiter.release(ticket)
    assert limiter.try_acquire(1) is None
    limiter.release(round1[3])
    assert limiter.try_acquire(1) is not None
    for _ in range(100):
        limiter.answered(round2, None, 200)
    assert limiter.concurrency == 64  # the limits known: each answer raises it by one, up to the ceiling
    limiter.answered(round2, None, 500)
    assert limiter.concurrency == 64


def test_without_headers_plain_concurrency_and_no_pacing():
    clock = Clock()
    limiter = RateLimiter(48, clock=clock)
    limiter.answered(limiter.try_acquire(100), {"content-type": "application/json"}, 200)
    assert limiter.reports_limits is False and limiter.concurrency == 48
    tickets = [limiter.try_acquire(10 ** 6) for _ in range(47)]  # 47 and the first: 48 out at once
    assert None not in tickets and limiter.try_acquire(1) is None
    for ticket in tickets:
        limiter.release(ticket)
    for _ in range(10_000):  # and no pacing, whatever the tokens
        limiter.release(limiter.try_acquire(10 ** 6))
    ticket = limiter.try_acquire(1)
    limiter.answered(ticket, {}, 429, retry_after=0.5)  # a 429 with nothing but Retry-After
    assert limiter.concurrency == 24 and limiter.try_acquire(1) is None
    for _ in range(24):  # only 429s to go by: back by one per round of answers, not one per answer
        limiter.answered(ticket, {}, 200)
    assert 24.9 < limiter.concurrency < 26
    off = RateLimiter(48, enabled=False, clock=clock)  # --pacing off: what the client did before
    assert off.concurrency == 48
    ticket = off.try_acquire(10)
    off.answered(ticket, limits(requests=(10, 0, "1s")), 429, retry_after=30)
    assert off.concurrency == 48 and off.delay(10) == 0 and off.try_acquire(10) is not None


def test_requests_hold_a_slot_under_the_ceiling_and_attempts_follow_the_concurrency():
    async def main():
        limiter = RateLimiter(6)
        limiter._set_concurrency(2)
        holding, out, most_holding, most_out = 0, 0, 0, 0
        gate = asyncio.Event()

        async def one():
            nonlocal holding, out, most_holding, most_out
            async with limiter:
                holding += 1
                most_holding = max(most_holding, holding)
                ticket = await limiter.acquire(10)
                out += 1
                most_out = max(most_out, out)
                await gate.wait()
                out -= 1
                limiter.release(ticket)
                holding -= 1

        tasks = [asyncio.ensure_future(one()) for _ in range(20)]
        await asyncio.sleep(0.01)
        assert (holding, out) == (6, 2)  # a slot for each of --concurrency requests, 2 attempts out
        limiter._set_concurrency(5)  # raised: the next attempts go at once
        await asyncio.sleep(0.01)
        assert (holding, out) == (6, 5)
        tasks[-1].cancel()  # a request cancelled while waiting for a slot takes none
        limiter._set_concurrency(10)  # above the ceiling: the ceiling
        await asyncio.sleep(0.01)
        assert limiter.concurrency == 6 and (holding, out) == (6, 6)
        gate.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert (most_holding, most_out) == (6, 6) and limiter.held == limiter.out == 0
        assert tasks[-1].cancelled() and all(t.done() and not t.cancelled() for t in tasks[:-1])

    asyncio.run(main())


def test_a_request_cancelled_as_its_slot_is_passed_on_gives_it_on():
    async def main():
        limiter = RateLimiter(1, enabled=False)
        await limiter.__aenter__()
        waiting = [asyncio.ensure_future(limiter.__aenter__()) for _ in range(2)]
        await asyncio.sleep(0)
        waiting[0].cancel()  # cancelled, and before it runs, the slot is given up
        await limiter.__aexit__()
        await asyncio.sleep(0)
        assert waiting[0].cancelled() and waiting[1].done() and limiter.held == 1
        await limiter.__aexit__()
        assert limiter.held == 0 and not limiter._slot_waiters

    asyncio.run(main())


# --- the limiter against the fake server's buckets, no HTTP -------------------------------------------


def simulate(limiter: RateLimiter, server: RateLimits, n: int, headers: bool = True, retries: int = 1000):
    """n requests through the limiter against the server's buckets, in one event loop: the server counts
    each attempt as it is let go and answers it after 20-200 ms (a 429 at once), in any order, with its
    headers or only Retry-After. Returns the counts and the seconds it took."""
    rng = random.Random(0)
    counts = {"admitted": 0, "rejected": 0, "tokens": 0, "failed": 0}

    async def one():
        tokens = rng.randint(100, 400)
        async with limiter:
            for _ in range(retries):
                ticket = await limiter.acquire(tokens)
                admitted, answer = server.admit(tokens)
                counts["admitted" if admitted else "rejected"] += 1
                counts["tokens"] += tokens if admitted else 0
                await asyncio.sleep(rng.uniform(0.02, 0.2) if admitted else 0.001)
                retry = float(answer.get("retry-after-ms", 0)) / 1000
                if not headers:
                    answer = {k: v for k, v in answer.items() if not k.startswith("x-ratelimit")}
                limiter.answered(ticket, answer, 200 if admitted else 429, retry)
                limiter.release(ticket)
                if admitted:
                    return
                await asyncio.sleep(retry)
            counts["failed"] += 1

    async def main():
        start = asyncio.get_running_loop().time()
        await asyncio.gather(*(one() for _ in range(n)))
        return asyncio.get_running_loop().time() - start

    elapsed = asyncio.run(main())
    return counts, elapsed


def test_paced_against_the_servers_buckets():
    """Answers in any order, costs of every size: next to no 429 and the limits used, all learnt from
    the headers (a window of 1 s, not a minute)."""
    rpm, tpm, window, n = 200, 40_000, 1.0, 500
    counts, elapsed = simulate(RateLimiter(256), RateLimits(rpm, tpm, window), n)
    share = max(counts["admitted"] / (rpm + rpm / window * elapsed), counts["tokens"] / (tpm + tpm / window * elapsed))
    assert counts["rejected"] <= 0.01 * n, counts
    assert share >= 0.85, (share, counts, elapsed)


def test_with_only_429s_to_go_by_far_fewer_than_sending_on():
    """A server that enforces limits without saying them: its 429s halve the attempts out and hold
    every attempt for the Retry-After; sending on at the same --concurrency draws far more 429s."""
    rpm, tpm, window, n = 100, 20_000, 1.0, 150
    paced, _ = simulate(RateLimiter(64), RateLimits(rpm, tpm, window), n, headers=False)
    blind, _ = simulate(RateLimiter(64, enabled=False), RateLimits(rpm, tpm, window), n, headers=False)
    assert paced["admitted"] == blind["admitted"] == n and paced["failed"] == blind["failed"] == 0
    assert paced["rejected"] * 3 < blind["rejected"], (paced, blind)


# --- gen_cot over real HTTP ----------------------------------------------------------------------------


N = 40  # questions per source: 80 first attempts at once, then second ones as answers are graded
LIMITED = {"rpm": 60, "tpm": 14_000, "window_s": 4.0}  # 15 requests a second; ~10 requests' tokens (~350 each)


def problems():
    return load_problems("gsm8k", GSM8K)[:N] + load_problems("math", MATH)[:N]


def server(**overrides):
    return start_in_thread(FakeServerConfig(problems=problems(), **overrides))


def gen_cot(srv, out, *extra, concurrency=64, limit=2 * N):
    return run_here("gen_cot.py", "--base_url", srv.url, "--model", "fake-llm", "--output_dir", out, "--inputs", GSM8K,
                    MATH, "--limit", limit, "--num_samples", 2, "--max_tokens", 256, "--concurrency", concurrency,
                    "--timeout", 10, *extra)


@pytest.fixture(scope="module")
def unlimited(tmp_path_factory):
    """A run against a server without limits (and without their headers): the rows and the most requests
    it had in flight at once."""
    out = tmp_path_factory.mktemp("unlimited")
    with server(latency=0.6) as srv:
        result = gen_cot(srv, out, concurrency=24)
        stats = srv.stats()
    assert result.returncode == 0, result.stderr[-2000:]
    return read_jsonl(out / "cot.jsonl"), stats


def test_without_headers_concurrency_reaches_the_ceiling(unlimited):
    rows, stats = unlimited
    assert stats["max_concurrent"] == 24 and "ratelimit" not in stats and rows


def test_gen_cot_under_rate_limits(tmp_path, unlimited):
    """The limits reached (the token bucket all but emptied), next to no 429 (<= 1%), the rows of the
    run without limits, and never more in flight than --concurrency."""
    with server(latency=0.1, **LIMITED) as srv:
        paced = gen_cot(srv, tmp_path)
        stats = srv.stats()
    assert paced.returncode == 0, paced.stderr[-2000:]
    counts = stats["ratelimit"]
    assert counts["admitted"] > 2 * N and counts["rejected"] <= 0.01 * stats["requests"], counts
    assert counts["lowest_remaining"]["tokens"] < 0.1 * LIMITED["tpm"], counts  # it did run into the limit
    ledger = json.loads((tmp_path / "cot.stats.json").read_text())["ledger"]
    assert ledger["rate_limited"] == counts["rejected"] and ledger["requests"] == counts["admitted"]
    assert read_jsonl(tmp_path / "cot.jsonl") == unlimited[0]
    assert stats["max_concurrent"] <= 64


def test_a_limited_server_without_headers(tmp_path, unlimited):
    """Only 429s and their Retry-After to go by: the run still ends with the rows of the run without
    limits, at the default --max_retries, and counts the 429s it was answered."""
    with server(latency=0.1, ratelimit_headers=False, **LIMITED) as srv:
        result = gen_cot(srv, tmp_path)
        counts = srv.stats()["ratelimit"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_jsonl(tmp_path / "cot.jsonl") == unlimited[0]
    ledger = json.loads((tmp_path / "cot.stats.json").read_text())["ledger"]
    assert ledger["rate_limited"] == counts["rejected"] > 0


def test_max_cost_holds_under_pacing(tmp_path):
    cap = 0.002
    with server(latency=0.05, **LIMITED) as srv:
        result = gen_cot(srv, tmp_path, "--model", "gpt-4o-mini", "--max_cost", str(cap))
        usage, counts = srv.stats()["usage"], srv.stats()["ratelimit"]
    spent = cost_of(price_of("gpt-4o-mini", "https://api.openai.com/v1"), usage["prompt_tokens"],
                    usage["completion_tokens"])
    stats = json.loads((tmp_path / "cot.stats.json").read_text())
    assert result.returncode == 3, result.stderr[-2000:]
    assert 0 < spent <= stats["spent_usd_at_most"] <= cap
    assert counts["rejected"] <= 0.01 * counts["admitted"] + 1


def test_waiting_on_the_limits_is_no_stall_but_a_stuck_server_is(tmp_path):
    """The stall watchdog counts time waiting on the server, not on its rate limits: about one request
    a second (~356 tokens each) with --stall_timeout 0.6 finishes; the same server stuck after 3
    answers stops the run."""
    slow = {"tpm": 800, "window_s": 2.0}
    with server(**slow) as srv:
        paced = gen_cot(srv, tmp_path / "paced", "--stall_timeout", "0.6", "--num_samples", "1", concurrency=1,
                        limit=6)
        counts = srv.stats()["ratelimit"]
    assert paced.returncode == 0, paced.stderr[-2000:]
    assert counts["admitted"] == 6 and counts["last_at"] - counts["first_at"] > 3  # it did wait on the limits
    with server(stall_after=3, **slow) as srv:
        stuck = gen_cot(srv, tmp_path / "stuck", "--stall_timeout", "1", "--num_samples", "1", concurrency=1,
                        limit=6)
    assert stuck.returncode == 5 and "--stall_timeout" in stuck.stderr, stuck.stderr[-2000:]
