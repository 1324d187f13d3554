"""Stage 2: every correctly solved question is rewritten K1 times, each time through a persona.

For each question of cot.jsonl, --k distinct personas (built-in ISCO-08 set, a Persona Hub file, or
proposed by the LLM); the LLM rewrites the question in that persona's context keeping every quantity
and the answer; the rewrite is solved afresh (never shown the original solution) and kept only if its
answer matches the original gold answer.

    python persona_augment.py --output_dir runs/gen --k 3

Reads OUTPUT_DIR/cot.jsonl (or --input); writes persona.jsonl (kept rewrites with persona, parent id,
stage), persona_rejected.jsonl (rewrites not kept, with the reason) and persona.stats.json.
"""
import asyncio
import sys
from pathlib import Path

from personamath.config import write_settings_used
from personamath.errors import exit_on_user_error
from personamath.personas import add_persona_args, persona_pool
from personamath.async_grading import AsyncGrader
from personamath.llm import Planned
from personamath.stage import (StageOutput, add_dry_run_inputs_arg, assumed_input, make_client, print_estimate,
                               read_stage_rows, run_items, stage_parser, write_stage)
from personamath.steps import REWRITE, SOLVE, persona_requests, persona_variants

def build_parser():
    p = stage_parser("persona_augment", __doc__.splitlines()[0])
    p.add_argument("--input", default=None, help="stage-1 output (default: OUTPUT_DIR/cot.jsonl)")
    add_persona_args(p, k_help="K1: personas (rewrites) per question")
    add_dry_run_inputs_arg(p, "cot.jsonl")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    input_path = Path(args.input or output_dir / "cot.jsonl")
    rows = None if args.dry_run and not input_path.exists() else read_stage_rows(input_path)[:args.limit]
    pool = persona_pool(args)
    llm = make_client(args, output_dir)
    write_settings_used(output_dir, parser.settings_used(args))
    if args.dry_run:
        chance, assumed = 1.0, ""
        if rows is None:  # before gen_cot has run
            rows, chance, assumed = assumed_input(args.dry_run_inputs, args.dry_run_solved_share, args.limit,
                                                  input_path, "solved by gen_cot (--dry_run_solved_share)")
        # row by row: the requests of every row at once would hold a prompt per request in memory
        planned = (Planned(messages, sample, chance, question=row["id"]) for row in rows
                   for messages, sample in persona_requests([row], pool, args.k, args.persona_seed))
        print_estimate("persona_augment", llm, planned, output_dir,
                       assumed="; ".join(filter(None, [assumed, "every rewrite is solved, its solve priced on the "
                                                                "original question and the persona"])))
        return 0
    grader = AsyncGrader(args.grading_timeout, args.answer_format)
    try:
        with StageOutput(output_dir, "persona", rejected_name="persona_rejected") as output:
            result = asyncio.run(run_items(
                rows, lambda row: persona_variants(llm, grader, row, pool, args.k, args.persona_seed, "persona"),
                llm, "persona_augment", max_requests_per_item=2 * args.k + (pool is None),
                stall_timeout=args.stall_timeout, emit=output.add))
    finally:
        grader.close()
    return write_stage(output, result, llm, grading=grader.tally, rows_required=False,
                       extra={"k": args.k, "persona_source": args.persona_source or ("file" if args.persona_file else "builtin"),
                              "prompt_versions": [REWRITE.version, SOLVE.version]})


if __name__ == "__main__":
    with exit_on_user_error():
        sys.exit(main())
