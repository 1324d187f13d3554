"""Stage 3: the wrongly answered questions get a reflection pass, then K2 persona rewrites.

Phase 1: for each question of cot_failed.jsonl, the LLM is shown its wrong attempt and told it is
wrong (never the gold answer); it reflects and writes a corrected solution, kept only if correct.
Phase 2: each corrected question is rewritten --k times through personas; each rewrite is solved,
and when the answer is wrong the LLM reflects on it; the rewrite is kept if it ends correct.

    python reflection.py --output_dir runs/gen --k 3 --format reflection

--format solution (default): the response is the corrected solution alone, so that a training row's
prompt (the question) shows all the response refers to;
--format reflection: the response holds the reflection and the corrected solution, and the row keeps
the wrong attempt it reflects on (`wrong_attempt`), which training shows in the prompt.
Either way the stage's rows record the reflection (`reflection`) and the attempt it reflected on
(`reflected_on`), for the dataset viewer; PersonaMathQA.jsonl does not carry them.
Reads OUTPUT_DIR/cot_failed.jsonl (or --input); writes reflection.jsonl, reflection_failed.jsonl,
reflection_persona.jsonl, reflection_persona_rejected.jsonl and a .stats.json for each phase.
"""
import asyncio
import sys
from pathlib import Path

from personamath.config import write_settings_used
from personamath.errors import UserError, exit_on_user_error
from personamath.personas import add_persona_args, persona_pool
from personamath.async_grading import AsyncGrader, GradingTally
from personamath.llm import Planned, stand_in_answer
from personamath.stage import (Outcome, StageOutput, add_dry_run_inputs_arg, assumed_input, fresh_ledger, make_client,
                               print_estimate, read_stage_rows, run_items, share, stage_parser, write_stage)
from personamath.steps import REFLECT, REWRITE, SOLVE, persona_requests, persona_variants, reflect, reflect_messages


def build_parser():
    p = stage_parser("reflection", __doc__.splitlines()[0])
    p.add_argument("--input", default=None, help="stage-1 failures (default: OUTPUT_DIR/cot_failed.jsonl)")
    p.add_argument("--format", choices=["solution", "reflection"], default="solution",
                   help="what a reflected row's response holds: the corrected solution (default), or the reflection "
                        "and the corrected solution, with the wrong attempt kept in the row for the training prompt")
    add_persona_args(p, k_help="K2: personas (rewrites) per corrected question")
    add_dry_run_inputs_arg(p, "cot_failed.jsonl")
    p.add_argument("--dry_run_corrected_share", type=share, default=0.5,
                   help="--dry_run's expected case: the share of failed questions that reflection corrects (default "
                        "0.5: an assumption, not measured)")
    p.add_argument("--dry_run_wrong_first_share", type=share, default=0.3,
                   help="--dry_run's expected case: the share of phase 2's rewrites solved wrong at first, so "
                        "reflected on (default 0.3: an assumption, not measured)")
    return p


def reflected_response(reflection: str, solution: str, wrong: str, fmt: str) -> tuple[str, str | None]:
    """The row's response, and the wrong attempt it refers to (None when it refers to none)."""
    if fmt == "solution" or not reflection:
        return solution, None
    return f"Reflection: {reflection}\n\nCorrected solution: {solution}", wrong


async def correct_question(llm, grader, row, fmt) -> Outcome:
    wrong = row["attempts"][-1]["response"]
    reflection, solution, correct = await reflect(llm, grader, row["source"], row["problem"], row["gold"], wrong)
    base = {"id": row["id"], "parent_id": None, "source": row["source"], "problem": row["problem"], "gold": row["gold"]}
    if not correct:
        return Outcome(attempted=1, rejected=[{**base, "wrong_attempt": wrong, "reflection": reflection,
                                               "solution": solution, "reason": "still wrong after reflection"}])
    response, shown = reflected_response(reflection, solution, wrong, fmt)
    return Outcome(attempted=1, kept=[{
        **base, "stage": "reflection", "response": response, "wrong_attempt": shown, "reflection": reflection,
        "reflected_on": wrong, "persona": None,
        "persona_id": None, "level": row.get("level"), "subject": row.get("subject"), "model": llm.model,
        "prompt_version": REFLECT.version}])


async def augment_corrected(llm, grader, row, pool, args) -> Outcome:
    async def fix(problem, wrong):
        reflection, solution, correct = await reflect(llm, grader, row["source"], problem, row["gold"], wrong)
        response, shown = reflected_response(reflection, solution, wrong, args.format)
        return response, correct, {"wrong_attempt": shown, "reflection": reflection, "reflected_on": wrong}

    return await persona_variants(llm, grader, row, pool, args.k, args.persona_seed, "reflection_persona", fix=fix)


