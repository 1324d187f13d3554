"""Pacing under a server's rate limits, read from the x-ratelimit-* headers of its answers.

An OpenAI-compatible server that enforces requests-per-minute (RPM) and tokens-per-minute (TPM)
limits reports them on every answer, and answers 429 with Retry-After beyond them:

    x-ratelimit-limit-requests     x-ratelimit-limit-tokens      the limits
    x-ratelimit-remaining-requests x-ratelimit-remaining-tokens  what is left, this request counted
    x-ratelimit-reset-requests     x-ratelimit-reset-tokens      until all of it is back: "1s", "6m0s", "20ms"

Both limits behave as token buckets: a request takes 1 from the request bucket and its tokens (its
prompt and its max_tokens, which the server counts in full) from the token bucket, and both refill
continuously, the whole limit in a window (a minute at OpenAI; reset = used / limit * window, from
which the window is read, so a server with a shorter window is paced right too).

RateLimiter keeps a model of both buckets, corrected by every answer to what the server said it had
when it counted that request, and lets an attempt go only when it fits in both (keeping back what
refills in RESERVE_S): requests and estimated tokens sent stay under what the server has left, so
the requests in flight rise and fall with the limits, up to the --concurrency ceiling. A 429 halves
the attempts allowed out at once (once per round of attempts) and holds every attempt until its
Retry-After has passed; each later answer below 400 raises that number again, by one (the limits
known: the buckets pace) or by one per round of answers (only 429s to go by, as TCP does). Until the
first answer says whether the server reports limits, at most INITIAL_CONCURRENCY attempts go out; a
server that reports none (a local vLLM) then gets plain concurrency: the ceiling, no pacing.
"""
import asyncio
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field

KINDS = ("requests", "tokens")
INITIAL_CONCURRENCY = 16  # in flight before the first answer tells whether the server has limits
DEFAULT_WINDOW = 60.0  # seconds a limit takes to refill from empty: RPM and TPM are per minute
MIN_WINDOW, MAX_WINDOW = 0.05, 60.0  # bounds on the window read from the headers
MIN_RESET = 0.05  # a shorter reset is too coarse (headers round it to the ms) to read the window from
MIN_USED = 10  # nor from fewer units used (remaining is rounded down): the window is read within 10%
RESERVE_S = 0.1  # what the limits refill in this long is kept back, for the jitter of when the server counts
RESERVE_SHARE = 0.05  # but never more than this share of a limit
SKEW_S = 0.5  # an attempt sent this soon before another may reach the server after it
CHARS_PER_TOKEN = 4  # the pacing estimate of a prompt's tokens (the server's count corrects it)
MESSAGE_TOKENS = 4  # the chat format's tokens around each message

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


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value >= 0 and math.isfinite(value) else None


