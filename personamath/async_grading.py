"""Grading off the event loop: math-verify in worker processes, awaited without blocking other
requests, and the tally of its failures that stops a stage when grading itself is broken."""
import asyncio
from dataclasses import dataclass, field

from . import grader, parser


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
