"""Decontamination on real files: the same-problem rule against adversarial siblings and rewrites, the
hand-labelled cases through the real CLI (every verdict explained), the LLM judge over real HTTP on every
candidate pair, and the shipped embeddings."""
import asyncio
import json
import os
import re
import threading

import pytest
from aiohttp import web
from conftest import DATA, ROOT, run_here

from personamath import decontamination, retrieval
from personamath.data import load_any
from personamath.dataset import main
from personamath.jsonl import read_jsonl, write_jsonl
from personamath.same_problem import Problem, Thresholds, compare, quantities, same_answer

os.environ["HF_HUB_OFFLINE"] = "1"  # the model comes from the package's files, never from a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

CASES = [json.loads(line) for name in ("cases_gsm8k", "cases_math")
         for line in (ROOT / "bench" / "decontamination" / f"{name}.jsonl").open()]
TESTS = {(f, p.id): p.question for f in ("gsm8k/test.jsonl", "math/MATH_test.jsonl", "math/math500_test.jsonl")
         for p in load_any(DATA / f)[1]}
THRESHOLDS = Thresholds(added_quantity_overlap=0.5, setting_overlap=0.3, max_added_quantities=1)
GSM8K_TEST = load_any(DATA / "gsm8k" / "test.jsonl")[1]
JANET = GSM8K_TEST[0].question  # 16 eggs, 3 for breakfast, 4 for muffins, $2 each


def row(row_id, problem, gold="7", source="gsm8k"):
    return {"id": row_id, "parent_id": None, "source": source, "stage": "cot", "problem": problem,
            "response": f"Solution. The answer is $\\boxed{{{gold}}}$.", "gold": gold, "persona": None,
            "persona_id": None, "model": "test-model", "prompt_version": "solve-v1"}


def same(row_text: str, test_text: str) -> bool:
    return compare(Problem(row_text), Problem(test_text), THRESHOLDS).same


# ----------------------------------------------------------------------------- the rule, adversarially

FOOTBALL = ("A football team has 105 members.  There are twice as many players on the offense as there is on the "
            "defense. There is half the number of players on the special teams as there is on the defense.  How many "
            "players are on the defense?")
GRAPH = ("Below is the graph of $y = a \\sin bx$ for some constants $a < 0$ and $b > 0.$  Find $b.$\n\n[asy]"
         "import TrigMacros;\nsize(400);\nreal g(real x) { return (-2*sin(x/3)); }\ndraw(graph(g,-3*pi,3*pi,n=700,"
         "join=operator ..),red);\n[/asy]")


@pytest.mark.parametrize("rewrite", [
    # every sentence reordered, the question first, numbers in words, a persona's voice
    "How much money does Janet pull in at the farmers' market each day? I run a small stall next to hers. "
    "She sells every leftover egg for $2. Her ducks lay sixteen eggs a day; three go to her breakfast and four "
    "into muffins for her friends.",
    # a persona's unrelated number in its own clause
    "I've kept bees for 20 years, so farm sums are my thing: Janet's ducks lay 16 eggs per day, she eats 3 for "
    "breakfast, bakes muffins with 4, and sells the rest at $2 per egg. How much in dollars does she make daily "
    "at the farmers' market?",
    # the test item verbatim inside a persona's sentences
    f"As a school nurse I love a puzzle. {JANET} Thanks, it made my lunch break!",
])
def test_rewrites_of_a_test_item_are_the_same_problem(rewrite):
    assert same(rewrite, JANET)


@pytest.mark.parametrize("sibling,why", [
    (JANET.replace("16", "18"), "one number changed"),
    (JANET.replace("four", "five"), "a number in words changed"),
    (JANET + " She also gives 5 of the eggs to her friends.", "a condition added"),
    (FOOTBALL.replace("on the defense?", "on the offense?"), "another quantity asked of the same story"),
    (GRAPH.replace("Find $b.$", "Find $a.$"), "the same figure code with another question"),
    ("How many ways are there to put 4 balls in 3 boxes if the balls are distinguishable but the boxes are not? "
     "Also count the ways with 5 balls.", "a quantity added in the question"),
])
def test_siblings_are_not_the_same_problem(sibling, why):
    test = {"one number changed": JANET, "a number in words changed": JANET, "a condition added": JANET,
            "another quantity asked of the same story": FOOTBALL,
            "the same figure code with another question": GRAPH}.get(
        why, "How many ways are there to put 4 balls in 3 boxes if the balls are distinguishable but the boxes "
             "are not?")
    assert not same(sibling, test), why


