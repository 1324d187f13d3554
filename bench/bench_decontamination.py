"""Decontamination measured against hand-labelled data, on the real inputs it meets, and at full scale.

    python bench/bench_decontamination.py                  # the report (about 4 minutes on 2 cores)
    python bench/bench_decontamination.py --rows 0         # without the full-scale timing
    python bench/bench_decontamination.py --sweep          # each threshold of the rule at several values
    python bench/bench_decontamination.py --answers ignore # any build_dataset.py decontamination flag

Labelled data (bench/decontamination/), written and labelled by hand:
- cases_gsm8k.jsonl, cases_math.jsonl: 210 rows, each with the gold answer of its own text, half
  `dev` (used to set the rule's thresholds), half `holdout`: persona rewrites of GSM8K/MATH-500 test
  items (label same: new wording and order, numbers in words, other LaTeX, a persona's unrelated
  numbers), the test item verbatim in a persona's sentences (same), new problems in the same style
  (different), adversarial siblings (one number changed, another quantity asked, a condition added,
  the same figure with another question).
- train_test_pairs.jsonl: 383 real pairs of a GSM8K/MATH train question and a test problem that
  retrieval put together (233 that an earlier version of the rule removed, 150 of its kept siblings),
  labelled same, sibling or different.
Reported, each through the whole decontamination (retrieval against all 6,319 test problems, then
the decision): precision and recall of `removed` for `same`; the share of each kind kept; the share of
the 14,973 original train questions removed; the --sibling_similarity threshold against the pairs'
sibling/different labels; and the time for --rows synthetic rows (default 128,900, v2's size) against
the baseline of the same run, the embedding retriever, on a sample. The CPU is printed first.
"""
import argparse
import json
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from personamath.data import load_any  # noqa: E402
from personamath.dataset import build_parser  # noqa: E402
from personamath.decontamination import DEFAULT_TEST_FILES, decontaminate, load_test_items  # noqa: E402
from personamath.retrieval import LexicalIndex  # noqa: E402
from personamath.same_problem import Problem  # noqa: E402

LABELLED = ROOT / "bench" / "decontamination"
TRAIN_FILES = (("gsm8k/train.jsonl", "gsm8k"), ("math/MATH_train.jsonl", "math"))
PERSONAS = ["As a school librarian, I like to share puzzles with the kids.",
            "I've been a long-haul trucker for years, and numbers keep me awake on the road.",
            "Our bakery team loves a brain teaser over coffee.",
            "As a nurse on night shifts, I jot down problems like this one."]
SWEEP = {"--setting_overlap": ["0.2", "0.3", "0.4"], "--added_quantity_overlap": ["0.3", "0.5", "0.7"],
         "--max_added_quantities": ["0", "1", "2"], "--top_k": ["3", "5", "10"], "--answers": ["use", "ignore"]}


def cpu() -> str:
    flags = subprocess.run("grep -o -w -E 'avx512_bf16|amx_bf16|avx2' /proc/cpuinfo | sort -u", shell=True,
                           capture_output=True, text=True).stdout.split()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{model}; flags: {' '.join(flags) or 'none of avx2/avx512_bf16/amx_bf16'}"


def row(row_id: str, problem: str, source: str, gold: str | None) -> dict:
    return {"id": row_id, "problem": problem, "source": source, "stage": "cot", "gold": gold}


class Inputs:
    """Everything measured, read once."""

    def __init__(self):
        self.cases = [json.loads(line) for name in ("cases_gsm8k", "cases_math")
                      for line in (LABELLED / f"{name}.jsonl").open()]
        self.case_rows = [row(c["case"], c["problem"], c["test_file"].split("/")[0], c["gold"]) for c in self.cases]
        self.pairs = [json.loads(line) for line in (LABELLED / "train_test_pairs.jsonl").open()]
        train = {(name, p.id): (p, source) for name, source in TRAIN_FILES for p in load_any(ROOT / "data" / name)[1]}
        self.train_rows = [row(p.id, p.question, source, p.gold) for p, source in train.values()]
        self.pair_rows = [row(key[1], train[key][0].question, train[key][1], train[key][0].gold)
                          for key in dict.fromkeys((p["train_file"], p["train_id"]) for p in self.pairs)]


def run(rows: list[dict], flags: list[str], out: Path):
    args = build_parser().parse_args(["--inputs", "-", "--output_dir", str(out), *flags])
    started = time.monotonic()
    kept, removed, siblings, stats = decontaminate(rows, args, out)
    return removed, siblings, stats, time.monotonic() - started


