"""Decontamination on real files with the real embedding model: persona-wrapped, short and paraphrased test
problems are removed, genuine train rows kept; the LLM judge over real HTTP decides the paraphrase candidates."""
import asyncio
import json
import os
import re
import threading
from collections import Counter

import pytest
from aiohttp import web
from conftest import DATA, run_here

from personamath.data import load_any
from personamath.dataset import main
from personamath import decontamination
from personamath.jsonl import read_jsonl, write_jsonl

os.environ["HF_HUB_OFFLINE"] = "1"  # the model comes from the package's files, never from a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

GSM8K_TEST = load_any(DATA / "gsm8k" / "test.jsonl")[1]
MATH500 = load_any(DATA / "math" / "math500_test.jsonl")[1]
# 45 words, no number: the judge below compares numbers.
PREAMBLE = ("As a community nurse who spends long shifts visiting elderly patients across the valley, I often end up "
            "puzzling over small everyday questions while I drive between houses, and today one of my patients asked "
            "me something that I could not answer straight away, so here it is: ")
BAKER = "As a baker, I need this: "
# Written for this test: the same problem as the test item named (file, id), reworded, every number kept.
# MATH-500's problems are named in MATH test, given first, from which MATH-500 is drawn.
PARAPHRASES = {
    ("gsm8k/test.jsonl", "test:1"):
        "Every day the ducks on Janet's farm produce 16 eggs. Three of them she has for breakfast each morning, and "
        "she uses four daily to bake muffins for friends. Whatever is left she sells at the farmers' market, charging "
        "$2 for each fresh egg. What are her daily earnings, in dollars, at the market?",
    ("gsm8k/test.jsonl", "test:3"):
        "Josh buys a house for $80,000 to flip it and spends $50,000 on renovations, which raises the house's value by "
        "150%. What was his profit?",
    ("gsm8k/test.jsonl", "test:4"):
        "Three times a week, James runs 3 sprints, and each sprint is 60 meters long. What is the total distance in "
        "meters he covers weekly?",
    ("gsm8k/test.jsonl", "test:6"):
        "A glass costs $5 at the shop, but every second glass is sold at only 60% of that price. Kylar needs 16 "
        "glasses for his new flat. What will he pay in total?",
    ("gsm8k/test.jsonl", "test:7"):
        "Seattle has 20 sheep. Charleston owns 4 times as many sheep as Seattle, and Toulouse owns twice as many as "
        "Charleston. How many sheep do the three cities have in total?",
    ("math/MATH_test.jsonl", "test/number_theory/572.json"):
        "Find the number of positive integer divisors of 196.",
    ("math/MATH_test.jsonl", "test/prealgebra/1622.json"):
        "Six equilateral triangles make up a regular hexagon. One of the triangles has a perimeter of 21 inches. In "
        "inches, what is the perimeter of the hexagon?",
}
# Eliza's overtime (gsm8k test line 10) with other numbers: the same template, a different problem.
OTHER_NUMBERS = ("Eliza's rate per hour for the first 35 hours she works each week is $12. She also receives an "
                 "overtime pay of 1.5 times her regular hourly rate. If Eliza worked for 41 hours this week, how much "
                 "are her earnings for this week?")
# Of the 200 train rows below, those removed, measured: none of GSM8K's; of MATH's, 3 by overlap (one a test
# problem verbatim, two sharing its template) and 6 by embeddings alone (the same template with other numbers:
# what --judge llm is for). MATH's train and test sets overlap this much by themselves.
GENUINE_REMOVED = {"ngram": 3, "embedding": 6}


def row(row_id, problem, response="Solution. The answer is 7.", source="gsm8k"):
    return {"id": row_id, "parent_id": None, "source": source, "stage": "cot", "problem": problem,
            "response": response, "gold": "7", "persona": None, "persona_id": None, "model": "test-model",
            "prompt_version": "solve-v1"}


