"""`--batch`: a stage's requests answered by a batch runner instead of one by one online.

Runners: the OpenAI Batch API (`--batch`: half price, its own quota, up to 24 h latency), or vLLM's
offline batch runner on a local model (`--batch_runner vllm`: `python -m vllm.entrypoints.openai.run_batch`
over the same JSONL). Both write and read the Batch JSONL format: one `{"custom_id", "method": "POST",
"url": "/v1/chat/completions", "body"}` line per request, the body exactly as the online request sends
it, and custom_id = its response-cache key (llm.ResponseCache.key). So batch and online answers live in
one cache, and either mode finishes what the other started.

Here: the batch flags (add_batch_args, prepare_args, attach), then the driver, BatchTransport, in the
order a round goes through it. Its parts: batch_runners.py (the Batch JSONL format, the OpenAI and
vLLM runners), batch_state.py (the saved state), quiescence.py (FlowTracker), batch_ledger.py (prices).

How a multi-round stage runs in batch mode
- chat() (llm.py) answers from the cache as always. On a miss it awaits the BatchTransport, which
  parks the request: the task asking (an item's, or one its item gathered) waits on a future.
- Quiescence, by exact accounting (FlowTracker): every task created under run_items is tracked through
  the event loop's task factory. A task is *busy* unless it is parked on a batch request or waits on
  live tasks of its own (a gather). Grading in worker processes, online requests, sleeps and plain
  computation all keep their task busy. When no task is busy, every live flow waits on the batch:
  the driver submits everything parked. No timing guess is involved; a safety valve submits anyway
  after QUIET_SECONDS without any change, should some library task never finish.
- The driver splits what is parked into files under the API's limits (--batch_max_requests,
  --batch_max_bytes) and, with --batch_enqueued_token_limit, in waves whose estimated input tokens fit
  next to the batches already in flight. Every batch is recorded in OUTPUT_DIR/batch_state.sqlite
  before anything waits on it: the uploaded file's id before the batch is created, the batch's id
  before it is polled. A killed client, rerun, polls the batches it finds there and resubmits none of
  their requests; a batch created whose id was never saved is found again by its input file id.
- Results are matched by custom_id, never by line order. A line counts as answered only with status
  200 and a choice with text, whatever its `error` field says; a 4xx other than 408/409/429 is a
  rejection for good (as online, LLMRejected); anything else, and every request missing from the output
  and error files, is a failure that is retried in the next batch, up to --batch_max_rounds batches, then
  sent online (--batch_fallback online) or failed (a rerun retries it). Expired, cancelled and failed
  batches are read like completed ones: their output and error files, when they have them, keep every
  answered line. --batch_max_wait cancels a batch that runs longer, keeping what it answered.
- Answers are written to the cache before the batch is marked read in the state, then the waiting
  flows are resumed, and the driver waits for the next quiescence; the run ends when every item has.
- Money: the ledger (BatchLedger) prices batch lines at the batch prices of resources/prices.json
  ("batch_models"), online ones (fallback) at the standard prices. --max_cost holds: each line's worst
  case (a bound on its prompt tokens plus max_tokens, at batch prices) is reserved before it is
  submitted and settled at the usage its answer reports, at nothing for a refused line or a failed
  batch, at the worst case for a line that went missing. A line that does not fit is not submitted,
  and nothing after it.
"""
import asyncio
import secrets
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .batch_ledger import BatchLedger, batch_price_of
from .batch_runners import (MAX_BYTES_PER_FILE, MAX_REQUESTS_PER_FILE, TERMINAL, VLLM_ENDPOINT, OpenAIRunner,
                            RunnerError, VLLMRunner, batch_line, estimated_tokens, read_result_line, split_files)
from .batch_state import STATE_FILE, BatchState
from .errors import UserError
from .llm import BudgetExceeded, LLMError, LLMRejected, Reply, cost_of, prompt_tokens_bound
from .quiescence import FlowTracker

QUIET_SECONDS = 60.0  # the safety valve: submit what is parked after this long without any change


