"""The LLM layer of the generation stages: an async OpenAI-compatible client that never loses or re-pays work.

- Concurrency and pacing (ratelimit.py): at most `--concurrency` requests in flight, a ceiling. A
  server's rate limits are met by a steady send rate, each attempt a set time after the one before
  (never a burst of what the headers say remains): the rate follows the limits the x-ratelimit-*
  headers report, less what other clients of the key take; a 429 lowers it and holds new attempts for
  its Retry-After, and it climbs back gradually. A server without those headers and without 429s (a
  local vLLM) is not paced: the concurrency doubles each round up to the ceiling. A stage that the
  server has refused everything for --stall_timeout stops, naming the limits. `--pacing off`: plain
  concurrency whatever the server says.
- Retries, each attempt its own: exponential backoff that honours Retry-After for 408, 409, 429,
  5xx, timeouts, connection errors and answers that arrive broken (malformed JSON, no choices). Any
  other 4xx (context too long, content filtered) is final: LLMRejected, the item is rejected.
- Cache: every answer is stored in SQLite, keyed by the request body exactly as sent (model,
  messages, every sampling parameter, the seed) and the endpoint, and committed as it arrives. A rerun
  sends no request for work already done and a killed run loses only what was in flight. The API key
  is never stored.
- Ledger: requests, cache hits, tokens and cost per stage (prices in personamath/resources/prices.json).
- A hard budget: `--max_cost` is never exceeded. Before each attempt is sent its worst case (a bound
  on its prompt tokens plus max_tokens) is reserved; it is settled at the usage the server reports,
  or at the worst case when the answer is lost (a timeout may still have been billed). An attempt that
  does not fit is not sent, and no request is sent after it. `--dry_run` prices the run without sending:
  expected, and the worst case that reservation would reach.
"""
import asyncio
import datetime
import email.utils
import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .errors import UserError
from .paths import RESOURCES
from .ratelimit import RateLimiter, request_tokens

PRICES_FILE = RESOURCES / "prices.json"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
CHARS_PER_TOKEN = 4  # for --dry_run estimates only: a rough average for English and LaTeX


# The request counter of the item being worked on (stage.run_items sets one per item): every
# request that item makes, answered by the server or the cache, counts on it.
ITEM_REQUESTS: ContextVar[list[int] | None] = ContextVar("item_requests", default=None)


class LLMError(Exception):
    """A request that still failed after every retry; the item it belonged to is not kept."""


class LLMRejected(LLMError):
    """The server refused the request for good (a 4xx other than 408, 409 and 429): a rerun would too."""


class BudgetExceeded(Exception):
    """--max_cost cannot pay for the next request: no new request is sent."""


RETRIED_STATUS = {408, 409, 429}  # and every 5xx
RAW_RESPONSE = {"headers": {"X-Stainless-Raw-Response": "true"}}  # post() returns the raw response, headers too
MESSAGE_OVERHEAD_TOKENS = 8  # the chat format's tokens around each message, generously


def prompt_tokens_bound(messages: list[dict]) -> int:
    """More prompt tokens than the model's tokenizer can make of these messages, without knowing it:
    every token of a byte-level BPE (OpenAI's, Llama's, Qwen's) or byte-fallback SentencePiece
    tokenizer covers at least one byte of UTF-8, and the chat format adds a few tokens per message."""
    return sum(len(m["content"].encode()) + MESSAGE_OVERHEAD_TOKENS for m in messages) + MESSAGE_OVERHEAD_TOKENS


@dataclass
class Planned:
    """A request a stage may send, for --dry_run (LLMClient.estimate). `messages` as the worst case has them:
    an answer the request quotes that is not known yet at its longest (stand_in_answer(max_tokens, bound=True));
    `expected_messages`, where they differ, with that answer as long as expected."""
    messages: list[dict]
    sample: int = 0
    chance: float = 1.0  # that the stage sends it (the expected case); the worst case sends every one
    expected_messages: list[dict] | None = None
    question: str | None = None  # the id of the question it is for, where the worst case is wanted by question


def stand_in_answer(tokens: int, bound: bool = False) -> str:
    """--dry_run's stand-in for an answer not known yet that a request quotes (a wrong attempt a reflection
    is shown): text that counts as `tokens` tokens, by the expected case's characters / CHARS_PER_TOKEN or,
    with `bound`, by the worst case's prompt_tokens_bound (a byte each: an answer of max_tokens tokens
    quoted is about max_tokens tokens of prompt, where its bytes would count each token about 4 times)."""
    return "x" * (tokens if bound else CHARS_PER_TOKEN * tokens)


