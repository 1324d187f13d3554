"""The evaluation behind eval_gsm8k.py and eval_math.py: prompts -> one vLLM generate call -> two graders.

Outputs (all inside --output_dir): generations.jsonl, written as soon as generation ends and again
with the verdicts; summary.json; summary.md. `--generations FILE` re-grades a saved generations.jsonl
without a model.

Two generation protocols (--protocol), recorded in every row and in the summary:
- `authors` (the default, so that the authors' command lines give the authors' numbers): the authors'
  eval_gsm8k.py / eval_math.py (MetaMath's): the Alpaca no-input prompt (alpaca.v1), greedy (temperature
  0, top_p 1), max_tokens 4096, and their stop list, bare words included. The protocol of the published
  table; report.py shows published figures only beside it.
- `ours`: the same prompt and decoding, but generation stops only where the model starts the next
  Alpaca block, so that a solution saying "Question 2 asks..." or "Response time" is not cut; the only
  protocol that takes --prompt chat.
"""
import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

from . import grader
from .config import RecipeParser, write_settings_used
from .data import Problem, load_problems
from .errors import UserError, exit_on_user_error
from .jsonl import read_jsonl, write_json, write_jsonl, write_text
from .precision import CHOICES, ENV_VAR
from .prompts import load_prompt, model_input
from .provenance import markdown as provenance_markdown
from .provenance import provenance

# The authors' template ends in "### Response: Let's think step by step."; a model that goes on to
# invent the next example starts one of these. The authors also stopped at bare words such as
# "Response" or "Question", which cut legitimate solutions ("Question 2 asks...").
ALPACA_STOP = ["### Instruction:", "### Response:", "Below is an instruction that describes a task"]
# The authors' eval_gsm8k.py and eval_math.py (both from MetaMath's): SamplingParams(temperature=0,
# top_p=1, max_tokens=4096, stop=AUTHORS_STOP) on the Alpaca no-input prompt, text in (vLLM adds BOS).
AUTHORS_STOP = ["Question:", "Question", "USER:", "USER", "ASSISTANT:", "ASSISTANT", "Instruction:", "Instruction",
                "Response:", "Response"]
AUTHORS_MAX_TOKENS = 4096
AUTHORS_PROMPT_VERSION = 1  # alpaca.v1 is their template, character for character
DEFAULT_MAX_TOKENS = 4096
PROTOCOLS = ("authors", "ours")
DEFAULT_PROTOCOL = "authors"  # a hand run as the authors' README gives the published protocol
PROMPTS = {"alpaca": "alpaca", "chat": "chat_math"}
ROW_KEYS = ("id", "question", "gold", "completion")  # what --generations needs in every row


