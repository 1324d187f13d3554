"""What the generation stages share: their command line, the prompts' requests and the parsing of
their answers, grading off the event loop, and the item loop (progress, budget stop, outputs, stats).

A stage is a function `work(item) -> Outcome` run over all items concurrently. Its outputs are written
once, at the end, from the outcomes; what makes a killed run cheap is the response cache (llm.py),
from which a rerun rebuilds every finished item without a request.
"""
import argparse
import asyncio
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from . import batch, grader, parser
from .errors import UserError
from .jsonl import iter_jsonl, write_json, write_jsonl
from .llm import ITEM_REQUESTS, BudgetExceeded, LLMClient, LLMError, LLMRejected, add_llm_args, cost_of
from .progress import RequestProgress
from .prompts import load_prompt
from .provenance import provenance
from .rewrites import rewrite_problem

SOLVE, REWRITE, PROPOSE, REFLECT = (load_prompt(n) for n in ("solve", "rewrite_persona", "propose_personas", "reflect"))
EXIT_BUDGET = 3  # --max_cost reached: outputs hold what finished, a rerun with a higher budget goes on
EXIT_FAILED_REQUESTS = 4  # some requests failed after every retry: a rerun retries just those
EXIT_STALLED = 5  # the server answered nothing for --stall_timeout: outputs hold what finished, a rerun resumes
EXIT_GRADING_FAILED = 6  # grading failed too often (GradingTally.count): outputs hold what finished, a rerun resumes


def stage_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--output_dir", default="runs/gen", help="stage outputs and the response cache")
    p.add_argument("--limit", type=int, default=None, help="process at most this many input items")
    p.add_argument("--grading_timeout", type=float, default=10.0)
    p.add_argument("--answer_format", choices=["boxed", "stated"], default="boxed",
                   help="what counts as a solution's final answer: boxed (default) only `\\boxed{}`; stated also "
                        "a closing \"The final answer is X\" line (a lower bar, for weak models)")
    add_llm_args(p)
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
# requests and the parsing of their answers


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def solve_messages(problem: str) -> list[dict]:
    return user(SOLVE.render(problem=problem))


def rewrite_messages(problem: str, persona: str) -> list[dict]:
    return user(REWRITE.render(problem=problem, persona=persona))


def propose_messages(problem: str, k: int) -> list[dict]:
    return user(PROPOSE.render(problem=problem, k=str(k)))


def reflect_messages(problem: str, attempt: str) -> list[dict]:
    return user(REFLECT.render(problem=problem, attempt=attempt))


_LABEL = re.compile(r"^\s*(rewritten problem|problem|question)\s*:\s*", re.IGNORECASE)
_LIST_MARK = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")
_CORRECTED = re.compile(r"\**corrected solution\s*:?\**\s*:?", re.IGNORECASE)


def parse_rewrite(text: str) -> str | None:
    """The rewritten problem, without a leading label; None when the model wrote nothing usable."""
    text = _LABEL.sub("", text.strip()).strip()
    return text if len(text) >= 10 else None


def parse_personas(text: str, k: int) -> list[str]:
    """Up to k distinct persona lines, list markers removed."""
    personas = []
    for line in text.splitlines():
        line = _LIST_MARK.sub("", line).strip().strip('"')
        if len(line) >= 10 and line not in personas:
            personas.append(line)
    return personas[:k]


def split_reflection(text: str) -> tuple[str, str]:
    """(reflection, corrected solution) of a reflect answer; all of it is the solution without the heading."""
    parts = _CORRECTED.split(text, maxsplit=1)
    if len(parts) == 1:
        return "", text.strip()
    return parts[0].strip(), parts[1].strip()


# ---------------------------------------------------------------------------------------------
# the steps the stages are made of


async def solve(llm: LLMClient, grader: "AsyncGrader", source: str, problem: str, gold: str,
                sample: int = 0) -> tuple[str, bool]:
    """A fresh solution (never shown any earlier one) and whether its answer is the gold one."""
    reply = await llm.chat(solve_messages(problem), sample=sample, kind="solve")
    return reply.text, reply.finish_reason != "length" and await grader.correct(source, reply.text, gold, problem)


