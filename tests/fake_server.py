"""A fake OpenAI-compatible chat-completions server for tests and benchmarks, on 127.0.0.1 only.

A deterministic "brain" answers the generation stages' prompts (solve, rewrite_persona,
propose_personas, reflect; and the decontamination judge: "same" when the row holds the test problem
whole) from the gold answers of the problems it is given: a stable-hash
`hard_fraction` of problems is solved wrong, and a `hopeless_fraction` (a subset) stays wrong after
reflection. Requests are counted (`GET /stats`; `paid_twice`: bodies answered more than once); `latency`
and `slots` bound its throughput to slots/latency requests per second (`latency_sigma`: latencies
log-normal around `latency`, a long tail as a real API has, each body's the same every time); `stall_after` makes it stop answering after that many requests, as
a stuck server does; a fault plan injects 429, 500, slow, malformed and empty answers
once per distinct request body (transient: a retried request is served normally, so a retrying
client ends with the results it would have had without faults) and `length` truncations (every time).

Rate limits (off unless `rpm` or `tpm` is set): requests and tokens per window (`window_s`, 60 s as
OpenAI's per-minute limits, shorter to run in seconds), enforced as token buckets that refill the whole
limit over the window. A request takes 1 request and its tokens (prompt, counted as in `usage`, plus
max_tokens) when both fit, else it is answered 429 at once with Retry-After / retry-after-ms; every
answer carries the x-ratelimit-{limit,remaining,reset}-{requests,tokens} headers as OpenAI's do
(`ratelimit_headers=False`: enforced without them). Counts in `stats()["ratelimit"]`.

    python tests/fake_server.py --problems data/gsm8k/train.jsonl --latency 0.05 --slots 32 \\
        --faults 429=0.1,500=0.1,slow=0.05,malformed=0.05,empty=0.05,length=0.02
    python tests/fake_server.py --problems data/gsm8k/train.jsonl --latency 0.2 --rpm 300 --tpm 150000 --window_s 6
"""
import argparse
import asyncio
import contextlib
import copy
import hashlib
import json
import math
import re
import signal
import socket
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from statistics import NormalDist

from aiohttp import web

from personamath.data import Problem, load_any, load_problems
from personamath.errors import exit_on_user_error
from personamath.prompts import PLACEHOLDER, load_prompt

TEMPLATES = {"solve": "solve", "rewrite": "rewrite_persona", "propose": "propose_personas", "reflect": "reflect",
             "judge": "decontam_judge"}
TRANSIENT_FAULTS = ("429", "500", "slow", "malformed", "empty")  # a body is given the first that selects it
PERMANENT_FAULTS = ("length", "400")  # every time the body is sent
FAULT_TYPES = (*TRANSIENT_FAULTS, *PERMANENT_FAULTS)
ANCHOR = 32  # characters of a question's start indexed for the substring search
REFLECTION = "Reflection: the attempt made an arithmetic slip."


