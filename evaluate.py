"""Evaluate one model on GSM8K and MATH with one vLLM engine: the rows, verdicts and outputs of
eval_gsm8k.py and eval_math.py run apart, for one engine start instead of two.

    python evaluate.py --config configs/recipes/paper-v1.yaml --model PATH --output_dir OUT

Each test set is evaluated with its script's own settings: the `eval_gsm8k` and `eval_math` sections of
--config, then the flags given here (--model, --output_dir, --dtype and the engine's settings apply to
both). Outputs: OUT/gsm8k/ and OUT/math/, each what the script alone writes; with
--training_questions also OUT/training_questions/{gsm8k,math}/, the model on the questions it was
(or is to be) trained on.
"""
import argparse
import sys
from pathlib import Path

from personamath.config import RawDescriptionDefaultsHelpFormatter
from personamath.errors import UserError, exit_on_user_error
from personamath.evaluation import build_parser as task_parser
from personamath.evaluation import run
from personamath.jsonl import read_jsonl, write_jsonl

TASKS = ("gsm8k", "math")
# What the one engine is made with: both test sets must ask for the same.
ENGINE_SETTINGS = ("tensor_parallel_size", "batch_size", "sampling_seed", "dtype")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=RawDescriptionDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="a recipe: its eval_gsm8k and eval_math sections")
    p.add_argument("--model", required=True, help="model directory (or hub id where a hub is reachable)")
    p.add_argument("--output_dir", required=True, help="OUTPUT_DIR/gsm8k and OUTPUT_DIR/math")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--training_questions", default=None, metavar="PERSONAMATHQA_JSONL",
                   help="also evaluate on the questions of this training set (each source with its test set's "
                        "settings, but every question up to --training_questions_limit) into "
                        "OUTPUT_DIR/training_questions/TASK: the base and the trained model side by side say "
                        "whether training took")
    p.add_argument("--training_questions_limit", type=int, default=100,
                   help="at most this many training questions of each source, the file's first")
    return p


def training_question_runs(args: argparse.Namespace, rest: list[str]) -> list[tuple[str, argparse.Namespace, dict]]:
    """(task, arguments, settings) of each source of --training_questions: its rows written as that
    task's test file (question and gold), evaluated with the task's settings on all of them."""
    rows = read_jsonl(args.training_questions)
    runs = []
    for task in args.tasks:
        picked = [r for r in rows if r["source"] == task][:args.training_questions_limit]
        if not picked:
            continue
        out = Path(args.output_dir) / "training_questions" / task
        questions = out / "questions.jsonl"
        write_jsonl(questions, [{"question": r["problem"], "answer": f"#### {r['gold']}", "idx": r["id"]}
                                if task == "gsm8k" else
                                {"problem": r["problem"], "solution": f"\\boxed{{{r['gold']}}}", "unique_id": r["id"]}
                                for r in picked])
        parsed, settings = task_args(task, args, rest)
        parsed.data_file, parsed.output_dir, parsed.start, parsed.limit = str(questions), str(out), 0, None
        runs.append((task, parsed, settings))
    return runs


def task_args(task: str, args: argparse.Namespace, rest: list[str]) -> tuple[argparse.Namespace, dict]:
    """The task's arguments as eval_TASK.py would parse them, and the settings it used."""
    parser = task_parser(task)
    config = ["--config", args.config] if args.config else []
    parsed = parser.parse_args([*config, *rest, "--model", args.model,
                                "--output_dir", str(Path(args.output_dir) / task)])
    if parsed.generations:
        raise UserError("evaluate.py generates: re-grade saved generations with eval_gsm8k.py / eval_math.py")
    return parsed, parser.settings_used(parsed)


def main(argv=None) -> None:
    with exit_on_user_error():
        args, rest = build_parser().parse_known_args(argv)
        runs = {task: task_args(task, args, rest) for task in args.tasks}
        first, *others = args.tasks
        for task in others:
            differ = [s for s in ENGINE_SETTINGS if getattr(runs[task][0], s) != getattr(runs[first][0], s)]
            if differ:
                raise UserError(f"one engine serves both test sets, but eval_{first} and eval_{task} ask for "
                                f"different {', '.join(differ)}: make them agree, or run the eval scripts apart")
        from personamath.inference import make_llm

        engine_args = runs[first][0]
        llm = make_llm(args.model, engine_args.tensor_parallel_size, engine_args.batch_size,
                       engine_args.sampling_seed, engine_args.dtype, in_process=True)
        try:
            for task in args.tasks:
                run(task, runs[task][0], llm, settings=runs[task][1])
            if args.training_questions:
                for task, parsed, settings in training_question_runs(args, rest):
                    run(task, parsed, llm, settings=settings)
        finally:
            llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    sys.exit(main())
