"""Pacing under a server's rate limits: a steady send rate under the limits, lowered when the server
says it is too much.

A provider limits requests per minute (RPM) and tokens per minute (TPM; a request counts its prompt
and all of its max_tokens). It may enforce them over the minute or over shorter slices of it (OpenAI:
"60,000 RPM may be enforced as 1,000 requests/second"), count refused requests against the limit,
report the limits on every answer or not, and be shared by other clients of the same key:

    x-ratelimit-limit-requests     x-ratelimit-limit-tokens      the limits
    x-ratelimit-remaining-requests x-ratelimit-remaining-tokens  what is left, this request counted
    x-ratelimit-reset-requests     x-ratelimit-reset-tokens      until all of it is back: "1s", "6m0s", "20ms"

What holds in every one of those cases is a send rate, not a count: RateLimiter lets each attempt go
`1 / rate` seconds after the one before it (and `tokens / token_rate` for the tokens), so requests are
spread over time and never burst, whatever the headers say is left. The rates come from:

- the headers' limits: TARGET_SHARE of each limit's rate (the limit per window; the window is read
  from the reset header where it can be, else a minute). The rate starts at START_SHARE of it and
  climbs to it quickly (START_RECOVERY a second, over no fewer than START_ROUNDS answers' latency):
  another client of the key may be sending at the limit, and a full bucket does not show it;
- the headers' remaining falling, which says that every client of the key together takes more than
  the limit refills (Drain: over a second, or over SLOW_DRAIN_S for a slow fall, by more than arrivals'
  jitter): the rates are multiplied by DRAIN_TO of the refill over that rate (each client by as much,
  so that all together come to DRAIN_TO of the limit), and do not climb again until the bucket is
  back near full. Clients that climb alike and come down in proportion converge to equal shares
  (additive increase, multiplicative decrease);
- 429s: each multiplies the rates by DECREASE (once per round of attempts, and once per LOWER_GAP_S
  after the pause) and holds every attempt until its Retry-After; one whose headers leave most of
  every limit (or, without headers of its own, the latest answer's did), the first in ISOLATED_ATTEMPTS
  attempts (a 429 for another reason), by STRAY_DECREASE, holding only itself. While attempts are
  held the rates do not climb, and after the hold the pace starts afresh (no burst to catch up); from
  the third hold in a row (an attempt sent after a hold refused again), each hold doubles from
  MIN_HOLD_S up to MAX_HOLD_S (clients that all come back when told, where refusals count, would all be
  refused again for good).
  Without headers, every 429 holds every attempt for at least MIN_HOLD_S (the bucket of a server that
  counts refusals, or that another client shares, refills instead of being dug deeper), the first
  429 starts a pace under the rate the server took (bounded by a Retry-After said within the second;
  a whole-second one is rounded up and bounds nothing), a rate above what was sent over the last
  ADMITTED_S comes down to it (the holds, not the pace, set the sending), and every 429 caps the
  rates at PROBE_DECREASE of the rate the server admitted over the last ADMITTED_S (the attempts not
  answered 429: a refusal comes back at once, an answer takes its time), where it refused enough of
  them (SATURATED) to be at its limit. The rate then climbs back by RECOVERY of its target a second;
  without a target, slowly from NEAR of the rate of the last 429 (a 429 there lowers it by
  PROBE_DECREASE), faster the longer no 429 came (QUIET_S), so that probing above it costs a 429 now
  and then, not a stream of them. Measured over minutes of virtual time against every enforcement in
  tests/test_pacing_virtual_time.py, and in real time by bench/bench_ratelimit.py;
- the headers' remaining at (or near) zero, which says the limit is reached before a 429 does: the
  rates are lowered by LOW_DECREASE, at most once a second.

Until the first answer, at most INITIAL_CONCURRENCY attempts go out. A server that reports no limits
and has answered no 429 (a local vLLM) is not paced: the concurrency grows by one an answer (doubling
each round, as TCP's slow start) up to the --concurrency ceiling.
"""
import asyncio
import heapq
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field