def test_short_problems_and_equivalent_latex():
    binomial = "Compute $\\dbinom{8}{4}$."
    assert same("As a chess coach I count pairings all day. Compute $\\binom{8}{4}$.", binomial)
    assert not same("Compute $\\dbinom{8}{3}$.", binomial)
    assert not same("Compute $\\dbinom{8}{4}+\\dbinom{8}{3}$.", binomial)
    radical = "What is $\\sqrt{53}$ in simplest radical form?"
    assert same("Write $\\sqrt{ 53 }$ in simplest radical form, please: my students asked.", radical)
    fraction = "Solve for $x$: $\\frac{x}2 + \\frac{x}3 = 5$"
    assert same("Find $x$ if $\\dfrac{x}{2}+\\dfrac{x}{3}=5$.", fraction)
    assert not same("Find $x$ if $\\dfrac{x}{2}-\\dfrac{x}{3}=5$.", fraction)


def test_problems_without_numbers():
    word = "Determine the number of ways to arrange the letters of the word THAT."
    assert not same("Determine the number of ways to arrange the letters of the word RADII.", word)
    assert same("Puzzle-setter here. Determine the number of ways to arrange the letters of the word THAT.", word)


@pytest.mark.parametrize("text,values", [
    ("one hundred and twenty dollars", {"120"}), ("one-sixth of them", {str(1 / __import__("decimal").Decimal(6))}),
    ("3 and a half", {"3.5"}), ("$\\frac{1}{2}$ of 1/2", {"0.5"}), ("a 25% tip", {"25", "0.25"}),
    ("twice as many", {"2"}), ("$1,000", {"1000"}), ("$1{,}000$", {"1000"}),
])
def test_quantities_by_value(text, values):
    assert {format(v, "f") for q in quantities(text) for v in q} == values


def test_unrelated_problems_sharing_numbers_are_not_the_same():
    """Two numbers in common and a few words: a coincidence, not a rewrite."""
    test = "The length of a rectangle is four times its width. The perimeter is 100 cm. What is its area?"
    row_text = ("A farmer plants 4 rows of 100 sunflowers along the north fence. How many sunflowers does she "
                "plant?")
    assert not same(row_text, test)


# ----------------------------------------------------------------------------- the labelled cases, end to end

def build(tmp_path, rows, *flags):
    write_jsonl(tmp_path / "cot.jsonl", rows)
    out = tmp_path / "out"
    status = main(["--inputs", str(tmp_path / "cot.jsonl"), "--output_dir", str(out), "--no_shuffle", *flags])
    return status, out


def genuine_rows(step: int = 75) -> list[dict]:
    """GSM8K and MATH train problems spread over the files: training data by the benchmarks' own split."""
    rows = []
    for name, source in (("gsm8k/train.jsonl", "gsm8k"), ("math/MATH_train.jsonl", "math")):
        rows += [row(f"{source}/train:{p.id}", p.question, p.gold, source) for p in load_any(DATA / name)[1][::step]]
    return rows


