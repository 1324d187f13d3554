"""The merge behind build_dataset.py: the generation stages' outputs -> the PersonaMathQA training set.

Steps, in this order, each keeping the earlier row in input order:
1. read every input row and check it has the fields the training set needs;
2. exact duplicates: the same problem text up to case and whitespace;
3. near duplicates: Jaccard similarity of the problems' word 5-gram sets at least --near_dup_threshold,
   found exactly (not estimated) by a prefix-filtered similarity join;
4. contamination against the GSM8K/MATH test sets (decontamination.py): the rows that are the same
   problem as a test item, decided pair by pair among retrieved candidates by a rule or an LLM judge;
   siblings (same template, other numbers or question) kept and reported;
5. a shuffle seeded by --seed.

Memory: of each row only what the steps read is held (IN_MEMORY, about 1-2 KB); the rest, the response
above all, is read back from its input file by offset when the outputs are written (Inputs.full), so
that 128.9K rows of gpt-4o-mini's chains of thought are not in memory at once.

Outputs (all inside --output_dir): PersonaMathQA.jsonl and .parquet, removed_duplicates.jsonl,
removed_contaminated.jsonl and siblings_kept.jsonl (each with its test item and the reason),
stats.json and stats.md (also printed), README.md (the dataset card for the Hub, card.py) and
viewer.html with its data in viewer_data/ (every row and every dropped item, offline, viewer.py).
"""
import argparse
import hashlib
import json
import math
import random
import re
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from .card import DATA_FILE, write_card, write_parquet
from .decontamination import add_decontamination_args, check_args, decontaminate
from .config import RecipeParser, write_settings_used
from .errors import UserError, exit_on_user_error
from .jsonl import iter_jsonl_at, write_json, write_jsonl, write_text
from .provenance import markdown as provenance_markdown
from .provenance import provenance
from .viewer import write_viewer

STAGES = ("cot", "persona", "reflection", "reflection_persona")
SOURCES = ("gsm8k", "math")
# PersonaMathQA.jsonl's columns, in order: what training reads first, then where each row came from.
# `wrong_attempt`: the attempt a reflection row's response reflects on (reflection.py --format reflection),
# which training shows in the prompt; None elsewhere.
OUTPUT_FIELDS = ("problem", "response", "wrong_attempt", "id", "parent_id", "source", "stage", "gold", "persona",
                 "persona_id", "model", "prompt_version")
# what the steps and the statistics read of a row, held in memory; the rest is read back when written
IN_MEMORY = ("problem", "id", "parent_id", "source", "stage", "gold", "persona", "persona_id")
SHINGLE = 5  # words per shingle for near duplicates
ISCO_SUB_MAJOR_GROUPS = 43  # ISCO-08 has 43 two-digit sub-major groups; the built-in personas are isco-XX-N
ISCO_ID = re.compile(r"isco-(\d\d)-\d+")
WORD = re.compile(r"\w+")


def build_parser() -> argparse.ArgumentParser:
    p = RecipeParser("build_dataset", prog="build_dataset.py", description="Merge the generation stages' outputs into PersonaMathQA: remove exact "
                                            "and near duplicates and test-set overlap, shuffle, report statistics.")
    p.add_argument("--inputs", nargs="+", default=[f"runs/gen/{name}.jsonl" for name in STAGES],
                   help="stage outputs; a X.stats.json beside X.jsonl gives its yield")
    p.add_argument("--output_dir", default="runs/dataset",
                   help="where the dataset goes (train.py reads runs/dataset/PersonaMathQA.jsonl)")
    p.add_argument("--near_dup_threshold", type=float, default=0.9,
                   help=f"a row is a near duplicate of an earlier one when the Jaccard similarity of their word "
                        f"{SHINGLE}-gram sets is at least this")
    p.add_argument("--shuffle_seed", type=int, default=42, help="seed of the final shuffle")
    p.add_argument("--no_shuffle", action="store_true", help="keep the input order")
    add_decontamination_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    with exit_on_user_error():
        parser = build_parser()
        args = parser.parse_args(argv)
        return run(args, settings=parser.settings_used(args))