def planned_requests(failed: list[dict], chance: float, pool, args):
    """Every request the stage may send for these failed questions (each one with `chance`), for --dry_run: the
    reflection on each; then, for those corrected, the rewrites through personas, their solves and the
    reflections on the wrong ones. An attempt not known yet is a stand-in as long as an answer."""
    expected_wrong = stand_in_answer(min(args.dry_run_output_tokens, args.max_tokens))
    worst_wrong = stand_in_answer(args.max_tokens, bound=True)
    corrected, wrong_first = args.dry_run_corrected_share, args.dry_run_wrong_first_share
    for row in failed:  # row by row: every request at once would hold a prompt per request in memory
        if row.get("attempts"):
            yield Planned(reflect_messages(row["problem"], row["attempts"][-1]["response"]), 0, chance,
                          question=row["id"])
        else:  # a question of --dry_run_inputs
            yield Planned(reflect_messages(row["problem"], worst_wrong), 0, chance,
                          reflect_messages(row["problem"], expected_wrong), row["id"])
        sure = persona_requests([row], pool, args.k, args.persona_seed)  # the rest: the reflections on wrong solves
        for (messages, sample), (expected, _) in zip(
                persona_requests([row], pool, args.k, args.persona_seed, worst_wrong),
                persona_requests([row], pool, args.k, args.persona_seed, expected_wrong)):
            reflected = 1.0 if (messages, sample) in sure else wrong_first
            yield Planned(messages, sample, chance * corrected * reflected, expected, row["id"])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    input_path = Path(args.input or output_dir / "cot_failed.jsonl")
    input_missing = args.dry_run and not input_path.exists()  # priced from gen_cot's questions (assumed_input)
    failed = [] if input_missing else read_stage_rows(input_path)[:args.limit]
    for row in failed:
        if not row.get("attempts"):
            raise UserError(f"{input_path}: row {row['id']} has no wrong attempts to reflect on")
    pool = persona_pool(args)
    llm = make_client(args, output_dir)
    write_settings_used(output_dir, parser.settings_used(args))
    if args.dry_run:
        chance, assumed = 1.0, ""
        if input_missing:
            failed, chance, assumed = assumed_input(args.dry_run_inputs, 1 - args.dry_run_solved_share, args.limit,
                                                    input_path, "failed by gen_cot (1 - --dry_run_solved_share)")
        print_estimate("reflection", llm, planned_requests(failed, chance, pool, args), output_dir,
                       assumed="; ".join(filter(None, [assumed, (
                           f"phase 2 over {100 * args.dry_run_corrected_share:.0f}% of the questions corrected "
                           f"(--dry_run_corrected_share), {100 * args.dry_run_wrong_first_share:.0f}% of its "
                           f"rewrites reflected on (--dry_run_wrong_first_share), its solves priced on the original "
                           f"question and the persona; the worst case: every question corrected and every rewrite "
                           f"reflected on")])))
        return 0
    grader = AsyncGrader(args.grading_timeout, args.answer_format)
    try:
        with StageOutput(output_dir, "reflection", rejected_name="reflection_failed") as reflected:
            corrected = asyncio.run(run_items(failed, lambda row: correct_question(llm, grader, row, args.format),
                                              llm, "reflection", max_requests_per_item=1,
                                              stall_timeout=args.stall_timeout, emit=reflected.add))
        status = write_stage(reflected, corrected, llm, grading=grader.tally, rows_required=False,
                             extra={"format": args.format, "prompt_version": REFLECT.version})
        if status != 0:
            return status
        # Phase 2 runs even over no corrected question, so that all four outputs always exist.
        llm.ledger = fresh_ledger(llm.ledger)  # phase 2 gets its own account
        grader.tally = GradingTally()  # and its own count of gradings
        # each rewrite: rewrite, solve and, when wrong, reflect
        with StageOutput(output_dir, "reflection_persona", rejected_name="reflection_persona_rejected") as output:
            augmented = asyncio.run(run_items(read_stage_rows(reflected.kept.path),
                                              lambda row: augment_corrected(llm, grader, row, pool, args), llm,
                                              "reflection_persona", max_requests_per_item=3 * args.k + (pool is None),
                                              stall_timeout=args.stall_timeout, emit=output.add))
    finally:
        grader.close()
    return write_stage(output, augmented, llm, grading=grader.tally, rows_required=False,
                       extra={"k": args.k, "format": args.format,
                              "prompt_versions": [REWRITE.version, SOLVE.version, REFLECT.version]})


if __name__ == "__main__":
    with exit_on_user_error():
        sys.exit(main())