KINDS = ("requests", "tokens")
INITIAL_CONCURRENCY = 4  # attempts out before the first answer says whether the server has limits
TARGET_SHARE = 0.99  # of a reported limit's rate: what the jitter of arrival times leaves to spare (measured: no 429 at 0.99)
DEFAULT_WINDOW = 60.0  # seconds a limit takes to refill from empty: RPM and TPM are per minute
MIN_WINDOW, MAX_WINDOW = 1.0, 60.0  # a window read from the headers outside these is not believed
MIN_USED = 10  # a window is read only from this many units used (remaining is rounded down: within 5%)
MIN_RESET = 0.01  # nor from a shorter reset (headers round it to the millisecond: within 5%)
WINDOW_READINGS = 25  # the closest readings of the window kept (their median, of those close enough, believed)
DECREASE = 0.85  # a 429: the rates times this
LOW_DECREASE = 0.95  # the headers' remaining near zero: the rates times this, at most once a second
LOW_REMAINING = 0.02  # "near zero": this share of the limit (at least one request's cost)
RECOVERY = 0.05  # after a decrease the rates climb back by this share of their target a second
NEAR = 0.93  # within this share of the rate of the last 429 ...
NEAR_RECOVERY = 0.003  # ... they climb by this share of it a second (probing, gently)
PROBE_DECREASE = 0.92  # without headers, a 429 met while probing near the rate of the last one, or a cap
#   at what the server admitted: the rates times this (under the limit by more than the probe overshoots)
STRAY_DECREASE = 0.95  # an isolated 429 that leaves most of the reported limits: the rates times this
ADMITTED_S = 1.0  # without headers, what the server admits is read over the attempts of this long ...
REFUSAL_MARGIN_S = 0.05  # ... that went this long ago, and twice as long as a 429 takes to come back,
SATURATED = 0.1  # ... where this share of them, and two at least, was refused (a stray 429 is no limit)
ISOLATED_ATTEMPTS = 100  # a 429 that leaves most of the limits, the first in this many attempts (1%): gently
LOWER_GAP_S = 1.0  # a 429 lowers the rates at most once this long after the last decrease's pause
PROBE_GROWTH = 0.2  # no limit known yet (a 429 while sending in bursts): the rates grow this share a second
CATCH_UP_S = 0.05  # lateness the pace makes up for (a short burst), so that it does not fall behind
SMOOTHING = 0.1  # the latency and the tokens of a request are averages over about this many answers, inverted
QUIET_S = 20.0  # without headers, the gentle climb near the last 429 is 1 + (seconds without one) / this times faster
MIN_HOLD_S = 0.25  # without headers, a 429 holds every attempt at least this long
MAX_HOLD_S = 8.0  # from the third hold in a row (attempts after a hold refused again), holds double up to this
DRAIN_S = 1.0  # a draining limit (clients of one key together above it) is read over this long ...
SLOW_DRAIN_S = 4.0  # ... and over this long, where it fell by
DRAIN_COSTS = 2  # ... this many requests' worth, and as many are missing from it, or
FAST_DRAIN_COSTS = 5  # ... sooner, from MIN_DRAIN_S on, where it fell by this many
MIN_DRAIN_S = 0.1  # (a reading spans this long at least)
MAX_DRAIN_DECREASE = 0.5  # a draining limit lowers the rates by at most this factor at once
START_SHARE = 0.6  # the headers' first limit: the rate starts at this share of its target, and climbs
START_RECOVERY = 0.5  # ... by this share of it a second until a decrease, at most
START_ROUNDS = 4  # ... taking at least this many answers' latency to reach it
DRAIN_TO = 0.9  # a draining limit: the rates times DRAIN_TO * refill / every client's rate (all together
#   come to this share of the refill, each keeping its share: the climbs, alike, make the shares equal)
CHARS_PER_TOKEN = 4  # the pacing estimate of a prompt's tokens (the server's count corrects it)

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|μs|ns)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}


def parse_duration(text) -> float | None:
    """Seconds of a reset header: Go-style durations ("1s", "6m0s", "20ms", "1h2m3.5s", "250us") or a
    plain number of seconds ("12", "0.5"); None for anything else."""
    if text is None:
        return None
    text = str(text).strip()
    try:
        value = float(text)
        return value if value >= 0 and math.isfinite(value) else None
    except ValueError:
        pass
    if not text or _DURATION.sub("", text):  # something that is not a duration part
        return None
    return sum(float(number) * _UNITS[unit] for number, unit in _DURATION.findall(text))


