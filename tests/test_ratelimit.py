"""Pacing under a server's rate limits (personamath/ratelimit.py), tried to break: the limiter alone on
a clock of its own, the limiter against the fake server's token buckets without HTTP, and gen_cot over
real HTTP against the fake server enforcing an RPM and a TPM limit (scaled to a window of seconds):
few 429s, the rows of an unlimited run, plain concurrency without headers, the budget cap, the stall
watchdog."""
import asyncio
import json
import math
import random

import pytest
from conftest import DATA, run_here

from fake_server import FakeServerConfig, RateLimits, format_duration, start_in_thread
from personamath.data import load_problems
from personamath.jsonl import read_jsonl
from personamath.llm import cost_of, price_of
from personamath.ratelimit import (DECREASE, INITIAL_CONCURRENCY, ISOLATED_ATTEMPTS, LOW_DECREASE, MAX_HOLD_S, MIN_HOLD_S, RECOVERY, STRAY_DECREASE, TARGET_SHARE,
                                   DRAIN_TO, START_RECOVERY, START_SHARE, RateLimiter, Drain, Ticket, parse_duration, request_tokens)

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


def test_the_fake_server_enforces_per_slice_and_can_count_refusals():
    clock = Clock()
    server = RateLimits(rpm=600, tpm=None, window_s=60.0, clock=clock, enforce_s=1.0)
    # 10 a second: the 11th in the same second is refused though the minute has 590 left
    assert [server.admit(1)[0] for _ in range(11)] == [True] * 10 + [False]
    clock.now += 0.1
    assert server.admit(1)[0] and not server.admit(1)[0]
    counted = RateLimits(rpm=600, tpm=None, window_s=60.0, clock=clock, enforce_s=1.0, count_refused=True)
    assert all(counted.admit(1)[0] for _ in range(10)) and not counted.admit(1)[0]  # refused, and charged
    clock.now += 0.1
    assert not counted.admit(1)[0]  # the refill paid the refused one's debt
    clock.now += 0.2
    assert counted.admit(1)[0]


def test_request_tokens_count_the_prompt_and_all_of_max_tokens():
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 256}
    assert request_tokens(body) == 100 + 256  # as OpenAI's limiter counts: characters / 4, and max_tokens
    assert request_tokens({**body, "max_tokens": 2048}) - request_tokens(body) == 2048 - 256


# --- the limiter on its own clock --------------------------------------------------------------------


def sends(limiter: RateLimiter, clock: Clock, seconds: float, tokens: int = 100, step: float = 0.01) -> list[float]:
    """When attempts went, trying every `step` seconds for `seconds` (each released at once)."""
    times = []
    for _ in range(round(seconds / step)):
        while (ticket := limiter.try_acquire(tokens)) is not None:
            times.append(clock.now)
            limiter.release(ticket)
        clock.now += step
    return times


def ramp(limiter: RateLimiter, clock: Clock, headers: dict) -> None:
    """Answers with `headers` every 0.1 s until the rate has climbed from its start (START_SHARE of the
    target) to the target."""
    pace = limiter.paces["requests"]
    assert pace.rate == pytest.approx(START_SHARE * pace.target)
    while pace.rate < pace.target:
        clock.now += 0.1
        limiter.answered(Ticket(0, 1, clock.now), headers, 200)  # (not sent: no turn of the pace taken)
        assert clock.now < 1000 + 2 * (1 - START_SHARE) / START_RECOVERY


def most_in_a_second(times: list[float]) -> int:
    return max(sum(1 for u in times if t <= u < t + 1) for t in times)


def test_reported_limits_are_paced_evenly_whatever_remains():
    """600 requests a minute, the bucket full: 599 remaining is no licence to burst. Attempts go one
    every 60 / (600 * TARGET_SHARE) seconds, so a limit enforced per second (10 a second) holds too."""
    clock = Clock()
    limiter = RateLimiter(256, clock=clock)
    first = limiter.try_acquire(100)
    headers = limits(requests=(600, 599, "100ms"), tokens=(600_000, 599_900, "10ms"))
    limiter.answered(first, headers, 200)
    limiter.release(first)
    ramp(limiter, clock, headers)
    times = sends(limiter, clock, 10)
    assert len(times) == pytest.approx(TARGET_SHARE * 10 * 10, abs=2)
    # within every second's share of the limit (after the first: an idle pace lets one go CATCH_UP_S early)
    assert most_in_a_second(times[1:]) <= 10
    assert limiter.window.seconds == pytest.approx(60, rel=0.01)  # read from the tokens' reset