def genuine_rows() -> list[dict]:
    """200 train problems with their reference solutions: 100 GSM8K and 100 MATH, spread over the files."""
    rows = []
    for name, source, key_q, key_a in (("gsm8k/train.jsonl", "gsm8k", "question", "answer"),
                                       ("math/MATH_train.jsonl", "math", "problem", "solution")):
        records = read_jsonl(DATA / name)
        rows += [row(f"{source}/train:{i}", records[i][key_q], records[i][key_a], source)
                 for i in range(0, len(records), len(records) // 100)][:100]
    return rows


def contaminated_rows() -> dict[str, tuple[dict, str]]:
    """id -> (row, the method expected to catch it)."""
    short = [p for p in MATH500 if len(re.findall(r"\w+", p.question)) < 13][:20]
    train = read_jsonl(DATA / "gsm8k" / "train.jsonl")
    rows = {}
    for i in range(20, 40):
        rows[f"wrapped:{i}"] = row(f"wrapped:{i}", PREAMBLE + GSM8K_TEST[i].question), "ngram"
    for j, i in enumerate(range(40, 45)):  # the test problem only in the response
        rows[f"in-response:{i}"] = row(f"in-response:{i}", train[5000 + j]["question"],
                                       f"Restating the question: {GSM8K_TEST[i].question} The answer is 7."), "ngram"
    for p in short:
        rows[f"baker:{p.id}"] = row(f"baker:{p.id}", BAKER + p.question, source="math"), "containment"
    for (_, test_id), text in PARAPHRASES.items():
        rows[f"paraphrase:{test_id}"] = row(f"paraphrase:{test_id}", text), "embedding"
    return rows


def build(tmp_path, rows, *flags):
    write_jsonl(tmp_path / "cot.jsonl", rows)
    out = tmp_path / "out"
    status = main(["--inputs", str(tmp_path / "cot.jsonl"), "--output_dir", str(out), "--no_shuffle", *flags])
    return status, out


def test_rewrites_removed_genuine_rows_kept(tmp_path):
    """Through the real CLI, offline: every wrapped, short and paraphrased test problem goes, by the
    expected method, and the genuine train rows stay."""
    contaminated = contaminated_rows()
    genuine = genuine_rows()
    write_jsonl(tmp_path / "cot.jsonl", genuine + [r for r, _ in contaminated.values()])
    out = tmp_path / "out"
    result = run_here("build_dataset.py", "--inputs", tmp_path / "cot.jsonl", "--output_dir", out,
                      env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr

    removed = {r["id"]: r for r in read_jsonl(out / "removed_contaminated.jsonl")}
    assert {i: r["method"] for i, r in removed.items() if i in contaminated} == \
           {i: method for i, (_, method) in contaminated.items()}
    genuine_removed = [r for i, r in removed.items() if i not in contaminated]
    assert all(r["source"] == "math" for r in genuine_removed)
    assert Counter(r["method"] for r in genuine_removed) == GENUINE_REMOVED
    assert removed["in-response:40"]["field"] == "response"
    for file, test_id in PARAPHRASES:
        r = removed[f"paraphrase:{test_id}"]
        assert r["matched_test_file"].endswith(file) and r["matched_test_id"] == test_id
        assert (r["decided_by"], r["verdict"]) == ("threshold", None) and r["score"] >= 0.75
    wrapped = removed["wrapped:20"]
    assert (wrapped["score"], wrapped["matched_test_text"], wrapped["decided_by"]) == \
           (1.0, GSM8K_TEST[20].question, "overlap")

    stats = json.loads((out / "stats.json").read_text())
    d = stats["decontamination"]
    assert d["removed_by_method"] == {"ngram": 25 + GENUINE_REMOVED["ngram"], "containment": 20,
                                      "embedding": len(PARAPHRASES) + GENUINE_REMOVED["embedding"]}
    assert d["decided_by"] == "threshold" and d["judge"] is None
    assert d["test_items"]["read"] == 1319 + 5000 + 500 and d["test_items"]["distinct"] < 1319 + 5000 + 500
    assert stats["removed"]["contaminated"] == len(removed)
    assert "| containment | 20 |" in (out / "stats.md").read_text()


# ----------------------------------------------------------------------------- the judge

class JudgeServer:
    """An OpenAI-compatible judge on 127.0.0.1, deterministic: "same" when both problems hold the same
    numbers, "different" otherwise, and an answer without a verdict for the James sprints item."""

    def __init__(self):
        self.pairs = []
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()

    async def _start(self):
        app = web.Application()
        app.add_routes([web.post("/v1/chat/completions", self._chat)])
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"

    async def _chat(self, request):
        prompt = (await request.json())["messages"][-1]["content"]
        a, b = re.search(r"Problem A \(training set\):\n(.*)\n\nProblem B \(test set\):\n(.*)\n\nReply", prompt,
                         re.DOTALL).groups()
        self.pairs.append((a, b))
        numbers = [set(re.findall(r"\d+(?:[.,]\d+)*", text)) for text in (a, b)]
        answer = ("I would need more context." if "James decides" in b else
                  f"VERDICT: {'same' if numbers[0] == numbers[1] else 'different'}")
        return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 100, "completion_tokens": 4}})

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def judge_server():
    server = JudgeServer()
    yield server
    server.close()