def measure(inputs: Inputs, flags: list[str], out: Path) -> dict:
    """Every figure of sections 1-3 for these flags, and what is needed to explain them."""
    gone = {r["id"] for r in run(inputs.case_rows, flags, out)[0]}
    pairs_gone = {r["id"] for r in run(inputs.pair_rows, flags, out)[0]}
    train_removed, train_siblings, _, seconds = run(inputs.train_rows, flags, out)
    cases = inputs.cases
    return {"cases": cases, "gone": gone, "pairs_gone": pairs_gone, "train_removed": train_removed,
            "train_siblings": train_siblings, "train_seconds": seconds,
            "recall": _count(c["case"] in gone for c in cases if c["label"] == "same"),
            "precision": _count(c["label"] == "same" for c in cases if c["case"] in gone),
            "paraphrase": _count(c["case"] in gone for c in cases if c["kind"] == "paraphrase"),
            "new_kept": _count(c["case"] not in gone for c in cases if c["kind"] == "new"),
            "sibling_kept": _count(c["case"] not in gone for c in cases if c["kind"] == "sibling"),
            "pairs_same_removed": _count(p["train_id"] in pairs_gone for p in inputs.pairs if p["label"] == "same"),
            "pairs_other_kept": _count(p["train_id"] not in pairs_gone for p in inputs.pairs if p["label"] != "same"),
            "train_share": (len(train_removed), len(inputs.train_rows))}