def test_the_token_limit_paces_by_the_tokens_and_the_window_is_read_from_reset():
    clock = Clock()
    limiter = RateLimiter(256, clock=clock)
    # 6000 tokens a 10-s window (1000 used, back in 1.667 s): 600 tokens a second
    limiter.answered(limiter.try_acquire(1000), limits(tokens=(6000, 5000, "1.667s")), 200)
    assert limiter.window.seconds == pytest.approx(10, rel=0.01)
    assert limiter.paces["requests"].rate is None  # never named: never waited for
    times = sends(limiter, clock, 10, tokens=300)
    # at the start's rate (no answers: no climbing), after the first 1000
    assert len(times) == pytest.approx((START_SHARE * TARGET_SHARE * 600 * 10 - 1000) / 300, abs=1.5)


def test_a_reset_of_another_bucket_than_the_limits_is_not_believed():
    """A server whose remaining and reset describe a per-second bucket beside a per-minute limit: the
    readings scatter below a second, and the window stays a minute."""
    clock = Clock()
    limiter = RateLimiter(256, clock=clock)
    for remaining, reset in ((5, "500ms"), (2, "800ms"), (8, "200ms"), (0, "1s"), (4, "600ms")):
        limiter.answered(Ticket(0, 1, clock.now), limits(requests=(600, remaining, reset)), 200)
    assert limiter.window.seconds == 60


def test_a_429_lowers_the_rate_once_a_round_holds_everything_and_the_rate_climbs_back():
    clock = Clock()
    limiter = RateLimiter(256, clock=clock)
    headers = limits(requests=(600, 599, "100ms"), tokens=(10**6, 10**6 - 1000, "60ms"))  # a minute's window
    limiter.answered(limiter.try_acquire(1), headers, 200)
    ramp(limiter, clock, headers)
    target = limiter.paces["requests"].rate
    assert target == pytest.approx(TARGET_SHARE * 10)
    round1 = []
    while len(round1) < 3:  # three attempts out, one each 1 / rate seconds
        ticket = limiter.try_acquire(1)
        round1.append(ticket) if ticket else setattr(clock, "now", clock.now + 0.05)
    spent = limits(requests=(600, 0, "6s"), tokens=(10**6, 10**6 - 1000, "60ms"))  # the limit reached
    limiter.answered(round1[0], spent, 429, retry_after=2.0)  # (remaining 0 lowers by LOW_DECREASE too)
    assert limiter.paces["requests"].rate == pytest.approx(target * LOW_DECREASE * DECREASE)
    assert limiter.delay(1) >= 2.0 - 1e-9 and limiter.try_acquire(1) is None  # nobody goes before Retry-After
    limiter.answered(round1[1], spent, 429, retry_after=2.0)  # the same round: no second decrease
    assert limiter.paces["requests"].rate == pytest.approx(target * LOW_DECREASE * DECREASE)
    assert limiter.stats["rate_limited"] == 2
    clock.now += 2.0
    for second in range(1, 3):  # accepted answers: back by RECOVERY of the target a second
        clock.now += 1.0
        limiter.answered(limiter.try_acquire(1) or Ticket(0, 1, clock.now), headers, 200)
        assert limiter.paces["requests"].rate == pytest.approx(
            target * min(1, LOW_DECREASE * DECREASE + second * RECOVERY), rel=0.02)
    for _ in range(5):
        clock.now += 12
        limiter.answered(Ticket(0, 1, clock.now), headers, 200)
    assert limiter.paces["requests"].rate == pytest.approx(target)  # and never above it


def test_a_429_while_the_headers_leave_most_of_the_limits_lowers_gently_and_holds_only_itself():
    """An isolated 429 that is not the reported limits' (a stray one): STRAY_DECREASE, and the other
    attempts go on; a second soon after is a limit the headers do not show (one enforced per second)."""
    clock = Clock()
    limiter = RateLimiter(256, clock=clock)
    headers = limits(requests=(600, 599, "100ms"), tokens=(10**6, 10**6 - 1000, "60ms"))
    limiter.answered(limiter.try_acquire(1), headers, 200)
    target = limiter.paces["requests"].rate
    clock.now += 1
    limiter.answered(limiter.try_acquire(1), headers, 429, retry_after=2.0)
    assert limiter.paces["requests"].rate == pytest.approx(target * STRAY_DECREASE)
    assert limiter.paused_until < clock.now + 1  # no pause for everyone
    clock.now += 1
    assert limiter.try_acquire(1) is not None
    clock.now += 1  # another within ISOLATED_ATTEMPTS: a limit the headers do not show (per second): a decrease, a pause
    limiter.answered(limiter.try_acquire(1), headers, 429, retry_after=2.0)
    assert limiter.paces["requests"].rate < target * STRAY_DECREASE * DECREASE * 1.01
    assert limiter.paused_until >= clock.now + 2.0 - 1e-9


