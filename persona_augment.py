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

from personamath.errors import exit_on_user_error
from personamath.personas import add_persona_args, persona_pool
from personamath.pipeline import (REWRITE, SOLVE, AsyncGrader, make_client, persona_variants, print_estimate,
                                  propose_messages, read_stage_rows, rewrite_messages, run_items, solve_messages,
                                  stage_parser, write_stage)

# --dry_run's stand-in for a persona the LLM has not proposed yet: about the length of a real one.
PLACEHOLDER_PERSONA = "I am a person who works with quantities like these every day and asks about them. " * 2


def parse_args(argv=None):
    p = stage_parser(__doc__.splitlines()[0])
    p.add_argument("--input", default=None, help="stage-1 output (default: OUTPUT_DIR/cot.jsonl)")
    add_persona_args(p, k_help="K1: personas (rewrites) per question")
    return p.parse_args(argv)


def dry_run_requests(rows, pool, args) -> list:
    from personamath.personas import choose

    requests = []
    for row in rows:
        if pool is None:
            requests.append((propose_messages(row["problem"], args.k), 0))
            texts = [PLACEHOLDER_PERSONA] * args.k
        else:
            texts = [p.text for p in choose(pool, row["id"], args.k, args.persona_seed)]
        for text in texts:
            requests.append((rewrite_messages(row["problem"], text), 0))
            requests.append((solve_messages(f"{text} {row['problem']}"), 0))  # the rewrite is not known yet
    return requests


def main(argv=None) -> int:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    rows = read_stage_rows(args.input or output_dir / "cot.jsonl")[:args.limit]
    pool = persona_pool(args)
    llm = make_client(args, output_dir)
    if args.dry_run:
        print_estimate("persona_augment", llm, dry_run_requests(rows, pool, args),
                       note=" (solve requests estimated from the original question)")
        return 0
    grader = AsyncGrader(args.grading_timeout, args.answer_format)
    try:
        result = asyncio.run(run_items(
            rows, lambda row: persona_variants(llm, grader, row, pool, args.k, args.persona_seed, "persona"), llm,
            "persona_augment", max_requests_per_item=2 * args.k + (pool is None), stall_timeout=args.stall_timeout))
    finally:
        grader.close()
    return write_stage(output_dir, "persona", result, llm, rejected_name="persona_rejected", grading=grader.tally,
                       rows_required=False,
                       extra={"k": args.k, "persona_source": args.persona_source or ("file" if args.persona_file else "builtin"),
                              "prompt_versions": [REWRITE.version, SOLVE.version]})


if __name__ == "__main__":
    with exit_on_user_error():
        sys.exit(main())
