"""The paper's results table and plots for one run folder.

    python report.py --run_dir runs/NAME

Reads RUN_DIR/eval/LABEL/{gsm8k,math}/summary.json (eval_gsm8k.py / eval_math.py outputs, one folder
per evaluated model), RUN_DIR/gen/*.stats.json, the rejected files beside them and RUN_DIR/dataset/
(what happened to the data: every reason an item was dropped, counted, with an example),
RUN_DIR/train/training_summary.json and RUN_DIR/eval/LABEL/training_questions/ (whether training
took) when present, and the published figures (data/reference/published_results.csv). Writes
RUN_DIR/report.md (also printed) and RUN_DIR/plots/: math_by_level.png, math_by_subject.png,
stage_yields.png, training_loss.png.
A LABEL spelled like a published model (e.g. PersonaMath-Qwen2.5-7B, or Llama-2-7b-hf for LLaMA-2-7B) is
shown beside its figures, for a task evaluated under the authors' protocol (`--protocol authors`, no
deviation) only: under `ours` (or with another --max_tokens) the numbers measure something else, and the
report says so. chain.py names its folders that way (the base model's name, PersonaMath-NAME).
Each result column is labelled with the protocol its evaluations were generated under.
"""
import argparse
import csv
import json
from pathlib import Path

from personamath.errors import UserError, exit_on_user_error
from personamath import provenance
from personamath.jsonl import write_text

PUBLISHED = Path(__file__).resolve().parent / "data/reference/published_results.csv"
TASKS = ("gsm8k", "math")
GRADERS = ("paper", "verify")
STAGES = ("cot", "persona", "reflection", "reflection_persona")


def load_published(path: Path = PUBLISHED) -> dict[str, dict]:
    with path.open(newline="") as f:
        return {published_key(row["model"]): row for row in csv.DictReader(f)}


def published_key(label: str) -> str:
    """A model's name as looked up in the published table: case aside, and without the hub's '-hf'
    suffix (meta-llama/Llama-2-7b-hf is the table's LLaMA-2-7B)."""
    return label.lower().removesuffix("-hf")


def load_evals(run_dir: Path) -> dict[str, dict[str, dict]]:
    """{label: {task: summary}} for every evaluated model under RUN_DIR/eval."""
    evals = {}
    for summary in sorted((run_dir / "eval").glob("*/*/summary.json")):
        label, task = summary.parent.parent.name, summary.parent.name
        if task in TASKS:
            evals.setdefault(label, {})[task] = json.loads(summary.read_text())
    return evals


TASK_NAMES = {"gsm8k": "GSM8K", "math": "MATH"}
PUBLISHED_COLUMNS = {"gsm8k": "gsm8k_pass1", "math": "math_pass1"}


def protocol_of(summary: dict) -> dict:
    """The summary's generation protocol; summaries written before protocols were recorded say none."""
    return summary.get("protocol") or {"name": "unrecorded", "deviations": [], "comparable": False}


def protocol_tag(summary: dict) -> str:
    """`authors`, `ours`, or `authors*` (the authors' protocol with a deviation, e.g. another max_tokens)."""
    protocol = protocol_of(summary)
    return protocol["name"] + ("*" if protocol.get("deviations") else "")


def comparable(summary: dict | None) -> bool:
    """Whether a summary measures what the published table does: generated under the authors' protocol,
    unchanged."""
    if summary is None:
        return False
    protocol = protocol_of(summary)
    return protocol["name"] == "authors" and not protocol.get("deviations")


def pct(summary: dict | None, grader: str, tag: bool = False) -> str:
    if summary is None or grader not in summary["accuracy"]:
        return "—"
    text = f"{100 * summary['accuracy'][grader]:.1f} ({summary['correct'][grader]}/{summary['n']})"
    return f"{text} [{protocol_tag(summary)}]" if tag else text


def published_cell(summary: dict | None, ref: dict, task: str) -> str:
    figure = ref.get(PUBLISHED_COLUMNS[task])
    if figure is None:
        return "—"
    if summary is None or comparable(summary):
        return figure
    return f"not shown ({protocol_tag(summary)})"