def test_stray_429s_rarer_than_one_in_isolated_attempts_each_lower_gently_with_or_without_headers():
    """A server that reports its limits sends a stray 429 without them (an overload, a fault): judged by
    the latest answer's headers. Strays ISOLATED_ATTEMPTS apart, at any rate, each cost STRAY_DECREASE
    and no pause; the rate recovers in between."""
    clock = Clock()
    limiter = RateLimiter(256, clock=clock)
    headers = limits(requests=(6000, 5999, "10ms"), tokens=(10**7, 10**7 - 1000, "6ms"))
    limiter.answered(limiter.try_acquire(1), headers, 200)
    ramp(limiter, clock, headers)
    target = limiter.paces["requests"].rate
    for stray in range(3):
        for _ in range(ISOLATED_ATTEMPTS):  # 100 a second: strays far more often than ISOLATED_S used to allow
            clock.now += 0.01
            ticket = limiter._take(1, clock.now)
            limiter.answered(ticket, headers, 200)
            limiter.release(ticket)
        assert limiter.paces["requests"].rate == pytest.approx(target)
        ticket = limiter._take(1, clock.now)
        limiter.answered(ticket, {}, 429, retry_after=1.0)  # no headers with it
        limiter.release(ticket)
        assert limiter.paces["requests"].rate >= target * STRAY_DECREASE - 1e-9  # (within LOWER_GAP_S: not at all)
        assert limiter.paused_until <= clock.now
    for _ in range(10):  # one more 10 attempts later (after LOWER_GAP_S): no stray, a limit
        clock.now += 0.15
        ticket = limiter._take(1, clock.now)
        limiter.answered(ticket, headers, 200)
        limiter.release(ticket)
    target = limiter.paces["requests"].rate
    ticket = limiter._take(1, clock.now)
    limiter.answered(ticket, {}, 429, retry_after=1.0)
    assert limiter.paces["requests"].rate == pytest.approx(target * DECREASE)
    assert limiter.paused_until >= clock.now + 1.0 - 1e-9


@pytest.mark.parametrize("others_rate", [0.0, 100_000.0])
def test_drain_reads_every_client_together_where_they_take_more_than_refills_and_nothing_where_not(others_rate):
    """Tokens refill at 400,000 a second; this client sends 90 attempts of 4,000 a second (360,000),
    another client 100,000 tokens a second more, or nothing. The readings are as noisy as at a real
    server: the attempts reach it 0-30 ms after they went, so not in the order they went; the window is
    read within +-3%; the sending stalls for 0.2 s every 5 s and catches up. Together above the refill,
    every reading is near the truth; under it (the bucket refills), there is none."""
    rng = random.Random(0)
    drain = Drain()
    limit, refill, cost = 24e6, 400_000.0, 4000.0
    went, t = [], 0.0
    while t < 30.0:  # when the attempts went
        t += 1 / 90 if t % 5 > 0.2 else 0.2
        went.append(t)
    arrivals = sorted((sent_at + rng.uniform(0, 0.03), sent_at) for sent_at in went)
    bucket, clock, readings = limit / 2, 0.0, []
    for arrival, sent_at in arrivals:  # the server admits each, and its answer is read
        bucket += refill * (arrival - clock) - others_rate * (arrival - clock) - cost
        clock = arrival
        reading = drain.read("tokens", sent_at, limit, math.floor(bucket), cost, refill * rng.uniform(0.97, 1.03))
        if sent_at > 10:
            readings.append(reading)
    if not others_rate:
        assert readings == [None] * len(readings)
        return
    average, peak = len(went) * cost / went[-1] + others_rate, 90 * cost + others_rate  # (the stalls: average)
    found = [r for r in readings if r is not None]
    assert len(found) > 0.8 * len(readings)
    assert all(refill * 0.97 <= r <= 1.1 * peak for r in found), (min(found), max(found))  # none far off
    assert sum(found) / len(found) == pytest.approx(average, rel=0.05)