def add_batch_args(parser) -> None:
    g = parser.add_argument_group("batch mode (personamath/batch.py)")
    g.add_argument("--batch", action="store_true",
                   help="send requests through the OpenAI Batch API (half price, up to 24 h per round) instead of "
                        "online; the same cache, so either mode finishes the other's work")
    g.add_argument("--batch_runner", choices=["openai", "vllm"], default=None,
                   help="openai (with --batch): the Batch API at --base_url; vllm: vLLM's offline batch runner "
                        "on the local model --model (a folder; or --vllm_model_dir), one engine start per round "
                        "(implies --batch)")
    g.add_argument("--batch_poll_interval", type=float, default=60.0, help="seconds between polls of a batch")
    g.add_argument("--batch_max_rounds", type=int, default=3,
                   help="batches a request may be sent in (it failed or went missing in the others) before it "
                        "fails, or goes online with --batch_fallback online")
    g.add_argument("--batch_fallback", choices=["none", "online"], default="none",
                   help="online: a request still unanswered after --batch_max_rounds batches is sent online "
                        "(standard prices); none: it fails and a rerun retries it")
    g.add_argument("--batch_enqueued_token_limit", type=int, default=None,
                   help="the account's enqueued-token limit for --model: batches go in waves whose estimated "
                        "input tokens stay under it")
    g.add_argument("--batch_max_requests", type=int, default=MAX_REQUESTS_PER_FILE, help="requests per batch file")
    g.add_argument("--batch_max_bytes", type=int, default=MAX_BYTES_PER_FILE, help="bytes per batch file")
    g.add_argument("--batch_max_wait", type=float, default=None,
                   help="seconds a batch may run before it is cancelled (its answered lines are kept, the rest "
                        "retried); default: the API's 24 h window")
    g.add_argument("--vllm_model_dir", default=None,
                   help="--batch_runner vllm: the model folder (default: --model, which is then also the name)")
    g.add_argument("--vllm_dtype", default=None, help="--batch_runner vllm: --dtype (default: precision.py's choice)")
    g.add_argument("--vllm_args", default="", help="--batch_runner vllm: more run_batch arguments, one string")


def prepare_args(args) -> None:
    """Settle the batch flags before the client is made: a runner implies --batch; vLLM's answers are
    cached under their own endpoint."""
    if args.batch_runner is not None:
        args.batch = True
    if not args.batch:
        return
    args.batch_runner = args.batch_runner or "openai"
    if args.batch_runner == "vllm":
        if args.batch_fallback == "online":
            raise UserError("--batch_fallback online needs an online server: not with --batch_runner vllm")
        args.base_url = args.base_url or VLLM_ENDPOINT
    if args.batch_max_rounds < 1 or args.batch_max_requests < 1 or args.batch_max_bytes < 1:
        raise UserError("--batch_max_rounds, --batch_max_requests and --batch_max_bytes must be at least 1")


def attach(llm, args, output_dir) -> "BatchTransport":
    """Batch mode for this client: chat() awaits the transport on a cache miss (the llm.py hook)."""
    transport = BatchTransport(llm, args, output_dir)
    llm.transport = transport
    return transport


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BatchStalled(Exception):
    """The batch endpoint could not be reached (or kept failing) for --stall_timeout seconds."""


# ---------------------------------------------------------------------------------------------
# the transport chat() awaits, and the driver


_ONLINE = None  # a parked request's result that sends it online (--batch_fallback online)


@dataclass
class Pending:
    """One distinct request waiting on the batch: the flows waiting on it, and its batches so far."""
    key: str
    body: dict
    kind: str
    waiters: list = field(default_factory=list)  # (future, task)
    sent: int = 0  # batches it was (or is) in
    batch: str | None = None  # the local id of the batch it is in now