def run(args: argparse.Namespace, settings: dict | None = None) -> int:
    """Build the dataset and write every output; return the exit status (1 when no row is kept)."""
    if not 0 < args.near_dup_threshold <= 1:
        raise UserError(f"--near_dup_threshold must be in (0, 1], got {args.near_dup_threshold}")
    check_args(args)
    # Everything that can fail on bad input is read before the first write, so a bad run writes nothing.
    with Inputs(args.inputs) as inputs:
        rows = inputs.rows
        yields = read_yields(args.inputs)
        out_dir = Path(args.output_dir)

        kept, exact = remove_exact_duplicates(rows)
        kept, near = remove_near_duplicates(kept, args.near_dup_threshold)
        kept, contaminated, siblings, decontamination = decontaminate(kept, args, out_dir)
        if not args.no_shuffle:
            random.Random(args.shuffle_seed).shuffle(kept)

        def dataset():  # the training rows, each read back in full
            return ({k: row.get(k) for k in OUTPUT_FIELDS} for row in map(inputs.full, kept))

        write_jsonl(out_dir / "PersonaMathQA.jsonl", dataset())
        write_parquet(out_dir / DATA_FILE, dataset(), OUTPUT_FIELDS)
        if settings is not None:
            write_settings_used(out_dir, settings)
        write_jsonl(out_dir / "removed_duplicates.jsonl", map(inputs.full, exact + near))
        write_jsonl(out_dir / "removed_contaminated.jsonl", map(inputs.full, contaminated))
        write_jsonl(out_dir / "siblings_kept.jsonl", siblings)
        stats = summarize(args, inputs.rows_per_file, kept, (row["response"] for row in dataset()), exact, near,
                          contaminated, decontamination, yields)
        write_json(out_dir / "stats.json", stats)
        markdown = render_markdown(stats)
        write_text(out_dir / "stats.md", markdown)
        viewer = write_viewer(out_dir, args.inputs, dataset(), map(inputs.full, exact + near + contaminated),
                              siblings, stats)
        write_card(out_dir, args.inputs, stats)
    print(markdown)
    print(f"outputs: {out_dir}; every row and every dropped item: {viewer} (opens from disk in a browser)")
    if not rows:
        print(f"no rows kept: the inputs hold no rows ({', '.join(map(str, args.inputs))})", file=sys.stderr)
        return 1
    if not kept:
        print(f"no rows kept: all {len(rows)} rows read were removed ({len(exact)} exact duplicates, {len(near)} "
              f"near duplicates, {len(contaminated)} contaminated); see {out_dir}", file=sys.stderr)
        return 1
    return 0


