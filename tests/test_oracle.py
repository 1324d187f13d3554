"""The oracle check of the `verify` grader: every gold solution graded against its own gold answer
must pass, and the same solutions shuffled across problems must fail, except where two problems
happen to share their answer (MATH has about 1% such pairs: `2` is the answer of many problems)."""
import random

import pytest
from conftest import DATA

from personamath import grader
from personamath.data import load_problems
from personamath.jsonl import read_jsonl


@pytest.mark.slow  # grades whole datasets
@pytest.mark.parametrize("task,path,solution_key,same_answer", [
    ("math", DATA / "math" / "MATH_test.jsonl", "solution", grader.paper_math_equiv),
    ("gsm8k", DATA / "gsm8k" / "test.jsonl", "answer", str.__eq__),
])
def test_oracle(task, path, solution_key, same_answer):
    problems = load_problems(task, path)
    golds = [p.gold for p in problems]
    solutions = [r[solution_key] for r in read_jsonl(path)]
    own = grader.verify_many(task, solutions, golds)
    own_rate = sum(v.correct for v in own) / len(own)

    order = list(range(len(solutions)))
    random.Random(0).shuffle(order)
    shuffled = grader.verify_many(task, [solutions[i] for i in order], golds)
    coincide = [same_answer(golds[i], golds[j]) for j, i in enumerate(order)]
    accepted = sum(v.correct for v in shuffled)
    accepted_different = sum(v.correct and not c for v, c in zip(shuffled, coincide))
    n_different = len(order) - sum(coincide)
    print(f"{task}: own {own_rate:.4f}; shuffled {accepted}/{len(order)} accepted, of which "
          f"{accepted - accepted_different} share the gold answer; "
          f"{accepted_different}/{n_different} pairs with different answers accepted")
    assert own_rate >= 0.995
    assert accepted_different / n_different <= 0.01
    assert accepted <= sum(coincide) + 0.01 * len(order)


def test_paper_grader_reads_every_math_gold_solution():
    problems = load_problems("math", DATA / "MATH_test.jsonl")
    rows = read_jsonl(DATA / "MATH_test.jsonl")
    assert all(grader.paper_grade("math", r["output"], p.gold).correct for r, p in zip(rows, problems))