def retry_delay(attempt: int, response=None, now: float | None = None) -> float:
    """Seconds before attempt `attempt` (1, 2, ...): the server's retry-after-ms, or its Retry-After in
    seconds or as an HTTP date (RFC 9110 allows both), capped at a minute; else exponential backoff."""
    headers = response.headers if response is not None else {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            seconds = _seconds_until(value, time.time() if now is None else now)
        if seconds is not None and math.isfinite(seconds):
            return min(max(seconds, 0.0), 60.0)
    return min(0.5 * 2 ** attempt, 8.0)


def _seconds_until(http_date: str, now: float) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, as HTTP dates are
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp() - now


@dataclass
class Reply:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False


def is_local(base_url: str) -> bool:
    return urlparse(base_url).hostname in LOCAL_HOSTS


def cost_of(price: dict | None, prompt_tokens: int, completion_tokens: int) -> float | None:
    if price is None:
        return None
    return (prompt_tokens * price["input"] + completion_tokens * price["output"]) / 1e6


def price_of(model: str, base_url: str, prices_file=PRICES_FILE) -> dict | None:
    """USD per million input and output tokens; None when unknown. A local server costs nothing."""
    try:
        prices = json.loads(Path(prices_file).read_text())["models"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{prices_file}: not a prices file ({e!r}); see {PRICES_FILE} for the format") from None
    if model in prices:
        return prices[model]
    return {"input": 0.0, "output": 0.0} if is_local(base_url) else None


def durable_sqlite(path, table: str) -> sqlite3.Connection:
    """A SQLite file whose every commit survives the process being killed: WAL mode with
    synchronous=NORMAL, without an fsync each (only a power cut may lose the last). `table` is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(f"CREATE TABLE IF NOT EXISTS {table}")
    db.commit()
    return db


class ResponseCache:
    """Answers by request hash in SQLite (durable_sqlite), committed one by one."""

    def __init__(self, path):
        self.db = durable_sqlite(path, "responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    @staticmethod
    def key(endpoint: str, body: dict) -> str:
        """The identity of a request: its endpoint and its whole body as sent (so also the seed, n, stop
        and any sampling parameter a later version adds)."""
        request = {"endpoint": endpoint.rstrip("/"), "body": body}
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> Reply | None:
        row = self.db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return Reply(**json.loads(row[0]), cached=True) if row else None

    def put(self, key: str, reply: Reply) -> None:
        value = {k: v for k, v in asdict(reply).items() if k != "cached"}
        self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(value, ensure_ascii=False)))
        self.db.commit()

    def __contains__(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM responses WHERE key = ?", (key,)).fetchone() is not None

    def replies(self) -> Iterator[Reply]:
        """Every cached answer (an account of what was paid for)."""
        for (value,) in self.db.execute("SELECT value FROM responses"):
            yield Reply(**json.loads(value), cached=True)


@dataclass
class Ledger:
    """What one stage's run asked for and what it cost. Cached answers cost nothing this run."""
    model: str
    price: dict | None
    requests: int = 0  # sent to the server (retries by the client not counted)
    cache_hits: int = 0
    failed: int = 0  # requests that failed after every retry
    rejected: int = 0  # requests the server refused for good (LLMRejected)
    rate_limited: int = 0  # attempts answered 429 (retried)
    truncated: int = 0  # answers cut by max_tokens (finish_reason "length")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_kind: dict = field(default_factory=dict)  # requests sent per kind (solve, rewrite, ...)

    @property
    def cost(self) -> float | None:
        return cost_of(self.price, self.prompt_tokens, self.completion_tokens)

    def as_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "price"}, "price_per_million_tokens": self.price,
                "cost_usd": self.cost}

    def spend_text(self) -> str:
        return "unknown" if self.cost is None else f"${self.cost:.4f}"