def _unit(text: str) -> float:
    """A stable pseudo-random number in [0, 1): unlike hash(), the same in every process."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _wrong(gold: str) -> str:
    """An answer surely not equivalent to gold."""
    try:
        value = Decimal(gold.replace(",", ""))
    except InvalidOperation:
        return f"{gold} + 1"
    return str(value + 1) if value.is_finite() else f"{gold} + 1"


def _solution(answer: str) -> str:
    return ("Step 1: Identify the quantities given in the problem.\n"
            "Step 2: Relate them as the problem describes.\n"
            "Step 3: Compute the result.\n"
            f"The final answer is $\\boxed{{{answer}}}$.")


class _Template:
    """A prompt template split at its placeholders: [fixed, name, fixed, name, ..., fixed]."""

    def __init__(self, kind: str):
        self.kind = kind
        self.text = load_prompt(TEMPLATES[kind]).text
        self.parts = PLACEHOLDER.split(self.text)
        self.marker = ""  # the first fixed line found in no other template, set by Brain

    def fixed_lines(self) -> list[str]:
        return [line.strip() for fixed in self.parts[::2] for line in fixed.splitlines() if line.strip()]

    def field(self, message: str, name: str) -> str | None:
        """What the placeholder `name` was filled with: the text between the fixed parts around it (None
        when the template has no such placeholder or the message does not follow it)."""
        if name not in self.parts[1::2]:
            return None
        i = self.parts.index(name)
        before, after = self.parts[i - 1], self.parts[i + 1]
        start = message.find(before)
        if start < 0:
            return None
        start += len(before)
        end = message.find(after, start) if after else len(message)
        return message[start:end] if end >= 0 else None


class Brain:
    """Deterministic answers to the five prompts, from the known problems' gold answers."""

    def __init__(self, problems: list[Problem], hard_fraction: float = 0.3, hopeless_fraction: float = 0.1,
                 bad_rewrites: float = 0.0):
        self.hard_fraction, self.hopeless_fraction = hard_fraction, min(hopeless_fraction, hard_fraction)
        self.bad_rewrites = bad_rewrites
        self.templates = [_Template(kind) for kind in TEMPLATES]
        for t in self.templates:
            t.marker = next(line for line in t.fixed_lines()
                            if not any(line in o.text for o in self.templates if o is not t))
        self.by_question = {p.question.strip(): p for p in problems}
        # The substring search looks up each position's next `anchor` characters instead of trying every question.
        self.anchor = min(ANCHOR, *(len(q) for q in self.by_question)) if problems else ANCHOR
        self.by_anchor = defaultdict(list)
        for question, problem in self.by_question.items():
            self.by_anchor[question[:self.anchor]].append((question, problem))

    def is_hard(self, question: str) -> bool:
        return _unit(question.strip()) < self.hard_fraction

    def is_hopeless(self, question: str) -> bool:
        return _unit(question.strip()) < self.hopeless_fraction

    def find(self, text: str) -> Problem | None:
        """The known problem whose full question the text holds (the longest one)."""
        text = text.strip()
        if text in self.by_question:
            return self.by_question[text]
        best = None
        for i in range(len(text) - self.anchor + 1):
            for question, problem in self.by_anchor.get(text[i:i + self.anchor], ()):
                if text.startswith(question, i) and (best is None or len(question) > len(best.question.strip())):
                    best = problem
        return best

    def kind_of(self, message: str) -> _Template | None:
        # Markers are the first fixed line unique to a template, before anything filled in: when a
        # filled-in text quotes another prompt, the earliest marker still names the outer one.
        found = [(message.find(t.marker), t) for t in self.templates if t.marker in message]
        return min(found, key=lambda pair: pair[0])[1] if found else None

    def answer(self, message: str) -> tuple[str, Problem | None, str]:
        """(kind, the problem found, reply text) for the last user message; anything else is answered as solve."""
        template = self.kind_of(message)
        source = (template and template.field(message, "problem")) or message
        problem = self.find(source)
        kind = template.kind if template else "unknown"
        if kind == "rewrite":
            persona = " ".join((template.field(message, "persona") or "").split()[:8])
            rewritten = f"As {persona}, I ask: {source.strip()}"
            draw = _unit(f"bad:{persona}:{source}")
            if problem is not None and draw < self.bad_rewrites / 2:  # a quantity lost
                rewritten = re.sub(r"\d+", "several", rewritten, count=1)
            elif problem is not None and draw < self.bad_rewrites:  # the answer given away
                rewritten += f" (The answer is {problem.gold}.)"
            return kind, problem, rewritten
        if kind == "judge":  # the decontamination judge: the same problem when the row holds the test item whole
            row_text, test_text = (" ".join((template.field(message, name) or "").split())
                                   for name in ("row_problem", "test_problem"))
            return kind, problem, f"VERDICT: {'same' if test_text and test_text in row_text else 'different'}"
        if kind == "propose":
            k = template.field(message, "k") or ""
            seed = problem.question if problem else source
            lines = [f"I am person {i} who needs this for work number {int(_unit(f'{seed}:{i}') * 10000)}."
                     for i in range(1, (int(k) if k.isdigit() else 3) + 1)]
            return kind, problem, "\n".join(lines)
        if problem is None:
            answer = "0"
        elif kind == "reflect":
            answer = _wrong(problem.gold) if self.is_hopeless(problem.question) else problem.gold
        else:
            answer = _wrong(problem.gold) if self.is_hard(problem.question) else problem.gold
        text = _solution(answer)
        return kind, problem, f"{REFLECTION}\n\nCorrected solution:\n{text}" if kind == "reflect" else text


