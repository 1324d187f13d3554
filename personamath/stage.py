"""A generation stage: its command line and client, the item loop (progress, budget stop, stall
watchdog, batch driver), and its outputs, stats and exit status.

A stage is a function `work(item) -> Outcome` (made of steps.py's steps) run over all items
concurrently. Each item's rows are written as it finishes, in input order (StageOutput), so that memory
holds only the counts and the items in progress; the files take their names only when the stage ends.
What makes a killed run cheap is the response cache (llm.py), from which a rerun rebuilds every
finished item without a request.
"""
import argparse
import asyncio
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from . import batch, grader
from .async_grading import GradingFailed, GradingTally
from .batch_state import STATE_FILE
from .config import RecipeParser
from .data import TRAIN_FILES, load_any
from .errors import UserError
from .jsonl import JsonlWriter, iter_jsonl, write_json
from .llm import ITEM_REQUESTS, BudgetExceeded, LLMClient, LLMError, LLMRejected, add_llm_args
from .progress import RequestProgress
from .provenance import provenance

EXIT_BUDGET = 3  # --max_cost reached: outputs hold what finished, a rerun with a higher budget goes on
EXIT_FAILED_REQUESTS = 4  # some requests failed after every retry: a rerun retries just those
EXIT_STALLED = 5  # the server answered nothing for --stall_timeout: outputs hold what finished, a rerun resumes
EXIT_GRADING_FAILED = 6  # grading failed too often (GradingTally.count): outputs hold what finished, a rerun resumes
# Online, items start as earlier ones finish, this many per request slot (--concurrency): enough to keep
# every slot busy (an item sends its requests one after another), and memory holds those items' tasks,
# not a waiting task for every input (about 20 KB each: 300 MiB at 15K questions)
ITEMS_PER_SLOT = 2


def stage_parser(name: str, description: str) -> RecipeParser:
    """The arguments every generation stage takes; `name` is its script's, and its section of --config."""
    p = RecipeParser(name, prog=f"{name}.py", description=description)
    p.add_argument("--output_dir", default="runs/gen", help="stage outputs and the response cache")
    p.add_argument("--limit", type=int, default=None, help="process at most this many input items")
    p.add_argument("--grading_timeout", type=float, default=10.0)
    p.add_argument("--answer_format", choices=["boxed", "stated"], default="boxed",
                   help="what counts as a solution's final answer: boxed (default) only `\\boxed{}`; stated also "
                        "a closing \"The final answer is X\" line (a lower bar, for weak models)")
    add_llm_args(p)
    add_dry_run_args(p)
    batch.add_batch_args(p)
    return p


def make_client(args, output_dir) -> LLMClient:
    """The stage's LLM client; with --batch (or --batch_runner) its requests go through a batch runner."""
    batch.prepare_args(args)
    llm = LLMClient(args, output_dir)
    if args.batch:
        batch.attach(llm, args, output_dir)
    return llm


def fresh_ledger(ledger):
    """A new, empty account for the same model and prices (reflection's phase 2)."""
    keep = {"model", "price", "batch_price"}
    return type(ledger)(**{f.name: getattr(ledger, f.name) for f in fields(ledger) if f.name in keep})


# ---------------------------------------------------------------------------------------------
# the item loop


@dataclass
class Outcome:
    kept: list[dict] = field(default_factory=list)  # rows for the stage's output
    rejected: list[dict] = field(default_factory=list)  # what was tried and not kept, with the reason
    attempted: int = 0  # units of work tried (questions, rewrites)


class StageOutput:
    """A stage's rows, handed over by run_items (emit=output.add) as its items finish, in input order: the
    kept ones to NAME.jsonl, the others with their reasons to REJECTED_NAME.jsonl. Written through
    temporary files that take those names when the `with` block ends without an error; after an error
    they are removed and the files of the last complete run stay."""

    def __init__(self, output_dir: Path, name: str, rejected_name: str):
        self.output_dir, self.name, self.rejected_name = Path(output_dir), name, rejected_name
        self.kept = JsonlWriter(self.output_dir / f"{name}.jsonl")
        self.rejected = JsonlWriter(self.output_dir / f"{rejected_name}.jsonl")

    def add(self, outcome: Outcome) -> None:
        for row in outcome.kept:
            self.kept.write(row)
        for row in outcome.rejected:
            self.rejected.write(row)

    def __enter__(self):
        return self

    def __exit__(self, kind, *rest):
        for writer in (self.kept, self.rejected):
            writer.__exit__(kind, *rest)