def build_parser(task: str) -> argparse.ArgumentParser:
    name = {"gsm8k": "GSM8K", "math": "MATH"}[task]
    p = RecipeParser(f"eval_{task}", prog=f"eval_{task}.py",
                     description=f"Evaluate a model on {name} with vLLM (greedy decoding), graded by the authors' "
                                 "grader and by math-verify.")
    p.add_argument("--model", help="model directory (or hub id where a hub is reachable)")
    p.add_argument("--data_file", help=f"{name} test JSONL in the authors' or the original format")
    p.add_argument("--start", type=int, default=0, help="first record (index into the file)")
    p.add_argument("--end", type=int, default=sys.maxsize,
                   help="one past the last record (default: the end of the file)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="sequences vLLM runs at once (max_num_seqs); all prompts go in one generate call")
    p.add_argument("--tensor_parallel_size", type=int, default=1)
    p.add_argument("--dtype", choices=CHOICES, default=None,
                   help=f"vLLM dtype (default: ${ENV_VAR}, else on a CPU bf16 where it computes bf16 natively, "
                        "else float32; on a GPU the model's own)")
    p.add_argument("--output_dir", help="where outputs go (default: runs/eval/<task>/<model>-<time>)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help=f"authors (default): the authors' eval scripts exactly (Alpaca prompt alpaca.v1, greedy, "
                        f"max_tokens {AUTHORS_MAX_TOKENS}, stop at any of {', '.join(AUTHORS_STOP)}), the protocol of "
                        "the published table; report.py puts published figures only beside it. ours: the "
                        "same, but generation stops only where the model starts another Alpaca block ("
                        f"{', '.join(repr(s) for s in ALPACA_STOP)}; none with --prompt chat), so solutions "
                        "mentioning 'Question 2' or 'Response' are not cut. Under authors, --prompt chat is an "
                        "error and a --max_tokens other than 4096 is applied with a warning and recorded as a "
                        "deviation (no published comparison then). With --generations: read from the rows; "
                        "if given, it must match them")
    p.add_argument("--max_tokens", type=int, default=None,
                   help=f"generation budget (default {DEFAULT_MAX_TOKENS}, the authors'), capped per item by the "
                        "model's context; under --protocol authors any other value is a recorded deviation")
    p.add_argument("--prompt", choices=sorted(PROMPTS), default=None,
                   help="alpaca (default): the authors' no-input template; chat: the tokenizer's chat template "
                        "(not with --protocol authors)")
    p.add_argument("--grader", choices=("both",) + grader.GRADERS, default="both")
    p.add_argument("--generations", help="re-grade this saved generations.jsonl instead of generating")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many records")
    p.add_argument("--sampling_seed", type=int, default=0, help="vLLM's seed (decoding is greedy)")
    p.add_argument("--grading_timeout", type=float, default=10.0, help="seconds per item for math-verify")
    p.add_argument("--grading_workers", type=int, default=None, help="math-verify processes")
    return p


def main(task: str, argv: list[str] | None = None) -> None:
    with exit_on_user_error():
        parser = build_parser(task)
        args = parser.parse_args(argv)
        run(task, args, settings=parser.settings_used(args))


def run(task: str, args: argparse.Namespace, llm=None, settings: dict | None = None) -> dict:
    """Evaluate and write every output; `llm` lets a caller reuse an already loaded vLLM engine;
    `settings` (config.RecipeMixin.settings_used) is written beside the outputs."""
    started = time.time()
    if args.generations:
        rows, generation = _load_generations(task, args.generations), None
        model = rows[0].get("model", "unknown")
        protocol = _protocol_of_rows(args.generations, rows, args.protocol)
    else:
        protocol = resolve_protocol(args)
        if not args.model or not args.data_file:
            raise UserError("--model and --data_file are required (or --generations to re-grade)")
        model = args.model
        _check_model(model)
        problems = load_problems(task, args.data_file)[args.start:args.end][:args.limit]
        if not problems:
            raise UserError(f"{args.data_file}: no records between --start {args.start} and --end {args.end}")
    out_dir = Path(args.output_dir or _default_output_dir(task, model))
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings is not None:
        write_settings_used(out_dir, settings)
    if not args.generations:
        rows, generation = _generate(task, problems, args, protocol, llm)
        write_jsonl(out_dir / "generations.jsonl", rows)  # kept even if grading fails

    graders = grader.GRADERS if args.grader == "both" else (args.grader,)
    grading_started = time.time()
    _grade(task, rows, graders, args)
    grading_s = time.time() - grading_started
    write_jsonl(out_dir / "generations.jsonl", rows)

    summary = _summarize(task, rows, graders, args, model, generation, protocol, grading_s, time.time() - started)
    write_json(out_dir / "summary.json", summary)
    markdown = render_markdown(summary)
    write_text(out_dir / "summary.md", markdown)
    print(markdown)
    print(f"outputs: {out_dir}")
    return summary


def resolve_protocol(args: argparse.Namespace) -> dict:
    """What --protocol, --prompt and --max_tokens together ask for: prompt, decoding, stop list, budget.

    `deviations` lists where a run under `authors` departs from the authors' scripts (only a smaller or
    larger --max_tokens may); `comparable` says whether its numbers measure what the published table does."""
    name = args.protocol or DEFAULT_PROTOCOL
    prompt = args.prompt or "alpaca"
    max_tokens = DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens
    if max_tokens < 1:
        raise UserError(f"--max_tokens {max_tokens}: must be at least 1")
    deviations = []
    if name == "authors":
        if prompt != "alpaca":
            raise UserError(f"--protocol authors uses the authors' Alpaca prompt; --prompt {prompt} contradicts it "
                            "(use --protocol ours with --prompt chat)")
        if max_tokens != AUTHORS_MAX_TOKENS:
            deviations.append(f"max_tokens {max_tokens} (authors: {AUTHORS_MAX_TOKENS})")
            print(f"warning: --protocol authors with --max_tokens {max_tokens}: the authors generated up to "
                  f"{AUTHORS_MAX_TOKENS} tokens; using {max_tokens}, recorded as a deviation, so these results are "
                  "not comparable with the published table", file=sys.stderr)
        stop = list(AUTHORS_STOP)
    else:
        stop = [] if prompt == "chat" else list(ALPACA_STOP)
    return {"name": name, "prompt": prompt, "temperature": 0.0, "top_p": 1.0, "max_tokens": max_tokens,
            "stop": stop, "deviations": deviations, "comparable": name == "authors" and not deviations}


def _protocol_of_rows(path, rows: list[dict], asked: str | None) -> dict:
    """The protocol the saved rows were generated under (as recorded in each row)."""
    recorded = {json.dumps(r.get("protocol"), sort_keys=True) for r in rows}
    if len(recorded) > 1:
        names = sorted({(r.get("protocol") or {}).get("name", "unrecorded") for r in rows})
        raise UserError(f"{path}: rows generated under different protocols or settings ({', '.join(names)}); "
                        "re-grade them apart")
    protocol = rows[0].get("protocol")
    if protocol is None:
        if asked:
            raise UserError(f"{path}: the rows do not record their protocol, so they cannot be re-graded as "
                            f"--protocol {asked}; leave --protocol out")
        return {"name": "unrecorded", "deviations": [], "comparable": False}
    if asked and asked != protocol["name"]:
        raise UserError(f"{path}: the rows were generated under --protocol {protocol['name']}, not {asked}")
    return protocol


def describe_protocol(protocol: dict) -> str:
    """One line for summary.md and report.md."""
    name = protocol["name"]
    if name == "unrecorded":
        return "`unrecorded` (generated before protocols were recorded): not comparable with the published table"
    text = (f"`{name}`: prompt {protocol['prompt']}, greedy, max_tokens {protocol['max_tokens']}, "
            f"stop {protocol['stop']}")
    if protocol["deviations"]:
        text += f"; deviates from the authors' scripts: {'; '.join(protocol['deviations'])}"
    if protocol["comparable"]:
        return text + " (the authors' eval scripts: comparable with the published table)"
    if name == "authors":
        return text + " (not comparable with the published table)"
    return text + " (not the published table's protocol, which also stops at bare words such as 'Question')"


def _default_output_dir(task: str, model: str) -> Path:
    return Path("runs") / "eval" / task / f"{Path(model).name}-{datetime.now():%Y%m%d-%H%M%S}"


def _check_model(model: str) -> None:
    path = Path(model)
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not path.exists() and not looks_like_hub_id:
        raise UserError(f"model {model}: no such directory")
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(f"model {model}: not a model directory (no config.json)")


def _load_generations(task: str, path) -> list[dict]:
    rows = read_jsonl(path)
    if not rows:
        raise UserError(f"{path}: no rows")
    for lineno, row in enumerate(rows, start=1):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise UserError(f"{path}:{lineno}: not a generations row (missing {', '.join(missing)})")
        if row.get("task", task) != task:
            raise UserError(f"{path}:{lineno}: row is from a {row['task']} evaluation, not {task}")
    return rows


def _generate(task: str, problems: list[Problem], args, protocol: dict, llm) -> tuple[list[dict], dict]:
    from .inference import make_llm, sampling_params

    own_engine = llm is None
    llm = llm or make_llm(args.model, args.tensor_parallel_size, args.batch_size, args.sampling_seed, args.dtype,
                          in_process=True)
    tokenizer = llm.get_tokenizer()
    prompt = load_prompt(PROMPTS[protocol["prompt"]],
                         AUTHORS_PROMPT_VERSION if protocol["name"] == "authors" else None)
    chat = protocol["prompt"] == "chat"
    inputs = [model_input(prompt, p.question, tokenizer, chat) for p in problems]
    texts = [text for text, _ in inputs]
    token_ids = [tokenizer(text, add_special_tokens=special).input_ids for text, special in inputs]
    stop, max_tokens = protocol["stop"], protocol["max_tokens"]
    context = llm.llm_engine.model_config.max_model_len
    for problem, ids in zip(problems, token_ids):
        if len(ids) >= context:
            raise UserError(f"item {problem.id}: prompt of {len(ids)} tokens does not fit the "
                            f"model's context of {context}")
    # The authors' vLLM, too, ended a sequence that reached the model's context ("length").
    params = [sampling_params(min(max_tokens, context - len(ids)), stop, args.sampling_seed) for ids in token_ids]

    dtype = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
    started = time.time()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], params, use_tqdm=True)
    wall_s = time.time() - started
    if own_engine:  # free its memory and threads before grading starts its worker processes
        llm.llm_engine.engine_core.shutdown()

    rows = []
    for problem, text, ids, param, output in zip(problems, texts, token_ids, params, outputs, strict=True):
        completion = output.outputs[0]
        rows.append({"task": task, "id": problem.id, "question": problem.question, "gold": problem.gold,
                     "level": problem.level, "subject": problem.subject, "model": args.model,
                     "prompt_version": prompt.version, "prompt": text, "completion": completion.text,
                     "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason,
                     "prompt_tokens": len(ids), "completion_tokens": len(completion.token_ids),
                     "max_tokens": param.max_tokens, "protocol": protocol})
    generation = {"wall_s": wall_s, "prompt": protocol["prompt"], "prompt_version": prompt.version,
                  "sampling": {"temperature": protocol["temperature"], "top_p": protocol["top_p"],
                               "max_tokens": max_tokens, "stop": stop, "seed": args.sampling_seed},
                  "context": context,
                  "data_file": str(args.data_file), "start": args.start, "end": args.end,
                  "limit": args.limit, "tensor_parallel_size": args.tensor_parallel_size,
                  "dtype": dtype}
    return rows, generation


