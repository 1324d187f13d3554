"""Grade the 5000 MATH test gold solutions against their own gold answers with each grader.

Prints items/s of each grader and the ratio verify/paper, measured in the same run.
Target: `verify` over all 5000 in <= 60 s on a 2-core machine.

    python bench/bench_grading.py [--workers N] [--limit N]
"""
import argparse
import time
from pathlib import Path

from personamath import grader
from personamath.data import load_problems
from personamath.jsonl import read_jsonl

MATH_TEST = Path(__file__).resolve().parent.parent / "data" / "math" / "MATH_test.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=None, help="math-verify processes (default: one per core)")
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args()
    golds = [problem.gold for problem in load_problems("math", MATH_TEST)][: args.limit]
    solutions = [r["solution"] for r in read_jsonl(MATH_TEST)][: args.limit]
    n = len(golds)

    started = time.perf_counter()
    paper = [grader.paper_grade("math", s, g) for s, g in zip(solutions, golds)]
    paper_s = time.perf_counter() - started

    started = time.perf_counter()
    verify = grader.verify_many("math", solutions, golds, workers=args.workers)
    verify_s = time.perf_counter() - started

    workers = args.workers or grader.default_workers()
    print(f"{n} MATH gold solutions; verify with {workers} worker processes (pool start included)")
    print("| grader | seconds | items/s | correct |\n|---|---|---|---|")
    for name, seconds, verdicts in (("paper", paper_s, paper), ("verify", verify_s, verify)):
        print(f"| {name} | {seconds:.2f} | {n / seconds:.0f} | {sum(v.correct for v in verdicts) / n:.4f} |")
    print(f"verify takes {verify_s / paper_s:.0f}x the time of paper; "
          f"target verify <= 60 s for 5000: {'met' if verify_s * 5000 / n <= 60 else 'NOT met'} "
          f"({verify_s * 5000 / n:.1f} s)")


if __name__ == "__main__":
    main()
