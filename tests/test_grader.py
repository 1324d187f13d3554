"""Both graders on hand-picked cases: the equivalences the authors' grader misses, its quirks, and
pathological completions that must be graded within the timeout."""
import time

import pytest

from personamath import grader, parser

# (gold, prediction): equal answers written differently. The authors' string normalisation marks
# every one wrong; math-verify marks every one right.
EQUIVALENT = [
    ("\\frac{2}{4}", "\\frac12"),
    ("2\\sqrt2", "\\sqrt8"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("1,000", "1000"),
    ("2+x", "x+2"),
    ("\\pi/2", "\\frac{\\pi}{2}"),
]
DIFFERENT = [("3", "4"), ("(1,2)", "(2,1)"), ("x^2", "x^3"), ("\\frac{1}{2}", "\\frac{1}{3}")]


def boxed(answer: str) -> str:
    return f"We compute carefully. So the final answer is $\\boxed{{{answer}}}$."


@pytest.mark.parametrize("gold,prediction", EQUIVALENT)
def test_equivalent_answers_verify_right_paper_wrong(gold, prediction):
    assert grader.verify_grade("math", boxed(prediction), gold).correct
    assert not grader.paper_grade("math", boxed(prediction), gold).correct


@pytest.mark.parametrize("gold,prediction", DIFFERENT)
def test_different_answers_wrong_for_both(gold, prediction):
    assert not grader.verify_grade("math", boxed(prediction), gold).correct
    assert not grader.paper_grade("math", boxed(prediction), gold).correct


@pytest.mark.parametrize("gold,prediction", [
    ("\\frac{1}{2}", "\\frac12"),          # \frac12 is braced
    ("\\frac{1}{2}", "0.5"),               # 0.5 is rewritten as a fraction
    ("\\frac{1}{2}", "1/2"),               # a/b of integers becomes \frac{a}{b}
    ("\\frac{3}{4}", "\\dfrac{3}{4}"),     # dfrac/tfrac
    ("3", "k = 3"),                        # a short left-hand side is dropped
    ("5", "5 \\text{ cm}"),                # units after "\text{ " are dropped
    ("90", "90^\\circ"),                   # degrees
    ("10", "10.0"),                        # both read as floats
    ("\\sqrt{3}", "\\sqrt3"),
])
def test_paper_normalisation_accepts(gold, prediction):
    assert grader.paper_grade("math", boxed(prediction), gold).correct


def test_paper_falls_back_to_raw_equality_where_the_authors_code_raises():
    # `x/2` is not int/int: the authors' normalisation raises and is_equiv compares the raw strings.
    assert grader.paper_math_equiv("x/2", "x/2")
    assert not grader.paper_math_equiv("x/2", "x / 2")
    # two "\text{ " groups fail the authors' assertion: raw comparison again
    assert not grader.paper_math_equiv("1 \\text{ a} \\text{ b}", "1")


def test_gsm8k_paper_rounds_but_verify_is_exact():
    # The authors' false positive: 17.6 is rounded to 18.
    assert grader.paper_grade("gsm8k", "so \\boxed{17.6}", "18").correct
    assert not grader.verify_grade("gsm8k", "so \\boxed{17.6}", "18").correct
    # Python rounds half to even, and so did their script: 2.5 -> 2.
    assert grader.paper_grade("gsm8k", "\\boxed{2.5}", "2").correct
    assert grader.paper_grade("gsm8k", "\\boxed{7/2}", "4").correct


def test_gsm8k_thousands_separators():
    completion = "In total \\boxed{1,234,567} dollars."
    assert parser.paper_gsm8k_number(completion) == 1234  # the authors read only `1,234`
    assert not grader.paper_grade("gsm8k", completion, "1234567").correct
    verdict = grader.verify_grade("gsm8k", completion, "1234567")
    assert verdict.correct and verdict.extracted == "1234567"
    assert grader.verify_grade("gsm8k", "The answer is 1{,}234.", "1234").correct
    assert not grader.verify_grade("gsm8k", "The answer is 1,234.", "1235").correct


def test_gsm8k_paper_needs_boxed_verify_does_not():
    assert parser.paper_gsm8k_number("The answer is 18.") is None
    assert grader.verify_grade("gsm8k", "She pays 3 + 15 = 18 dollars. The answer is 18.", "18").correct
    assert grader.verify_grade("gsm8k", "3 * 6 = <<3*6=18>>18\n#### 18", "18").correct


def test_last_boxed_extraction():
    assert parser.last_boxed_answer("\\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert parser.last_boxed_answer("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert parser.last_boxed_answer("unterminated \\boxed{12") is None
    assert parser.last_boxed_answer("no box here") is None
    assert parser.last_boxed_group("\\fbox{3}") == "\\fbox{3}"
    assert parser.strip_boxed("\\fbox{3}") is None  # the authors accept only \boxed{ in the end


def test_gsm8k_gold():
    assert parser.gsm8k_gold("work\n#### 1,234") == "1234"
    assert parser.gsm8k_gold("no marker") is None


PATHOLOGICAL = {
    "nested braces": "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "5000-digit number": "The answer is \\boxed{" + "7" * 5000 + "}.",
    "unterminated boxed": "Thus \\boxed{\\frac{1}{2" + " x" * 2000,
}


@pytest.mark.parametrize("task", ["math", "gsm8k"])
def test_pathological_completions_are_graded_within_the_timeout(task):
    names = list(PATHOLOGICAL)
    completions = [PATHOLOGICAL[n] for n in names] + [boxed("5")]
    started = time.time()
    verdicts = grader.grade_many(task, completions, ["5"] * len(completions), timeout=5.0, workers=2)
    assert time.time() - started < 60
    for name, verdict in zip(names, verdicts):
        assert not verdict["paper"].correct and not verdict["verify"].correct, name
    assert verdicts[-1]["paper"].correct and verdicts[-1]["verify"].correct


def test_a_timed_out_item_is_graded_wrong_and_the_pool_goes_on():
    slow = PATHOLOGICAL["nested braces"] * 20
    verdicts = grader.verify_many("math", [slow, boxed("\\frac{1}{2}"), boxed("3")], ["1", "0.5", "3"],
                                  timeout=0.2, workers=1)
    assert not verdicts[0].correct and "timeout" in verdicts[0].error
    assert verdicts[1].correct and verdicts[2].correct


def test_gold_of_unbraced_boxed_train_solutions():
    assert parser.gold_boxed_answer("so our answer is $\\boxed 2$.") == "2"
    assert parser.gold_boxed_answer("\\boxed{3} and later \\boxed 4") == "4"  # the last box, as always
    assert parser.last_boxed_answer("so our answer is $\\boxed 2$.") is None  # the authors' extraction


@pytest.mark.parametrize("text,expected", [
    ("Add them.\n\nThe final answer is 1.", "1"),
    ("So, the answer is $1$.", "1"),
    ("Final Answer: 3 inches", "3 inches"),
    ("We get $\\boxed{7}$.\nThe final answer is 8.", "7"),  # a box wins
    ("The answer is 4 because 2 + 2 = 4.\nLet me check once more.\nStep 1.\nStep 2.", None),  # not closing
    ("There are 12 apples and 3 pears.", None),
])
def test_stated_final_answer(text, expected):
    from personamath.parser import stated_final_answer

    assert stated_final_answer(text) == expected


@pytest.mark.parametrize("answer,problem,gold,expected", [
    ("81^{3/4}", "Evaluate $81^{3/4}$.", "27", True),  # the question restated: equal to 27, not solved
    ("\\dbinom{133}{133}", "Compute $\\dbinom{133}{133}$.", "1", True),
    ("16 ^ {7/4}", "Evaluate $16^{7/4}$.", "128", True),  # spacing aside
    ("27", "Evaluate $81^{3/4}$.", "27", False),
    ("3", "What is 3 + 0?", "3", False),  # a plain number of the problem may be its answer
    ("\\frac{1}{2}", "Is $\\frac{1}{2}$ equal to $\\frac{2}{4}$? Give the first.", "\\frac{1}{2}", False),  # the gold
    ("\\frac{3}{4}", "Evaluate $\\frac{3}{8} \\cdot 2$.", "\\frac34", False),
])
def test_restates_problem(answer, problem, gold, expected):
    assert parser.restates_problem(answer, problem, gold) is expected