async def reflect(llm: LLMClient, grader: "AsyncGrader", source: str, problem: str, gold: str,
                  wrong: str) -> tuple[str, str, bool]:
    """The LLM is told its attempt is wrong (never the gold answer): (reflection, corrected solution, correct)."""
    reply = await llm.chat(reflect_messages(problem, wrong), kind="reflect")
    reflection, solution = split_reflection(reply.text)
    return reflection, solution, reply.finish_reason != "length" and await grader.correct(source, solution, gold,
                                                                                          problem)


async def rewrite(llm: LLMClient, problem: str, persona: str) -> str | None:
    """The problem as the persona would pose it; None when the answer is unusable."""
    reply = await llm.chat(rewrite_messages(problem, persona), kind="rewrite")
    return parse_rewrite(reply.text) if reply.finish_reason != "length" else None


async def personas_for(llm: LLMClient, row: dict, pool, k: int, seed: int) -> list:
    """k personas for one question: drawn from the pool, or proposed by the LLM when there is none."""
    from .personas import choose, proposed

    if pool is not None:
        return choose(pool, row["id"], k, seed)
    reply = await llm.chat(propose_messages(row["problem"], k), kind="propose")
    return [proposed(text) for text in parse_personas(reply.text, k)]


async def persona_variants(llm: LLMClient, grader: "AsyncGrader", row: dict, pool, k: int, seed: int, stage: str,
                           fix=None) -> "Outcome":
    """Rewrite one solved question through k personas and solve each rewrite afresh; a rewrite is kept
    if its answer is the question's gold one. `fix(problem, wrong)` may turn a wrong solution into a
    correct one, returning (response, correct, the wrong attempt the response refers to or None)."""
    personas = await personas_for(llm, row, pool, k, seed)

    async def one(j, persona):
        base = {"id": f"{row['id']}#p{j}", "parent_id": row["id"], "source": row["source"], "persona": persona.text,
                "persona_id": persona.id, "gold": row["gold"]}
        problem = await rewrite(llm, row["problem"], persona.text)
        if problem is None:
            return None, {**base, "reason": "unusable rewrite"}
        invalid = rewrite_problem(row["problem"], problem, row["gold"])
        if invalid:  # rejected before a request is spent on solving it
            return None, {**base, "problem": problem, "reason": invalid}
        response, correct = await solve(llm, grader, row["source"], problem, row["gold"])
        versions, wrong_attempt = f"{REWRITE.version}+{SOLVE.version}", None
        if not correct and fix is not None:
            response, correct, wrong_attempt = await fix(problem, response)
            versions += f"+{REFLECT.version}"
        if not correct:
            return None, {**base, "problem": problem, "response": response, "reason": "rewrite solved wrong"}
        return {**base, "stage": stage, "problem": problem, "response": response, "wrong_attempt": wrong_attempt,
                "level": row.get("level"), "subject": row.get("subject"), "model": llm.model,
                "prompt_version": versions}, None

    results = await asyncio.gather(*(one(j, p) for j, p in enumerate(personas)))
    return Outcome(attempted=len(personas), kept=[k for k, _ in results if k], rejected=[r for _, r in results if r])


# ---------------------------------------------------------------------------------------------
# grading, off the event loop


class GradingFailed(Exception):
    """Grading failed on too many answers (GradingTally.count): the stage stops."""


@dataclass
class GradingTally:
    """The answers a stage had math-verify grade, and the failures among them: its stats' "grading"."""
    graded: int = 0
    errors: int = 0
    examples: list[str] = field(default_factory=list)  # the first few error messages

    def count(self, error: str | None) -> None:
        """Count one grading. Raise GradingFailed once the failures are more than 1% of the answers graded
        and more than one: one odd answer may time out, a second so soon is math-verify failing here.
        A failed grading counts as a wrong answer, so going on would spend every attempt and reflection
        on questions already solved, and keep nothing."""
        self.graded += 1
        if error is None:
            return
        self.errors += 1
        if len(self.examples) < 3:
            self.examples.append(error)
        if self.errors > max(1, self.graded / 100):
            raise GradingFailed(f"grading failed on {self.errors} of the {self.graded} answers graded so far, "
                                f"first with: {self.examples[0]}")