def duration_resolution(text) -> float:
    """The last digit's worth of a duration as written: "17ms" 0.001, "1.5s" 0.1, "6m0s" 1, "12" 1."""
    text = str(text).strip()
    parts = _DURATION.findall(text) or [(text, "s")]
    return min(_UNITS[unit] * 10.0 ** -(len(number.split(".")[1]) if "." in number else 0) for number, unit in parts)


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value >= 0 and math.isfinite(value) else None


def request_tokens(body: dict) -> int:
    """The tokens a request counts against a TPM limit, estimated as OpenAI's limiter does: its prompt's
    characters at CHARS_PER_TOKEN a token, and all of its max_tokens."""
    chars = sum(len(m["content"]) if isinstance(m.get("content"), str) else len(str(m.get("content") or ""))
                for m in body["messages"])
    limit = body.get("max_tokens") or body.get("max_completion_tokens") or 0
    return -(-chars // CHARS_PER_TOKEN) + limit


def smooth(average: float | None, value: float) -> float:
    return value if average is None else average + SMOOTHING * (value - average)


@dataclass
class Pace:
    """One limit's send rate, in units (requests, or tokens) a second; None: not paced."""
    limit: float | None = None  # from the headers
    target: float | None = None  # TARGET_SHARE of limit / window
    rate: float | None = None  # what is sent at now
    refused_at: float | None = None  # the rate of the last 429 (or near-zero remaining)
    next_at: float = 0.0  # when the next attempt may go, by this limit
    climbed_at: float = 0.0  # the last time the rate climbed
    unpaced: float = 0.0  # units sent before there was a rate, within a second of each other
    unpaced_at: float = -math.inf  # when the last of them went
    lowered_at: float = -math.inf  # the last time the remaining headers lowered it
    quiet_since: float = 0.0  # the end of the last 429's pause
    drained: bool = False  # clients of the key took more than refilled, and the bucket is not yet back near full

    def wait(self, now: float) -> float:
        return 0.0 if self.rate is None else max(0.0, self.next_at - now)

    def take(self, cost: float, now: float) -> None:
        """The next attempt goes cost / rate after this one's turn: an attempt that went late (the event
        loop is busy, a sleep overshoots) does not push the ones after it back, up to CATCH_UP_S. Before
        a rate is known, what goes is counted, for the pace to start after it."""
        if self.rate is not None:
            self.next_at = max(self.next_at, now - CATCH_UP_S) + cost / self.rate
        else:
            self.unpaced = (self.unpaced if now - self.unpaced_at < 1.0 else 0.0) + cost
            self.unpaced_at = now

    def set_limit(self, limit: float, window: float, now: float) -> None:
        """A limit the headers reported: the target follows it. The rate starts under it, at START_SHARE
        of it (another client of the key may be sending at the limit, and a full bucket does not show
        it: a start at the target would double the sending), after what went before it (the probe), and
        climbs from now."""
        self.limit = limit
        self.target = TARGET_SHARE * limit / window
        if self.rate is None:
            self.rate = START_SHARE * self.target
            self.next_at = max(self.next_at, self.unpaced_at + self.unpaced / self.rate)
            self.climbed_at = now
        self.rate = min(self.rate, self.target)

    def lower(self, factor: float, refused_at: float | None = None) -> None:
        """Multiplicative decrease; `refused_at`: the rate the refused attempt was sent at (a refusal
        of an attempt sent before an earlier decrease says nothing about the rate now)."""
        if self.rate is None:
            return
        self.refused_at = refused_at or self.rate
        self.rate = max(self.rate * factor, 1e-3)

    def climb(self, now: float, latency: float | None = None) -> None:
        """Additive increase: RECOVERY of the target a second, up to it (from the start, START_RECOVERY,
        in no fewer than START_ROUNDS answers' `latency`); without a target (no headers), RECOVERY of the
        last refused rate, and NEAR_RECOVERY of it near it (probing above it gently)."""
        if self.rate is None:
            return
        elapsed, self.climbed_at = max(0.0, now - self.climbed_at), max(now, self.climbed_at)
        if self.drained:  # clients of the key took more than refilled: not before it is made up
            return
        base = self.target or self.refused_at or self.rate
        step = RECOVERY * base if self.target or self.refused_at else PROBE_GROWTH * self.rate
        if self.target is not None and self.refused_at is None:  # the start under the target: quickly, as
            # fast as answers can say that other clients of the key fill the limit
            rounds_s = START_ROUNDS * (latency or 0.0)
            step = (min(START_RECOVERY, (1 - START_SHARE) / rounds_s) if rounds_s else START_RECOVERY) * base
        if self.target is None and self.refused_at is not None and NEAR * self.refused_at <= self.rate:
            # near the rate of the last 429: gently; well past it without a 429, it was no limit
            step = NEAR_RECOVERY * self.refused_at if self.rate <= self.refused_at / NEAR else RECOVERY * self.rate
            step *= 1 + max(0.0, now - self.quiet_since) / QUIET_S
        self.rate = self.rate + step * min(elapsed, 1.0)
        if self.target is not None:
            self.rate = min(self.rate, self.target)


class Window:
    """The seconds a limit takes to refill from empty: a minute (RPM, TPM) unless the reset headers say
    otherwise. A reading is reset * limit / used, within half the reset's last digit and half a unit of
    used (remaining is rounded down), taken where enough is used to read it within a few %, from the
    limit with the most used (a provider's limits share their window). The median of the WINDOW_READINGS
    closest readings so far, of those within twice the closest one's error, is believed when it is
    within bounds (a header that reports another bucket than the limit's gives scattered readings): at a
    steady rate under the limit every reading is the same coarse one (a few ms of reset), and the closer
    ones of busier moments are not pushed out by it."""

    def __init__(self):
        self.readings = []  # (-error, seconds): a heap of the closest readings, the least close first
        self.seconds = DEFAULT_WINDOW

    def read(self, limit: float, remaining: float, reset: float | None, resolution: float = 0.001) -> None:
        used = limit - remaining - 0.5  # remaining is rounded down: used is within half a unit of this
        if reset is None or reset < MIN_RESET or used < MIN_USED:  # too coarse to read within a few %
            return
        reading = (-(resolution / 2 / reset + 0.5 / used), reset * limit / used)
        if len(self.readings) < WINDOW_READINGS:
            heapq.heappush(self.readings, reading)
        elif reading[0] > self.readings[0][0]:  # closer than the least close kept
            heapq.heapreplace(self.readings, reading)
        closest = -max(self.readings)[0]
        values = sorted(seconds for error, seconds in self.readings if -error <= 2 * closest)
        median = values[len(values) // 2]
        if MIN_WINDOW <= median <= MAX_WINDOW:
            self.seconds = median


class Drain:
    """How fast every client of a key sends together, where that is more than the limit refills: between
    two answers the server's remaining fell by what every client sent less what refilled. Read from a
    mark below full (a full bucket hides what was taken) over DRAIN_S of sending, and over SLOW_DRAIN_S
    (a slow drain, as clients climb past the limit together, falls by less than the jitter in a second),
    where it fell by more than that jitter: DRAIN_COSTS requests' worth (FAST_DRAIN_COSTS over less than
    half of DRAIN_S), and as many are missing from it. The faster of the two readings counts."""

    def __init__(self):
        # kind -> span -> (sent_at, remaining) of the answers over that span
        self.marks = {kind: {span: deque() for span in (DRAIN_S, SLOW_DRAIN_S)} for kind in KINDS}
        self.since = dict.fromkeys(KINDS, -math.inf)  # readings start after this (the last decrease)

    def read(self, kind: str, sent_at: float, limit: float, remaining: float, cost: float,
             refill: float) -> float | None:
        """Every client's rate of `kind` together after an answer to an attempt sent at `sent_at`, where
        the bucket is draining; None where it is not, or not long enough to say."""
        if remaining >= limit - cost:  # full: every client together sends no more than it refills
            self.restart(kind, self.since[kind])
            return None
        if sent_at < self.since[kind]:
            return None
        together = None
        for longest, marks in self.marks[kind].items():
            marks.append((sent_at, remaining))
            while len(marks) > 2 and marks[1][0] <= sent_at - longest:
                marks.popleft()
            first_at, first_remaining = marks[0]
            span, fell = sent_at - first_at, (first_remaining - remaining) / cost
            if limit - remaining < DRAIN_COSTS * cost or span < MIN_DRAIN_S:
                continue  # near full (the jitter of arrivals), or too soon to say
            if fell >= (FAST_DRAIN_COSTS if span < DRAIN_S / 2 else DRAIN_COSTS):
                together = max(together or 0.0, refill + fell * cost / span)
        return together

    def restart(self, kind: str, now: float) -> None:
        """Readings of the rate from `now` on only (the rate changed)."""
        for marks in self.marks[kind].values():
            marks.clear()
        self.since[kind] = now


@dataclass
class Ticket:
    """One attempt let go by the limiter."""
    seq: int
    tokens: int
    sent_at: float
    rates: dict = field(default_factory=dict)  # kind -> the pace's rate when it went


class RateLimiter:
    """Concurrency under a ceiling, and pacing under the server's limits (see the module).

    `async with limiter:` holds one of `ceiling` slots for a request, across its retries (a semaphore);
    `await limiter.acquire(tokens)` lets one attempt of it go when its turn in the pace has come and
    fewer than `concurrency` attempts are out, and returns its Ticket; `limiter.answered(ticket,
    headers, status, retry_after)` reads the answer; `limiter.release(ticket)` ends the attempt,
    answered or not. Not bound to an event loop: waiters are futures of the loop that awaits."""

    def __init__(self, ceiling: int, enabled: bool = True, clock=time.monotonic):
        self.ceiling = max(1, ceiling)
        self.enabled = enabled
        self.clock = clock
        self.concurrency = float(self.ceiling if not enabled else min(self.ceiling, INITIAL_CONCURRENCY))
        self.reports_limits = None  # None until the first answer: whether the server sends the headers
        self.paces = {kind: Pace() for kind in KINDS}
        self.window = Window()
        self.drain = Drain()
        self.paused_until = 0.0  # no attempt goes before this (a 429's Retry-After)
        self._held_until = 0.0  # the end of the last 429's hold
        self.holds = 0  # holds in a row: a 429 of an attempt sent after the one before ended
        self.held = 0  # request slots held
        self.out = 0  # attempts let go and not released
        self._slot_waiters = deque()
        self._pace_waiters = deque()  # attempts waiting to go, first come first served
        self._released = None  # a future the first of those waits on when `concurrency` attempts are out
        self._seq = 0  # attempts let go
        self._lowered_seq = -1  # the attempts let go when a 429 last lowered the rates
        self._latency = None  # seconds from an attempt to its answer, smoothed
        self._answers = deque()  # when the last second's answers below 400 came
        self._sent_times = deque()  # when the attempts of the last few seconds went
        self._refused_times = deque()  # when those of them answered 429 went
        self._refusal_rtt = 0.0  # how long a 429 took to come back, at most, lately
        self._limits_left_seq = -ISOLATED_ATTEMPTS  # the attempt of the last 429 that left most of the limits
        self._lowered_at = -math.inf  # when a 429 last lowered the rates
        self._tokens = None  # tokens of an accepted attempt, smoothed
        self.last_accepted_at = clock()  # the latest answer below 400 (or the start)
        self.refused_since = 0  # 429s since then
        self.seen = {}  # the latest limit headers, for messages
        self.stats = {"rate_limited": 0, "waited_s": 0.0, "max_out": 0, "min_concurrency": self.concurrency}

    # --- request slots ---------------------------------------------------------------------------------

    async def __aenter__(self):
        if self.held < self.ceiling and not self._slot_waiters:
            self.held += 1
            return self
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter  # resolved by __aexit__, which passed its slot on
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                await self.__aexit__()  # given a slot just as it was cancelled: pass it on
            elif waiter in self._slot_waiters:
                self._slot_waiters.remove(waiter)
            raise
        return self

    async def __aexit__(self, *exc):
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on
                return
        self.held -= 1

    # --- attempts --------------------------------------------------------------------------------------

    def delay(self, tokens: int, now: float | None = None) -> float:
        """Seconds until an attempt may go by the pace (0: now); attempts out not counted."""
        if not self.enabled:
            return 0.0
        now = self.clock() if now is None else now
        return max(self.paused_until - now, *(pace.wait(now) for pace in self.paces.values()))

    def try_acquire(self, tokens: int) -> Ticket | None:
        """The attempt's Ticket if it may go now (and none waits before it), else None."""
        now = self.clock()
        if self._pace_waiters or self.out >= int(self.concurrency) or self.delay(tokens, now) > 0:
            return None
        return self._take(tokens, now)

    async def acquire(self, tokens: int) -> Ticket:
        """Wait until an attempt of `tokens` may go (after those waiting before it); take it."""
        ticket = self.try_acquire(tokens)
        if ticket is not None:
            return ticket
        started = self.clock()
        loop = asyncio.get_running_loop()
        turn = loop.create_future()
        self._pace_waiters.append(turn)
        try:
            if len(self._pace_waiters) > 1:
                await turn  # the one before us went
            while True:
                if (wait := self.delay(tokens)) > 0:
                    await asyncio.sleep(wait)
                elif self.out >= int(self.concurrency):
                    if self._released is None or self._released.done():
                        self._released = loop.create_future()
                    await self._released
                else:
                    break
        finally:
            self._pace_waiters.remove(turn)
            if self._pace_waiters and not self._pace_waiters[0].done():
                self._pace_waiters[0].set_result(None)
        self.stats["waited_s"] += self.clock() - started
        return self._take(tokens, self.clock())

    def _take(self, tokens: int, now: float) -> Ticket:
        self._seq += 1
        if self.enabled:
            self.paces["requests"].take(1, now)
            self.paces["tokens"].take(tokens, now)
        self.out += 1
        self._sent_times.append(now)
        self._forget(now)
        self.stats["max_out"] = max(self.stats["max_out"], self.out)
        return Ticket(seq=self._seq, tokens=tokens, sent_at=now,
                      rates={kind: pace.rate for kind, pace in self.paces.items()})

    def _margin(self) -> float:
        return max(REFUSAL_MARGIN_S, 2 * self._refusal_rtt)

    def _forget(self, now: float) -> None:
        horizon = now - 2 * ADMITTED_S - self._margin()
        for times in (self._sent_times, self._refused_times):
            while times and times[0] < horizon:
                times.popleft()

    def admitted_rate(self, now: float) -> float | None:
        """Attempts a second the server admitted lately, where it was at its limit: of those that went
        over ADMITTED_S, long enough ago for a 429 to have come back (a refusal comes back at once; an
        answer takes its time), those not refused. None before ADMITTED_S of sending, or where fewer
        than SATURATED of them were refused (the client, not the server, set the rate)."""
        end = now - self._margin()
        start = end - ADMITTED_S
        if not self._sent_times or self._sent_times[0] > start:
            return None
        sent = sum(1 for t in self._sent_times if start <= t < end)
        refused = sum(1 for t in self._refused_times if start <= t < end)
        if refused < max(2, SATURATED * sent):
            return None
        return (sent - refused) / ADMITTED_S

    def release(self, ticket: Ticket) -> None:
        """The attempt is over (answered, timed out, lost): another may go. Once per ticket."""
        self.out -= 1
        self._wake()

    def cancel(self, ticket: Ticket) -> None:
        """An attempt let go but not sent after all: released (its turn in the pace is not given back:
        the next attempt goes a little later, which costs nothing but that)."""
        self.release(ticket)

    def _wake(self) -> None:
        if self._released is not None and not self._released.done() and self.out < int(self.concurrency):
            self._released.set_result(None)

    def _set_concurrency(self, value: float) -> None:
        self.concurrency = min(float(self.ceiling), max(1.0, value))
        self.stats["min_concurrency"] = min(self.stats["min_concurrency"], self.concurrency)
        self._wake()

    @property
    def paced(self) -> bool:
        return any(pace.rate is not None for pace in self.paces.values())

    # --- answers -------------------------------------------------------------------------------------

    def answered(self, ticket: Ticket, headers=None, status: int | None = None,
                 retry_after: float | None = None) -> None:
        """Read an answer: the limits and what remains of them in its headers, a 429 (the rates lowered,
        every attempt held for `retry_after` seconds), or an acceptance (the rates climb back)."""
        if not self.enabled:
            return
        now = self.clock()
        found = self._read_headers(headers, ticket, now) if headers is not None else False
        if self.reports_limits is None and headers is not None:
            self.reports_limits = found
        if status == 429:
            # One that leaves most of the limits (by its headers, or by the latest answer's where a server
            # that reports them sent none with it), the first in ISOLATED_ATTEMPTS: a stray one; another
            # sooner says a limit the headers do not show (enforced per second) is reached. Counted in
            # attempts, not seconds: at any rate, strays that rare keep the 429s under 1%.
            limits_left = (found or bool(self.reports_limits)) and self._plenty_left()
            isolated = limits_left and ticket.seq - self._limits_left_seq >= ISOLATED_ATTEMPTS
            self._limits_left_seq = ticket.seq if limits_left else self._limits_left_seq
            self._refused(ticket, retry_after, now, limits_left=isolated)
        elif status is not None and status < 400:
            self.last_accepted_at, self.refused_since = now, 0
            if ticket.sent_at >= self._held_until:
                self.holds = 0
            self._latency = smooth(self._latency, now - ticket.sent_at)
            self._answers.append(now)
            while self._answers[0] < now - 1.0:
                self._answers.popleft()
            self._tokens = smooth(self._tokens, ticket.tokens)
            for pace in self.paces.values():
                pace.climb(now, self._latency)
            if not self.paced:  # slow start: one more out per answer, doubling each round
                self._set_concurrency(self.concurrency + 1)
            elif self.concurrency < self.ceiling:
                self._set_concurrency(self.ceiling)  # paced: the pace, not the count out, bounds the sending

    def _read_headers(self, headers, ticket: Ticket, now: float) -> bool:
        found = {}
        for kind in KINDS:
            limit = _number(headers.get(f"x-ratelimit-limit-{kind}"))
            remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
            if limit is not None and remaining is not None and limit > 0:
                found[kind] = (limit, remaining)
        resets = {kind: parse_duration(headers.get(f"x-ratelimit-reset-{kind}")) for kind in found}
        readable = [k for k in found if (resets[k] or 0) >= MIN_RESET]
        if readable:  # the window from the limit with the most units used: the closest reading
            kind = max(readable, key=lambda k: found[k][0] - found[k][1])
            self.window.read(*found[kind], resets[kind], duration_resolution(headers.get(f"x-ratelimit-reset-{kind}")))
        for kind, (limit, remaining) in found.items():
            pace = self.paces[kind]
            cost = self._cost(kind)
            refill = limit / self.window.seconds
            together = self.drain.read(kind, ticket.sent_at, limit, remaining, cost, refill)
            if remaining >= limit - DRAIN_COSTS * cost:
                pace.drained = False
            pace.set_limit(limit, self.window.seconds, now)
            if together is not None:  # clients of the key together above the limit: each down by as much
                pace.lower(max(MAX_DRAIN_DECREASE, DRAIN_TO * refill / together))
                pace.drained = True
                pace.climbed_at = max(pace.climbed_at, now)
                self.drain.restart(kind, now)
            self.seen[kind] = {"limit": limit, "remaining": remaining, "reset": headers.get(f"x-ratelimit-reset-{kind}")}
            if remaining <= max(LOW_REMAINING * limit, cost) and now - pace.lowered_at >= 1.0:
                pace.lowered_at = now  # the limit is reached, by this client or another of the same key
                pace.lower(LOW_DECREASE)
        return bool(found)

    def _plenty_left(self) -> bool:
        """Whether the latest headers leave more than LOW_REMAINING of every limit they report."""
        return all(s["remaining"] > max(LOW_REMAINING * s["limit"], self._cost(kind)) for kind, s in self.seen.items())

    def _cost(self, kind: str, ticket: Ticket | None = None) -> float:
        """What one request takes of a limit: 1 request, or its tokens (the average accepted attempt's,
        else this one's)."""
        return 1.0 if kind == "requests" else max(1.0, self._tokens or (ticket.tokens if ticket else 0))

    def _refused(self, ticket: Ticket, retry_after: float | None, now: float, limits_left: bool = False) -> None:
        """A 429. `limits_left`: an isolated one whose headers say the limits they report are far from
        reached (a 429 for another reason): a gentle decrease, and only the refused attempt waits its
        Retry-After."""
        self.stats["rate_limited"] += 1
        self.refused_since += 1
        self._refused_times.append(ticket.sent_at)
        self._refusal_rtt = max(now - ticket.sent_at, 0.9 * self._refusal_rtt)
        if not limits_left:  # no climbing while the server refuses: answers of earlier attempts say nothing
            hold = retry_after or 0.0
            if not self.reports_limits:
                hold = max(hold, MIN_HOLD_S)
            if ticket.sent_at >= self._held_until:  # went after the last hold, and refused again
                self.holds += 1
            if self.holds > 2:  # clients that all come back when told are all refused again: back off
                hold = max(hold, min(MAX_HOLD_S, MIN_HOLD_S * 2 ** (self.holds - 3)))
            self.paused_until = max(self.paused_until, now + hold)
            self._held_until = self.paused_until
            for pace in self.paces.values():  # and after the pause the pace starts afresh: no catching up
                pace.climbed_at = max(pace.climbed_at, self.paused_until)
                pace.next_at = max(pace.next_at, self.paused_until)
                pace.quiet_since = self.paused_until
        if not self.reports_limits and self.paced:
            self._down_to_sent(now, ticket)
        # Without headers, what the server admitted lately is the limit, where more was sent than it
        # admitted: no rate stays above it, whatever the round.
        admitted = None if self.reports_limits else self.admitted_rate(now)
        if admitted is not None and self.paced and self._cap(admitted, ticket):
            self._lowered_seq, self._lowered_at = self._seq, now + (retry_after or 0.0)
            for pace in self.paces.values():
                pace.climbed_at = max(pace.climbed_at, now + (retry_after or 0.0))
            return
        # Once per round (the attempts let go before the decrease saw the same limit), and once per
        # LOWER_GAP_S after the pause: a server that counts refusals refuses on while it recovers.
        if ticket.seq <= self._lowered_seq or now < self._lowered_at + LOWER_GAP_S:
            return
        self._lowered_seq, self._lowered_at = self._seq, now + (0.0 if limits_left else retry_after or 0.0)
        if not self.paced:
            # The first sign of a limit the server does not report, met while sending in bursts: pace
            # under the rate it was seen to take (the attempts out over an answer's time, at most the
            # last second's answers, and at most one per Retry-After), and grow by
            # PROBE_GROWTH a second until a 429 of the paced sending says where the limit is.
            sending = min(self.concurrency / max(self._latency or 1.0, 1e-3), len(self._answers) + 1.0)
            if retry_after and retry_after < 1.0:  # until one more fits (over an emptied limit: one refill), where said within the second (a whole-second Retry-After is rounded up: no bound)
                sending = min(sending, 1.0 / retry_after)
            if admitted:  # and at most what the server admitted (a burst over a full bucket drains it)
                sending = min(sending, admitted)
            for kind, pace in self.paces.items():
                pace.rate = DECREASE * sending * self._cost(kind, ticket)
                pace.climbed_at = now + (retry_after or 0.0)
            self._set_concurrency(self.ceiling)
            return
        for kind, pace in self.paces.items():
            sent_at = ticket.rates.get(kind)
            probing = pace.target is None and pace.refused_at and sent_at and sent_at >= NEAR * pace.refused_at
            pace.lower(STRAY_DECREASE if limits_left else PROBE_DECREASE if probing else DECREASE, sent_at)
            pace.climbed_at = max(pace.climbed_at, now if limits_left else now + (retry_after or 0.0))

    def _down_to_sent(self, now: float, ticket: Ticket) -> None:
        """A rate above what was sent over the last ADMITTED_S is none: the pauses of 429s (a whole-second
        Retry-After), not the pace, held the sending; the rate comes down to what went, for the decrease
        to start from."""
        sent = sum(1 for t in self._sent_times if t >= now - ADMITTED_S) / ADMITTED_S
        if sent and self._sent_times[0] <= now - ADMITTED_S:
            for kind, pace in self.paces.items():
                if pace.rate is not None and pace.target is None:
                    pace.rate = min(pace.rate, sent * self._cost(kind, ticket))

    def _cap(self, admitted: float, ticket: Ticket) -> bool:
        """Lower every unreported limit's rate to DECREASE of the rate the server admitted, where it
        was above it; whether it was."""
        capped = False
        for kind, pace in self.paces.items():
            unit = self._cost(kind, ticket)
            if pace.rate is not None and pace.target is None and pace.rate > admitted * unit:
                pace.refused_at, pace.rate = admitted * unit, max(PROBE_DECREASE * admitted * unit, 1e-3)
                capped = True
        return capped

    def describe(self) -> str:
        """The limits the server reported, and its 429s, for messages."""
        seen = ", ".join(f"{kind}: limit {s['limit']:g}, remaining {s['remaining']:g}, reset {s['reset']}"
                         for kind, s in self.seen.items()) or "no x-ratelimit headers"
        return f"{seen}; {self.refused_since} answers 429 in a row"