@dataclass
class FakeServerConfig:
    model: str = "fake-llm"
    problems: list[Problem] = field(default_factory=list)
    hard_fraction: float = 0.3
    hopeless_fraction: float = 0.1
    latency: float = 0.0  # seconds per request, spent holding a slot (the median, with latency_sigma)
    latency_sigma: float = 0.0  # > 0: each body's latency drawn log-normal, latency * exp(sigma * z), z ~ N(0, 1)
    slots: int | None = None  # requests processed at once; None: unlimited
    faults: dict[str, float] = field(default_factory=dict)  # fault type -> fraction of distinct request bodies
    slow_seconds: float = 5.0
    stall_after: int | None = None  # answer this many requests, then none (a server alive but stuck)
    bad_rewrites: float = 0.0  # rewrites that drop a number or state the answer (half each)
    port: int = 0  # 0: a free port
    rpm: int | None = None  # requests per window_s, enforced (None: no request limit)
    tpm: int | None = None  # tokens (prompt + max_tokens) per window_s, enforced (None: no token limit)
    window_s: float = 60.0  # the time the limits refill in from empty
    ratelimit_headers: bool = True  # send the x-ratelimit-* headers (with rpm or tpm)
    enforce_s: float | None = None  # the limits also enforced over slices this long (RateLimits)
    count_refused: bool = False  # a refused request counts against the limits too


def _error(status: int, kind: str, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status,
                             headers=headers)


def format_duration(seconds: float) -> str:
    """A reset header as OpenAI writes it, Go-style, to the millisecond: "6m0s", "1.5s", "20ms", "0s"."""
    ms = round(seconds * 1000)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + \
        f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"