def test_labelled_cases_through_the_cli(tmp_path):
    """Every hand-labelled case (with its hand-computed gold) and 200 train problems (with theirs) through
    build_dataset.py with the defaults: the
    rewrites of test items go with their own test item named, verbatim wrappings all go, new problems and
    train problems stay, and every removal and kept sibling says why. The shares asserted are the ones
    bench/bench_decontamination.py measures, a little under (a regression fails here)."""
    rows = [row(c["case"], c["problem"], c["gold"], c["test_file"].split("/")[0]) for c in CASES] + genuine_rows()
    write_jsonl(tmp_path / "cot.jsonl", rows)
    out = tmp_path / "out"
    result = run_here("build_dataset.py", "--inputs", tmp_path / "cot.jsonl", "--output_dir", out,
                      env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    removed = {r["id"]: r["contamination"] for r in read_jsonl(out / "removed_contaminated.jsonl")}
    by_kind = {}
    own_item = []
    for case in CASES:
        by_kind.setdefault(case["kind"], []).append(case["case"] in removed)
        if case["case"] in removed and case["label"] == "same":
            why = removed[case["case"]]
            assert (why["label"], why["decided_by"]) == ("same", "rule") and why["reason"] and why["retrieval"]
            own_item.append(why["test_problem"] == TESTS[(case["test_file"], case["test_id"])])
    assert sum(own_item) >= 0.95 * len(own_item)  # MATH test holds a few near-copies of its own items
    assert all(by_kind["wrapped"])
    assert not any(by_kind["new"])
    assert sum(by_kind["paraphrase"]) >= 0.95 * len(by_kind["paraphrase"])
    assert sum(by_kind["sibling"]) <= 0.05 * len(by_kind["sibling"])
    genuine_removed = [i for i in removed if "/train:" in i]
    assert len(genuine_removed) <= 0.01 * len(genuine_rows())

    siblings = read_jsonl(out / "siblings_kept.jsonl")
    assert siblings and all(s["label"] == "sibling" and s["reason"] and s["test_id"] for s in siblings)
    assert not {s["id"] for s in siblings} & set(removed)
    stats = json.loads((out / "stats.json").read_text())["decontamination"]
    assert stats["removed"] == len(removed) and stats["siblings_kept"] == len(siblings)
    assert stats["decided_by"] == "rule" and stats["retrieval"]["pairs"] >= 10 * len(rows) * 0.9
    markdown = (out / "stats.md").read_text()
    assert f"Removed (same problem only): {len(removed)} rows. Siblings kept: {len(siblings)} rows" in markdown
    assert "| row problem | test item | reason |" in markdown


def test_answers_decide_where_known(tmp_path):
    """A rewrite answered otherwise leaks nothing: kept as a sibling, saying so; a verbatim copy is the
    test item's question whatever its gold; without golds, or with --answers ignore, the texts decide."""
    rewrite = ("How much does Janet make daily at the market? Her ducks lay 16 eggs a day, she eats 3 for "
               "breakfast and bakes muffins with 4, selling the remainder for $2 per fresh duck egg.")
    other_words = ("Every day sixteen eggs come from Janet's ducks. Breakfast takes three of them and the muffins "
                   "for her friends four. The rest go to the farmers' market at $2 apiece: what does she earn?")
    no_gold = ("A farm-stand question from a retired teacher: sixteen duck eggs daily, three eaten at breakfast, "
               "four baked into muffins, and every remaining egg sold for $2. Her market income per day?")
    rows = [row("rewrite-right", rewrite, "18"), row("rewrite-wrong", other_words, "26"),
            row("copy-wrong", f"As a farmer: {JANET}", "26"), row("rewrite-no-gold", no_gold, "")]
    assert build(tmp_path, rows)[0] == 0
    removed = {r["id"]: r["contamination"] for r in read_jsonl(tmp_path / "out" / "removed_contaminated.jsonl")}
    assert set(removed) == {"rewrite-right", "copy-wrong", "rewrite-no-gold"}
    [kept] = read_jsonl(tmp_path / "out" / "siblings_kept.jsonl")
    assert (kept["id"], kept["test_id"], kept["reason"]) == ("rewrite-wrong", "test:1",
                                                              "the answers differ (row 26, test item 18)")
    assert build(tmp_path, rows, "--answers", "ignore")[0] == 1  # every row goes: nothing kept
    assert len(read_jsonl(tmp_path / "out" / "removed_contaminated.jsonl")) == 4


@pytest.mark.parametrize("a,b,agree", [("18", "18.00", True), ("1,000", "1000", True), ("\\frac12", "\\dfrac{1}{2}", True),
                                       ("5\\text{ cm}", "5", True),
                                       ("18", "19", False), ("\\frac{1}{2}", "\\frac{1}{3}", False),
                                       ("", "7", None), (None, "7", None)])
def test_same_answer(a, b, agree):
    assert same_answer(a, b) is agree


# ----------------------------------------------------------------------------- the judge

JUDGE_ANSWERS = {"same": "VERDICT: same", "sibling": "Looks like a template.\nVERDICT: sibling",
                 "none": "I would need more context."}


class JudgeServer:
    """An OpenAI-compatible judge on 127.0.0.1, deterministic: "same" when both problems hold the same
    numbers, "sibling" when they share one, "different" otherwise, no verdict for the James sprints item."""

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
        verdict = "same" if numbers[0] == numbers[1] else "sibling" if numbers[0] & numbers[1] else "different"
        answer = "I would need more context." if "James decides" in b else f"VERDICT: {verdict}"
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


def test_judge_decides_every_candidate_pair(tmp_path, judge_server):
    """No threshold in front of the judge: every retrieved pair is sent. "same" and no verdict remove the row,
    "sibling" keeps and reports it; a rerun sends nothing (cached); a cap below the cost stops with exit 3
    and writes nothing."""
    sprints = GSM8K_TEST[3].question  # James decides to run 3 sprints 3 times a week ...
    rows = [row("janet-rewrite", JANET.replace("Janet", "Our farmer Jan")), row("sprints", sprints),
            row("janet-sibling", JANET.replace("16", "18")), *genuine_rows(step=1500)]
    flags = ("--judge", "llm", "--judge_base_url", judge_server.url, "--judge_model", "judge-test", "--top_k", "3")
    assert build(tmp_path, rows, *flags)[0] == 0
    out = tmp_path / "out"
    stats = json.loads((out / "stats.json").read_text())["decontamination"]
    assert len(judge_server.pairs) == stats["retrieval"]["pairs"] == stats["judge"]["requests"]
    assert stats["retrieval"]["pairs"] >= 3 * len(rows)  # every row's top 3, whatever their similarity
    removed = {r["id"]: r["contamination"] for r in read_jsonl(out / "removed_contaminated.jsonl")}
    assert removed["janet-rewrite"]["reason"] == "judge: same" and removed["janet-rewrite"]["test_id"] == "test:1"
    assert removed["sprints"]["label"] in ("same", "unparseable")
    assert stats["pair_labels"]["unparseable"] >= 1  # James: no verdict, which removes a row all the same
    siblings = {s["id"]: s for s in read_jsonl(out / "siblings_kept.jsonl")}
    assert siblings["janet-sibling"]["reason"] == "judge: sibling"
    assert "janet-sibling" in {r["id"] for r in read_jsonl(out / "PersonaMathQA.jsonl")}

    sent = len(judge_server.pairs)
    assert build(tmp_path, rows, *flags)[0] == 0
    assert len(judge_server.pairs) == sent  # all answers came from the cache
    judge = json.loads((out / "stats.json").read_text())["decontamination"]["judge"]
    assert (judge["requests"], judge["cache_hits"]) == (0, sent)

    capped = tmp_path / "capped"
    capped.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        build(capped, rows, *flags, "--judge_model", "gpt-4o-mini", "--judge_max_cost", "0.00001")
    assert exit_info.value.code == 3
    assert not (capped / "out" / "PersonaMathQA.jsonl").exists()


def test_judge_in_batch_mode_answers_every_pair_once(tmp_path):
    """--judge_args --batch: every candidate pair goes through the Batch API (a fake of it over real HTTP,
    losing and failing lines the first time), each answered exactly once; a rerun sends nothing."""
    from fake_batch_server import FakeBatchConfig, start_in_thread
    from fake_server import FakeServerConfig

    rows = [row("wrapped", f"As a nurse: {JANET}", "18"), row("sibling", JANET.replace("16", "18"), "20"),
            *genuine_rows(step=1500)]
    flags = ("--judge", "llm", "--judge_model", "gpt-4o-mini", "--top_k", "3", "--judge_max_cost", "1",
             "--judge_args", "--batch --batch_poll_interval 0.1 --batch_max_rounds 4")
    with start_in_thread(FakeServerConfig(), FakeBatchConfig(lost=0.2, failed_lines=0.2)) as server:
        assert build(tmp_path, rows, *flags, "--judge_base_url", server.url)[0] == 0
        stats = server.stats()
        decontamination_stats = json.loads((tmp_path / "out" / "stats.json").read_text())["decontamination"]
        pairs = decontamination_stats["retrieval"]["pairs"]
        assert len(stats["answered"]) == pairs and set(stats["answered"].values()) == {1}
        assert stats["online_requests"] == 0 and stats["lost"] and stats["failed"]
        assert decontamination_stats["judge"]["batch"]
        removed = {r["id"] for r in read_jsonl(tmp_path / "out" / "removed_contaminated.jsonl")}
        assert removed == {"wrapped"}
        assert build(tmp_path, rows, *flags, "--judge_base_url", server.url)[0] == 0
        assert server.stats()["uploads"] == stats["uploads"]  # all from the cache


def test_bad_judge_args(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build(tmp_path, [row("a", JANET)], "--judge", "llm", "--judge_args", "--no_such_flag 3")
    assert exit_info.value.code == 2
    assert "--judge_args '--no_such_flag 3': not flags of the LLM client" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("answer,verdict", [("VERDICT: same", "same"), ("verdict: Different.", "different"),
                                            ("**VERDICT:** sibling", "sibling"), ("They look alike.", "unparseable"),
                                            ("VERDICT: same\nVERDICT: different", "different")])
def test_parse_verdict(answer, verdict):
    assert decontamination.parse_verdict(answer) == verdict


# ----------------------------------------------------------------------------- retrieval

def test_overlap_from_the_test_items_side():
    """Half of a test item's n-grams score 0.5 however long the row; a short item is matched by containment,
    operators included."""
    long_item = " ".join(f"w{i}" for i in range(20))  # 8 distinct 13-grams
    items = [retrieval.TestItem("t.jsonl", "long", long_item),
             retrieval.TestItem("t.jsonl", "short", "Evaluate $(1+2i)6-3i$.")]
    index = retrieval.OverlapIndex(items, 13)
    padding = " ".join(["filler"] * 500)
    half = " ".join(f"w{i}" for i in range(16))  # 4 of the 8
    assert index.matches(f"{padding} {half} {padding}", 3) == [(0, 0.5)]
    assert index.matches(f"First, evaluate (1 + 2i)6 - 3i, which is {padding}", 3) == [(1, 1.0)]
    assert index.matches("Evaluate $(1+2i)6+3i$.", 3) == []  # another sign: no candidate


def test_diagram_code_is_not_overlap():
    """Two MATH problems that share only their [asy] boilerplate do not match; one that also shares the words does."""
    asy = "[asy] " + " ".join(f"draw((0,{i})--(8,{i}));" for i in range(30)) + " [/asy]"
    test = f"The results of a cross-country team's training run are graphed below. Which student is fastest? {asy}"
    index = retrieval.OverlapIndex([retrieval.TestItem("t.jsonl", "t", test)], 13)
    assert index.matches(f"How far did the red car go in the first hour of the trip? {asy}", 3) == []
    assert index.matches(test.replace("draw((0,3)", "draw((1,3)"), 3) == [(0, 1.0)]


def test_lexical_retrieval_reads_quantities_by_value():
    """`sixteen` and `16` are one term: a rewrite with numbers in words still finds its test item first."""
    tests = [Problem(p.question) for p in GSM8K_TEST[:200]]
    index = retrieval.LexicalIndex(tests)
    rewrite = Problem("Sixteen eggs a day from Janet's ducks: three at breakfast, four in muffins, the rest sold "
                      "for two dollars each. Her daily market takings?")
    assert index.nearest(rewrite, 5)[0][0] == 0
    assert len(index.nearest(rewrite, 5)) == 5  # top k, whatever the score


def test_shipped_test_embeddings_are_the_models(tmp_path):
    """The shipped embeddings of the default test sets are what the model computes here (40 items spread
    over the files), and --embedding_retrieval uses them: it computes none."""
    embedder = retrieval.Embedder()
    items, _ = decontamination.load_test_items(decontamination.DEFAULT_TEST_FILES)
    shipped = embedder.encode_cached(items, tmp_path)
    assert list(tmp_path.iterdir()) == []  # found in data/decontamination, nothing computed or written
    sample = list(range(0, len(items), len(items) // 40))
    fresh = embedder.encode([items[i].text for i in sample])
    assert (shipped[sample] * fresh).sum(1).min() > 0.999
    assert (shipped[sample] - fresh).abs().max() < 2e-3  # float16 storage, nothing more


def test_computed_embeddings_are_cached(tmp_path):
    """Test files other than the shipped ones are embedded once, stored whole, then read back."""
    embedder = retrieval.Embedder()
    items = [retrieval.TestItem("f", str(i), p.question) for i, p in enumerate(GSM8K_TEST[:5])]
    first = embedder.encode_cached(items, tmp_path)
    (cached,) = tmp_path.iterdir()
    assert cached.name.endswith(".fp16.npy")
    assert bool((embedder.encode_cached(items, tmp_path) == first).all())
    changed = embedder.encode_cached(items[:4], tmp_path)  # other texts, another file
    assert len(list(tmp_path.iterdir())) == 2 and changed.shape[0] == 4


def test_embedding_retrieval_adds_candidates(tmp_path):
    rows = [row("janet", f"As a nurse: {JANET}", "18")]
    assert build(tmp_path, rows, "--embedding_retrieval", "--top_k", "2",
                 "--embedding_cache_dir", str(tmp_path / "cache"))[0] == 1  # the only row goes: nothing kept
    [removed] = read_jsonl(tmp_path / "out" / "removed_contaminated.jsonl")
    assert removed["contamination"]["retrieval"]["embedding_rank"] == 1
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())["decontamination"]
    assert stats["retrieval"]["embedding"] and "seconds_embedding" in stats["seconds"]
    assert not (tmp_path / "cache").exists()  # the default test sets' embeddings are shipped