def request_tokens(body: dict) -> int:
    """The tokens a request counts against a TPM limit, estimated: its prompt at CHARS_PER_TOKEN
    characters a token plus the chat format, and all of its max_tokens."""
    chars = sum(len(m["content"]) if isinstance(m.get("content"), str) else len(str(m.get("content") or ""))
                for m in body["messages"])
    limit = body.get("max_tokens") or body.get("max_completion_tokens") or 0
    return -(-chars // CHARS_PER_TOKEN) + MESSAGE_TOKENS * (len(body["messages"]) + 1) + limit


@dataclass
class Bucket:
    """One limit as the client sees it: None until a header names it (then it is never waited for)."""
    limit: float | None = None
    window: float = DEFAULT_WINDOW  # seconds to refill from empty
    level: float = 0.0  # what the server has left, as of `stamp`, by the model
    stamp: float = 0.0
    corrected: float = 0.0  # every correction ever applied from the headers

    @property
    def rate(self) -> float:
        return self.limit / self.window

    def refill(self, now: float) -> None:
        if self.limit is not None and now > self.stamp:
            self.level = min(self.limit, self.level + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def wait(self, cost: float, now: float) -> float:
        """Seconds until `cost` fits with the reserve left over (a cost over the whole limit fits a full
        bucket). The reserve costs no throughput: the bucket refills at the same rate near it as near 0."""
        if self.limit is None:
            return 0.0
        self.refill(now)
        reserve = min(self.rate * RESERVE_S, self.limit * RESERVE_SHARE)
        need = min(cost + reserve, self.limit) - self.level
        return need / self.rate if need > 0 else 0.0

    def take(self, cost: float, now: float) -> tuple[float, float]:
        """Take `cost`; returns what the answer's headers are compared with: (level, corrected)."""
        self.refill(now)
        self.level -= cost
        return self.level, self.corrected

    def sync(self, limit: float, remaining: float, reset: float | None, mark: tuple, now: float,
             uncounted: float = 0.0) -> None:
        """Correct the model by an answer: the server had `remaining` right after counting the request
        taken at `mark` (the model's level and corrected total then). `uncounted`: what was sent
        just before that request and may have reached the server after it; taken as not counted yet, so
        the model errs on the side of less."""
        used = limit - remaining - 1  # at least this much was used (remaining is rounded down)
        if reset is not None and reset >= MIN_RESET and used >= MIN_USED:
            self.window = min(max(reset * limit / used, MIN_WINDOW), MAX_WINDOW)
        remaining -= uncounted
        level_then, corrected_then = mark
        self.refill(now)
        self.limit = limit
        # What the model believed then, with the corrections made since, against what the server had.
        # Before the first word on this limit the model's level is 0 less all taken, so the first
        # correction makes it what the server had less what was sent since.
        error = remaining - (level_then + self.corrected - corrected_then)
        level = min(self.level + error, limit)
        self.corrected += level - self.level
        self.level = level


@dataclass
class Ticket:
    """One attempt let go by the limiter: what its answer is compared with."""
    seq: int
    tokens: int
    sent_at: float
    marks: dict = field(default_factory=dict)  # kind -> Bucket.take's mark


class RateLimiter:
    """Concurrency under a ceiling, and pacing under the limits the server reports (see the module).

    `async with limiter:` holds one of `ceiling` slots for a request, across its retries (a semaphore,
    as before); `await limiter.acquire(tokens)` lets one attempt of it go when it fits the limits and
    fewer than `concurrency` attempts are out, and returns its Ticket; `limiter.answered(ticket,
    headers, status, retry_after)` reads the answer; `limiter.release(ticket)` ends the attempt,
    answered or not. Not bound to an event loop: waiters are futures of the loop that awaits."""

    def __init__(self, ceiling: int, enabled: bool = True, clock=time.monotonic):
        self.ceiling = max(1, ceiling)
        self.enabled = enabled
        self.clock = clock
        self.concurrency = float(self.ceiling if not enabled else min(self.ceiling, INITIAL_CONCURRENCY))
        self.reports_limits = None  # None until the first answer: whether the server sends the headers
        self.buckets = {kind: Bucket() for kind in KINDS}
        self.paused_until = 0.0  # no attempt goes before this (a 429's Retry-After)
        self.held = 0  # request slots held
        self.out = 0  # attempts let go and not released
        self._slot_waiters = deque()
        self._pace_waiters = deque()  # attempts waiting to go, first come first served
        self._released = None  # a future the first of those waits on when `concurrency` attempts are out
        self._seq = 0  # attempts let go
        self._unanswered = {}  # seq -> Ticket, in the order they went
        self._synced = -1  # the latest attempt whose answer corrected the buckets
        self._halved_at = -1  # the attempts let go when the concurrency was last halved
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
        """Seconds until an attempt of `tokens` fits the limits (0: now); attempts out not counted."""
        if not self.enabled:
            return 0.0
        now = self.clock() if now is None else now
        return max(self.paused_until - now, self.buckets["requests"].wait(1, now),
                   self.buckets["tokens"].wait(tokens, now))

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
        ticket = Ticket(seq=self._seq, tokens=tokens, sent_at=now)
        for kind, cost in (("requests", 1), ("tokens", tokens)):
            ticket.marks[kind] = self.buckets[kind].take(cost, now)
        self._unanswered[ticket.seq] = ticket
        self.out += 1
        self.stats["max_out"] = max(self.stats["max_out"], self.out)
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The attempt is over (answered, timed out, lost): another may go. Once per ticket."""
        self._unanswered.pop(ticket.seq, None)
        self.out -= 1
        self._wake()

    def cancel(self, ticket: Ticket) -> None:
        """An attempt let go but not sent after all: released, and its share of the limits comes back."""
        self.release(ticket)
        for kind, cost in (("requests", 1), ("tokens", ticket.tokens)):
            self.buckets[kind].level += cost

    def _wake(self) -> None:
        if self._released is not None and not self._released.done() and self.out < int(self.concurrency):
            self._released.set_result(None)

    def _set_concurrency(self, value: float) -> None:
        self.concurrency = min(float(self.ceiling), max(1.0, value))
        self.stats["min_concurrency"] = min(self.stats["min_concurrency"], self.concurrency)
        self._wake()

    def _sent_just_before(self, ticket: Ticket) -> tuple[int, int]:
        """Requests and tokens of the unanswered attempts sent within SKEW_S before `ticket`."""
        requests = tokens = 0
        for other in self._unanswered.values():
            if other.seq >= ticket.seq:
                break
            if other.sent_at >= ticket.sent_at - SKEW_S:
                requests, tokens = requests + 1, tokens + other.tokens
        return requests, tokens

    # --- answers -------------------------------------------------------------------------------------

    def answered(self, ticket: Ticket, headers=None, status: int | None = None,
                 retry_after: float | None = None) -> None:
        """Read an answer: the limits in its headers (when it is the latest attempt answered); on a
        429 a halved concurrency and a pause of `retry_after` seconds for every attempt; on any other
        answer below 400, one more attempt out at once (up to the ceiling)."""
        self._unanswered.pop(ticket.seq, None)
        if not self.enabled:
            return
        now = self.clock()
        found = False
        if headers is not None:
            uncounted = None
            for kind in KINDS:
                limit = _number(headers.get(f"x-ratelimit-limit-{kind}"))
                remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
                if limit is None or remaining is None or limit <= 0:
                    continue
                found = True
                if ticket.seq > self._synced:  # an older answer knows less than the one already read
                    reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
                    uncounted = uncounted or dict(zip(KINDS, self._sent_just_before(ticket)))
                    self.buckets[kind].sync(limit, remaining, reset, ticket.marks[kind], now, uncounted[kind])
            if found:
                self._synced = max(self._synced, ticket.seq)
        if self.reports_limits is None and headers is not None:
            self.reports_limits = found
            if not found:  # plain concurrency, as without pacing
                self._set_concurrency(self.ceiling)
        if status == 429:
            self.stats["rate_limited"] += 1
            if retry_after:
                self.paused_until = max(self.paused_until, now + retry_after)
            if ticket.seq > self._halved_at:  # once per round: the attempts let go before it saw the same
                self._halved_at = self._seq
                self._set_concurrency(self.concurrency / 2)
        elif status is not None and status < 400 and self.concurrency < self.ceiling:
            # With the limits known, the buckets pace and the concurrency comes back fast (one per
            # answer); with only 429s to go by, by one per round of answers, as TCP's does.
            self._set_concurrency(self.concurrency + (1 if self.reports_limits else 1 / self.concurrency))
