"""Decontamination measured against hand-labelled data, on the real inputs it meets, and at full scale.

    python bench/bench_decontamination.py            # everything (a few minutes on 2 cores)
    python bench/bench_decontamination.py --rows 0   # without the full-scale timing

1. The hand-labelled cases of bench/decontamination/ (cases_gsm8k.jsonl, cases_math.jsonl: 210 rows
   written and labelled by hand, half `dev` used to set the rule's thresholds, half `holdout` not looked
   at while doing so): persona rewrites of GSM8K/MATH-500 test items (label same), the test item
   verbatim in a persona's sentences (same), new problems in the same style (different), and
   adversarial siblings (one number changed, another quantity asked, a condition added, the same
   figure with another question). Each case goes through the whole decontamination (retrieval
   against all 6.3K test items, then the decision) with build_dataset.py's defaults; printed:
   precision and recall of `removed` for `same`, and the share kept per kind, per split.
2. The 14,973 original GSM8K and MATH train questions (training data by the benchmarks' own split):
   the share removed, by source, and the first removals with their reasons.
3. Speed: a synthetic dataset of --rows rows (default 128,900, PersonaMathQA v2's size) made of
   train questions with persona sentences and renumbered quantities, timed against the baseline of
   the same run: the embedding retriever on a sample, extrapolated (rows per second each).
Figures: the CPU they ran on is printed first.
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
from personamath.decontamination import decontaminate  # noqa: E402

CASES = ROOT / "bench" / "decontamination"
PERSONAS = ["As a school librarian, I like to share puzzles with the kids.",
            "I've been a long-haul trucker for years, and numbers keep me awake on the road.",
            "Our bakery team loves a brain teaser over coffee.",
            "As a nurse on night shifts, I jot down problems like this one."]


def cpu() -> str:
    flags = subprocess.run("grep -o -w -E 'avx512_bf16|amx_bf16|avx2' /proc/cpuinfo | sort -u", shell=True,
                           capture_output=True, text=True).stdout.split()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{model}; flags: {' '.join(flags) or 'none of avx2/avx512_bf16/amx_bf16'}"


def row(row_id: str, problem: str, source: str, gold: str | None) -> dict:
    return {"id": row_id, "problem": problem, "source": source, "stage": "cot", "gold": gold}


def run(rows: list[dict], flags: list[str], out: Path):
    args = build_parser().parse_args(["--inputs", "-", "--output_dir", str(out), *flags])
    started = time.monotonic()
    kept, removed, siblings, stats = decontaminate(rows, args, out)
    return removed, siblings, stats, time.monotonic() - started


def labelled(flags, out):
    cases = [json.loads(line) for name in ("cases_gsm8k", "cases_math") for line in (CASES / f"{name}.jsonl").open()]
    removed, _, _, _ = run([row(c["case"], c["problem"], c["test_file"].split("/")[0], c["gold"]) for c in cases], flags, out)
    gone = {r["id"] for r in removed}
    print("\n## 1. Hand-labelled cases (bench/decontamination/)\n")
    print("| split | same removed (recall) | removed that are same (precision) | paraphrase removed | wrapped removed "
          "| new kept | sibling kept |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for split in ("dev", "holdout", "all"):
        chosen = [c for c in cases if split in ("all", c["split"])]
        same = [c for c in chosen if c["label"] == "same"]
        out_ = [c for c in chosen if c["case"] in gone]
        share = lambda kind, removed_: _share([c for c in chosen if c["kind"] == kind], removed_, gone)  # noqa
        print(f"| {split} | {_frac(sum(c['case'] in gone for c in same), len(same))} | "
              f"{_frac(sum(c['label'] == 'same' for c in out_), len(out_))} | {share('paraphrase', True)} | "
              f"{share('wrapped', True)} | {share('new', False)} | {share('sibling', False)} |")
    missed = [c for c in cases if c["label"] == "same" and c["case"] not in gone]
    wrong = [c for c in cases if c["label"] != "same" and c["case"] in gone]
    print(f"\nMissed rewrites: {', '.join(c['case'] for c in missed) or 'none'}")
    print(f"Siblings/new removed: {', '.join(c['case'] for c in wrong) or 'none'}")


def train_test_pairs(flags, out):
    """The hand-labelled real pairs: a train question and a test problem that retrieval put together."""
    pairs = [json.loads(line) for line in (CASES / "train_test_pairs.jsonl").open()]
    train = {(name, p.id): (p, source) for name, source in (("gsm8k/train.jsonl", "gsm8k"),
                                                            ("math/MATH_train.jsonl", "math"))
             for p in load_any(ROOT / "data" / name)[1]}
    ids = list(dict.fromkeys((p["train_file"], p["train_id"]) for p in pairs))
    rows = [row(i, train[key][0].question, train[key][1], train[key][0].gold) for key in ids for i in [key[1]]]
    removed, _, _, _ = run(rows, flags, out)
    gone = {r["id"] for r in removed}
    print("\n## 2. Hand-labelled train/test pairs (bench/decontamination/train_test_pairs.jsonl)\n")
    print("| label | pairs | train question removed |")
    print("|---|---:|---:|")
    for label in ("same", "sibling", "different"):
        chosen = [p for p in pairs if p["label"] == label]
        print(f"| {label} | {len(chosen)} | {_frac(sum(p['train_id'] in gone for p in chosen), len(chosen))} |")
    missed = [p["pair"] for p in pairs if p["label"] == "same" and p["train_id"] not in gone]
    print(f"\n`same` pairs whose train question was kept: {missed or 'none'}")


def train_questions(flags, out):
    rows = [row(p.id, p.question, source, p.gold) for name, source in (("gsm8k/train.jsonl", "gsm8k"),
                                                               ("math/MATH_train.jsonl", "math"))
            for p in load_any(ROOT / "data" / name)[1]]
    removed, siblings, stats, seconds = run(rows, flags, out)
    by_source = Counter(r["source"] for r in removed)
    total = Counter(r["source"] for r in rows)
    print("\n## 3. The original GSM8K + MATH train questions\n")
    print(f"Removed {_frac(len(removed), len(rows))} ({', '.join(f'{s} {_frac(by_source[s], n)}' for s, n in total.items())}); "
          f"siblings kept {len(siblings)}; {len(rows) / seconds:.0f} rows/s.")
    (out / "train_removed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in removed))
    print(f"Every removal with its test item and reason: {out / 'train_removed.jsonl'}. The first 5:\n")
    for r in removed[:5]:
        why = r["contamination"]
        print(f"- {_short(r['problem'])}\n  test {why['test_id']}: {_short(why['test_problem'])}\n  {why['reason']}")


def speed(n_rows, flags, out):
    random.seed(0)
    train = [p.question for name in ("gsm8k/train.jsonl", "math/MATH_train.jsonl")
             for p in load_any(ROOT / "data" / name)[1]]

    def synthetic(i):
        text = re.sub(r"\d+", lambda m: str(int(m[0]) + random.randint(1, 9)), random.choice(train))
        return row(f"synthetic:{i}", f"{random.choice(PERSONAS)} {text}", "math", None)

    rows = [synthetic(i) for i in range(n_rows)]
    _, _, stats, seconds = run(rows, flags, out)
    sample = rows[:300]
    _, _, sample_stats, _ = run(sample, [*flags, "--embedding_retrieval"], out)
    embedding_rate = len(sample) / max(sample_stats["seconds"]["seconds_embedding"], 1e-9)
    print(f"\n## 4. Speed: {n_rows:,} synthetic rows (train questions, persona sentence, renumbered)\n")
    print(f"Default (lexical + overlap retrieval, the rule): {seconds:.0f} s in all ({n_rows / seconds:.0f} rows/s; "
          f"{stats['seconds']}); {stats['removed']} removed, {stats['siblings_kept']} siblings.")
    print(f"Baseline, the embedding retriever on {len(sample)} of them: {embedding_rate:.0f} rows/s, so "
          f"{n_rows / embedding_rate / 60:.0f} min for all; the default is {n_rows / seconds / embedding_rate:.0f}x "
          f"faster.")


def _share(cases, removed, gone) -> str:
    return _frac(sum((c["case"] in gone) == removed for c in cases), len(cases))


def _frac(a: int, b: int) -> str:
    return f"{a}/{b} ({100 * a / b:.1f}%)" if b else "-"


def _short(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=128_900, help="synthetic rows for the timing (0: skip it)")
    p.add_argument("--output_dir", default=str(ROOT / "runs" / "bench_decontamination"))
    args, flags = p.parse_known_args()  # the rest: build_dataset.py's decontamination flags
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# Decontamination bench\n\nCPU: {cpu()}\nFlags: {' '.join(flags) or 'the defaults'}")
    labelled(flags, out)
    train_test_pairs(flags, out)
    train_questions(flags, out)
    if args.rows:
        speed(args.rows, flags, out)


if __name__ == "__main__":
    main()