@dataclass
class StageResult:
    kept: int  # rows kept
    reasons: Counter  # rejected rows by reason
    inputs: int
    attempted: int
    finished: int  # items done; fewer than inputs when the budget, the stall watchdog or grading stopped the run
    failed_ids: list[str]  # items whose requests failed after every retry: not graded, retried by a rerun
    rejected_by_server: list[dict] = field(default_factory=list)  # {id, message}: refused for good, not retried
    stalled: str | None = None  # why the stall watchdog stopped the run
    grading_failed: str | None = None  # why failed gradings stopped the run (GradingFailed)


class Stalled(Exception):
    """The server answered no request for --stall_timeout seconds while some waited."""


async def _watch_for_stall(llm: LLMClient, timeout: float) -> None:
    while True:
        await asyncio.sleep(min(1.0, timeout / 4))
        if llm.refused_for() > timeout:  # first: a wait for a Retry-After is no silence of the server
            raise Stalled(f"the server at {llm.base_url} refused every request (429) for {llm.refused_for():.0f} s "
                          f"(--stall_timeout): the account's limits are spent, or shared with another client that "
                          f"takes them all ({llm.limits_seen()})")
        if llm.stalled_for() > timeout:
            raise Stalled(f"the server at {llm.base_url} answered none of the {llm.in_flight} requests waiting on it "
                          f"in {timeout:.0f} s (--stall_timeout)")


async def run_items(items: list, work, llm: LLMClient, desc: str, max_requests_per_item: int,
                    stall_timeout: float, emit, item_id=lambda item: item["id"]) -> StageResult:
    """Run `work` over every item concurrently (the client bounds requests in flight); each finished
    item's Outcome goes to `emit`, in input order (one that finishes early waits for those before it).
    `max_requests_per_item` (the most requests one item can make) sizes the progress bar. If the
    server answers nothing for `stall_timeout` seconds, or grading fails too often (GradingFailed), the
    run stops with what finished."""
    waiting: dict[int, Outcome] = {}  # finished before an item ahead of them
    next_index = 0  # the first item not emitted
    counts = {"kept": 0, "attempted": 0, "finished": 0, "reasons": Counter()}
    failed_ids, rejected_by_server = [], []

    def finish(i: int, outcome: Outcome) -> None:
        nonlocal next_index
        counts["kept"] += len(outcome.kept)
        counts["attempted"] += outcome.attempted
        counts["finished"] += 1
        counts["reasons"].update(r["reason"] for r in outcome.rejected if r.get("reason"))
        waiting[i] = outcome
        while next_index in waiting:
            emit(waiting.pop(next_index))
            next_index += 1

    progress = RequestProgress(desc, len(items), max_requests_per_item)
    llm.on_reply = lambda reply: progress.request_done(reply.completion_tokens, reply.cached)

    async def one(i, item):
        nonlocal grading_failed
        requests = [0]
        ITEM_REQUESTS.set(requests)  # this item's task (and the tasks it starts) count on it
        try:
            outcome = await work(item)
        except BudgetExceeded:
            return  # the item stays unfinished; its cached requests are reused by a rerun
        except GradingFailed as err:  # every item stops, as after a stall; answers are cached for a rerun
            grading_failed = grading_failed or str(err)
            stop()
            return
        except LLMRejected as err:  # final: the item is done, with nothing kept
            rejected_by_server.append({"id": item_id(item), "message": str(err)})
            outcome = Outcome()
            progress.write(f"{desc}: {item_id(item)}: rejected by the server: {err}")
        except LLMError as err:
            failed_ids.append(item_id(item))
            outcome = Outcome()
            progress.write(f"{desc}: {item_id(item)}: {err}")
        finish(i, outcome)
        progress.item_done(requests[0], len(outcome.kept))

    def stop() -> None:
        """Every item stops now, not at the next turn of the loop (where more answers would be graded)."""
        everything.cancel()
        for task in started:
            task.cancel()

    started: set[asyncio.Task] = set()  # online: the items in progress (_windowed)
    stalled = grading_failed = None
    watchdog = asyncio.ensure_future(_watch_for_stall(llm, stall_timeout))
    transport = getattr(llm, "transport", None)  # batch mode (batch.py): a driver submits what the items park
    driver = None
    if transport is not None:
        transport.log = progress.write
        with transport.tracking():  # the items' tasks, and every task they start, are counted for quiescence
            everything = asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
        driver = asyncio.ensure_future(transport.drive(everything))
    else:
        everything = asyncio.ensure_future(_windowed(items, one, ITEMS_PER_SLOT * llm.concurrency, started))
    try:
        await asyncio.wait([everything, watchdog, *([driver] if driver else [])], return_when=asyncio.FIRST_COMPLETED)
        if watchdog.done():
            stalled = str(watchdog.exception())
        elif driver is not None and driver.done() and not everything.done():
            error = driver.exception()
            if not isinstance(error, batch.BatchStalled):
                stop()
                await asyncio.gather(everything, return_exceptions=True)
                raise error or RuntimeError("the batch driver stopped before the items were done")
            stalled = str(error)
        if stalled or grading_failed:
            stop()  # what is in flight is dropped; everything answered is in the cache
            await asyncio.gather(everything, return_exceptions=True)
        else:
            watchdog.cancel()
            await everything  # re-raises what an item raised
    finally:
        watchdog.cancel()
        if driver is not None:  # done once every item is; cancelled when the run stops early
            driver.cancel()  # at an await: what it did is recorded, a rerun picks up the rest
            await asyncio.gather(driver, return_exceptions=True)
            transport.untrack()
            transport.log = batch.log_to_stderr
        llm.on_reply = None
        progress.close()
        await llm.aclose()
    for i in sorted(waiting):  # behind items that did not finish (the budget, a stall): in order still
        emit(waiting[i])
    return StageResult(kept=counts["kept"], reasons=counts["reasons"], inputs=len(items),
                       attempted=counts["attempted"], finished=counts["finished"], failed_ids=failed_ids,
                       rejected_by_server=rejected_by_server, stalled=stalled, grading_failed=grading_failed)


