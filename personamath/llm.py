"""The LLM layer of the generation stages: an async OpenAI-compatible client that never loses or re-pays work.

- Concurrency: at most `--concurrency` requests in flight.
- Retries: the openai client's own, with exponential backoff that honours Retry-After, for 429, 5xx,
  timeouts and connection errors; on top, a few re-sends for answers that arrive broken (malformed
  JSON, no choices), which the client does not retry.
- Cache: every answer is stored in SQLite, keyed by (model, messages, sampling parameters, sample
  index), and committed as it arrives. A rerun sends no request for work already done and a killed
  run loses only what was in flight. The key is a hash of the request; the API key is never stored.
- Ledger: requests, cache hits, tokens and cost per stage (prices in configs/prices.json);
  `--max_cost` stops sending once this run has spent that much; `--dry_run` estimates without sending.
"""
import asyncio
import hashlib
import json
import os
import sqlite3
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .errors import UserError

PRICES_FILE = Path(__file__).resolve().parent.parent / "configs" / "prices.json"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
CHARS_PER_TOKEN = 4  # for --dry_run estimates only: a rough average for English and LaTeX


# The request counter of the item being worked on (pipeline.run_items sets one per item): every
# request that item makes, answered by the server or the cache, counts on it.
ITEM_REQUESTS: ContextVar[list[int] | None] = ContextVar("item_requests", default=None)


class LLMError(Exception):
    """A request that still failed after every retry; the item it belonged to is not kept."""


class BudgetExceeded(Exception):
    """--max_cost is spent: no new request is sent."""


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


def price_of(model: str, base_url: str) -> dict | None:
    """USD per million input and output tokens; None when unknown. A local server costs nothing."""
    prices = json.loads(PRICES_FILE.read_text())["models"]
    if model in prices:
        return prices[model]
    return {"input": 0.0, "output": 0.0} if is_local(base_url) else None


