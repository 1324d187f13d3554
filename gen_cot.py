"""Stage 1: the LLM regenerates a detailed chain-of-thought for every GSM8K and MATH train question.

A solution is kept only if the `verify` grader finds its final answer equal to the gold answer;
up to --num_samples attempts per question, each sent only if the ones before failed.

    python gen_cot.py --output_dir runs/gen                      # gpt-4o-mini, $OPENAI_API_KEY
    python gen_cot.py --base_url http://127.0.0.1:8000/v1 --model SmolLM2-135M-Instruct --limit 50
    python gen_cot.py --slice easy --levels 1 2 --limit 40        # chain.py's easy slice, MATH levels 1-2

The questions are chosen before --limit takes its share of each input: --levels and --subjects keep MATH
questions (GSM8K's have neither), --max_solution_chars those with a short reference solution, and --slice
orders them (personamath/data.py Selection, also behind chain.py's --slice). A question's id is the one it
has in its file, whatever the selection.

Writes cot.jsonl (kept: id, source, problem, response, gold, model, prompt_version, attempt),
cot_failed.jsonl (questions with no correct attempt, with their wrong attempts) and cot.stats.json.
"""
import asyncio
import sys
from pathlib import Path

from personamath.data import MATH_LEVELS, MATH_SUBJECTS, ORDER_HELP, ORDERS, TRAIN_FILES, Selection, load_selected
from personamath.config import write_settings_used
from personamath.errors import exit_on_user_error
from personamath.async_grading import AsyncGrader
from personamath.stage import (Outcome, StageOutput, make_client, print_estimate, run_items, stage_parser,
                              write_stage)
from personamath.llm import Planned
from personamath.steps import SOLVE, solve, solve_messages



def build_parser():
    p = stage_parser("gen_cot", __doc__.splitlines()[0])
    p.add_argument("--inputs", nargs="+", default=list(TRAIN_FILES.values()),
                   help="GSM8K/MATH JSONL files (format detected per file) or `datasets` names NAME[:CONFIG]:SPLIT")
    p.add_argument("--num_samples", type=int, default=1, help="attempts per question before it goes to reflection")
    g = p.add_argument_group("which questions (before --limit)")
    g.add_argument("--slice", choices=list(ORDERS), default="first",
                   help=f"the order questions are taken in: {ORDER_HELP}")
    g.add_argument("--levels", nargs="+", choices=MATH_LEVELS, default=None, metavar="LEVEL",
                   help=f"MATH questions of these levels only ({' '.join(MATH_LEVELS)}); GSM8K questions are all kept")
    g.add_argument("--subjects", nargs="+", choices=MATH_SUBJECTS, default=None, metavar="SUBJECT",
                   help=f"MATH questions of these subjects only ({', '.join(MATH_SUBJECTS)}; quote names with a "
                        "space); GSM8K questions are all kept")
    g.add_argument("--max_solution_chars", type=int, default=None,
                   help="questions whose reference solution (GSM8K's with its <<calculation>> marks) has at most this "
                        "many characters")
    return p


def selection(args) -> Selection:
    """The questions --slice, --levels, --subjects and --max_solution_chars ask for."""
    return Selection(order=args.slice, levels=tuple(args.levels) if args.levels else None,
                     subjects=tuple(args.subjects) if args.subjects else None,
                     max_solution_chars=args.max_solution_chars)


def load_questions(inputs, limit, chosen: Selection):
    """[(source, Problem)] over all inputs, as `chosen` selects and orders each; --limit takes an equal share
    from each input."""
    per_input = None if limit is None else -(-limit // len(inputs))
    questions = []
    for spec in inputs:
        task, problems = load_selected(spec, chosen, per_input)
        questions += [(task, p) for p in problems]
    return questions[:limit]


async def solve_question(llm, grader, source, problem, num_samples):
    base = {"id": f"{source}/{problem.id}", "source": source, "problem": problem.question, "gold": problem.gold,
            "level": problem.level, "subject": problem.subject, "model": llm.model, "prompt_version": SOLVE.version}
    wrong = []
    for attempt in range(num_samples):
        response, correct = await solve(llm, grader, source, problem.question, problem.gold, sample=attempt)
        if correct:
            return Outcome(attempted=1, kept=[{**base, "parent_id": None, "stage": "cot", "response": response,
                                               "persona": None, "persona_id": None, "attempt": attempt}])
        wrong.append({"attempt": attempt, "response": response})
    return Outcome(attempted=1, rejected=[{**base, "attempts": wrong, "reason": "solved wrong"}])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    questions = load_questions(args.inputs, args.limit, selection(args))
    llm = make_client(args, output_dir)
    write_settings_used(output_dir, parser.settings_used(args))
    if args.dry_run:
        # an attempt after the first is sent only while the ones before are wrong
        unsolved = 1 - args.dry_run_solved_share
        attempts = (Planned(solve_messages(p.question), attempt, 1.0 if attempt == 0 else unsolved)
                    for _, p in questions for attempt in range(args.num_samples))
        print_estimate("gen_cot", llm, attempts, output_dir,
                       assumed=f"the {100 * unsolved:.0f}% of questions not solved at the first attempt (1 - "
                               f"--dry_run_solved_share) take all {args.num_samples} attempts; the worst case: every "
                               f"question does" if args.num_samples > 1 else "")
        return 0
    grader = AsyncGrader(args.grading_timeout, args.answer_format)
    try:
        with StageOutput(output_dir, "cot", rejected_name="cot_failed") as output:
            result = asyncio.run(run_items(
                questions, lambda q: solve_question(llm, grader, q[0], q[1], args.num_samples), llm, "gen_cot",
                max_requests_per_item=args.num_samples, stall_timeout=args.stall_timeout, emit=output.add,
                item_id=lambda q: f"{q[0]}/{q[1].id}"))
    finally:
        grader.close()
    return write_stage(output, result, llm, grading=grader.tally,
                       extra={"num_samples": args.num_samples, "prompt_version": SOLVE.version})


if __name__ == "__main__":
    with exit_on_user_error():
        sys.exit(main())