def _grade(task: str, rows: list[dict], graders: tuple[str, ...], args) -> None:
    verdicts = grader.grade_many(task, [r["completion"] for r in rows], [r["gold"] for r in rows], graders,
                                 timeout=args.grading_timeout, workers=args.grading_workers)
    for row, by_grader in zip(rows, verdicts):
        for name in grader.GRADERS:
            verdict = by_grader.get(name)
            row[f"{name}_extracted"] = verdict.extracted if verdict else None
            row[f"{name}_correct"] = verdict.correct if verdict else None
        row["grading_errors"] = {name: v.error for name, v in by_grader.items() if v.error} or None


def _accuracy_table(rows: list[dict], graders) -> dict:
    table = {}
    for g in graders:
        correct = sum(bool(r[f"{g}_correct"]) for r in rows)
        table[g] = {"n": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else 0.0}
    return table


def _breakdown(rows: list[dict], key: str, graders) -> dict:
    groups = defaultdict(list)
    for row in rows:
        groups[str(row.get(key))].append(row)
    return {value: _accuracy_table(group, graders) for value, group in sorted(groups.items())}


def _summarize(task, rows, graders, args, model, generation, protocol, grading_s, total_s) -> dict:
    prompt_tokens = sum(r.get("prompt_tokens") or 0 for r in rows)
    completion_tokens = sum(r.get("completion_tokens") or 0 for r in rows)
    gen_s = generation["wall_s"] if generation else None
    disagree = ([r["id"] for r in rows if r["paper_correct"] != r["verify_correct"]]
                if len(graders) == 2 else [])
    overall = _accuracy_table(rows, graders)
    summary = {
        "task": task,
        "model": model,
        "n": len(rows),
        "protocol": protocol,
        "graders": list(graders),
        "accuracy": {g: t["accuracy"] for g, t in overall.items()},
        "correct": {g: t["correct"] for g, t in overall.items()},
        "no_answer": {g: sum(r[f"{g}_extracted"] is None for r in rows) for g in graders},
        # per grader: math-verify's exceptions, timeouts and dead workers; inputs that crash the authors' code
        "grading_errors": {g: sum(bool((r.get("grading_errors") or {}).get(g)) for r in rows) for g in graders},
        "disagreements": {"count": len(disagree), "ids": disagree[:100]},
        "finish_reasons": dict(Counter(str(r.get("finish_reason")) for r in rows)),
        "tokens": {"prompt": prompt_tokens, "completion": completion_tokens},
        "wall_s": {"generation": gen_s, "grading": grading_s, "total": total_s},
        "completion_tokens_per_s": completion_tokens / gen_s if gen_s else None,
        "generation": generation or {"regraded_from": str(args.generations)},
        "provenance": provenance(),
    }
    if task == "math":
        summary["by_level"] = _breakdown(rows, "level", graders)
        summary["by_subject"] = _breakdown(rows, "subject", graders)
    return summary


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def render_markdown(summary: dict) -> str:
    graders = summary["graders"]
    gen = summary["generation"]
    lines = [f"# {summary['task'].upper()} evaluation", "",
             f"- model: `{summary['model']}`",
             f"- protocol: {describe_protocol(summary.get('protocol') or {'name': 'unrecorded'})}"]
    if "regraded_from" in gen:
        lines.append(f"- re-graded from: `{gen['regraded_from']}`")
    else:
        lines += [f"- data: `{gen['data_file']}` (start {gen['start']}, limit {gen['limit']})",
                  f"- prompt: `{gen['prompt_version']}`; sampling: {gen['sampling']}; dtype: {gen.get('dtype')}"]
    lines += ["", "| grader | correct | n | accuracy (%) | no answer extracted |", "|---|---|---|---|---|"]
    for g in graders:
        lines.append(f"| {g} | {summary['correct'][g]} | {summary['n']} | {_pct(summary['accuracy'][g])} "
                     f"| {summary['no_answer'][g]} |")
    for key, title in (("by_level", "level"), ("by_subject", "subject")):
        if key in summary:
            lines += ["", f"| {title} | n | " + " | ".join(f"{g} (%)" for g in graders) + " |",
                      "|---|---|" + "---|" * len(graders)]
            for value, table in summary[key].items():
                n = table[graders[0]]["n"]
                lines.append(f"| {value} | {n} | " + " | ".join(_pct(table[g]["accuracy"]) for g in graders) + " |")
    lines.append("")
    if len(graders) == 2:
        lines.append(f"- graders disagree on {summary['disagreements']['count']} items")
    errors = ", ".join(f"{g} {n}" for g, n in summary["grading_errors"].items())
    lines.append(f"- grading errors (exceptions, timeouts, crashes; graded wrong): {errors}")
    lines.append(f"- finish reasons: {summary['finish_reasons']}")
    tokens, wall = summary["tokens"], summary["wall_s"]
    speed = summary["completion_tokens_per_s"]
    lines.append(f"- tokens: {tokens['prompt']} in, {tokens['completion']} out"
                 + (f"; generation {wall['generation']:.1f} s, {speed:.1f} tokens/s" if speed else "")
                 + f"; grading {wall['grading']:.1f} s; total {wall['total']:.1f} s")
    lines += provenance_markdown(summary["provenance"])
    return "\n".join(lines) + "\n"
