"""Equivalence of an extracted answer and the gold answer, by two graders.

- `paper`: the authors' verdicts, reproduced from their scripts' behaviour. MATH compares two
  strings after a fixed normalisation (so `\\frac{2}{4}` differs from `\\frac12`); GSM8K compares
  an integer-rounded number (so 17.6 counts as 18) with the gold read as their script read it
  (parser.paper_gsm8k_gold: `2,125` and ` 2125 ` are 2125; a gold int() cannot read is a grading error).
- `verify`: math-verify's symbolic equivalence of the last `\\boxed{}` (parser.final_answer, the
  stages' rule too) and the gold; a completion without a box is left to math-verify's own extraction.
  Its timeouts are signal-based and work only in a process's main thread, so it runs in worker
  processes, each item under a hard timeout after which the worker is killed: a pathological
  completion costs at most that timeout and never hangs a run.
"""
import multiprocessing
import os
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from . import parser

TASKS = ("gsm8k", "math")
GRADERS = ("paper", "verify")


@dataclass
class Verdict:
    extracted: str | None  # the answer the grader read from the completion, None when it found none
    correct: bool
    error: str | None = None  # why grading failed (timeout, crash); the verdict is then False


# ---------------------------------------------------------------------------------------------
# paper grader


class _Unnormalizable(Exception):
    """The authors' normalisation raised; their `is_equiv` then falls back to raw string equality."""


def _drop_right_units(s: str) -> str:
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise _Unnormalizable
    return parts[0]


def _brace_sqrt_arguments(s: str) -> str:  # \sqrt3 -> \sqrt{3}
    head, *rest = s.split("\\sqrt")
    out = [head]
    for part in rest:
        if not part:
            raise _Unnormalizable
        out.append("\\sqrt" + part if part[0] == "{" else "\\sqrt{" + part[0] + "}" + part[1:])
    return "".join(out)


def _brace_frac_arguments(s: str) -> str:  # \frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}
    head, *rest = s.split("\\frac")
    out = [head]
    for part in rest:
        if not part:
            raise _Unnormalizable
        if part[0] == "{":
            out.append("\\frac" + part)
        elif len(part) < 2:
            return s  # the authors give up on the whole string here, keeping it as it was
        elif part[1] != "{":
            out.append("\\frac{" + part[0] + "}{" + part[1] + "}" + part[2:])
        else:
            out.append("\\frac{" + part[0] + "}" + part[1:])
    return "".join(out)


def _slash_to_frac(s: str) -> str:  # 3/4 -> \frac{3}{4}, only for two plain integers
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        numerator, denominator = int(parts[0]), int(parts[1])
    except ValueError:
        raise _Unnormalizable from None  # in the authors' code this escapes to the raw comparison
    if s != f"{numerator}/{denominator}":
        return s
    return "\\frac{" + str(numerator) + "}{" + str(denominator) + "}"


def paper_normalize(s: str) -> str | float:
    """The authors' MATH answer normalisation; a string that reads as a float becomes that float."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    s = _drop_right_units(s)
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # drop a short left-hand side such as `k = `
        s = sides[1]
    if "\\sqrt" in s:
        s = _brace_sqrt_arguments(s)
    s = _brace_frac_arguments(s.replace(" ", ""))
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _slash_to_frac(s)
    try:
        return float(s)
    except ValueError:
        return s


def paper_math_equiv(prediction: str, gold: str) -> bool:
    try:
        return paper_normalize(prediction) == paper_normalize(gold)
    except _Unnormalizable:
        return prediction == gold


def paper_grade(task: str, completion: str, gold: str) -> Verdict:
    if task == "gsm8k":
        number = parser.paper_gsm8k_number(completion)
        if number is None:
            return Verdict(None, False)
        return Verdict(str(number), float(number) == float(parser.paper_gsm8k_gold(gold)))
    answer = parser.last_boxed_answer(completion)
    return Verdict(answer, answer is not None and paper_math_equiv(answer, gold))


def paper_grade_safe(task: str, completion: str, gold: str) -> Verdict:
    """paper_grade, with the inputs that crash the authors' script (e.g. `\\boxed{5/00}`) graded wrong."""
    try:
        return paper_grade(task, completion, gold)
    except (ArithmeticError, ValueError) as err:
        return Verdict(None, False, f"{type(err).__name__}: {err}")