class BatchTransport:
    """What LLMClient.chat() awaits on a cache miss in batch mode (llm.transport), and the driver that
    submits, polls and reads the batches while run_items runs (drive())."""

    def __init__(self, llm, args, output_dir: Path):
        self.llm, self.args, self.output_dir = llm, args, Path(output_dir)
        self.price = batch_price_of(llm.model, llm.base_url, args.prices)
        if llm.max_cost is not None and self.price is None:
            raise UserError(f"--max_cost with --batch needs a batch price for model {llm.model}: add it to the "
                            f"\"batch_models\" of {args.prices}")
        llm.ledger = BatchLedger(model=llm.model, price=llm.ledger.price, batch_price=self.price)
        self.runner = VLLMRunner(args, output_dir) if args.batch_runner == "vllm" else OpenAIRunner(llm, args)
        self.poll_interval = min(args.batch_poll_interval, self.runner.poll_interval)
        self.max_rounds, self.fallback = args.batch_max_rounds, args.batch_fallback
        self.max_wait, self.token_limit = args.batch_max_wait, args.batch_enqueued_token_limit
        self.stall_timeout = args.stall_timeout
        self.pending: dict[str, Pending] = {}
        self.in_flight: dict[str, dict] = {}  # local id -> record, not read yet
        self.covering: dict[str, str] = {}  # custom_id -> the local id of the batch in flight that holds it
        self._data: dict[str, bytes] = {}  # local id -> the file not uploaded yet
        self.state = None
        self.tracker = None
        self.log = log_to_stderr  # run_items writes through its progress bar instead
        self.counts = Counter()
        self._failing_since = None
        self._next_poll = 0.0

    # --- what chat() awaits --------------------------------------------------------------------

    async def __call__(self, key: str, body: dict, kind: str) -> Reply | None:
        task = asyncio.current_task()
        if self.tracker is None or not self.tracker.tracks(task):
            raise RuntimeError("batch mode: chat() must run inside stage.run_items, whose driver submits")
        if self.llm.budget_stopped:
            raise BudgetExceeded(f"--max_cost ${self.llm.max_cost} reached: no more batch lines are submitted")
        pending = self.pending.get(key)
        if pending is None:
            pending = self.pending[key] = Pending(key, body, kind)
            if key in self.covering:  # in a batch of an earlier run, still in flight: not sent again
                pending.batch, pending.sent = self.covering[key], 1
        future = asyncio.get_running_loop().create_future()
        pending.waiters.append((future, task))
        self.tracker.park(task)
        try:
            result = await future
        finally:
            self.tracker.unpark(task)
            if (future, task) in pending.waiters:  # cancelled while parked
                pending.waiters.remove((future, task))
                if not pending.waiters and pending.batch is None:
                    self.pending.pop(key, None)
        if result is not _ONLINE:
            self.llm.answered(result)
        return result

    def _resolve(self, pending: Pending, result) -> None:
        """Wake every flow waiting on the request: with a Reply, _ONLINE, or an exception (a callable
        making one per waiter)."""
        for future, task in pending.waiters:
            if not future.done():
                if callable(result):
                    future.set_exception(result())
                else:
                    future.set_result(result)
            self.tracker.unpark(task)
        pending.waiters.clear()
        if self.pending.get(pending.key) is pending:
            del self.pending[pending.key]

    # --- the driver ------------------------------------------------------------------------------

    @contextmanager
    def tracking(self):
        """Made around the creation of the items' tasks: they, and the tasks they create, are tracked
        (until untrack())."""
        self.counts = Counter()  # this run_items call's (reflection's two phases: each its own)
        if self.state is None and self.runner.resumable:  # before any item parks a request
            self.state = BatchState(self.output_dir / STATE_FILE)
            self._resume()
        self.tracker = FlowTracker()
        self.tracker.install()
        with self.tracker.scope():
            yield

    def untrack(self) -> None:
        if self.tracker is not None:
            self.tracker.uninstall()

    async def drive(self, everything: asyncio.Future) -> None:
        """Submit what is parked whenever every flow waits on the batch, poll what is in flight, read
        what finished, until `everything` (the items) is done."""
        await self.runner.open()
        try:
            while not everything.done():
                self.tracker.went_idle.clear()
                await self._tick()
                if everything.done():
                    break
                idle = asyncio.ensure_future(self.tracker.went_idle.wait())
                try:
                    await asyncio.wait([everything, idle], timeout=self._wait_for(),
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    idle.cancel()
        finally:
            await self.runner.close()
            self.tracker.went_idle.clear()

    def _resume(self) -> None:
        for record in self.state.open_records(self.llm.base_url):
            if record["runner"] != self.runner.name:
                continue
            self.in_flight[record["local_id"]] = record
            for key in record["keys"]:
                self.covering[key] = record["local_id"]
            self.llm.reserved += sum(record["worst"].values())  # paid for by now, or soon
            self.counts["batches_resumed"] += 1
            self.log(f"batch: resuming {record.get('batch_id') or record['file_id']} ({len(record['keys'])} requests) "
                     f"of an earlier run: polling it, resubmitting none of its requests")

    def _ready(self) -> list[Pending]:
        ready = []
        for pending in self.pending.values():
            if pending.batch is None and pending.waiters:
                if pending.key in self.covering:  # already in a batch in flight: never in two at once
                    pending.batch = self.covering[pending.key]
                    pending.sent = max(pending.sent, 1)
                else:
                    ready.append(pending)
        return ready

    def _wait_for(self) -> float | None:
        waits = []
        if self.in_flight:
            waits.append(max(0.0, self._next_poll - time.monotonic()))
        if self.tracker.busy and self._ready():
            waits.append(max(0.0, QUIET_SECONDS - self.tracker.quiet_for()) + 0.01)
        return min(waits) if waits else None

    async def _tick(self) -> None:
        if self.in_flight and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.poll_interval
            for record in list(self.in_flight.values()):
                await self._advance(record)
        if self.tracker.busy == 0 or (self._ready() and self.tracker.quiet_for() >= QUIET_SECONDS):
            if self.tracker.busy:
                self.log(f"batch: no change in {QUIET_SECONDS:.0f} s while {self.tracker.busy} tasks are not waiting "
                         f"on the batch: submitting what is parked")
            await self._submit_ready()

    async def _submit_ready(self) -> None:
        ready = self._ready()
        busy_runner = self.runner.max_in_flight is not None and len(self.in_flight) >= self.runner.max_in_flight
        if not ready or busy_runner:
            return
        room = None
        if self.token_limit is not None:
            room = self.token_limit - sum(r["tokens"] for r in self.in_flight.values())
        take, tokens = [], 0
        for i, pending in enumerate(ready):
            need = estimated_tokens(pending.body)
            if room is not None and tokens + need > room and (take or self.in_flight):
                break  # the next wave, once a batch in flight is done
            worst = self._worst(pending.body)
            llm = self.llm
            if llm.max_cost is not None and (llm.budget_stopped or llm.spent + llm.reserved + worst > llm.max_cost):
                llm.budget_stopped = True
                message = (f"the next batch line (up to ${worst:.6f}) does not fit in --max_cost ${llm.max_cost}")
                for stopped in ready[i:]:
                    self._resolve(stopped, lambda: BudgetExceeded(message))
                break
            llm.reserved += worst
            tokens += need
            take.append((pending, worst, need))
        if not take:
            return
        lines = [batch_line(p.key, p.body) for p, _, _ in take]
        for indices in split_files(lines, self.args.batch_max_requests, self.args.batch_max_bytes):
            record = {"local_id": f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}",
                      "runner": self.runner.name, "endpoint": self.llm.base_url, "status": "new",
                      "keys": [take[i][0].key for i in indices], "worst": {take[i][0].key: take[i][1] for i in indices},
                      "tokens": sum(take[i][2] for i in indices), "created": time.time(), "file_id": None,
                      "batch_id": None}
            self._data[record["local_id"]] = b"".join(lines[i] for i in indices)
            for i in indices:
                pending = take[i][0]
                pending.batch = record["local_id"]
                self.covering[pending.key] = record["local_id"]
                if pending.sent == 0:
                    self.llm.ledger.requests += 1
                    self.llm.ledger.by_kind[pending.kind] = self.llm.ledger.by_kind.get(pending.kind, 0) + 1
                else:
                    self.counts["lines_resubmitted"] += 1
                pending.sent += 1
            self.llm.ledger.batch_lines += len(indices)
            self.in_flight[record["local_id"]] = record
            self.counts["batches_submitted"] += 1
            await self._advance(record)
        self._next_poll = time.monotonic() + self.poll_interval

    def _worst(self, body: dict) -> float:
        if self.llm.max_cost is None:
            return 0.0
        return cost_of(self.price, prompt_tokens_bound(body["messages"]), body["max_tokens"])

    def _save(self, record: dict) -> None:
        if self.state is not None:
            self.state.save(record)

    async def _advance(self, record: dict) -> None:
        """One step for a batch: upload its file, create it (or adopt it), or poll it and read it when it
        is done. A failing call is retried at the next poll; failing for --stall_timeout, the run stops."""
        try:
            if record["status"] == "new":
                await self.runner.upload(record, self._data[record["local_id"]])
                record["status"] = "uploaded"
                self._save(record)  # the file's id, before the batch exists
                del self._data[record["local_id"]]
            if record["status"] == "uploaded":
                adopted = await self.runner.create(record)
                record["status"], record["submitted"] = "submitted", time.time()
                self._save(record)  # the batch's id, before anything waits on it
                self.counts["batches_adopted"] += adopted
                self.log(f"batch: {'found' if adopted else 'submitted'} {record['batch_id']} "
                         f"({len(record['keys'])} requests)")
                return
            status = await self.runner.poll(record)
            if status in TERMINAL:
                lines, broken = await self.runner.results(record)
                self._read(record, status, lines, broken)
            elif (self.max_wait is not None and not record.get("cancel_requested")
                  and time.time() - record["submitted"] > self.max_wait):
                await self.runner.cancel(record)
                record["cancel_requested"] = True
                self._save(record)
                self.log(f"batch: {record['batch_id']} ran past --batch_max_wait {self.max_wait:.0f} s: cancelled, "
                         f"its answered lines are kept")
        except RunnerError as err:
            if err.final:  # this batch cannot be made or read: its requests go to the next one
                self.log(f"batch: {record.get('batch_id') or record['local_id']}: {err}; its requests are retried")
                self._read(record, "lost", [], 0, problem=str(err))
                return
            now = time.monotonic()
            self._failing_since = self._failing_since or now
            self.log(f"batch: {record.get('batch_id') or record['local_id']}: {err} (retried at the next poll)")
            if now - self._failing_since > self.stall_timeout:
                raise BatchStalled(f"the batch endpoint at {self.llm.base_url} kept failing for "
                                   f"{now - self._failing_since:.0f} s (--stall_timeout): {err}") from None
            return
        self._failing_since = None

    def _read(self, record: dict, status: str, lines: list[dict], broken: int, problem: str | None = None) -> None:
        """Take a finished batch's lines into the cache and the ledger, then wake the flows waiting on it."""
        keys = set(record["keys"])
        found: dict[str, tuple[str, Reply | str]] = {}
        rank = {"ok": 0, "rejected": 1, "failed": 2}
        for line in lines:
            key = line.get("custom_id")
            if key not in keys:
                self.counts["lines_unknown"] += 1
                continue
            outcome = read_result_line(line)
            if key not in found or rank[outcome[0]] < rank[found[key][0]]:
                found[key] = outcome
        errors = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in record.get("errors") or [])
        missing_problem = problem or (f"batch {status}" + (f" ({errors})" if errors else "") +
                                      ", the request missing from its output and error files")
        ledger, charged, counts = self.llm.ledger, 0.0, Counter()
        for key in record["keys"]:
            outcome, detail = found.get(key, ("missing", missing_problem))
            counts[outcome] += 1
            if outcome == "ok":
                charged += cost_of(self.price, detail.prompt_tokens, detail.completion_tokens) or 0.0
                self.llm.cache.put(key, detail)
                ledger.prompt_tokens += detail.prompt_tokens
                ledger.completion_tokens += detail.completion_tokens
                ledger.batch_prompt_tokens += detail.prompt_tokens
                ledger.batch_completion_tokens += detail.completion_tokens
                ledger.truncated += detail.finish_reason == "length"
            elif outcome == "missing" and status not in ("failed", "lost"):
                charged += record["worst"].get(key, 0.0)  # it may have been answered, and billed
            found[key] = (outcome, detail)
        self.llm.reserved -= sum(record["worst"].values())
        self.llm.spent += charged
        for name, n in counts.items():
            self.counts[f"lines_{name}"] += n
        self.counts["lines_broken"] += broken
        self.counts[f"batches_{status}"] += 1
        record.update(status="read" if status != "lost" else "lost", result=status, outcome=dict(counts),
                      charged_usd=charged, read_at=time.time())
        del record["keys"], record["worst"]
        self._save(record)
        del self.in_flight[record["local_id"]]
        self._data.pop(record["local_id"], None)
        self.log(f"batch: {record.get('batch_id') or record['local_id']} {status}: {counts['ok']} answered, "
                 f"{counts['rejected']} refused, {counts['failed']} failed, {counts['missing']} missing"
                 + (f", {broken} unreadable lines" if broken else ""))
        retry_round = not (status == "failed" and any(e.get("code") == "token_limit_exceeded"
                                                      for e in record.get("errors") or []) and self.in_flight)
        for key, (outcome, detail) in found.items():
            if self.covering.get(key) == record["local_id"]:
                del self.covering[key]
            pending = self.pending.get(key)
            if pending is None or pending.batch != record["local_id"]:
                continue  # nobody waits on it (yet): the answer is in the cache
            pending.batch = None
            if outcome == "ok":
                self._resolve(pending, detail)
            elif outcome == "rejected":
                ledger.rejected += 1
                self._resolve(pending, lambda d=detail: LLMRejected(d))
            else:
                if not retry_round:
                    pending.sent -= 1  # the enqueued-token limit: not this request's fault
                if pending.sent < self.max_rounds:
                    continue  # in the next batch
                if self.fallback == "online":
                    self.counts["sent_online"] += 1
                    self._resolve(pending, _ONLINE)
                else:
                    ledger.failed += 1
                    self.counts["failed_after_rounds"] += 1
                    message = (f"no answer after {pending.sent} batches (last: {detail}); a rerun retries it, "
                               f"or --batch_fallback online sends it online")
                    self._resolve(pending, lambda m=message: LLMError(m))

    def summary(self) -> dict:
        state = str(self.output_dir / STATE_FILE) if self.runner.resumable else None
        return {"runner": self.runner.name, "state": state,
                "in_flight_at_exit": [r.get("batch_id") or r["local_id"] for r in self.in_flight.values()],
                **dict(sorted(self.counts.items()))}