async def _windowed(items: list, one, window: int, running: set) -> None:
    """`one(i, item)` for every item, at most `window` at once, each started as another ends, its task in
    `running` while it runs; the first exception an item raises stops the rest and is raised, as
    asyncio.gather would; cancelled, every item in progress is cancelled."""
    slots, errors = asyncio.Semaphore(window), []

    def ended(task: asyncio.Task) -> None:
        running.discard(task)
        slots.release()
        if not task.cancelled() and task.exception() is not None:
            errors.append(task.exception())

    try:
        for i, item in enumerate(items):
            await slots.acquire()
            if errors:
                raise errors[0]
            task = asyncio.ensure_future(one(i, item))
            running.add(task)
            task.add_done_callback(ended)
        while running and not errors:
            await asyncio.wait(set(running), return_when=asyncio.FIRST_EXCEPTION)
        if errors:
            raise errors[0]
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


# ---------------------------------------------------------------------------------------------
# outputs


def write_stage(output: StageOutput, result: StageResult, llm: LLMClient, grading: GradingTally,
                extra: dict | None = None, rows_required: bool = True) -> int:
    """Write NAME.stats.json beside the stage's rows (StageOutput); print the yield; return the exit status."""
    output_dir, name, rejected_name = output.output_dir, output.name, output.rejected_name
    complete = result.finished == result.inputs
    reasons = result.reasons
    invalid = sum(n for reason, n in reasons.items() if reason.startswith("invalid rewrite"))
    stats = {"stage": name, "inputs": result.inputs, "attempted": result.attempted, "kept": result.kept,
             "yield": result.kept / result.attempted if result.attempted else 0.0,
             "finished_items": result.finished, "complete": complete, "rejected_by_reason": dict(reasons),
             "invalid_rewrites": {"count": invalid, "share": invalid / result.attempted if result.attempted else 0.0},
             "request_failed_ids": result.failed_ids, "rejected_by_server": result.rejected_by_server,
             "stalled": result.stalled, "spent_usd_at_most": llm.spent, "max_cost_usd": llm.max_cost,
             "model": llm.model, "ledger": llm.ledger.as_dict(), "grading": asdict(grading),
             **({"batch": llm.transport.summary()} if getattr(llm, "transport", None) else {}),
             **(extra or {}), "provenance": provenance()}
    write_json(output_dir / f"{name}.stats.json", stats)
    print(f"{name}: kept {result.kept} of {result.attempted} attempted ({100 * stats['yield']:.1f}%) "
          f"from {result.inputs} inputs; requests sent {llm.ledger.requests}, cached {llm.ledger.cache_hits}, "
          f"failed {llm.ledger.failed}; tokens {llm.ledger.prompt_tokens} in, {llm.ledger.completion_tokens} out; "
          f"spend {llm.ledger.spend_text()} -> {output_dir / (name + '.jsonl')}")
    if result.stalled:
        if llm.transport is not None:  # batch mode: the batches, not a server's log, are what to look at
            resume = (f"every batch submitted is recorded in {output_dir / STATE_FILE}, so the same command "
                      f"resumes polling them without resubmitting")
        else:
            resume = ("the same command resumes. Check that the server is alive and see its log; a server that runs "
                      "but answers nothing is often a CPU without native bf16 serving in bf16 (serve in float32: "
                      "--dtype float32), or more requests in flight than it can finish in that time (lower "
                      "--concurrency or --max_tokens, or raise --stall_timeout)")
        print(f"{name}: stopped: {result.stalled}. Nothing answered is lost: {result.finished} of {result.inputs} "
              f"items finished and every answer is cached; {resume}", file=sys.stderr)
        return EXIT_STALLED
    if result.grading_failed:
        print(f"{name}: stopped: {result.grading_failed}. An answer that cannot be graded counts as wrong, so going "
              f"on would spend attempts and reflections on questions already solved. Check that math-verify works "
              f"here (python -c 'import math_verify'), or raise --grading_timeout if the errors are timeouts; every "
              f"answer is cached, so the same command then resumes", file=sys.stderr)
        return EXIT_GRADING_FAILED
    if result.rejected_by_server:
        print(f"{name}: the server refused {len(result.rejected_by_server)} items for good (not retried; ids and its "
              f"messages in {name}.stats.json)", file=sys.stderr)
    if not complete:
        print(f"{name}: stopped at the budget: spent at most ${llm.spent:.6f} of --max_cost ${llm.max_cost} after "
              f"{result.finished} of {result.inputs} items (the next request's worst case did not fit). Every "
              f"answer is cached: rerun with a higher --max_cost to go on, paying nothing twice", file=sys.stderr)
        return EXIT_BUDGET
    if result.failed_ids:
        print(f"{name}: {len(result.failed_ids)} items failed after every retry (ids in {name}.stats.json); "
              f"rerun to retry them (finished work is cached)", file=sys.stderr)
        return EXIT_FAILED_REQUESTS
    if not result.kept:
        print(f"{name}: no rows kept; see {output_dir / (rejected_name + '.jsonl')}", file=sys.stderr)
        return 1 if rows_required else 0
    return 0