def results_table(evals: dict, published: dict) -> tuple[list[str], list[str]]:
    """The results table, its columns labelled with their protocols, and notes on what is not shown."""
    tags = {task: sorted({protocol_tag(tasks[task]) for tasks in evals.values() if task in tasks}) for task in TASKS}
    mixed = {task for task, found in tags.items() if len(found) > 1}
    header = ["model"]
    for task in TASKS:
        label = f" ({'/'.join(tags[task])})" if tags[task] else ""
        header += [f"{TASK_NAMES[task]} {grader}{label}" for grader in GRADERS]
    header += ["published GSM8K", "published MATH"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    hidden = []
    for label, tasks in evals.items():
        ref = published.get(published_key(label), {})
        cells = [label]
        for task in TASKS:
            cells += [pct(tasks.get(task), grader, tag=task in mixed) for grader in GRADERS]
        for task in TASKS:
            cells.append(published_cell(tasks.get(task), ref, task))
            if ref and task in tasks and not comparable(tasks[task]):
                hidden.append(f"{label} / {task} ({describe(tasks[task])})")
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if hidden:
        notes.append("Published figures are shown only beside evaluations generated under the authors' protocol "
                     "(`--protocol authors`: their stop list, bare words such as 'Question' and 'Response' "
                     "included, and max_tokens 4096). Not shown for: " + "; ".join(hidden) + ". Under `ours` "
                     "generation stops only at the next Alpaca block, so a solution the authors' stop list "
                     "would cut (\"Question 2 asks...\") is graded whole: not the published measurement.")
    return lines, notes


def describe(summary: dict) -> str:
    protocol = protocol_of(summary)
    if protocol["name"] == "unrecorded":
        return "protocol not recorded (evaluated before protocols were)"
    if protocol.get("deviations"):
        return f"protocol {protocol['name']} with {'; '.join(protocol['deviations'])}"
    return f"protocol {protocol['name']}"


def yields_table(run_dir: Path) -> tuple[list[str], list[dict]]:
    stats = [json.loads(p.read_text()) for name in STAGES if (p := run_dir / "gen" / f"{name}.stats.json").exists()]
    lines = ["| stage | inputs | attempted | kept | yield |", "|---|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['inputs']} | {s['attempted']} | {s['kept']} | {100 * s['yield']:.1f}% |"
              for s in stats]
    return lines, stats


# what each stage takes in and gives out, for the data's story
STAGE_UNITS = {"cot": ("questions", "questions attempted", "chains of thought"),
               "persona": ("solved questions", "persona rewrites", "rewrites solved right"),
               "reflection": ("questions solved wrong", "reflections", "corrected solutions"),
               "reflection_persona": ("corrected questions", "persona rewrites", "rewrites solved right")}
REASONS_DOC = "docs/data.md#why-rows-are-dropped"


def excerpt(text, limit: int = 90) -> str:
    text = " ".join(str(text or "").split())
    return (text[:limit] + "…" if len(text) > limit else text).replace("|", "\\|")


def example(row: dict, answer_format: str) -> str:
    """One dropped row in a line: its id, its problem, what was wrong with it."""
    from personamath.parser import final_answer

    text = f"`{row['id']}`: {excerpt(row.get('problem')) or '(no rewrite in the answer)'}"
    responses = [a["response"] for a in row.get("attempts", [])] or [row.get("solution", row.get("response"))]
    if responses[-1] is not None:
        answers = ", ".join(str(final_answer(r, answer_format)) for r in responses)
        text += f" — answer{'s' if len(responses) > 1 else ''} {excerpt(answers, 40)} (gold {excerpt(row['gold'], 30)})"
    if ":" in row["reason"]:
        text += f" — {excerpt(row['reason'].split(':', 1)[1], 60)}"
    return text


def line_chart(path: Path, title: str, points: list[list[float]], xlabel: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([x for x, _ in points], [y for _, y in points], marker="o" if len(points) < 30 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_check(run_dir: Path, evals: dict) -> list[str]:
    """Whether training took: the rows it trained on, its loss, how far the weights moved
    (train/training_summary.json), and each evaluated model's accuracy on the training set's own
    questions (eval/LABEL/training_questions/TASK); said plainly when the trained model is the base."""
    summary_path = run_dir / "train" / "training_summary.json"
    if not summary_path.exists():
        return []
    from personamath.training_check import summary_line

    summary = json.loads(summary_path.read_text())
    weights = summary["weights"]
    lines = ["## Did the training take?", ""]
    if weights.get("equals_base"):
        lines += ["**The trained model equals the base model: no weight changed.** Its results are the base "
                  "model's; they measure nothing about PersonaMathQA.", ""]
    lines += [f"Trained on **{summary['examples']} rows**: {summary_line(summary)}.", ""]
    if summary["loss_curve"]:
        line_chart(run_dir / "plots" / "training_loss.png", "Training loss", summary["loss_curve"],
                   "optimizer step", "loss")
        lines += ["![training loss](plots/training_loss.png)", ""]
    found = {(label, task): json.loads(path.read_text()) for label in evals
             for task in TASKS if (path := run_dir / "eval" / label / "training_questions" / task / "summary.json").exists()}
    if found:
        lines += ["On the questions of its own training set (a model that learned its rows does better on "
                  "them than the base):", "", "| model | " + " | ".join(f"{TASK_NAMES[t]} training questions (verify)"
                                                                        for t in TASKS) + " |",
                  "|---|" + "---|" * len(TASKS)]
        for label in evals:
            lines.append(f"| {label} | " + " | ".join(pct(found.get((label, t)), "verify") for t in TASKS) + " |")
        lines.append("")
    return lines


def data_story(run_dir: Path) -> list[str]:
    """For each stage: what went in, what was kept, every reason for dropping with its count and one
    example; then build_dataset's removals. The reasons are defined in REASONS_DOC."""
    from personamath.config import read_settings_used
    from personamath.jsonl import iter_jsonl
    from personamath.viewer import REJECTED_FILES, reason_kind

    gen = run_dir / "gen"
    answer_format = read_settings_used(gen, "gen_cot").get("answer_format", "boxed")
    lines = ["## What happened to the data", "",
             f"Each stage: what went in, what was kept, and every reason an item was dropped, with its count and "
             f"the first example (reasons defined in [{REASONS_DOC}](../../{REASONS_DOC})).", ""]
    for name in STAGES:
        stats_path = gen / f"{name}.stats.json"
        if not stats_path.exists():
            continue
        stats = json.loads(stats_path.read_text())
        into, tried, out = STAGE_UNITS[name]
        lines += [f"### {name}", "",
                  f"{stats['inputs']} {into} in, {stats['attempted']} {tried}, **{stats['kept']} {out} kept**"
                  f" ({100 * stats['yield']:.1f}%)" + ("" if stats["complete"] else " (stopped before the end)") + "."]
        grading = stats.get("grading", {})
        if grading.get("judged"):
            wrong = ", ".join(f"{why} {n}" for why, n in grading["wrong"].items() if n) or "none"
            lines.append(f"Answers judged: {grading['judged']} ({grading['correct']} right; wrong: {wrong}).")
        examples = {}
        rejected = gen / f"{REJECTED_FILES[name]}.jsonl"
        if rejected.exists():
            for _, row in iter_jsonl(rejected):
                examples.setdefault(reason_kind(row["reason"]), row)
        counts = {}
        for reason, n in stats["rejected_by_reason"].items():
            counts[reason_kind(reason)] = counts.get(reason_kind(reason), 0) + n
        if counts:
            lines += ["", "| dropped because | items | first example |", "|---|---:|---|"]
            lines += [f"| {kind} | {n} | {example(examples[kind], answer_format) if kind in examples else ''} |"
                      for kind, n in counts.items()]
        lines.append("")
    dataset_dir = run_dir / "dataset"
    if (dataset_dir / "stats.json").exists():
        dataset = json.loads((dataset_dir / "stats.json").read_text())
        removed = dataset["removed"]
        lines += ["### build_dataset", "",
                  f"{dataset['rows_read']['total']} rows read from the stages, **{dataset['kept']['total']} kept** in "
                  f"PersonaMathQA (by stage: {dataset['kept']['by_stage']}; by source: {dataset['kept']['by_source']}).",
                  "", "| dropped because | rows | first example |", "|---|---:|---|"]
        firsts = {}
        for file in ("removed_duplicates", "removed_contaminated"):
            if (dataset_dir / f"{file}.jsonl").exists():
                for _, row in iter_jsonl(dataset_dir / f"{file}.jsonl"):
                    firsts.setdefault("contaminated" if "contamination" in row else row["reason"], row)
        for kind, count, describe_row in (
                ("exact", removed["exact_duplicates"], lambda r: f"duplicate of {r['duplicate_of_stage']} `{r['duplicate_of']}`"),
                ("near", removed["near_duplicates"], lambda r: f"similarity {r['similarity']} to {r['duplicate_of_stage']} `{r['duplicate_of']}`"),
                ("contaminated", removed["contaminated"], lambda r: f"the same problem as test item `{r['contamination']['test_id']}`")):
            row = firsts.get(kind)
            shown = f"`{row['id']}`: {excerpt(row['problem'])} — {describe_row(row)}" if row else ""
            lines.append(f"| {kind if kind == 'contaminated' else kind + ' duplicate'} | {count} | {shown} |")
        decontamination = dataset["decontamination"]
        lines += ["", f"Decontamination ({decontamination['decided_by']}): siblings of test items kept (same template, "
                      f"another problem; `dataset/siblings_kept.jsonl`): {decontamination['siblings_kept']}.", ""]
        if (dataset_dir / "viewer.html").exists():
            lines += ["Every row, its lineage, and every item dropped on the way with the reason: "
                      "[dataset/viewer.html](dataset/viewer.html) (opens from disk in a browser). The dataset "
                      "card for the Hub: [dataset/README.md](dataset/README.md).", ""]
    return lines


def bar_chart(path: Path, title: str, categories: list[str], series: dict[str, list[float]], ylabel: str,
              annotations: dict[str, list[str]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(categories) * max(1, len(series)) ** 0.5), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(categories))]
        bars = ax.bar(xs, values, width, label=name)
        for bar, text in zip(bars, (annotations or {}).get(name, [])):
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8)
    ax.set_xticks(range(len(categories)), categories, rotation=20 if len(categories) > 5 else 0, ha="right"
                  if len(categories) > 5 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(0, max([5.0] + [v * 1.15 for values in series.values() for v in values]))
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def math_breakdown(evals: dict, key: str, grader: str = "verify") -> tuple[list[str], dict, dict]:
    """Categories (levels or subjects) and per-model accuracy (%) with correct/n labels."""
    maths = {label: tasks["math"] for label, tasks in evals.items() if "math" in tasks}
    categories = sorted({c for s in maths.values() for c in s.get(key, {})})
    series, notes = {}, {}
    for label, summary in maths.items():
        cells = [summary.get(key, {}).get(c, {}).get(grader, {"n": 0, "correct": 0}) for c in categories]
        series[label] = [100 * cell["correct"] / cell["n"] if cell["n"] else 0.0 for cell in cells]
        notes[label] = [f"{cell['correct']}/{cell['n']}" for cell in cells]
    return categories, series, notes


def write_report(run_dir: Path) -> str:
    evals = load_evals(run_dir)
    ytable, stats = yields_table(run_dir)
    if not evals and not stats:
        raise UserError(f"{run_dir}: neither evaluation summaries (eval/LABEL/{{gsm8k,math}}/summary.json) nor "
                        f"generation stats (gen/*.stats.json)")
    published = load_published()
    plots = run_dir / "plots"
    lines = [f"# PersonaMath run report: {run_dir.name}", ""]
    if not evals:
        lines += ["No model was evaluated in this run (chain.py --stop_after): its data only.", ""]
    else:
        table, notes = results_table(evals, published)
        lines += ["## Results (Pass@1, %, greedy)", "", *table, "",
                  "Column labels name the generation protocol (`authors`: the authors' eval scripts, stop list "
                  "included; `ours`: stops only at the next Alpaca block; `*`: with a deviation, listed below). "
                  "`paper`: the authors' answer extraction and comparison (comparable with the published table for "
                  "`authors` generations); `verify`: math-verify equivalence. Published figures: the authors' README "
                  "(data/reference/published_results.csv), full test sets; ours are on the slices named below.", "",
                  *[line for note in notes for line in (note, "")]]
        summary = run_dir / "train" / "training_summary.json"
        if summary.exists() and json.loads(summary.read_text())["weights"].get("equals_base"):
            lines += ["**The trained model equals the base model** (no weight changed in training): the two rows "
                      "above are one model. See \"Did the training take?\".", ""]
    for label, tasks in evals.items():
        for task, summary in tasks.items():
            gen = summary["generation"]
            source = (f"items of `{gen['data_file']}`, prompt `{gen['prompt_version']}`, max_tokens "
                      f"{gen['sampling']['max_tokens']}" if "data_file" in gen
                      else f"items re-graded from `{gen.get('regraded_from')}`")
            lines.append(f"- {label} / {task}: `{summary['model']}` on {summary['n']} {source}, "
                         f"{describe(summary)} ({provenance.short(summary.get('provenance'))})")
    lines.append("")
    if stats:
        lines += ["## Generation yields", "", *ytable, ""]
        bar_chart(plots / "stage_yields.png", "Yield of each generation stage", [s["stage"] for s in stats],
                  {"yield": [100 * s["yield"] for s in stats]}, "kept / attempted (%)",
                  {"yield": [f"{s['kept']}/{s['attempted']}" for s in stats]})
        lines += ["![stage yields](plots/stage_yields.png)", "", *data_story(run_dir)]
    lines += training_check(run_dir, evals)
    for key, name in (("by_level", "level"), ("by_subject", "subject")):
        categories, series, notes = math_breakdown(evals, key)
        if categories:
            bar_chart(plots / f"math_by_{name}.png", f"MATH accuracy per {name} (verify grader)", categories, series, "accuracy (%)", notes)
            lines += [f"![MATH per {name}](plots/math_by_{name}.png)", ""]
    lines += ["## Published (the authors' table)", "", "| model | GSM8K | MATH | source |", "|---|---|---|---|",
              *[f"| {r['model']} | {r['gsm8k_pass1']} | {r['math_pass1']} | {r['source']} |" for r in published.values()],
              ""]
    lines += [*provenance.markdown(provenance.provenance()),
              "(of this report; each evaluation's own is in its summary.json, each stage's in its stats)", ""]
    report = "\n".join(lines)
    write_text(run_dir / "report.md", report)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", required=True, type=Path, help="a run folder: RUN_DIR/gen, dataset, train, eval")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with exit_on_user_error():
        print(write_report(args.run_dir))
        print(f"report: {args.run_dir / 'report.md'}; plots: {args.run_dir / 'plots'}")


if __name__ == "__main__":
    main()