def report(inputs: Inputs, m: dict, out: Path) -> None:
    cases, gone = m["cases"], m["gone"]
    print("\n## 1. Hand-labelled cases (cases_gsm8k.jsonl, cases_math.jsonl)\n")
    print("| split | same removed (recall) | removed that are same (precision) | paraphrase removed | wrapped removed "
          "| new kept | sibling kept |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for split in ("dev", "holdout", "all"):
        chosen = [c for c in cases if split in ("all", c["split"])]

        def share(kind, removed):
            return _frac(*_count((c["case"] in gone) == removed for c in chosen if c["kind"] == kind))
        print(f"| {split} | {_frac(*_count(c['case'] in gone for c in chosen if c['label'] == 'same'))} | "
              f"{_frac(*_count(c['label'] == 'same' for c in chosen if c['case'] in gone))} | "
              f"{share('paraphrase', True)} | {share('wrapped', True)} | {share('new', False)} | "
              f"{share('sibling', False)} |")
    print(f"\nMissed rewrites: {', '.join(c['case'] for c in cases if c['label'] == 'same' and c['case'] not in gone) or 'none'}")
    print(f"Siblings/new removed: {', '.join(c['case'] for c in cases if c['label'] != 'same' and c['case'] in gone) or 'none'}")

    print("\n## 2. Hand-labelled train/test pairs (train_test_pairs.jsonl)\n")
    print("| label | pairs | train question removed |\n|---|---:|---:|")
    for label in ("same", "sibling", "different"):
        removed, pairs = _count(p["train_id"] in m["pairs_gone"] for p in inputs.pairs if p["label"] == label)
        print(f"| {label} | {pairs} | {_frac(removed, pairs)} |")
    missed = [p["pair"] for p in inputs.pairs if p["label"] == "same" and p["train_id"] not in m["pairs_gone"]]
    print(f"\n`same` pairs whose train question was kept: {missed or 'none'}")

    removed = m["train_removed"]
    by_source, total = Counter(r["source"] for r in removed), Counter(r["source"] for r in inputs.train_rows)
    print("\n## 3. The original GSM8K + MATH train questions\n")
    print(f"Removed {_frac(*m['train_share'])} ("
          f"{', '.join(f'{s} {_frac(by_source[s], n)}' for s, n in total.items())}); siblings kept "
          f"{len(m['train_siblings'])}; {len(inputs.train_rows) / m['train_seconds']:.0f} rows/s.")
    (out / "train_removed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in removed))
    print(f"Every removal with its test item and reason: {out / 'train_removed.jsonl'}. The first 5:\n")
    for r in removed[:5]:
        why = r["contamination"]
        print(f"- {_short(r['problem'])}\n  test {why['test_id']}: {_short(why['test_problem'])}\n  {why['reason']}")


def sibling_threshold(inputs: Inputs) -> None:
    """--sibling_similarity (which pairs that are not the same problem are reported as siblings) against
    the pairs' sibling/different labels."""
    items, _ = load_test_items(DEFAULT_TEST_FILES)
    index = LexicalIndex([Problem(item.text) for item in items])
    position = {(Path(item.file).relative_to(ROOT / "data").as_posix(), item.id): i for i, item in enumerate(items)}
    text = {r["id"]: r["problem"] for r in inputs.pair_rows}
    scored = []
    for pair in inputs.pairs:
        i = position.get((pair["test_file"], pair["test_id"]))
        if pair["label"] != "same" and i is not None:
            scores = dict(index.nearest(Problem(text[pair["train_id"]]), len(items)))
            scored.append((scores.get(i, 0.0), pair["label"] == "sibling"))
    print("\n## 4. --sibling_similarity against the pairs' labels (sibling vs different)\n")
    print("| threshold | precision | recall |\n|---:|---:|---:|")
    for threshold in (0.3, 0.4, 0.5, 0.6, 0.7):
        said = [sibling for score, sibling in scored if score >= threshold]
        print(f"| {threshold} | {_frac(sum(said), len(said))} | "
              f"{_frac(sum(said), sum(sibling for _, sibling in scored))} |")


def sweep(inputs: Inputs, flags: list[str], out: Path) -> None:
    print("\n## Sweep: each setting at several values, the others at their defaults (or as given)\n")
    print("| setting | rewrites removed | paraphrases removed | new kept | siblings kept | real same removed "
          "| real sibling/different kept | train removed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for flag, values in SWEEP.items():
        for value in values:
            m = measure(inputs, [*flags, flag, value], out)
            print(f"| {flag} {value} | " + " | ".join(_frac(*m[k]) for k in (
                "recall", "paraphrase", "new_kept", "sibling_kept", "pairs_same_removed", "pairs_other_kept",
                "train_share")) + " |", flush=True)


def speed(n_rows: int, flags: list[str], out: Path) -> None:
    random.seed(0)
    train = [p.question for name, _ in TRAIN_FILES for p in load_any(ROOT / "data" / name)[1]]

    def synthetic(i):
        text = re.sub(r"\d+", lambda m: str(int(m[0]) + random.randint(1, 9)), random.choice(train))
        return row(f"synthetic:{i}", f"{random.choice(PERSONAS)} {text}", "math", None)

    rows = [synthetic(i) for i in range(n_rows)]
    _, _, stats, seconds = run(rows, flags, out)
    sample = rows[:300]
    _, _, sample_stats, _ = run(sample, [*flags, "--embedding_retrieval"], out)
    embedding_rate = len(sample) / max(sample_stats["seconds"]["seconds_embedding"], 1e-9)
    print(f"\n## 5. Speed: {n_rows:,} synthetic rows (train questions, a persona sentence, renumbered, no gold)\n")
    print(f"Default (lexical + overlap retrieval, the rule): {seconds:.0f} s in all ({n_rows / seconds:.0f} rows/s; "
          f"{stats['seconds']}); {stats['removed']} removed, {stats['siblings_kept']} siblings.")
    print(f"Baseline, the embedding retriever on {len(sample)} of them: {embedding_rate:.0f} rows/s, so "
          f"{n_rows / embedding_rate / 60:.0f} min for all; the default is {n_rows / seconds / embedding_rate:.0f}x "
          f"faster.")


def _count(flags) -> tuple[int, int]:
    flags = list(flags)
    return sum(flags), len(flags)


def _frac(a: int, b: int) -> str:
    return f"{a}/{b} ({100 * a / b:.1f}%)" if b else "-"


def _short(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=128_900, help="synthetic rows for the timing (0: skip it)")
    p.add_argument("--sweep", action="store_true", help="only the sweep of the rule's settings")
    p.add_argument("--output_dir", default=str(ROOT / "runs" / "bench_decontamination"))
    args, flags = p.parse_known_args()  # the rest: build_dataset.py's decontamination flags
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# Decontamination bench\n\nCPU: {cpu()}\nFlags: {' '.join(flags) or 'the defaults'}")
    inputs = Inputs()
    if args.sweep:
        sweep(inputs, flags, out)
        return
    report(inputs, measure(inputs, flags, out), out)
    sibling_threshold(inputs)
    if args.rows:
        speed(args.rows, flags, out)


if __name__ == "__main__":
    main()