class ResponseCache:
    """Answers by request hash in SQLite, committed one by one. In WAL mode with synchronous=NORMAL a
    commit survives the process being killed without an fsync each (only a power cut may lose the last)."""

    def __init__(self, path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.db.commit()

    @staticmethod
    def key(model: str, messages: list[dict], params: dict, sample: int) -> str:
        request = {"model": model, "messages": messages, "params": params, "sample": sample}
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


@dataclass
class Ledger:
    """What one stage's run asked for and what it cost. Cached answers cost nothing this run."""
    model: str
    price: dict | None
    requests: int = 0  # sent to the server (retries by the client not counted)
    cache_hits: int = 0
    failed: int = 0  # requests that failed after every retry
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


def add_llm_args(parser) -> None:
    g = parser.add_argument_group("LLM")
    g.add_argument("--model", default="gpt-4o-mini")
    g.add_argument("--base_url", default=None, help=f"OpenAI-compatible endpoint (default: $OPENAI_BASE_URL or {DEFAULT_BASE_URL}); "
                                                   "the API key is read from $OPENAI_API_KEY only")
    g.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request before it is retried")
    g.add_argument("--stall_timeout", type=float, default=300.0,
                   help="stop (exit 5, everything answered kept) when the server answers none of the requests "
                        "waiting on it for this many seconds")
    g.add_argument("--max_retries", type=int, default=6, help="retries per request (429, 5xx, timeouts, broken answers)")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--max_tokens", type=int, default=2048)
    g.add_argument("--seed", type=int, default=0, help="base of the per-request seed (seed + sample index)")
    g.add_argument("--cache", default=None, help="response cache (default: OUTPUT_DIR/llm_cache.sqlite)")
    g.add_argument("--max_cost", type=float, default=None, help="stop sending requests once this run spent this many USD")
    g.add_argument("--dry_run", action="store_true", help="print the request count and cost estimate; send nothing")
    g.add_argument("--dry_run_output_tokens", type=int, default=400,
                   help="completion tokens assumed per request by --dry_run")


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
        self.seed = args.seed
        self.max_cost = args.max_cost
        self.spent = 0.0  # USD sent this run, over every ledger: what --max_cost is held against
        self.max_retries = args.max_retries
        self.ledger = Ledger(model=self.model, price=price_of(self.model, self.base_url))
        if self.max_cost is not None and self.ledger.price is None:
            raise UserError(f"--max_cost needs a price for model {self.model}: add it to {PRICES_FILE}")
        self.cache = ResponseCache(args.cache or Path(output_dir) / "llm_cache.sqlite")
        self.dry_run = args.dry_run
        self.dry_run_output_tokens = args.dry_run_output_tokens
        self._concurrency = args.concurrency
        self._semaphore = None  # made inside the running event loop
        self._client = None
        self._api_key, self._timeout = api_key, args.timeout
        self.on_reply = None  # called with every Reply, cached or not (the stage's progress)
        self.in_flight = 0  # requests sent and not answered yet
        self.waiting_since = time.monotonic()  # the last answer from the server, or when requests began waiting

    def _ensure_client(self):
        if self._client is None:
            from openai import AsyncOpenAI

            self._client = AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, timeout=self._timeout,
                                       max_retries=self.max_retries)
            self._semaphore = asyncio.Semaphore(self._concurrency)
        return self._client

    def key(self, messages: list[dict], sample: int) -> str:
        return ResponseCache.key(self.model, messages, self.params, sample)

    async def chat(self, messages: list[dict], *, sample: int = 0, kind: str = "chat") -> Reply:
        """One chat completion: from the cache when it is there, else from the server (and then cached)."""
        key = self.key(messages, sample)
        counter = ITEM_REQUESTS.get()
        if counter is not None:
            counter[0] += 1
        cached = self.cache.get(key)
        if cached is not None:
            self.ledger.cache_hits += 1
            self._answered(cached)
            return cached
        if self.max_cost is not None and self.spent >= self.max_cost:
            raise BudgetExceeded(f"--max_cost ${self.max_cost} reached")
        client = self._ensure_client()
        async with self._semaphore:
            self.ledger.requests += 1
            self.ledger.by_kind[kind] = self.ledger.by_kind.get(kind, 0) + 1
            if not self.in_flight:
                self.waiting_since = time.monotonic()
            self.in_flight += 1
            try:
                reply = await self._request(client, messages, sample)
            finally:  # answered, or failed for good: either way the server is not stuck on it
                self.in_flight -= 1
                self.waiting_since = time.monotonic()
        self.ledger.prompt_tokens += reply.prompt_tokens
        self.ledger.completion_tokens += reply.completion_tokens
        self.ledger.truncated += reply.finish_reason == "length"
        self.spent += cost_of(self.ledger.price, reply.prompt_tokens, reply.completion_tokens) or 0.0
        self.cache.put(key, reply)
        self._answered(reply)
        return reply

    def _answered(self, reply: Reply) -> None:
        if self.on_reply is not None:
            self.on_reply(reply)

    def stalled_for(self) -> float:
        """Seconds that requests have been waiting with no answer from the server (0 when none waits)."""
        return time.monotonic() - self.waiting_since if self.in_flight else 0.0

    async def _request(self, client, messages: list[dict], sample: int) -> Reply:
        import openai

        body = {"model": self.model, "messages": messages, "seed": self.seed + sample, **self.params}
        problem = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(min(0.5 * 2 ** attempt, 8.0))
            try:
                # The client's own post(): its retries and backoff, without the typed request transform and
                # response models of chat.completions.create(), which cost the event loop ~3 ms a request.
                data = json.loads(await client.post("/chat/completions", body=body, cast_to=str))
            except json.JSONDecodeError:
                problem = "malformed JSON in the response"
                continue  # a broken answer: send again
            except openai.APIError as err:  # the client already retried what is retryable
                self.ledger.failed += 1
                raise LLMError(f"{type(err).__name__}: {getattr(err, 'message', err)}") from None
            choices = data.get("choices") if isinstance(data, dict) else None
            message = choices[0].get("message") or {} if choices else {}
            if not isinstance(message.get("content"), str):
                problem = "response without choices"
                continue
            usage = data.get("usage") or {}
            return Reply(text=message["content"], finish_reason=choices[0].get("finish_reason") or "stop",
                         prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0))
        self.ledger.failed += 1
        raise LLMError(f"{problem} after {self.max_retries + 1} attempts")

    def estimate(self, requests: list[tuple[list[dict], int]]) -> dict:
        """--dry_run: how many of these (messages, sample) requests the cache lacks, and what they would cost."""
        missing = [m for m, sample in requests if self.key(m, sample) not in self.cache]
        prompt_tokens = sum(len(msg["content"]) for m in missing for msg in m) // CHARS_PER_TOKEN
        completion_tokens = self.dry_run_output_tokens * len(missing)
        cost = cost_of(self.ledger.price, prompt_tokens, completion_tokens)
        return {"requests": len(requests), "cached": len(requests) - len(missing), "to_send": len(missing),
                "prompt_tokens_est": prompt_tokens, "completion_tokens_est": completion_tokens, "cost_usd_est": cost}

    async def aclose(self) -> None:
        """Close the HTTP client of this event loop; a later chat() in a new loop opens another."""
        if self._client is not None:
            await self._client.close()
            self._client = self._semaphore = None