class Inputs:
    """The stage outputs, every row read and checked at once (UserError naming the file and line), of
    each row only IN_MEMORY held (with where it is: `_at`); `full(row)` reads the rest back from its
    file, with whatever the steps added to the row. `rows_per_file`: how many rows each file gave."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        self.rows, self.rows_per_file, self._files = [], {}, {}
        seen = {}
        for number, path in enumerate(self.paths):
            self.rows_per_file[str(path)] = 0
            for lineno, offset, row in iter_jsonl_at(path):
                check_row(row, f"{path}:{lineno}")
                # ids are unique within a stage; a repeat means the same output was given twice.
                key = (row["stage"], row["id"])
                if key in seen:
                    first = seen[key]
                    raise UserError(f"{path}:{lineno}: {row['stage']} id {row['id']!r} already read at "
                                    f"{self.paths[first[0]]}:{first[1]}")
                seen[key] = (number, lineno)
                self.rows.append({k: row.get(k) for k in IN_MEMORY} | {"_at": (number, offset)})
                self.rows_per_file[str(path)] += 1

    def full(self, row: dict) -> dict:
        """The row as its file holds it, with the fields the steps added (a duplicate's, a contamination)."""
        number, offset = row["_at"]
        if number not in self._files:
            self._files[number] = self.paths[number].open("rb")
        f = self._files[number]
        f.seek(offset)
        found = json.loads(f.readline().decode("utf-8"))
        if (found.get("stage"), found.get("id")) != (row["stage"], row["id"]):
            raise UserError(f"{self.paths[number]} changed while the dataset was built from it: build again")
        return found | {k: v for k, v in row.items() if k != "_at"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in self._files.values():
            f.close()


def check_row(row: dict, where: str) -> None:
    """A stage output row with the fields the training set needs, each of its type."""
    missing = [k for k in OUTPUT_FIELDS if k not in row and k != "wrong_attempt"]  # the one optional
    if missing:
        raise UserError(f"{where}: not a stage output row (missing {', '.join(missing)})")
    empty = [k for k in ("problem", "response", "id") if not isinstance(row[k], str) or not row[k].strip()]
    if empty:
        raise UserError(f"{where}: {', '.join(empty)} must be non-empty text")
    if row["stage"] not in STAGES:
        raise UserError(f"{where}: unknown stage {row['stage']!r} (expected one of {', '.join(STAGES)})")
    if row["source"] not in SOURCES:
        raise UserError(f"{where}: unknown source {row['source']!r} (expected gsm8k or math)")
    not_text = [k for k in ("persona", "persona_id", "wrong_attempt")
                if row.get(k) is not None and not isinstance(row[k], str)]
    if not_text:
        raise UserError(f"{where}: {', '.join(not_text)} must be text or null")


def read_yields(paths) -> list[dict]:
    """The yield recorded in X.stats.json beside each input X.jsonl; inputs without one are skipped."""
    yields = []
    for path in map(Path, paths):
        stats_path = path.with_name(path.name.removesuffix(".jsonl") + ".stats.json")
        if not stats_path.is_file():
            continue
        try:
            stats = json.loads(stats_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{stats_path}:{err.lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(stats, dict):
            raise UserError(f"{stats_path}: expected a JSON object")
        yields.append({"file": str(stats_path), **{k: stats.get(k) for k in
                                                    ("stage", "inputs", "attempted", "kept", "yield", "complete")}})
    return yields


# ----------------------------------------------------------------------------- text

def words(text: str) -> list[str]:
    """Lowercased word tokens with punctuation dropped: `$x^2+1$?` -> ['x', '2', '1']."""
    return WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> set[str]:
    """The distinct word n-grams; a text shorter than n words is one gram, the whole text."""
    if len(tokens) < n:
        return {" ".join(tokens)} if tokens else set()
    return {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def shingle_hashes(text: str) -> np.ndarray:
    """The text's word SHINGLE-grams as sorted distinct 64-bit hashes: the same sets (a collision among
    a few million distinct grams has a chance below 1e-6) in a fraction of the memory of the strings
    (near duplicates of 52K rows: 88 MiB at the peak, 347 with strings)."""
    grams = ngrams(words(text), SHINGLE)
    digests = (int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") for g in grams)
    return np.unique(np.fromiter(digests, dtype=np.uint64, count=len(grams)))


# ----------------------------------------------------------------------------- removal steps

def remove_exact_duplicates(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    first = {}  # normalised problem -> the row kept for it
    kept, removed = [], []
    for row in rows:
        key = " ".join(row["problem"].lower().split())
        if key in first:
            removed.append({**row, **_duplicate_of(first[key]), "reason": "exact", "similarity": 1.0})
        else:
            first[key] = row
            kept.append(row)
    return kept, removed


def remove_near_duplicates(rows: list[dict], threshold: float) -> tuple[list[dict], list[dict]]:
    """Drop each row whose shingle set has Jaccard similarity >= threshold with an earlier kept row's.

    Exact, and far from O(n^2), by prefix filtering (Bayardo et al., "Scaling up all pairs similarity
    search", 2007): sort every set's shingles rarest first; if J(X, Y) >= t then |X & Y| >= ceil(t|X|),
    so X and Y share a shingle among the first |X| - ceil(t|X|) + 1 of each. Only those prefixes are
    indexed, and since they hold rare shingles, few earlier rows are ever compared.
    """
    sets = [shingle_hashes(row["problem"]) for row in rows]
    distinct, frequency = np.unique(np.concatenate([np.empty(0, np.uint64), *sets]), return_counts=True)
    index = defaultdict(list)  # shingle -> positions of kept rows with it in their prefix
    kept, removed = [], []
    for i, (row, shingles) in enumerate(zip(rows, sets)):
        rarest_first = shingles[np.lexsort((shingles, frequency[np.searchsorted(distinct, shingles)]))]
        # The epsilon keeps float error (0.7 * 10 = 7.000000000000001) from shortening the prefix.
        prefix = rarest_first[:len(shingles) - math.ceil(threshold * len(shingles) - 1e-9) + 1].tolist()
        best, best_similarity = None, 0.0
        for j in sorted({j for s in prefix for j in index[s]}):
            common = len(np.intersect1d(shingles, sets[j], assume_unique=True))
            similarity = common / (len(shingles) + len(sets[j]) - common)
            if similarity >= threshold and similarity > best_similarity:  # the most similar, earliest on ties
                best, best_similarity = j, similarity
        if best is None:
            kept.append(row)
            for s in prefix:
                index[s].append(i)
        else:
            removed.append({**row, **_duplicate_of(rows[best]), "reason": "near",
                            "similarity": round(best_similarity, 4)})
    return kept, removed


def _duplicate_of(row: dict) -> dict:
    # ids are unique only within a stage, so the stage names the kept row too.
    return {"duplicate_of": row["id"], "duplicate_of_stage": row["stage"]}


# ----------------------------------------------------------------------------- statistics

def summarize(args, rows_per_file, dataset, responses, exact, near, contaminated, decontamination, yields) -> dict:
    """`dataset`: the rows kept (their IN_MEMORY fields); `responses`: their responses, in any order."""
    by_stage_source = {stage: {source: 0 for source in SOURCES} for stage in STAGES}
    for row in dataset:
        by_stage_source[row["stage"]][row["source"]] += 1
    return {
        "rows_read": {"total": sum(rows_per_file.values()), "per_file": rows_per_file},
        "kept": {"total": len(dataset), "by_stage_source": by_stage_source,
                 "by_stage": {stage: sum(counts.values()) for stage, counts in by_stage_source.items()},
                 "by_source": {source: sum(by_stage_source[s][source] for s in STAGES) for source in SOURCES}},
        "removed": {"exact_duplicates": len(exact), "near_duplicates": len(near), "contaminated": len(contaminated)},
        "decontamination": decontamination,
        "personas": persona_coverage(dataset),
        "yield": yields,
        "diversity": {"problem": diversity(row["problem"] for row in dataset),
                      "response": diversity(responses)},
        "settings": {"decontaminate": [str(f) for f in args.decontaminate],
                     **{name: getattr(args, name) for name in (
                         "contamination_policy", "top_k", "ngram", "embedding_retrieval", "added_quantity_overlap",
                         "max_added_quantities", "setting_overlap", "answers", "sibling_similarity", "judge")},
                     "near_dup_threshold": args.near_dup_threshold, "near_dup_shingle_words": SHINGLE,
                     "shuffle": not args.no_shuffle, "seed": args.shuffle_seed},
        "provenance": provenance(),
    }


def persona_coverage(dataset: list[dict]) -> dict:
    rows_per_persona = Counter(row["persona"] for row in dataset if row["persona"])
    persona_ids = {row["persona_id"] for row in dataset if row["persona_id"]}
    isco_groups = sorted({m.group(1) for pid in persona_ids if (m := ISCO_ID.fullmatch(pid))})
    counts = sorted(rows_per_persona.values())
    return {
        "rows_with_persona": sum(counts),
        "distinct_personas": len(rows_per_persona),
        "distinct_persona_ids": len(persona_ids),
        "rows_per_persona": ({"min": counts[0], "median": statistics.median(counts), "max": counts[-1]}
                             if counts else None),
        "isco_sub_major_groups": {"covered": len(isco_groups), "of": ISCO_SUB_MAJOR_GROUPS, "codes": isco_groups},
    }


def diversity(texts) -> dict:
    """The paper's lexical diversity: distinct lowercased words (types), all words (tokens), their ratio."""
    types, tokens = set(), 0
    for text in texts:
        text_words = words(text)
        types.update(text_words)
        tokens += len(text_words)
    return {"types": len(types), "tokens": tokens, "type_token_ratio": len(types) / tokens if tokens else 0.0}


def render_markdown(stats: dict) -> str:
    kept, removed, personas = stats["kept"], stats["removed"], stats["personas"]
    lines = ["# PersonaMathQA", "",
             f"Kept {kept['total']} of {stats['rows_read']['total']} rows read; removed {removed['exact_duplicates']} "
             f"exact duplicates, {removed['near_duplicates']} near duplicates, {removed['contaminated']} contaminated.",
             "", "## Rows read", "", "| input | rows |", "|---|---:|"]
    lines += [f"| {path} | {n} |" for path, n in stats["rows_read"]["per_file"].items()]

    lines += ["", "## Rows kept", "", "| stage | " + " | ".join(SOURCES) + " | total |",
              "|---|" + "---:|" * (len(SOURCES) + 1)]
    for stage, counts in kept["by_stage_source"].items():
        lines.append(f"| {stage} | " + " | ".join(str(counts[s]) for s in SOURCES) + f" | {kept['by_stage'][stage]} |")
    lines.append("| total | " + " | ".join(str(kept["by_source"][s]) for s in SOURCES) + f" | {kept['total']} |")

    lines += ["", "## Removed", "", "| reason | rows |", "|---|---:|",
              f"| exact duplicate | {removed['exact_duplicates']} |",
              f"| near duplicate | {removed['near_duplicates']} |",
              f"| contaminated | {removed['contaminated']} |"]

    lines += decontamination_markdown(stats["decontamination"])

    lines += ["", "## Yield of the generation stages", ""]
    if stats["yield"]:
        lines += ["| stage | inputs | attempted | kept | yield | complete | stats file |",
                  "|---|---:|---:|---:|---:|---|---|"]
        lines += [f"| {y['stage']} | {y['inputs']} | {y['attempted']} | {y['kept']} | {_percent(y['yield'])} | "
                  f"{y['complete']} | {y['file']} |" for y in stats["yield"]]
    else:
        lines.append("No X.stats.json beside the inputs.")

    per_persona = personas["rows_per_persona"]
    isco = personas["isco_sub_major_groups"]
    lines += ["", "## Personas", "", "| measure | value |", "|---|---:|",
              f"| rows with a persona | {personas['rows_with_persona']} |",
              f"| distinct personas | {personas['distinct_personas']} |",
              f"| distinct persona ids | {personas['distinct_persona_ids']} |",
              "| rows per persona (min / median / max) | " +
              (f"{per_persona['min']} / {per_persona['median']:g} / {per_persona['max']} |" if per_persona else "- |"),
              f"| ISCO-08 sub-major groups covered | {isco['covered']} of {isco['of']} |"]

    lines += ["", "## Diversity (lowercased words)", "", "| text | types | tokens | type-token ratio |",
              "|---|---:|---:|---:|"]
    lines += [f"| {name} | {d['types']} | {d['tokens']} | {d['type_token_ratio']:.4f} |"
              for name, d in stats["diversity"].items()]

    s = stats["settings"]
    shuffle = f"shuffled with seed {s['seed']}" if s["shuffle"] else "not shuffled"
    lines += ["", f"Settings: near duplicates at Jaccard >= {s['near_dup_threshold']} of word "
                  f"{s['near_dup_shingle_words']}-grams; contamination policy {s['contamination_policy']}, decided by "
                  f"{'the LLM judge' if s['judge'] == 'llm' else 'the rule'} over the top {s['top_k']} candidates "
                  f"(lexical{', embedding' if s['embedding_retrieval'] else ''}) and word {s['ngram']}-gram overlaps; "
                  f"test files {', '.join(s['decontaminate'])}; {shuffle}."]
    lines += provenance_markdown(stats["provenance"])
    return "\n".join(lines) + "\n"


def decontamination_markdown(d: dict) -> list[str]:
    items, retrieval, labels = d["test_items"], d["retrieval"], d["pair_labels"]
    decider = "an LLM judge" if d["decided_by"] == "judge" else "the rule (personamath/same_problem.py)"
    policy = "same problem and siblings" if d["policy"] == "sibling" else "same problem only"
    lines = ["", "## Decontamination", "",
             f"Against {items['distinct']} distinct test problems ({items['read']} read). Retrieval proposed "
             f"{retrieval['pairs']} candidate pairs for {retrieval['rows_with_candidates']} rows; {decider} decided "
             f"each: " + (", ".join(f"{n} {label}" for label, n in sorted(labels.items())) or "none") + ".",
             f"Removed ({policy}): {d['removed']} rows. Siblings kept: {d['siblings_kept']} rows "
             "(siblings_kept.jsonl). Seconds: " + ", ".join(f"{k.removeprefix('seconds_')} {v}"
                                                             for k, v in d["seconds"].items()) + "."]
    if d["judge"] is not None:
        j = d["judge"]
        lines.append(f"Judge {j['model']} ({j['prompt']}): {j['pairs']} pairs, {j['requests']} requests sent, "
                     f"{j['cache_hits']} cached, spent at most ${j['spent_usd_at_most']:.4f}.")
    for title, examples in (("Removed", d["examples"]["removed"]), ("Siblings kept", d["examples"]["siblings_kept"])):
        if examples:
            lines += ["", f"{title} (first {len(examples)}; all in the jsonl, each with its scores):", "",
                      "| row problem | test item | reason |", "|---|---|---|"]
            lines += [f"| {_cell(e['problem'])} | {e['test_id']}: {_cell(e['test_problem'])} | {_cell(e['reason'])} |"
                      for e in examples]
    return lines


def _cell(text: str, width: int = 120) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def _percent(fraction) -> str:
    return f"{100 * fraction:.1f}%" if isinstance(fraction, (int, float)) else "-"