class AsyncGrader:
    """math-verify (the `verify` grader) in worker processes, awaited without blocking other requests."""

    def __init__(self, timeout: float, answer_format: str = "boxed"):
        self.timeout, self.answer_format = timeout, answer_format
        self.pool = grader.grading_pool()
        self.tally = GradingTally()

    async def correct(self, task: str, completion: str, gold: str, problem: str) -> bool:
        """Whether the completion's final answer (parser.final_answer: the last `\\boxed{}`, or with
        answer_format "stated" also a closing "The final answer is X" line) equals the gold. Without a
        final answer, math-verify would fall back to any number in the text: a lucky match, not a
        solution. An answer that restates an expression of the problem is not a solution either.
        Raises GradingFailed when grading fails too often."""
        from concurrent.futures import TimeoutError as FutureTimeout

        from pebble import ProcessExpired

        answer = parser.final_answer(completion, self.answer_format)
        if answer is None or parser.restates_problem(answer, problem, gold):
            return False
        future = self.pool.schedule(grader.verify_safely, args=(task, f"\\boxed{{{answer}}}", gold),
                                    timeout=self.timeout)
        try:
            verdict = await asyncio.wrap_future(future)
        except (FutureTimeout, ProcessExpired) as err:
            verdict = grader.failed_verdict(err, self.timeout)
        self.tally.count(verdict.error)
        return verdict.correct

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


# ---------------------------------------------------------------------------------------------
# the item loop


@dataclass
class Outcome:
    kept: list[dict] = field(default_factory=list)  # rows for the stage's output
    rejected: list[dict] = field(default_factory=list)  # what was tried and not kept, with the reason
    attempted: int = 0  # units of work tried (questions, rewrites)


@dataclass
class StageResult:
    kept: list[dict]
    rejected: list[dict]
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
        if llm.stalled_for() > timeout:
            raise Stalled(f"the server at {llm.base_url} answered none of the {llm.in_flight} requests waiting on it "
                          f"in {timeout:.0f} s (--stall_timeout)")


async def run_items(items: list, work, llm: LLMClient, desc: str, max_requests_per_item: int,
                    stall_timeout: float, item_id=lambda item: item["id"]) -> StageResult:
    """Run `work` over every item concurrently (the client bounds requests in flight), in input order.
    `max_requests_per_item` (the most requests one item can make) sizes the progress bar. If the
    server answers nothing for `stall_timeout` seconds, or grading fails too often (GradingFailed), the
    run stops with what finished."""
    outcomes: list[Outcome | None] = [None] * len(items)
    failed_ids, rejected_by_server = [], []
    progress = RequestProgress(desc, len(items), max_requests_per_item)
    llm.on_reply = lambda reply: progress.request_done(reply.completion_tokens, reply.cached)

    async def one(i, item):
        nonlocal grading_failed
        requests = [0]
        ITEM_REQUESTS.set(requests)  # this item's task (and the tasks it starts) count on it
        try:
            outcomes[i] = await work(item)
        except BudgetExceeded:
            return  # the item stays unfinished; its cached requests are reused by a rerun
        except GradingFailed as err:  # every item stops, as after a stall; answers are cached for a rerun
            grading_failed = grading_failed or str(err)
            everything.cancel()
            return
        except LLMRejected as err:  # final: the item is done, with nothing kept
            rejected_by_server.append({"id": item_id(item), "message": str(err)})
            outcomes[i] = Outcome()
            progress.write(f"{desc}: {item_id(item)}: rejected by the server: {err}")
        except LLMError as err:
            failed_ids.append(item_id(item))
            outcomes[i] = Outcome()
            progress.write(f"{desc}: {item_id(item)}: {err}")
        progress.item_done(requests[0], len(outcomes[i].kept))

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
        everything = asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
    try:
        await asyncio.wait([everything, watchdog, *([driver] if driver else [])], return_when=asyncio.FIRST_COMPLETED)
        if watchdog.done():
            stalled = str(watchdog.exception())
        elif driver is not None and driver.done() and not everything.done():
            error = driver.exception()
            if not isinstance(error, batch.BatchStalled):
                everything.cancel()
                await asyncio.gather(everything, return_exceptions=True)
                raise error or RuntimeError("the batch driver stopped before the items were done")
            stalled = str(error)
        if stalled or grading_failed:
            everything.cancel()  # what is in flight is dropped; everything answered is in the cache
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
    done = [o for o in outcomes if o is not None]
    return StageResult(kept=[r for o in done for r in o.kept], rejected=[r for o in done for r in o.rejected],
                       inputs=len(items), attempted=sum(o.attempted for o in done), finished=len(done),
                       failed_ids=failed_ids, rejected_by_server=rejected_by_server, stalled=stalled,
                       grading_failed=grading_failed)