# ---------------------------------------------------------------------------------------------
# verify grader


def verify_grade(task: str, completion: str, gold: str) -> Verdict:
    """math-verify equivalence of the final answer (parser.final_answer) and the gold; must run in a
    process's main thread (see module docstring)."""
    from math_verify import parse, verify

    if task == "gsm8k":
        # GSM8K golds are plain numbers: compare exactly, with `1,234` read as 1234.
        completion = parser.gsm8k_verify_text(completion)
        gold_parsed = parse(f"${gold}$")
    else:
        gold_parsed = parse(f"$\\boxed{{{gold}}}$")
    # The last box alone: given the whole text, math-verify reads `\boxed{3}, \boxed{2}` as the set {3, 2}.
    # Without a box, its own extraction from the whole text (a closing "the answer is", a last number) stands.
    answer = parser.final_answer(completion)
    predicted = parse(completion if answer is None else f"$\\boxed{{{answer}}}$")
    if not predicted:
        return Verdict(None, False)
    # [expression, the text it was read from], or the text alone where math-verify cannot read it (as in
    # `\frac{12}{5,\!525}`), which then still equals a gold written the same way
    return Verdict(str(predicted[-1]), bool(verify(gold_parsed, predicted)))


def verify_safely(task: str, completion: str, gold: str) -> Verdict:
    """verify_grade for a worker process: any failure grades the item wrong, with the reason."""
    try:
        return verify_grade(task, completion, gold)
    except Exception as err:  # noqa: BLE001 - one item's failure must not stop the run
        return Verdict(None, False, f"{type(err).__name__}: {err}"[:500])


def _warm_up_worker() -> None:
    """Import math-verify (and sympy) when a worker starts, so that no item's timeout pays for it.
    Graders run at lower CPU priority: during generation a grading backlog costs nothing, while a
    request sent late leaves a server slot idle."""
    os.nice(5)
    from math_verify import parse

    parse("$1$")


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


def grading_pool(workers: int | None = None):
    """A pebble pool for verify_safely, started. Not forked from the caller, which may hold vLLM's or
    asyncio's threads and locks: forked from a fresh server process that imported math-verify once, so
    that each worker (and each replacement of a worker killed on a timeout) starts in milliseconds, not
    a second. Started here, before a stage sends anything: its first task would start it, and that
    half second (2-core CPU) held the stage's event loop at its first answers (traced: the attempts
    those answers let go reached the server 0.5 s late)."""
    from pebble import ProcessPool

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["math_verify"])
    pool = ProcessPool(max_workers=workers or default_workers(), initializer=_warm_up_worker, context=context)
    pool.schedule(_started)  # pebble starts a pool at its first task
    return pool


def _started() -> bool:
    return True


def failed_verdict(err: BaseException, timeout: float) -> Verdict:
    """The verdict of an item whose worker timed out (and was killed) or died."""
    if isinstance(err, FutureTimeout):
        return Verdict(None, False, f"timeout after {timeout:g}s")
    return Verdict(None, False, f"grader process died: {err}")


def verify_many(task: str, completions: list[str], golds: list[str], timeout: float = 10.0,
                workers: int | None = None) -> list[Verdict]:
    """Grade every (completion, gold) pair with math-verify in a pool of worker processes."""
    from pebble import ProcessExpired

    with grading_pool(workers) as pool:
        futures = [pool.schedule(verify_safely, args=(task, c, g), timeout=timeout)
                   for c, g in zip(completions, golds, strict=True)]
        verdicts = []
        for future in futures:
            try:
                verdicts.append(future.result())
            except (FutureTimeout, ProcessExpired) as err:
                verdicts.append(failed_verdict(err, timeout))
    return verdicts


def grade_many(task: str, completions: list[str], golds: list[str], graders=GRADERS, timeout: float = 10.0,
               workers: int | None = None) -> list[dict[str, Verdict]]:
    """The chosen graders' verdicts for every item: [{"paper": Verdict, "verify": Verdict}, ...]."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    verdicts = [{} for _ in completions]
    if "paper" in graders:
        for verdict, c, g in zip(verdicts, completions, golds, strict=True):
            verdict["paper"] = paper_grade_safe(task, c, g)
    if "verify" in graders:
        for verdict, v in zip(verdicts, verify_many(task, completions, golds, timeout=timeout, workers=workers)):
            verdict["verify"] = v
    return verdicts
