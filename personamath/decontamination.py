"""Test-set decontamination for build_dataset.py: retrieval proposes, a same-problem decision disposes.

A row is contaminated when it is the same problem as a test item (identical, reworded, reordered,
wrapped in a persona: the same quantities and the same question), so that training on it leaks that
item's answer. A sibling (the same template with other numbers, another quantity asked, another
figure) is kept and reported, unless --contamination_policy sibling asks for the stricter rule.

1. Candidates (retrieval.py): the --top_k test items nearest each row's problem by TF-IDF over its
   words and quantities, the test items whose word n-grams it holds, and with --embedding_retrieval
   the --top_k nearest by all-MiniLM-L6-v2. No similarity threshold: every candidate is decided.
2. The decision, for every candidate pair: without a judge (the default), same_problem.py's rule
   compares the mathematics (the quantities, the expressions, what is asked); with --judge llm, an
   LLM asked to label the pair same, sibling or different, its answers cached, paced, batched with
   --judge_args --batch and capped by --judge_max_cost like every other request.
3. A pair not the same is a sibling when their lexical cosine reaches --sibling_similarity (or the
   judge said so); the row's best sibling is reported in siblings_kept.jsonl.
The thresholds were measured on hand-labelled cases: bench/bench_decontamination.py.
"""
import argparse
import asyncio
import re
import shlex
import time
from collections import Counter
from pathlib import Path

from . import batch, stage
from .data import load_any
from .errors import UserError
from .llm import add_llm_args
from .paths import user_cache_dir
from .prompts import load_prompt
from .retrieval import Embedder, LexicalIndex, OverlapIndex, TestItem, nearest
from .same_problem import Problem, Thresholds, compare

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEST_FILES = [ROOT / "data" / "gsm8k" / "test.jsonl", ROOT / "data" / "math" / "MATH_test.jsonl",
                      ROOT / "data" / "math" / "math500_test.jsonl"]
DEFAULT_CACHE_DIR = user_cache_dir() / "decontamination"
JUDGE = load_prompt("decontam_judge")
VERDICT = re.compile(r"VERDICT\W*(same|sibling|different)\b", re.IGNORECASE)
EXAMPLES = 5  # removed rows and kept siblings shown in stats.md


def add_decontamination_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decontamination")
    g.add_argument("--decontaminate", nargs="+", default=[str(f) for f in DEFAULT_TEST_FILES], metavar="FILE",
                   help="GSM8K/MATH test files (format detected per file) whose problems must not leak into training "
                        "(default: data/gsm8k/test.jsonl data/math/MATH_test.jsonl data/math/math500_test.jsonl)")
    g.add_argument("--contamination_policy", choices=["same", "sibling"], default="same",
                   help="same (default): remove the rows that are the same problem as a test item, keep and report "
                        "siblings; sibling: remove siblings too")
    g.add_argument("--top_k", type=int, default=10,
                   help="candidate test items per row from each retriever, decided whatever their similarity "
                        "(default 10: every hand-labelled rewrite's test item was within the top 9)")
    g.add_argument("--ngram", type=int, default=13,
                   help="words per n-gram of the overlap retriever (default 13)")
    g.add_argument("--embedding_retrieval", action="store_true",
                   help="also propose the --top_k nearest test items by all-MiniLM-L6-v2 (about 50 rows/s on a "
                        "2-core CPU; the test items' embeddings are shipped)")
    g.add_argument("--embedding_cache_dir", default=str(DEFAULT_CACHE_DIR),
                   help=f"where other test sets' embeddings are cached (default {DEFAULT_CACHE_DIR})")
    g.add_argument("--added_quantity_overlap", type=float, default=0.5,
                   help="the rule's step 3: a row clause sharing this share of its words with the test item may "
                        "state no quantity the test item lacks (default 0.5, measured)")
    g.add_argument("--max_added_quantities", type=int, default=1,
                   help="the rule's step 3: quantities a row may state that the test item lacks, wherever they are "
                        "(default 1: a persona's \"in my 20 years\"; measured)")
    g.add_argument("--setting_overlap", type=float, default=0.3,
                   help="the rule's step 4: the least share of a test item's words in the row, raised by 0.15 for "
                        "each quantity or expression under 3 the test item has (default 0.3, measured)")
    g.add_argument("--answers", choices=["use", "ignore"], default="use",
                   help="use (default): where a row's gold and the test item's are both known, a row answered "
                        "otherwise is not the same problem and one answered alike needs less textual evidence; "
                        "ignore: the texts alone decide (as for rows without a gold)")
    g.add_argument("--sibling_similarity", type=float, default=0.5,
                   help="lexical cosine from which a pair that is not the same problem is reported as a sibling "
                        "(default 0.5, measured)")
    g.add_argument("--judge", choices=["off", "llm"], default="off",
                   help="who decides the candidate pairs: off, the rule (default); llm, an LLM judge on every pair "
                        "(about rows x --top_k requests; a full-scale run should use it)")
    g.add_argument("--judge_model", default="gpt-4o-mini")
    g.add_argument("--judge_base_url", default=None,
                   help="OpenAI-compatible endpoint of the judge (default: $OPENAI_BASE_URL or the OpenAI API; "
                        "the key comes from $OPENAI_API_KEY); answers are cached in OUTPUT_DIR/judge_cache.sqlite")
    g.add_argument("--judge_max_cost", type=float, default=None,
                   help="hard cap in USD on the judge's requests; at the cap nothing is written (exit 3) and a rerun "
                        "with a higher cap pays nothing twice")
    g.add_argument("--judge_args", default="",
                   help="more flags of the stages' LLM client and batch mode for the judge, one string, e.g. "
                        "\"--batch --concurrency 64\" (see gen_cot.py --help)")