def print_estimate(name: str, llm: LLMClient, planned, output_dir: Path, assumed: str = "") -> None:
    """--dry_run output: the requests the stage may send (Planned, each one it may need) and what they would
    cost, expected and in the worst case (LLMClient.estimate), with `assumed`, what the expected case takes
    for granted; printed and written to OUTPUT_DIR/NAME.estimate.json (read by chain.py --dry_run)."""
    transport = getattr(llm, "transport", None)  # --batch: at batch prices
    est = llm.estimate(planned, transport.price if transport is not None else llm.ledger.price)
    prices = f" at {transport.runner.name} batch prices" if transport is not None else ""
    cost = ("unknown (no price for this model)" if est["cost_usd_est"] is None else
            f"{usd(est['cost_usd_est'])} expected, {usd(est['cost_usd_worst'])} worst case,")
    print(f"{name} --dry_run: {est['requests']:,} requests ({est['cached']:,} cached, {est['to_send']:,} to send); "
          f"estimated cost {cost} for {llm.model}{prices}\n"
          f"  expected: ~{est['requests_expected']:,.0f} requests, ~{est['prompt_tokens_est']:,} prompt + "
          f"~{est['completion_tokens_est']:,} completion tokens (answers of {est['output_tokens_expected']:,} tokens: "
          f"--dry_run_output_tokens, at most --max_tokens)\n"
          f"  worst case: every request sent, {est['prompt_tokens_worst']:,} prompt + "
          f"{est['completion_tokens_worst']:,} completion tokens (every answer {est['max_tokens']:,} tokens: "
          f"--max_tokens; prompts at the bound --max_cost reserves; a retry after a lost answer may be billed again)"
          + (f"\n  assumed: {assumed}" if assumed else ""))
    write_json(Path(output_dir) / f"{name}.estimate.json", {"stage": name, "model": llm.model, **est,
                                                            "batch_prices": transport is not None,
                                                            "assumed": assumed or None})