def test_judge_decides_candidates(tmp_path, judge_server):
    """Pairs above the threshold go to the judge; "different" keeps the row, "same" and no verdict remove it;
    the stats say so; a rerun sends nothing (cached)."""
    rows = [row(f"paraphrase:{test_id}", text) for (_, test_id), text in PARAPHRASES.items()]
    rows += [row("other-numbers", OTHER_NUMBERS)] + genuine_rows()[:50]
    flags = ("--judge", "llm", "--judge_base_url", judge_server.url, "--judge_model", "judge-test")
    assert build(tmp_path, rows, *flags)[0] == 0

    removed = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "removed_contaminated.jsonl")}
    kept = {r["id"] for r in read_jsonl(tmp_path / "out" / "PersonaMathQA.jsonl")}
    assert "other-numbers" in kept
    assert OTHER_NUMBERS in [a for a, _ in judge_server.pairs]  # it was above the threshold, and judged
    assert set(removed) == {f"paraphrase:{test_id}" for _, test_id in PARAPHRASES}
    assert removed.pop("paraphrase:test:4")["verdict"] == "unparseable"  # James: removed all the same
    assert {r["verdict"] for r in removed.values()} == {"same"}
    assert {r["decided_by"] for r in removed.values()} == {"judge"}

    d = json.loads((tmp_path / "out" / "stats.json").read_text())["decontamination"]
    judge = d["judge"]
    assert d["decided_by"] == "judge"
    assert judge["pairs"] == judge["requests"] == len(judge_server.pairs) == d["paraphrase"]["pairs_above_threshold"]
    assert judge["verdicts"]["unparseable"] >= 1 and judge["verdicts"]["different"] >= 1
    assert judge["rows_kept_by_judge"] >= 1 and judge["model"] == "judge-test"

    sent = len(judge_server.pairs)
    assert build(tmp_path, rows, *flags)[0] == 0
    assert len(judge_server.pairs) == sent  # all answers came from the cache
    judge = json.loads((tmp_path / "out" / "stats.json").read_text())["decontamination"]["judge"]
    assert (judge["requests"], judge["cache_hits"]) == (0, sent)


# ----------------------------------------------------------------------------- units

def test_shipped_test_embeddings_are_the_models(tmp_path):
    """The shipped embeddings of the default test sets are what the model computes here (40 items spread
    over the files), and the default run uses them: it computes none."""
    embedder = decontamination.Embedder()
    items, _ = decontamination.load_test_items(decontamination.DEFAULT_TEST_FILES)
    shipped = embedder.encode_cached(items, tmp_path)
    assert list(tmp_path.iterdir()) == []  # found in data/decontamination, nothing computed or written
    sample = list(range(0, len(items), len(items) // 40))
    fresh = embedder.encode([items[i].text for i in sample])
    assert (shipped[sample] * fresh).sum(1).min() > 0.999
    assert (shipped[sample] - fresh).abs().max() < 2e-3  # float16 storage, nothing more


def test_computed_embeddings_are_cached(tmp_path):
    """Test files other than the shipped ones are embedded once, stored whole, then read back."""
    embedder = decontamination.Embedder()
    items = [decontamination.TestItem("f", str(i), p.question) for i, p in enumerate(GSM8K_TEST[:5])]
    first = embedder.encode_cached(items, tmp_path)
    (cached,) = tmp_path.iterdir()
    assert cached.name.endswith(".fp16.npy")
    assert torch_equal(embedder.encode_cached(items, tmp_path), first)
    changed = embedder.encode_cached(items[:4], tmp_path)  # other texts, another file
    assert len(list(tmp_path.iterdir())) == 2 and changed.shape[0] == 4


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_overlap_from_the_test_items_side():
    """Half of a test item's n-grams suffice however long the row; a short item is matched by containment,
    operators included, in the problem or the response."""
    long_item = " ".join(f"w{i}" for i in range(20))  # 8 distinct 13-grams
    items = [decontamination.TestItem("t.jsonl", "long", long_item),
             decontamination.TestItem("t.jsonl", "short", "Evaluate $(1+2i)6-3i$.")]
    index = decontamination.OverlapIndex(items, 13)
    padding = " ".join(["filler"] * 500)
    half = " ".join(f"w{i}" for i in range(16))  # 4 of the 8
    match = index.match(row("a", f"{padding} {half} {padding}"))
    assert (match.item.id, match.method, match.score, match.field) == ("long", "ngram", 0.5, "problem")
    match = index.match(row("b", "What is 2?", f"First, evaluate (1 + 2i)6 - 3i, which is {padding}"))
    assert (match.item.id, match.method, match.score, match.field) == ("short", "containment", 1.0, "response")
    assert index.match(row("c", "Evaluate $(1+2i)6+3i$.")) is None  # another sign: another problem


def test_diagram_code_is_not_overlap():
    """Two MATH problems that share only their [asy] boilerplate do not match; one that also shares the words does."""
    asy = "[asy] " + " ".join(f"draw((0,{i})--(8,{i}));" for i in range(30)) + " [/asy]"
    test = f"The results of a cross-country team's training run are graphed below. Which student is fastest? {asy}"
    index = decontamination.OverlapIndex([decontamination.TestItem("t.jsonl", "t", test)], 13)
    assert index.match(row("a", f"How far did the red car go in the first hour of the trip? {asy}")) is None
    assert index.match(row("b", test.replace("draw((0,3)", "draw((1,3)"))).score == 1.0


def test_judge_needs_the_paraphrase_pass(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build(tmp_path, [row("a", "What is 1+1?")], "--judge", "llm", "--no_paraphrase")
    assert exit_info.value.code == 2
    assert "--judge llm decides the paraphrase pass's candidates" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("answer,verdict", [("VERDICT: same", "same"), ("verdict: Different.", "different"),
                                            ("**VERDICT:** same", "same"), ("They look alike.", "unparseable"),
                                            ("VERDICT: same\nVERDICT: different", "different")])
def test_parse_verdict(answer, verdict):
    assert decontamination.parse_verdict(answer) == verdict