def check_args(args: argparse.Namespace) -> None:
    for name in ("added_quantity_overlap", "setting_overlap", "sibling_similarity"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    for name in ("ngram", "top_k"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")


def load_test_items(paths) -> tuple[list[TestItem], int]:
    """Every distinct test problem, and the number read. A problem in several files (MATH-500 is drawn
    from MATH test) is kept once, under the first file given, so it is embedded and judged once."""
    items, seen, read = [], set(), 0
    for path in paths:
        for problem in load_any(path)[1]:
            read += 1
            key = " ".join(problem.question.split())
            if key not in seen:
                seen.add(key)
                items.append(TestItem(str(path), problem.id, problem.question, problem.gold))
    return items, read


# ----------------------------------------------------------------------------- candidates

def retrieve(row: dict, problem: Problem, lexical: LexicalIndex, overlap: OverlapIndex, embedded, k: int) -> dict:
    """{test index: its retrieval scores} in order of first proposal, for one row; `embedded`: the
    row's (test index, cosine) pairs by embedding, best first (empty without --embedding_retrieval)."""
    scores = {}
    for rank, (i, score) in enumerate(lexical.nearest(problem, k), 1):
        scores.setdefault(i, {})["lexical"] = round(score, 4)
        scores[i]["lexical_rank"] = rank
    for i, share in overlap.matches(row["problem"], k):
        scores.setdefault(i, {})["ngram_share"] = round(share, 4)
    for rank, (i, cosine) in enumerate(embedded, 1):
        scores.setdefault(i, {})["embedding"] = round(cosine, 4)
        scores[i]["embedding_rank"] = rank
    return scores


def embedding_neighbours(rows: list[dict], items: list[TestItem], args) -> list[list[tuple[int, float]]]:
    """Each row's --top_k nearest test items by MiniLM embeddings (--embedding_retrieval)."""
    embedder = Embedder()
    test_embeddings = embedder.encode_cached(items, args.embedding_cache_dir)
    return nearest(embedder.encode([row["problem"] for row in rows]), test_embeddings, args.top_k)


# ----------------------------------------------------------------------------- the judge

def judge_client(args: argparse.Namespace, output_dir: Path):
    """The stages' LLM client for the judge: deterministic short answers, cached beside the outputs,
    paced, capped by --judge_max_cost, batched with --judge_args --batch."""
    p = argparse.ArgumentParser()
    add_llm_args(p)
    batch.add_batch_args(p)
    argv = ["--model", args.judge_model, "--temperature", "0", "--max_tokens", "64",
            "--cache", str(Path(output_dir) / "judge_cache.sqlite")]
    argv += ["--max_cost", str(args.judge_max_cost)] if args.judge_max_cost is not None else []
    try:
        llm_args = p.parse_args([*argv, *shlex.split(args.judge_args)])
    except SystemExit:
        raise UserError(f"--judge_args {args.judge_args!r}: not flags of the LLM client (see gen_cot.py --help)")
    llm_args.base_url = args.judge_base_url
    return stage.make_client(llm_args, output_dir), llm_args


def parse_verdict(text: str) -> str:
    """same, sibling or different from the answer's last VERDICT line; unparseable without one."""
    verdicts = VERDICT.findall(text)
    return verdicts[-1].lower() if verdicts else "unparseable"


def judge(pairs: list[tuple[str, str]], args, output_dir: Path) -> tuple[list[str], dict]:
    """The judge's verdict on each (row problem, test problem) pair, and its account."""
    llm, llm_args = judge_client(args, output_dir)

    async def work(pair):
        index, (row_problem, test_problem) = pair
        prompt = JUDGE.render(row_problem=row_problem, test_problem=test_problem)
        reply = await llm.chat([{"role": "user", "content": prompt}], kind="judge")
        return stage.Outcome(kept=[(index, parse_verdict(reply.text))], attempted=1)

    verdicts = {}
    result = asyncio.run(stage.run_items(list(enumerate(pairs)), work, llm, "judge", 1, llm_args.stall_timeout,
                                         emit=lambda outcome: verdicts.update(outcome.kept),
                                         item_id=lambda pair: f"pair {pair[0]}"))
    where = f"judge at {llm.base_url}"
    if result.stalled:
        raise UserError(f"{where}: stopped: {result.stalled}; the answered pairs are cached, so the same command "
                        f"resumes")
    if result.finished < result.inputs and not result.failed_ids:
        raise UserError(f"{where}: stopped at --judge_max_cost ${llm.max_cost} (spent at most ${llm.spent:.4f}) "
                        f"after {result.finished} of {result.inputs} pairs; nothing is written: rerun with a higher "
                        f"cap, the answered pairs are cached", status=stage.EXIT_BUDGET)
    if result.failed_ids or result.rejected_by_server:
        failed = len(result.failed_ids) + len(result.rejected_by_server)
        raise UserError(f"{where}: {failed} of {len(pairs)} requests failed after every retry; the answered ones "
                        f"are cached, so a rerun sends only these")
    account = {"model": llm.model, "base_url": llm.base_url, "prompt": JUDGE.version, "pairs": len(pairs),
               "requests": llm.ledger.requests, "cache_hits": llm.ledger.cache_hits,
               "spent_usd_at_most": llm.spent, "max_cost_usd": llm.max_cost, "ledger": llm.ledger.as_dict(),
               **({"batch": llm.transport.summary()} if getattr(llm, "transport", None) else {})}
    return [verdicts[i] for i in range(len(pairs))], account


# ----------------------------------------------------------------------------- the decision

def decontaminate(rows: list[dict], args: argparse.Namespace, output_dir: Path) -> tuple[list, list, list, dict]:
    """(kept rows in input order, removed rows with the pair that removed them, the siblings kept with
    their nearest test item, statistics). Row by row: a row's problem is parsed once, for its
    retrieval and (by the rule) its decisions, and let go; of its pairs only what removed it or made it
    a sibling is kept (at v2's size, every row's parsed problem and ten decided pairs held to the end
    took most of build_dataset's memory)."""
    items, read = load_test_items(args.decontaminate)
    tests = [Problem(item.text, item.gold) for item in items]
    timings = {"seconds_lexical_and_overlap": 0.0, "seconds_deciding": 0.0}
    started = time.monotonic()
    lexical, overlap = LexicalIndex(tests), OverlapIndex(items, args.ngram)
    timings["seconds_lexical_and_overlap"] += time.monotonic() - started
    if args.embedding_retrieval:
        started = time.monotonic()
        embedded = embedding_neighbours(rows, items, args)
        timings["seconds_embedding"] = round(time.monotonic() - started, 1)
    thresholds = Thresholds(args.added_quantity_overlap, args.setting_overlap, args.max_added_quantities,
                            use_answers=args.answers == "use")
    removed_labels = {"same"} | ({"sibling"} if args.contamination_policy == "sibling" else set())
    # An unparseable answer removes the row: a leak costs more than a lost row.
    removed_labels |= {"unparseable"} if args.judge == "llm" else set()
    kept, removed, siblings, labels = [], [], [], Counter()
    pairs, rows_with_candidates = 0, 0

    def settle(row: dict, scores: dict, decisions: dict) -> None:
        """The row kept, removed (by its first pair labelled to remove it) or kept as a sibling."""
        labels.update(label for label, _ in decisions.values())
        labelled = {label: [i for i in scores if decisions[i][0] == label] for label in ("same", "unparseable", "sibling")}
        hit = next((labelled[label][0] for label in ("same", "unparseable", "sibling")
                    if label in removed_labels and labelled[label]), None)
        if hit is not None:
            removed.append({**row, "contamination": explanation(items[hit], scores[hit], decisions[hit], args)})
        else:
            kept.append(row)
            if labelled["sibling"]:
                sibling = labelled["sibling"][0]
                siblings.append({k: row.get(k) for k in ("id", "stage", "source", "problem")} |
                                explanation(items[sibling], scores[sibling], decisions[sibling], args))

    to_judge = []  # (row index, its scores): the judge decides every pair at once, concurrently
    for r, row in enumerate(rows):
        started = time.monotonic()
        problem = Problem(row["problem"], row.get("gold"))
        scores = retrieve(row, problem, lexical, overlap, embedded[r] if args.embedding_retrieval else (), args.top_k)
        decided = time.monotonic()
        timings["seconds_lexical_and_overlap"] += decided - started
        pairs += len(scores)
        rows_with_candidates += bool(scores)
        if args.judge == "llm":
            to_judge.append((r, scores))
            continue
        decisions = {}
        for i in scores:
            verdict = compare(problem, tests[i], thresholds)
            sibling = scores[i].get("lexical", 0.0) >= args.sibling_similarity or "ngram_share" in scores[i]
            decisions[i] = ("same" if verdict.same else "sibling" if sibling else "different", verdict.reason)
        settle(row, scores, decisions)
        timings["seconds_deciding"] += time.monotonic() - decided
    account = None
    if args.judge == "llm":
        started = time.monotonic()
        judged = [(r, i) for r, scores in to_judge for i in scores]
        verdicts, account = judge([(rows[r]["problem"], items[i].text) for r, i in judged], args, output_dir)
        verdict_of = dict(zip(judged, verdicts))
        for r, scores in to_judge:
            settle(rows[r], scores, {i: (verdict_of[(r, i)], f"judge: {verdict_of[(r, i)]}") for i in scores})
        timings["seconds_deciding"] = time.monotonic() - started
    timings = {k: round(v, 1) for k, v in timings.items()}
    stats = {"test_items": {"read": read, "distinct": len(items)},
             "retrieval": {"top_k": args.top_k, "ngram": args.ngram, "embedding": args.embedding_retrieval,
                           "pairs": pairs, "rows_with_candidates": rows_with_candidates},
             "decided_by": "judge" if account else "rule", "policy": args.contamination_policy,
             "pair_labels": dict(labels), "removed": len(removed), "siblings_kept": len(siblings),
             "judge": account, "seconds": timings,
             "examples": {"removed": [_example(r["problem"], r["contamination"]) for r in removed[:EXAMPLES]],
                          "siblings_kept": [_example(s["problem"], s) for s in siblings[:EXAMPLES]]}}
    return kept, removed, siblings, stats


def explanation(item: TestItem, scores: dict, decision: tuple[str, str], args) -> dict:
    label, reason = decision
    return {"test_file": item.file, "test_id": item.id, "test_problem": item.text, "retrieval": scores,
            "label": label, "decided_by": "judge" if args.judge == "llm" else "rule", "reason": reason}


def _example(problem: str, contamination: dict) -> dict:
    return {"problem": problem, "test_id": contamination["test_id"], "test_problem": contamination["test_problem"],
            "reason": contamination["reason"]}