def test_a_draining_limit_brings_every_client_down_together_and_none_climbs_until_it_is_full_again():
    """Headers say the bucket is falling faster than this client's own sending explains (another
    client of the key, at 10 a second): the rate comes down by DRAIN_TO of the refill over every client's
    rate together (each client by as much: their shares kept), and it does not climb back while the
    bucket is below full."""
    clock = Clock()
    limiter = RateLimiter(256, clock=clock)
    pace = limiter.paces["requests"]
    limit, refill, other = 600.0, 10.0, 10.0  # 600 a minute
    remaining, before, start = limit, None, clock.now
    while before is None or pace.rate >= before:
        before = pace.rate
        sending = before or 1.0
        clock.now += 1 / sending
        ticket = limiter._take(1, clock.now)
        remaining = max(0.0, remaining + (refill - other) / sending - 1)
        limiter.answered(ticket, {"x-ratelimit-limit-requests": str(limit),
                                  "x-ratelimit-remaining-requests": str(math.floor(remaining)),
                                  "x-ratelimit-reset-requests": f"{(limit - remaining) / refill:.3f}s"}, 200)
        limiter.release(ticket)
        assert clock.now < start + 30
    assert pace.rate == pytest.approx(before * DRAIN_TO * refill / (before + other), rel=0.15)
    lowered, remaining = pace.rate, limit - 50

    def answer(remaining):
        clock.now += 0.1
        ticket = limiter._take(1, clock.now)
        limiter.answered(ticket, {"x-ratelimit-limit-requests": str(limit),
                                  "x-ratelimit-remaining-requests": str(math.floor(remaining))}, 200)
        limiter.release(ticket)

    for _ in range(20):  # the other client stopped: the bucket refills, not yet full
        remaining += 0.5
        answer(remaining)
    assert pace.rate == lowered
    for _ in range(20):  # full again: the rate climbs
        answer(limit - 1)
    assert pace.rate > lowered


def test_without_headers_every_429_caps_the_rate_at_what_the_server_admitted():
    """No headers: the attempts of the last second not answered 429 (a refusal comes back at once) are
    what the server admits; a client sending three times that is brought under it."""
    clock = Clock()
    limiter = RateLimiter(256, clock=clock)
    limiter.answered(limiter.try_acquire(1), {}, 200)
    limiter.answered(limiter.try_acquire(1), {}, 429)  # pacing starts
    limiter.paces["requests"].rate = 30.0
    for i in range(45):  # 30 attempts a second (whatever the pace says), one in three admitted
        clock.now += 1 / 30
        ticket = limiter._take(1, clock.now)
        limiter.answered(ticket, {}, 200 if i % 3 == 0 else 429)
        limiter.release(ticket)
    assert limiter.admitted_rate(clock.now) == pytest.approx(10, abs=1.5)
    assert limiter.paces["requests"].rate <= limiter.admitted_rate(clock.now)
    assert limiter.paces["requests"].refused_at == pytest.approx(10, abs=1.5)  # where it probes gently
    for i in range(45):  # then a stray 429 among answers: the client set the rate, nothing is read
        clock.now += 1 / 30
        ticket = limiter._take(1, clock.now)
        limiter.answered(ticket, {}, 429 if i == 40 else 200)
        limiter.release(ticket)
    assert limiter.admitted_rate(clock.now) is None


@pytest.mark.parametrize("headers", [True, False], ids=["headers", "no_headers"])
def test_an_attempt_refused_again_after_a_hold_doubles_the_next_hold(headers):
    """Where refusals count, clients that all come back when the Retry-After says are all refused again,
    for good: from the third hold in a row (a 429 of an attempt sent after the last hold ended), holds
    double from MIN_HOLD_S up to MAX_HOLD_S; 429s of attempts sent before it do not count; an accepted
    attempt sent after it starts over."""
    clock = Clock()
    limiter = RateLimiter(256, clock=clock)
    seen = limits(requests=(600, 0, "100ms")) if headers else {}
    limiter.answered(limiter._take(1, clock.now), seen, 200)
    holds = []
    for _ in range(8):  # each time the hold ends, one attempt goes and is refused again: up to the cap
        clock.now = max(clock.now, limiter.paused_until)
        ticket = limiter._take(1, clock.now)
        clock.now += 0.002
        limiter.answered(ticket, seen, 429, retry_after=0.1)
        limiter.release(ticket)
        holds.append(round(limiter.paused_until - clock.now, 3))
    first = 0.1 if headers else MIN_HOLD_S
    assert holds == [first, first] + [min(MAX_HOLD_S, MIN_HOLD_S * 2 ** i) for i in range(6)]
    clock.now = limiter.paused_until
    accepted = limiter._take(1, clock.now)
    limiter.answered(accepted, seen, 200)
    assert limiter.holds == 0
    for _ in range(5):
        clock.now = max(clock.now, limiter.paused_until)
        ticket = limiter._take(1, clock.now)
        limiter.answered(ticket, seen, 429, retry_after=0.1)
    assert limiter.paused_until - clock.now == pytest.approx(1.0)  # (first, first, 0.25, 0.5, 1)
    earlier = limiter._take(1, clock.now - 20)  # an attempt sent before the hold: no doubling
    limiter.answered(earlier, seen, 429, retry_after=0.1)
    assert limiter.paused_until - clock.now == pytest.approx(1.0)
    clock.now = limiter.paused_until
    accepted = limiter._take(1, clock.now)
    limiter.answered(accepted, seen, 200)
    assert limiter.holds == 0
    ticket = limiter._take(1, clock.now)
    limiter.answered(ticket, seen, 429, retry_after=0.1)
    assert limiter.paused_until - clock.now == pytest.approx(first)


