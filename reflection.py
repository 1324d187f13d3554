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
from personamath.stage import (Outcome, StageOutput, fresh_ledger, make_client, print_estimate, read_stage_rows,
                               run_items, stage_parser, write_stage)
from personamath.steps import REFLECT, REWRITE, SOLVE, persona_requests, persona_variants, reflect, reflect_messages


def build_parser():
    p = stage_parser("reflection", __doc__.splitlines()[0])
    p.add_argument("--input", default=None, help="stage-1 failures (default: OUTPUT_DIR/cot_failed.jsonl)")
    p.add_argument("--format", choices=["solution", "reflection"], default="solution",
                   help="what a reflected row's response holds: the corrected solution (default), or the reflection "
                        "and the corrected solution, with the wrong attempt kept in the row for the training prompt")
    add_persona_args(p, k_help="K2: personas (rewrites) per corrected question")
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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    input_path = args.input or output_dir / "cot_failed.jsonl"
    failed = read_stage_rows(input_path)[:args.limit]
    for row in failed:
        if not row.get("attempts"):
            raise UserError(f"{input_path}: row {row['id']} has no wrong attempts to reflect on")
    pool = persona_pool(args)
    llm = make_client(args, output_dir)
    write_settings_used(output_dir, parser.settings_used(args))
    if args.dry_run:
        # Phase 2 as if every question were corrected and every rewrite first solved wrong: at most.
        wrong = max((r["attempts"][-1]["response"] for r in failed), key=len, default="")
        print_estimate("reflection", llm, [(reflect_messages(r["problem"], r["attempts"][-1]["response"]), 0)
                                           for r in failed] + persona_requests(failed, pool, args.k,
                                                                               args.persona_seed, wrong),
                       output_dir, note=f" (phase 1's reflections, and phase 2 as if every question were corrected: "
                                        f"{args.k} x rewrite + solve + reflect each)")
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