def write_stage(output_dir: Path, name: str, result: StageResult, llm: LLMClient, rejected_name: str,
                grading: GradingTally, extra: dict | None = None, rows_required: bool = True) -> int:
    """Write NAME.jsonl, the rejected rows and NAME.stats.json; print the yield; return the exit status."""
    write_jsonl(output_dir / f"{name}.jsonl", result.kept)
    write_jsonl(output_dir / f"{rejected_name}.jsonl", result.rejected)
    complete = result.finished == result.inputs
    reasons = Counter(r["reason"] for r in result.rejected if r.get("reason"))
    invalid = sum(n for reason, n in reasons.items() if reason.startswith("invalid rewrite"))
    stats = {"stage": name, "inputs": result.inputs, "attempted": result.attempted, "kept": len(result.kept),
             "yield": len(result.kept) / result.attempted if result.attempted else 0.0,
             "finished_items": result.finished, "complete": complete, "rejected_by_reason": dict(reasons),
             "invalid_rewrites": {"count": invalid, "share": invalid / result.attempted if result.attempted else 0.0},
             "request_failed_ids": result.failed_ids, "rejected_by_server": result.rejected_by_server,
             "stalled": result.stalled, "spent_usd_at_most": llm.spent, "max_cost_usd": llm.max_cost,
             "model": llm.model, "ledger": llm.ledger.as_dict(), "grading": asdict(grading),
             **({"batch": llm.transport.summary()} if getattr(llm, "transport", None) else {}),
             **(extra or {}), "provenance": provenance()}
    write_json(output_dir / f"{name}.stats.json", stats)
    print(f"{name}: kept {len(result.kept)} of {result.attempted} attempted ({100 * stats['yield']:.1f}%) "
          f"from {result.inputs} inputs; requests sent {llm.ledger.requests}, cached {llm.ledger.cache_hits}, "
          f"failed {llm.ledger.failed}; tokens {llm.ledger.prompt_tokens} in, {llm.ledger.completion_tokens} out; "
          f"spend {llm.ledger.spend_text()} -> {output_dir / (name + '.jsonl')}")
    if result.stalled:
        if llm.transport is not None:  # batch mode: the batches, not a server's log, are what to look at
            resume = (f"every batch submitted is recorded in {output_dir / batch.STATE_FILE}, so the same command "
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


def print_estimate(name: str, llm: LLMClient, requests: list, note: str = "") -> None:
    """--dry_run output: the requests the stage would send and their estimated cost."""
    est = llm.estimate(requests)
    transport = getattr(llm, "transport", None)
    if transport is not None:  # --batch: at batch prices
        est["cost_usd_est"] = cost_of(transport.price, est["prompt_tokens_est"], est["completion_tokens_est"])
    cost = "unknown (no price for this model)" if est["cost_usd_est"] is None else f"${est['cost_usd_est']:.2f}"
    prices = f" at {transport.runner.name} batch prices" if transport is not None else ""
    print(f"{name} --dry_run: {est['requests']} requests ({est['cached']} cached, {est['to_send']} to send); "
          f"~{est['prompt_tokens_est']:,} prompt + ~{est['completion_tokens_est']:,} completion tokens; "
          f"estimated cost {cost} for {llm.model}{prices}{note}")


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