def test_remaining_at_zero_lowers_the_rate_at_most_once_a_second():
    """Another client of the same key may take the limit before a 429 says so: remaining at zero."""
    clock = Clock()
    limiter = RateLimiter(256, clock=clock)
    limiter.answered(limiter.try_acquire(1), limits(requests=(600, 300, "30s")), 200)
    target = limiter.paces["requests"].rate
    empty = limits(requests=(600, 0, "60s"))
    limiter.answered(limiter.try_acquire(1) or Ticket(0, 1, clock.now), empty, 200)
    lowered = limiter.paces["requests"].rate
    assert lowered < target and limiter.stats["rate_limited"] == 0
    limiter.answered(Ticket(0, 1, clock.now), empty, 200)
    assert limiter.paces["requests"].rate == lowered


def test_without_headers_a_slow_start_and_no_pacing_until_a_429():
    clock = Clock()
    limiter = RateLimiter(48, clock=clock)
    assert limiter.concurrency == INITIAL_CONCURRENCY  # until the server says whether it has limits
    tickets = [limiter.try_acquire(10 ** 6) for _ in range(INITIAL_CONCURRENCY)]
    assert None not in tickets and limiter.try_acquire(1) is None
    for ticket in tickets:  # each answer lets one more out: doubling each round, up to the ceiling
        clock.now += 0.5
        limiter.answered(ticket, {"content-type": "application/json"}, 200)
        limiter.release(ticket)
    assert limiter.reports_limits is False and limiter.concurrency == 2 * INITIAL_CONCURRENCY
    for _ in range(100):
        limiter.answered(Ticket(0, 1, clock.now - 0.5), {}, 200)
    assert limiter.concurrency == 48 and not limiter.paced  # a local server: plain concurrency, no pace
    ticket = limiter.try_acquire(1)
    limiter.answered(ticket, {}, 429, retry_after=0.5)  # a 429 with nothing but Retry-After
    assert limiter.paced and limiter.paces["requests"].rate <= DECREASE * 48 / 0.5
    assert limiter.try_acquire(1) is None  # paused
    off = RateLimiter(48, enabled=False, clock=clock)  # --pacing off: a fixed concurrency, nothing else
    assert off.concurrency == 48
    ticket = off.try_acquire(10)
    off.answered(ticket, limits(requests=(10, 0, "1s")), 429, retry_after=30)
    assert off.concurrency == 48 and off.delay(10) == 0 and off.try_acquire(10) is not None


# --- the limiter against the fake server's buckets, no HTTP -------------------------------------------