def usd(cost: float) -> str:
    """Dollars as --dry_run prints them: cents, or a tenth of a cent below a dollar."""
    return f"${cost:,.2f}" if cost >= 1 else f"${cost:.3f}"


def share(text: str) -> float:
    """A share of questions, 0 to 1 (an argparse type)."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share between 0 and 1")
    return value


def add_dry_run_args(parser) -> None:
    """--dry_run's stated assumption about gen_cot's yield, which the expected cost of every stage depends on."""
    parser.add_argument("--dry_run_solved_share", type=share, default=0.7,
                        help="--dry_run's expected case: the share of questions gen_cot solves (default 0.7, the "
                             "share the full-scale rehearsal solved, 10,467 of 14,973, against the simulated server: "
                             "no yield of gpt-4o-mini was measured here). gen_cot: the share solved at the first "
                             "attempt, the others taking every --num_samples attempt; persona_augment and reflection: "
                             "the share of --dry_run_inputs that their input holds, before it exists")


def add_dry_run_inputs_arg(parser, stage_input: str) -> None:
    """--dry_run_inputs, for a stage whose input (`stage_input`, of gen_cot) may not exist yet."""
    parser.add_argument("--dry_run_inputs", nargs="+", default=list(TRAIN_FILES.values()),
                        help=f"the questions gen_cot is given (its --inputs; default: {' '.join(TRAIN_FILES.values())}): "
                             f"while {stage_input} does not exist, --dry_run prices the stage from them, at "
                             f"--dry_run_solved_share")


def question_rows(inputs: list[str]) -> list[dict]:
    """The questions of GSM8K/MATH files (or `datasets` names) as rows of gen_cot's outputs, without answers."""
    rows = []
    for spec in inputs:
        task, problems = load_any(spec)
        rows += [{"id": f"{task}/{p.id}", "source": task, "problem": p.question, "gold": p.gold, "level": p.level,
                  "subject": p.subject} for p in problems]
    return rows


def assumed_input(inputs: list[str], share_of_questions: float, limit: int | None, missing: Path,
                  which: str) -> tuple[list[dict], float, str]:
    """--dry_run before the stage's input (`missing`) exists: the questions of `inputs` (the first --limit) as
    its rows, each one of them with the chance that gives `share_of_questions` of all of them (the expected
    case; the worst case takes every one), and that assumption in words (`which`: which share it is)."""
    questions = question_rows(inputs)
    rows = questions[:limit]
    expected_rows = min(share_of_questions * len(questions), len(rows))
    capped = f", at most --limit {limit}" if limit is not None and limit < len(questions) else ""
    words = (f"{missing} does not exist yet: priced from the {len(questions):,} questions of --dry_run_inputs, "
             f"{100 * share_of_questions:.0f}% of them {which}: ~{expected_rows:,.0f} rows{capped}; the worst case "
             f"takes all {len(rows):,}")
    return rows, expected_rows / len(rows) if rows else 0.0, words


def read_stage_rows(path) -> list[dict]:
    """Rows of an earlier stage's output, checked for the fields every stage relies on."""
    rows = []
    for lineno, row in iter_jsonl(path):
        missing = [k for k in ("id", "source", "problem", "gold") if not isinstance(row.get(k), str)]
        if missing:
            raise UserError(f"{path}:{lineno}: row lacks {', '.join(missing)}")
        if row["source"] not in grader.TASKS:
            raise UserError(f"{path}:{lineno}: unknown source {row['source']!r} (expected gsm8k or math)")
        rows.append(row)
    return rows
