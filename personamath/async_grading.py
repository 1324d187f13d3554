"""Grading off the event loop: math-verify in worker processes, awaited without blocking other
requests, and the tally of its failures that stops a stage when grading itself is broken."""
import asyncio
from dataclasses import dataclass, field

from . import grader, parser


class GradingFailed(Exception):
    """Grading failed on too many answers (GradingTally.count): the stage stops."""


# why an answer was judged wrong, in the stats ("verdicts")
WRONG_REASONS = ("truncated", "no final answer", "restates the problem", "not the gold answer", "grading failed")


@dataclass
class GradingTally:
    """Every answer a stage judged, correct or wrong and why (its stats' "grading"): `judged` counts them
    all; `graded` those math-verify compared with the gold (an answer cut by max_tokens, with no final
    answer, or restating the problem is wrong before any comparison), `errors` its failures."""
    judged: int = 0
    correct: int = 0
    wrong: dict = field(default_factory=lambda: dict.fromkeys(WRONG_REASONS, 0))
    graded: int = 0
    errors: int = 0
    examples: list[str] = field(default_factory=list)  # the first few error messages

    def verdict(self, correct: bool, why_wrong: str | None = None) -> bool:
        """Count one judged answer; returns `correct`."""
        self.judged += 1
        if correct:
            self.correct += 1
        else:
            self.wrong[why_wrong] += 1
        return correct

    def count(self, error: str | None) -> None:
        """Count one grading by math-verify. Raise GradingFailed once the failures are more than 1% of the
        answers graded and more than one: one odd answer may time out, a second so soon is math-verify
        failing here. A failed grading counts as a wrong answer, so going on would spend every attempt
        and reflection on questions already solved, and keep nothing."""
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

    async def correct(self, task: str, completion: str, gold: str, problem: str, truncated: bool = False) -> bool:
        """Whether the completion's final answer (parser.final_answer: the last `\\boxed{}`, or with
        answer_format "stated" also a closing "The final answer is X" line) equals the gold; each verdict
        is counted in the tally with its reason. A completion cut by max_tokens (`truncated`) is wrong:
        its last answer may be a step's. Without a final answer, math-verify would fall back to any
        number in the text: a lucky match, not a solution. An answer that restates an expression of the
        problem is not a solution either. Raises GradingFailed when grading fails too often."""
        from concurrent.futures import TimeoutError as FutureTimeout

        from pebble import ProcessExpired

        if truncated:
            return self.tally.verdict(False, "truncated")
        answer = parser.final_answer(completion, self.answer_format)
        if answer is None:
            return self.tally.verdict(False, "no final answer")
        if parser.restates_problem(answer, problem, gold):
            return self.tally.verdict(False, "restates the problem")
        future = self.pool.schedule(grader.verify_safely, args=(task, f"\\boxed{{{answer}}}", gold),
                                    timeout=self.timeout)
        try:
            verdict = await asyncio.wrap_future(future)
        except (FutureTimeout, ProcessExpired) as err:
            verdict = grader.failed_verdict(err, self.timeout)
        why = "grading failed" if verdict.error is not None else "not the gold answer"
        correct = self.tally.verdict(verdict.correct, None if verdict.correct else why)
        self.tally.count(verdict.error)  # may raise GradingFailed, this answer counted
        return correct

    def close(self) -> None:
        self.pool.close()
        self.pool.join()