def simulate(limiters: list[RateLimiter], server: RateLimits, n: int, headers: bool = True, retries: int = 1000):
    """n requests through each limiter against the server's buckets (several limiters: clients of one
    key), in one event loop: the server counts each attempt as it is let go and answers it after 20-200
    ms (a 429 at once), in any order, with its headers or only Retry-After. Returns each limiter's
    counts and the seconds until all were done."""
    rng = random.Random(0)
    counts = [{"admitted": 0, "rejected": 0, "tokens": 0, "failed": 0, "done_at": 0.0} for _ in limiters]

    async def one(limiter, count):
        tokens = rng.randint(100, 400)
        async with limiter:
            for _ in range(retries):
                ticket = await limiter.acquire(tokens)
                admitted, answer = server.admit(tokens)
                count["admitted" if admitted else "rejected"] += 1
                count["tokens"] += tokens if admitted else 0
                await asyncio.sleep(rng.uniform(0.02, 0.2) if admitted else 0.001)
                retry = float(answer.get("retry-after-ms", 0)) / 1000
                if not headers:
                    answer = {k: v for k, v in answer.items() if not k.startswith("x-ratelimit")}
                limiter.answered(ticket, answer, 200 if admitted else 429, retry)
                limiter.release(ticket)
                if admitted:
                    count["done_at"] = max(count["done_at"], asyncio.get_running_loop().time() - start)
                    return
                await asyncio.sleep(retry)
            count["failed"] += 1

    async def main():
        nonlocal start
        start = asyncio.get_running_loop().time()
        await asyncio.gather(*(one(limiter, count) for limiter, count in zip(limiters, counts) for _ in range(n)))
        return asyncio.get_running_loop().time() - start

    start = 0.0
    elapsed = asyncio.run(main())
    return counts, elapsed


@pytest.mark.parametrize("enforce_s, count_refused", [(None, False), (0.5, True)])
def test_paced_against_the_servers_buckets(enforce_s, count_refused):
    """Answers in any order, costs of every size, the limits enforced over the window or over slices of
    it too (per second, scaled: slices of half a second, 10 requests), refusals counted or not: next to no 429 and
    the limits used (against their steady rate: a full bucket's burst is not the limit)."""
    rpm, tpm, window, n = 120, 24_000, 6.0, 150
    (counts,), elapsed = simulate([RateLimiter(256)], RateLimits(rpm, tpm, window, enforce_s=enforce_s,
                                                                  count_refused=count_refused), n)
    share = max(counts["admitted"] / (rpm / window * elapsed), counts["tokens"] / (tpm / window * elapsed))
    assert counts["rejected"] <= 0.01 * n, counts
    assert share >= 0.9, (share, counts, elapsed)


def test_two_clients_of_one_key_share_its_limits():
    """Two limiters on one account (TPM-bound), enforced per (scaled) second, refusals counted: together
    near the limit, few 429s each, neither starved."""
    rpm, tpm, window, n = 10_000, 24_000, 6.0, 100
    server = RateLimits(rpm, tpm, window, enforce_s=0.5, count_refused=True)
    counts, elapsed = simulate([RateLimiter(256), RateLimiter(256)], server, n)
    together = sum(c["tokens"] for c in counts) / (tpm / window * elapsed)
    assert together >= 0.65, (together, counts, elapsed)  # a short run: its start weighs (the bench: a minute)
    assert all(c["rejected"] <= 0.15 * n for c in counts), counts  # the first collision (the bench: 0)
    assert min(c["done_at"] for c in counts) >= 0.6 * max(c["done_at"] for c in counts), counts  # neither starved


def test_with_only_429s_to_go_by_far_fewer_than_sending_on():
    """A server that enforces limits without saying them: its 429s set a pace and hold every attempt for
    the Retry-After; sending on at the same --concurrency draws far more 429s."""
    rpm, tpm, window, n = 100, 20_000, 1.0, 150
    (paced,), _ = simulate([RateLimiter(64)], RateLimits(rpm, tpm, window), n, headers=False)
    (blind,), _ = simulate([RateLimiter(64, enabled=False)], RateLimits(rpm, tpm, window), n, headers=False)
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
    span = max(t for t, admitted, *_ in counts["answers"] if admitted)
    share = counts["admitted_tokens"] / (LIMITED["tpm"] / LIMITED["window_s"] * span)
    assert share >= 0.85, (share, counts)  # the limit reached (its steady rate: no burst of the full bucket)
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


def test_refused_everything_for_the_stall_timeout_stops_naming_the_limits(tmp_path):
    """An account whose limits are spent (here 2 requests a 10-minute window, refusals counted): every
    request is answered 429. The stage does not wait forever: after --stall_timeout it stops, resumable,
    naming the limits it saw, and what was answered is kept."""
    with server(rpm=2, window_s=600, count_refused=True) as srv:
        result = gen_cot(srv, tmp_path, "--stall_timeout", "3", "--num_samples", "1", limit=6)
        counts = srv.stats()["ratelimit"]
    assert result.returncode == 5, result.stderr[-2000:]
    assert "refused every request (429)" in result.stderr and "requests: limit 2" in result.stderr, result.stderr
    assert counts["admitted"] == 2 and counts["rejected"] >= 1
    stats = json.loads((tmp_path / "cot.stats.json").read_text())
    assert stats["finished_items"] >= 1 and not stats["complete"]