class RateLimits:
    """The server's RPM and TPM: token buckets holding `limit`, refilled at limit / window_s a second.

    `enforce_s`: the limits are also enforced over slices of this many seconds, as OpenAI may enforce
    60,000 RPM as 1,000 requests a second: a second bucket per limit holding limit * enforce_s / window_s,
    refilled at the same rate. `count_refused`: a refused request takes its cost too (down to minus a
    bucket's size), as OpenAI says unsuccessful requests count toward the limit. The headers report
    the window's bucket, as OpenAI's report the minute's."""

    def __init__(self, rpm: int | None, tpm: int | None, window_s: float, clock=time.monotonic,
                 enforce_s: float | None = None, count_refused: bool = False):
        self.window, self.clock, self.count_refused = window_s, clock, count_refused
        now = clock()
        self.buckets = {kind: {"limit": float(limit), "level": float(limit), "stamp": now}
                        for kind, limit in (("requests", rpm), ("tokens", tpm)) if limit}
        self.slices = {kind: {"limit": limit * enforce_s / window_s, "level": limit * enforce_s / window_s,
                              "stamp": now, "rate": limit / window_s}
                       for kind, limit in (("requests", rpm), ("tokens", tpm)) if limit and enforce_s}

    def admit(self, tokens: int) -> tuple[bool, dict]:
        """Take 1 request and `tokens` if both fit every bucket (a cost over a bucket's size fits a full
        one): (admitted, the x-ratelimit-* headers after it, and on refusal Retry-After / retry-after-ms)."""
        now = self.clock()
        costs = {"requests": 1, "tokens": tokens}
        everything = [(kind, bucket) for kind, bucket in self.buckets.items()] + list(self.slices.items())
        wait = 0.0
        for kind, bucket in everything:
            rate = self.buckets[kind]["limit"] / self.window
            bucket["level"] = min(bucket["limit"], bucket["level"] + (now - bucket["stamp"]) * rate)
            bucket["stamp"] = now
            wait = max(wait, (min(costs[kind], bucket["limit"]) - bucket["level"]) / rate)
        if wait <= 0 or self.count_refused:
            for kind, bucket in everything:
                bucket["level"] = max(bucket["level"] - costs[kind], -bucket["limit"])
        if wait > 0 and self.count_refused:  # what this refusal took is owed too before the next fits
            wait = max((min(costs[kind], b["limit"]) - b["level"]) / (self.buckets[kind]["limit"] / self.window)
                       for kind, b in everything)
        headers = {}
        for kind, bucket in self.buckets.items():
            headers[f"x-ratelimit-limit-{kind}"] = str(int(bucket["limit"]))
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket["level"])))
            headers[f"x-ratelimit-reset-{kind}"] = format_duration(
                (bucket["limit"] - bucket["level"]) * self.window / bucket["limit"])
        if wait > 0:
            headers.update({"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000))})
        return wait <= 0, headers


def _text(message: dict) -> str:
    content = message.get("content") or ""
    # content may also be a list of parts: [{"type": "text", "text": ...}, ...]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


class InThread:
    """A server running its own event loop in a daemon thread (start_in_thread), stopped by stop() or
    by leaving a `with` block. Subclasses set _loop and _thread and define `async close()`."""
    _thread = None

    async def _listen(self, app) -> None:
        """Serve `app` on 127.0.0.1:config.port (0: a free port, then in self.port)."""
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.config.port))
        await web.SockSite(self._runner, sock).start()
        self.port = sock.getsockname()[1]

    def stop(self) -> None:
        if self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class FakeServer(InThread):
    """The HTTP server around a Brain: counts requests, injects faults, bounds concurrency."""

    def __init__(self, config: FakeServerConfig):
        if unknown := set(config.faults) - set(FAULT_TYPES):
            raise ValueError(f"unknown fault types {sorted(unknown)}; known: {', '.join(FAULT_TYPES)}")
        self.config = config
        self.brain = Brain(config.problems, config.hard_fraction, config.hopeless_fraction, config.bad_rewrites)
        self.port = config.port
        self._faulted = set()  # digests of the bodies that already had their transient fault
        self._limits = (RateLimits(config.rpm, config.tpm, config.window_s, enforce_s=config.enforce_s,
                                   count_refused=config.count_refused) if config.rpm or config.tpm else None)
        self._in_flight = 0
        self._runner = self._loop = self._thread = None
        self.reset_stats()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        return copy.deepcopy(self._stats)

    def reset_stats(self) -> None:
        self._paid = Counter()  # answers billed, by request body
        self._stats = {"requests": 0, "paid_twice": 0, "by_kind": dict.fromkeys([*TEMPLATES, "unknown"], 0),
                       "faults": dict.fromkeys(FAULT_TYPES, 0), "max_concurrent": 0, "completed": 0,
                       "usage": {"prompt_tokens": 0, "completion_tokens": 0},  # of every answer it sent
                       "truncated": []}  # (kind, problem id or None) of every answer cut by the length fault
        if self.config.rpm or self.config.tpm:
            # requests admitted and refused, tokens admitted, the least left after an admission per limit,
            # when the first request came and the last answer went (time.monotonic()), and every verdict
            self._stats["ratelimit"] = {"admitted": 0, "rejected": 0, "admitted_tokens": 0,
                                        "lowest_remaining": {}, "first_at": None, "last_at": None,
                                        "answers": []}  # (s since first_at, admitted, tokens, model) of each request

    async def _chat(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "invalid_request_error", "expected a JSON object with a `messages` list")
        user = [_text(m) for m in body["messages"] if m.get("role") == "user"]
        kind, problem, text = self.brain.answer(user[-1] if user else "")
        stats = self._stats
        stats["requests"] += 1
        stats["by_kind"][kind] += 1
        self._in_flight += 1
        stats["max_concurrent"] = max(stats["max_concurrent"], self._in_flight)
        canonical = json.dumps(body, sort_keys=True, ensure_ascii=False)
        headers = {}
        try:
            if self._limits is not None:
                admitted, headers = self._admit(body)
                if not self.config.ratelimit_headers:
                    headers = {k: v for k, v in headers.items() if not k.startswith("x-ratelimit-")}
                if not admitted:
                    return _error(429, "rate_limit_exceeded", "Rate limit reached (fake rpm/tpm)", headers=headers)
            if self.config.stall_after is not None and stats["requests"] > self.config.stall_after:
                await asyncio.Event().wait()  # until the client hangs up
            async with self._slots:
                await asyncio.sleep(self._latency(canonical))
                response = await self._respond(body, canonical, kind, problem, text)
                response.headers.update(headers)
                return response
        finally:
            self._in_flight -= 1
            if self._limits is not None:
                stats["ratelimit"]["last_at"] = time.monotonic()

    def _latency(self, canonical: str) -> float:
        """This body's answer time: the same for the same body, drawn from the configured distribution."""
        if not self.config.latency_sigma:
            return self.config.latency
        z = NormalDist().inv_cdf(min(max(_unit(f"latency:{canonical}"), 1e-9), 1 - 1e-9))
        return self.config.latency * math.exp(self.config.latency_sigma * z)

    def _admit(self, body: dict) -> tuple[bool, dict]:
        """The rate limits' verdict on a request, counted in stats["ratelimit"]."""
        counts = self._stats["ratelimit"]
        if counts["first_at"] is None:
            counts["first_at"] = time.monotonic()
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        tokens = max(1, sum(len(_text(m)) for m in body["messages"]) // 4) + (limit if isinstance(limit, int) else 0)
        admitted, headers = self._limits.admit(tokens)
        counts["admitted" if admitted else "rejected"] += 1
        counts["admitted_tokens"] += tokens if admitted else 0
        counts["answers"].append((round(time.monotonic() - counts["first_at"], 3), admitted, tokens, body.get("model")))
        if admitted:
            for kind in self._limits.buckets:
                left = int(headers[f"x-ratelimit-remaining-{kind}"])
                counts["lowest_remaining"][kind] = min(counts["lowest_remaining"].get(kind, left), left)
        return admitted, headers

    def _fault_for(self, canonical: str, digest: str) -> str | None:
        """The transient fault due to this body, only the first time it is received."""
        for fault in TRANSIENT_FAULTS:
            if _unit(f"{fault}:{canonical}") < self.config.faults.get(fault, 0.0):
                if digest in self._faulted:
                    return None
                self._faulted.add(digest)
                return fault
        return None

    async def _respond(self, body: dict, canonical: str, kind: str, problem: Problem | None,
                       text: str) -> web.Response:
        stats = self._stats
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        fault = self._fault_for(canonical, digest)
        if fault:
            stats["faults"][fault] += 1
        if fault == "429":
            return _error(429, "rate_limit_exceeded", "Rate limit reached (fake)",
                          headers={"Retry-After": "1", "retry-after-ms": "200"})
        if fault == "500":
            return _error(500, "server_error", "The server had an error (fake)")
        if fault == "malformed":
            return web.Response(text='{"id": "x", "choices": [', content_type="application/json")
        if fault == "slow":
            await asyncio.sleep(self.config.slow_seconds)
        if _unit(f"400:{canonical}") < self.config.faults.get("400", 0.0):
            stats["faults"]["400"] += 1
            return _error(400, "invalid_request_error", "This model's maximum context length is 128 tokens (fake)")
        finish = "stop"
        if fault != "empty" and _unit(f"length:{canonical}") < self.config.faults.get("length", 0.0):
            text, finish = text[:len(text) // 2].split("\\boxed")[0], "length"  # no answer survives the cut
            stats["faults"]["length"] += 1
            stats["truncated"].append([kind, problem.id if problem else None])
        prompt_tokens = max(1, sum(len(_text(m)) for m in body["messages"]) // 4)
        completion_tokens = max(1, len(text) // 4)
        if isinstance(body.get("max_tokens"), int) and completion_tokens > body["max_tokens"]:
            completion_tokens, text, finish = body["max_tokens"], text[:4 * body["max_tokens"]], "length"
        if fault != "empty":
            stats["usage"]["prompt_tokens"] += prompt_tokens
            stats["usage"]["completion_tokens"] += completion_tokens
        choices = [] if fault == "empty" else [{"index": 0, "message": {"role": "assistant", "content": text},
                                                "finish_reason": finish}]
        stats["completed"] += fault != "empty"
        if fault != "empty":
            self._paid[digest] += 1
            stats["paid_twice"] += self._paid[digest] == 2
        return web.json_response({
            "id": f"chatcmpl-fake-{digest[:16]}",
            "object": "chat.completion", "created": int(time.time()), "model": body.get("model", self.config.model),
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.config.model, "object": "model",
                                                              "created": 0, "owned_by": "fake"}]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _get_stats(self, request: web.Request) -> web.Response:
        """The counts; `?answers=0` leaves out the verdict of every request (megabytes after a long run)."""
        if request.query.get("answers") == "0" and "ratelimit" in self._stats:
            return web.json_response({**self._stats, "ratelimit": {k: v for k, v in self._stats["ratelimit"].items()
                                                                   if k != "answers"}})
        return web.json_response(self.stats())

    async def _reset_stats(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return web.json_response(self.stats())

    async def start(self) -> None:
        """Serve on 127.0.0.1, in the running event loop."""
        self._slots = asyncio.Semaphore(self.config.slots) if self.config.slots else contextlib.nullcontext()
        app = web.Application()
        app.add_routes([web.post("/v1/chat/completions", self._chat), web.get("/v1/models", self._models),
                        web.get("/health", self._health), web.get("/stats", self._get_stats),
                        web.post("/stats/reset", self._reset_stats)])
        # A client that hangs up (as one that timed out on a slow answer does) cancels its request, so
        # the request frees its slot and is not counted as completed; nothing waits long at shutdown.
        await self._listen(app)

    async def close(self) -> None:
        await self._runner.cleanup()



def start_in_thread(config: FakeServerConfig) -> FakeServer:
    """A started server, running its own event loop in a daemon thread."""
    server = FakeServer(config)
    server._loop = asyncio.new_event_loop()
    server._thread = threading.Thread(target=server._loop.run_forever, name="fake-llm-server", daemon=True)
    server._thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), server._loop).result()
    return server


def parse_faults(text: str) -> dict[str, float]:
    """`429=0.1,500=0.1,length=0.02` -> {"429": 0.1, "500": 0.1, "length": 0.02}."""
    faults = {}
    for item in filter(None, text.split(",")):
        name, _, fraction = item.partition("=")
        if name.strip() not in FAULT_TYPES:
            raise argparse.ArgumentTypeError(f"unknown fault {name!r}; known: {', '.join(FAULT_TYPES)}")
        faults[name.strip()] = float(fraction)
    return faults


async def serve_until_signal(server, port_file: str | None = None) -> None:
    """Serve until SIGTERM or SIGINT (the command-line servers)."""
    await server.start()
    if port_file:
        Path(port_file).write_text(f"{server.port}\n")
    print(f"listening on {server.url}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", default=[], help="JSONL files (or datasets) of the known problems")
    p.add_argument("--task", choices=["gsm8k", "math"], default=None, help="default: detected per file")
    p.add_argument("--model", default="fake-llm")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--port_file", default=None, help="also write the port to this file")
    p.add_argument("--latency", type=float, default=0.0, help="seconds per request (the median, with --latency_sigma)")
    p.add_argument("--latency_sigma", type=float, default=0.0,
                   help="> 0: latencies log-normal around --latency, this sigma (0.7: p99 about 5x the median)")
    p.add_argument("--slots", type=int, default=None, help="requests processed at once (default: unlimited)")
    p.add_argument("--faults", type=parse_faults, default={}, help="e.g. 429=0.1,500=0.1,slow=0.05,length=0.02")
    p.add_argument("--hard_fraction", type=float, default=0.3)
    p.add_argument("--hopeless_fraction", type=float, default=0.1)
    p.add_argument("--slow_seconds", type=float, default=5.0)
    p.add_argument("--rpm", type=int, default=None, help="requests per --window_s, enforced with 429 (default: none)")
    p.add_argument("--tpm", type=int, default=None, help="tokens (prompt + max_tokens) per --window_s, enforced")
    p.add_argument("--window_s", type=float, default=60.0, help="seconds the rate limits refill in")
    p.add_argument("--no_ratelimit_headers", action="store_true", help="enforce the limits without x-ratelimit-*")
    p.add_argument("--enforce_s", type=float, default=None,
                   help="also enforce the limits over slices of this many seconds (--window_s / 60: per second)")
    p.add_argument("--count_refused", action="store_true", help="refused requests count against the limits")
    args = p.parse_args(argv)
    with exit_on_user_error():
        problems = [problem for path in args.problems
                    for problem in (load_problems(args.task, path) if args.task else load_any(path)[1])]
    config = FakeServerConfig(model=args.model, problems=problems, hard_fraction=args.hard_fraction,
                              hopeless_fraction=args.hopeless_fraction, latency=args.latency,
                              latency_sigma=args.latency_sigma, slots=args.slots,
                              faults=args.faults, slow_seconds=args.slow_seconds, port=args.port, rpm=args.rpm,
                              tpm=args.tpm, window_s=args.window_s,
                              ratelimit_headers=not args.no_ratelimit_headers, enforce_s=args.enforce_s,
                              count_refused=args.count_refused)
    asyncio.run(serve_until_signal(FakeServer(config), args.port_file))


if __name__ == "__main__":
    main()