def parse_reply(raw: str) -> Reply | None:
    """A chat completion's text and usage; None for an answer that arrived broken."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return None
    choices = data.get("choices") if isinstance(data, dict) else None
    message = (choices[0].get("message") or {}) if choices and isinstance(choices[0], dict) else {}
    if not isinstance(message.get("content"), str):
        return None
    usage = data.get("usage") or {}
    return Reply(text=message["content"], finish_reason=choices[0].get("finish_reason") or "stop",
                 prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0))


THROTTLED_RETRIES_PER_RETRY = 4  # 429s a request may meet, per --max_retries, before it fails


def add_llm_args(parser) -> None:
    g = parser.add_argument_group("LLM")
    g.add_argument("--model", default="gpt-4o-mini")
    g.add_argument("--base_url", default=None, help=f"OpenAI-compatible endpoint (default: $OPENAI_BASE_URL or {DEFAULT_BASE_URL}); "
                                                   "the API key is read from $OPENAI_API_KEY only")
    g.add_argument("--concurrency", type=int, default=32,
                   help="the most requests in flight at once; with --pacing headers the server's rate limits set "
                        "the pace and this only caps it: it must exceed the requests/s the limits allow times the "
                        "seconds per answer (the paper recipes: 256)")
    g.add_argument("--pacing", choices=["headers", "off"], default="headers",
                   help="headers (default): pace under the rate limits the server reports, slow down on 429; "
                        "off: exactly --concurrency requests in flight, each 429 only retried after its Retry-After")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request before it is retried")
    g.add_argument("--stall_timeout", type=float, default=300.0,
                   help="stop (exit 5, everything answered kept) when the server answers none of the requests "
                        "waiting on it for this many seconds")
    g.add_argument("--max_retries", type=int, default=6,
                   help="retries per request (408, 409, 5xx, timeouts, broken answers); a 429 is the server's pacing: "
                        f"a request may be answered 429 {THROTTLED_RETRIES_PER_RETRY} x (max_retries + 1) times")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--max_tokens", type=int, default=2048)
    g.add_argument("--sampling_seed", type=int, default=0, help="base of the per-request seed (sampling_seed + sample index)")
    g.add_argument("--cache", default=None, help="response cache (default: OUTPUT_DIR/llm_cache.sqlite)")
    g.add_argument("--prices", default=str(PRICES_FILE),
                   help="USD per million input/output tokens per model, a JSON file")
    g.add_argument("--max_cost", type=float, default=None,
                   help="a hard cap in USD for this run: a request whose worst case does not fit is not sent")
    g.add_argument("--dry_run", action="store_true",
                   help="send nothing; print the requests the run may send and their cost: expected (answers of "
                        "--dry_run_output_tokens) and worst case (every request the stage may send, every answer "
                        "--max_tokens long)")
    g.add_argument("--dry_run_output_tokens", type=int, default=400,
                   help="--dry_run's expected case: completion tokens per answer (at most --max_tokens)")


class LLMClient:
    def __init__(self, args, output_dir: Path):
        self.base_url = args.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        api_key = os.environ.get("OPENAI_API_KEY")
        if not api_key:
            if not is_local(self.base_url) and not args.dry_run:
                raise UserError(f"OPENAI_API_KEY is not set, and {self.base_url} is not a local server")
            api_key = "EMPTY"  # local servers ignore it, the client insists on one
        self.model = args.model
        self.params = {"temperature": args.temperature, "max_tokens": args.max_tokens}
        self.seed = args.sampling_seed
        self.max_cost = args.max_cost
        self.spent = 0.0  # USD this run, at most (see _request), over every ledger: what --max_cost caps
        self.reserved = 0.0  # the worst case of the attempts in flight
        self.budget_stopped = False  # once an attempt did not fit, none is sent
        self.max_retries = args.max_retries
        self.ledger = Ledger(model=self.model, price=price_of(self.model, self.base_url, args.prices))
        if self.max_cost is not None and self.ledger.price is None:
            raise UserError(f"--max_cost needs a price for model {self.model}: add it to {args.prices}")
        self.cache = ResponseCache(args.cache or Path(output_dir) / "llm_cache.sqlite")
        self.dry_run = args.dry_run
        self.dry_run_output_tokens = args.dry_run_output_tokens
        self._concurrency = args.concurrency
        self._pacing = getattr(args, "pacing", "headers") != "off"
        self._limiter = None  # concurrency and pacing (RateLimiter), one per event loop
        self._client = None
        self.api_key, self._timeout = api_key, args.timeout  # sent to the server, never written to a file
        self.on_reply = None  # called with every Reply, cached or not (the stage's progress)
        # --- batch-mode hook (personamath/batch.py): awaited on a cache miss instead of sending ---
        self.transport = None  # async (key, body, kind) -> Reply, or None: send it online after all
        self.in_flight = 0  # requests sent and not answered yet
        self.throttled = 0  # requests waiting out a 429's Retry-After
        self.waiting_since = time.monotonic()  # the last answer from the server, or when requests began waiting

    @property
    def concurrency(self) -> int:
        """The most requests in flight at once (--concurrency)."""
        return self._concurrency

    def _ensure_client(self):
        if self._client is None:
            from openai import AsyncOpenAI

            # Retries are ours (_request), so that each attempt is reserved against the budget.
            self._client = AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self._timeout,
                                       max_retries=0)
            self._limiter = RateLimiter(self._concurrency, enabled=self._pacing)
        return self._client

    def body(self, messages: list[dict], sample: int) -> dict:
        """The request as sent; sample i of the same messages is asked for with seed --sampling_seed + i."""
        return {"model": self.model, "messages": messages, "seed": self.seed + sample, **self.params}

    def key(self, messages: list[dict], sample: int) -> str:
        return ResponseCache.key(self.base_url, self.body(messages, sample))

    async def chat(self, messages: list[dict], *, sample: int = 0, kind: str = "chat") -> Reply:
        """One chat completion: from the cache when it is there, else from the server (and then cached)."""
        body = self.body(messages, sample)
        key = ResponseCache.key(self.base_url, body)
        counter = ITEM_REQUESTS.get()
        if counter is not None:
            counter[0] += 1
        cached = self.cache.get(key)
        if cached is not None:
            self.ledger.cache_hits += 1
            self.answered(cached)
            return cached
        if self.transport is not None:  # --- batch-mode hook: the transport answers, accounts, caches
            reply = await self.transport(key, body, kind)
            if reply is not None:
                return reply  # else (--batch_fallback online): sent online below, as without --batch
        client = self._ensure_client()
        async with self._limiter:
            self.ledger.requests += 1
            self.ledger.by_kind[kind] = self.ledger.by_kind.get(kind, 0) + 1
            if not self.in_flight:
                self.waiting_since = time.monotonic()
            self.in_flight += 1
            try:
                reply = await self._request(client, body)
            finally:  # answered, or failed for good: either way the server is not stuck on it
                self.in_flight -= 1
                self.waiting_since = time.monotonic()
        self.ledger.prompt_tokens += reply.prompt_tokens
        self.ledger.completion_tokens += reply.completion_tokens
        self.ledger.truncated += reply.finish_reason == "length"
        self.cache.put(key, reply)
        self.answered(reply)
        return reply

    def answered(self, reply: Reply) -> None:
        """Report one answer, cached or not, to on_reply (the stage's progress). chat() calls it for
        every reply it returns; a transport (batch.py) that answers for chat() calls it for its own."""
        if self.on_reply is not None:
            self.on_reply(reply)

    def stalled_for(self) -> float:
        """Seconds that requests have been waiting with no answer from the server (0 when none waits)."""
        return time.monotonic() - self.waiting_since if self.in_flight else 0.0

    def refused_for(self) -> float:
        """Seconds since the server last accepted a request, when it has refused (429) every one since,
        or every request waits out a 429's Retry-After; else 0."""
        limiter = self._limiter
        if limiter is None or not (limiter.refused_since or (self.throttled and not self.in_flight)):
            return 0.0
        return limiter.clock() - limiter.last_accepted_at

    def limits_seen(self) -> str:
        """The rate limits the server reported and its 429s, for messages."""
        return self._limiter.describe() if self._limiter is not None else "no answer yet"

    def _reserve(self, body: dict) -> float:
        """Reserve the worst case of one attempt against --max_cost, or refuse to send it."""
        if self.max_cost is None:
            return 0.0
        worst = cost_of(self.ledger.price, prompt_tokens_bound(body["messages"]), body["max_tokens"])
        if self.budget_stopped or self.spent + self.reserved + worst > self.max_cost:
            self.budget_stopped = True
            raise BudgetExceeded(f"the next request (up to ${worst:.6f}) does not fit in --max_cost ${self.max_cost}")
        self.reserved += worst
        return worst

    async def _request(self, client, body: dict) -> Reply:
        import openai

        problem = "no attempt"
        tokens = request_tokens(body)
        failures = throttled = 0  # a 429 is the server pacing us, not a failure: it has its own, larger allowance
        while True:
            attempt, was_throttled = failures + throttled, False
            ticket = await self._paced(tokens)
            try:
                worst = self._reserve(body)  # after the wait: nothing is sent after a request that does not fit
            except BudgetExceeded:
                self._limiter.cancel(ticket)
                raise
            charged = worst  # unless the server says what it billed, or that it refused
            try:
                # The client's own post(): without the typed request transform and response models of
                # chat.completions.create(), which cost the event loop ~3 ms a request.
                raw = await client.post("/chat/completions", body=body, cast_to=str, options=RAW_RESPONSE)
                self._limiter.answered(ticket, raw.headers, raw.status_code)
                reply = parse_reply(raw.text)
                self.waiting_since = time.monotonic()  # the server answers, if not always usefully
                if reply is not None:
                    charged = cost_of(self.ledger.price, reply.prompt_tokens, reply.completion_tokens) or 0.0
                    return reply
                problem, delay = "a malformed answer (no JSON, or no choices)", retry_delay(attempt + 1)
            except openai.APIStatusError as err:
                charged = 0.0  # refused before generating
                self.waiting_since = time.monotonic()
                problem = f"HTTP {err.status_code}: {err.message}"
                delay = retry_delay(attempt + 1, err.response)
                self.ledger.rate_limited += err.status_code == 429
                was_throttled = err.status_code == 429
                self._limiter.answered(ticket, err.response.headers, err.status_code, delay)
                if err.status_code not in RETRIED_STATUS and err.status_code < 500:
                    self.ledger.rejected += 1
                    raise LLMRejected(problem) from None
            except (openai.APITimeoutError, openai.APIConnectionError) as err:
                problem, delay = f"{type(err).__name__}: {err}", retry_delay(attempt + 1)
            finally:
                self.reserved -= worst
                self.spent += charged
                self._limiter.release(ticket)
            throttled += was_throttled
            failures += not was_throttled
            if failures > self.max_retries or throttled > THROTTLED_RETRIES_PER_RETRY * (self.max_retries + 1):
                break
            if was_throttled:  # waiting on the limits, not on the server: the stall watchdog does not count it
                self.in_flight -= 1
                self.throttled += 1
                try:
                    await asyncio.sleep(delay)
                finally:
                    self.throttled -= 1
                    if not self.in_flight:
                        self.waiting_since = time.monotonic()
                    self.in_flight += 1
                continue
            await asyncio.sleep(delay)
        self.ledger.failed += 1
        raise LLMError(f"{problem}, after {failures + throttled} attempts ({throttled} answered 429)")

    async def _paced(self, tokens: int):
        """Wait until the server's rate limits let one more attempt go (ratelimit.py). An attempt
        waiting there is not waiting on the server: the stall watchdog does not count it."""
        ticket = self._limiter.try_acquire(tokens)
        if ticket is not None:
            return ticket
        self.in_flight -= 1
        try:
            return await self._limiter.acquire(tokens)
        finally:
            if not self.in_flight:
                self.waiting_since = time.monotonic()
            self.in_flight += 1

    def estimate(self, planned: Iterable[Planned], price: dict | None) -> dict:
        """--dry_run: what the planned requests the cache lacks would cost at `price`. Expected: each sent with
        its chance, its prompt about characters / CHARS_PER_TOKEN tokens and its answer --dry_run_output_tokens
        long; worst case: every one sent, its prompt at the bound --max_cost reserves and its answer
        --max_tokens long (what a --max_cost that never stops the stage would reserve, retries aside), also
        by question (Planned.question): [requests to send, their prompt tokens]."""
        max_tokens = self.params["max_tokens"]
        output_tokens = min(self.dry_run_output_tokens, max_tokens)
        requests = to_send = worst_prompt = 0
        expected_requests = expected_prompt = 0.0
        by_question = {}
        for request in planned:
            requests += 1
            if self.key(request.messages, request.sample) in self.cache:
                continue
            to_send += 1
            expected_requests += request.chance
            chars = sum(len(m["content"]) for m in request.expected_messages or request.messages)
            expected_prompt += request.chance * chars / CHARS_PER_TOKEN
            bound = prompt_tokens_bound(request.messages)
            worst_prompt += bound
            if request.question is not None:
                sent = by_question.setdefault(request.question, [0, 0])
                sent[0] += 1
                sent[1] += bound
        prompt, completion = round(expected_prompt), round(expected_requests * output_tokens)
        return {"requests": requests, "cached": requests - to_send, "to_send": to_send,
                "requests_expected": round(expected_requests, 1), "output_tokens_expected": output_tokens,
                "prompt_tokens_est": prompt, "completion_tokens_est": completion,
                "cost_usd_est": cost_of(price, prompt, completion), "max_tokens": max_tokens,
                "prompt_tokens_worst": worst_prompt, "completion_tokens_worst": to_send * max_tokens,
                "cost_usd_worst": cost_of(price, worst_prompt, to_send * max_tokens),
                "price_per_million_tokens": price, "worst_by_question": by_question}

    async def aclose(self) -> None:
        """Close the HTTP client of this event loop; a later chat() in a new loop opens another."""
        if self._client is not None:
            await self._client.close()
            self._client = self._limiter = None
