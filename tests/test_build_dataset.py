"""build_dataset.py on real files: duplicates, test-set contamination, the seeded shuffle, statistics, errors."""
import json
import random
import re

import pytest
from conftest import DATA, run_here, run_script

from personamath.data import load_any
from personamath.dataset import OUTPUT_FIELDS, main, ngrams, remove_near_duplicates, words
from personamath.jsonl import read_jsonl, write_json, write_jsonl

GSM8K_TEST = DATA / "gsm8k" / "test.jsonl"
# 40 words, in no test set.
ORIGINAL = ("A gardener plants seven rows of tulips with twelve bulbs in each row and then adds three rows of "
            "daisies with nine seeds in each row before the spring rain begins to fall on the hill "
            "how many plants grow")


def make_row(row_id, problem, stage="cot", source="gsm8k", persona=None, persona_id=None):
    return {"id": row_id, "parent_id": None if stage in ("cot", "reflection") else "gsm8k/parent", "source": source,
            "stage": stage, "problem": problem, "response": f"Solution of {row_id}. The answer is 7.", "gold": "7",
            "persona": persona, "persona_id": persona_id, "model": "test-model", "prompt_version": "solve-v1"}


def build(tmp_path, inputs: dict[str, list[dict]], *flags) -> tuple[int, object]:
    """Write the inputs, run the build in-process (decontaminating against GSM8K test only, for speed)."""
    paths = []
    for name, rows in inputs.items():
        write_jsonl(tmp_path / name, rows)
        paths.append(str(tmp_path / name))
    out = tmp_path / "out"
    status = main(["--inputs", *paths, "--output_dir", str(out), "--decontaminate", str(GSM8K_TEST), *flags])
    return status, out


def gsm8k_test_question(index: int) -> str:
    return load_any(GSM8K_TEST)[1][index].question


def test_cli_end_to_end(tmp_path):
    """The real script with its default test files: each kind of removal is listed, the rest is kept."""
    train = load_any(DATA / "gsm8k" / "train.jsonl")[1][0].question
    test_question = gsm8k_test_question(28)
    assert test_question.startswith("Henry made two stops")
    last_word_changed = ORIGINAL.removesuffix("grow") + "bloom"
    cot = [make_row("gsm8k/train:1", train),
           make_row("gsm8k/train:1-copy", "  " + train.upper().replace(" ", "\n ") + " "),  # exact, up to case/space
           make_row("gsm8k/new:1", ORIGINAL),
           make_row("math/new:2", "What is $1+1$?", source="math")]
    persona = [make_row("gsm8k/new:1#p0", last_word_changed, stage="persona", persona="A florist.",
                        persona_id="isco-52-1"),
               make_row("gsm8k/test:28#p0", "As a cyclist who rides every weekend, I ask this: " + test_question,
                        stage="persona", persona="A cyclist.", persona_id="isco-34-2")]
    write_jsonl(tmp_path / "cot.jsonl", cot)
    write_jsonl(tmp_path / "persona.jsonl", persona)
    write_json(tmp_path / "cot.stats.json", {"stage": "cot", "inputs": 10, "attempted": 10, "kept": 4, "yield": 0.4,
                                             "complete": True, "ledger": {"requests": 10}})
    out = tmp_path / "out"
    result = run_here("build_dataset.py", "--inputs", tmp_path / "cot.jsonl", tmp_path / "persona.jsonl",
                      "--output_dir", out)
    assert result.returncode == 0, result.stderr

    dataset = read_jsonl(out / "PersonaMathQA.jsonl")
    assert {r["id"] for r in dataset} == {"gsm8k/train:1", "gsm8k/new:1", "math/new:2"}
    assert all(list(r) == list(OUTPUT_FIELDS) for r in dataset)  # problem and response first

    exact, near = read_jsonl(out / "removed_duplicates.jsonl")
    assert (exact["id"], exact["reason"], exact["duplicate_of"], exact["similarity"]) == \
           ("gsm8k/train:1-copy", "exact", "gsm8k/train:1", 1.0)
    # 36 word 5-grams each; changing the last word changes one: Jaccard 35/37.
    assert (near["id"], near["reason"], near["duplicate_of"], near["duplicate_of_stage"]) == \
           ("gsm8k/new:1#p0", "near", "gsm8k/new:1", "cot")
    assert near["similarity"] == round(35 / 37, 4)

    [contaminated] = read_jsonl(out / "removed_contaminated.jsonl")
    assert contaminated["id"] == "gsm8k/test:28#p0"
    why = contaminated["contamination"]
    assert (why["test_file"], why["test_id"], why["label"], why["decided_by"]) == \
           (str(GSM8K_TEST), "test:29", "same", "rule")
    # All 28 13-grams of the 40-word test question are in the row, whatever the preamble before it.
    assert why["retrieval"]["ngram_share"] == 1.0 and why["retrieval"]["lexical_rank"] == 1
    assert why["reason"].startswith("every quantity of the test item")

    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_read"]["per_file"] == {str(tmp_path / "cot.jsonl"): 4, str(tmp_path / "persona.jsonl"): 2}
    assert stats["removed"] == {"exact_duplicates": 1, "near_duplicates": 1, "contaminated": 1}
    assert stats["kept"]["total"] == sum(stats["kept"]["by_stage"].values()) == len(dataset) == 3
    assert stats["kept"]["by_stage_source"]["cot"] == {"gsm8k": 2, "math": 1}
    assert stats["kept"]["by_source"] == {"gsm8k": 2, "math": 1}
    assert stats["yield"] == [{"file": str(tmp_path / "cot.stats.json"), "stage": "cot", "inputs": 10,
                               "attempted": 10, "kept": 4, "yield": 0.4, "complete": True}]  # persona has none
    assert len(stats["settings"]["decontaminate"]) == 3
    markdown = (out / "stats.md").read_text()
    assert markdown in result.stdout
    assert "| cot | 2 | 1 | 3 |" in markdown and "| cot | 10 | 10 | 4 | 40.0% | True |" in markdown


def test_near_duplicate_threshold(tmp_path):
    """A word changed mid-text changes five 5-grams (Jaccard 31/41): kept at 0.9, removed at 0.7."""
    words = ORIGINAL.split()
    words[20] = "violets"
    rows = {"cot.jsonl": [make_row("a", ORIGINAL), make_row("b", " ".join(words))]}
    assert build(tmp_path, rows)[0] == 0
    assert read_jsonl(tmp_path / "out" / "removed_duplicates.jsonl") == []
    assert build(tmp_path, rows, "--near_dup_threshold", "0.7")[0] == 0
    [near] = read_jsonl(tmp_path / "out" / "removed_duplicates.jsonl")
    assert (near["id"], near["duplicate_of"], near["similarity"]) == ("b", "a", round(31 / 41, 4))


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_near_duplicates_are_those_a_brute_force_join_finds(threshold):
    """The prefix-filtered join on hashed shingles removes exactly the rows that comparing every pair of
    word 5-gram string sets removes (each row against the earlier kept ones), on 300 texts made to
    straddle the threshold: variants of a few bases with 1-6 words changed, repeated words, short texts."""
    rng = random.Random(threshold)
    vocabulary = ORIGINAL.split() + ["apples", "nine", "farmer", "rain", "rain rain", "x"]
    bases = [ORIGINAL, " ".join(reversed(ORIGINAL.split())), "rain " * 30, "one two three", ""]
    texts = []
    for _ in range(300):
        tokens = rng.choice(bases).split()
        for _ in range(rng.randrange(7) if tokens else 0):
            tokens[rng.randrange(len(tokens))] = rng.choice(vocabulary)
        texts.append(" ".join(tokens))
    rows = [make_row(f"r{i}", text) for i, text in enumerate(texts)]
    kept_sets, expected = [], []
    for row in rows:
        grams = ngrams(words(row["problem"]), 5)
        similar = [len(grams & g) / len(grams | g) for g in kept_sets if grams | g]
        if similar and max(similar) >= threshold:
            expected.append(row["id"])
        else:
            kept_sets.append(grams)
    kept, removed = remove_near_duplicates(rows, threshold)
    assert [r["id"] for r in removed] == expected
    assert len(expected) > 30 and len(kept) > 30  # both sides of the threshold are met


def test_contamination_policy(tmp_path):
    """The test question with one number changed is a sibling: kept and reported by default, removed
    with --contamination_policy sibling."""
    test = gsm8k_test_question(28)
    number = re.search(r"\d+", test)[0]
    sibling = test.replace(number, str(int(number) + 7), 1)
    rows = {"cot.jsonl": [make_row("sibling", sibling), make_row("original", ORIGINAL)]}
    assert build(tmp_path, rows)[0] == 0
    assert read_jsonl(tmp_path / "out" / "removed_contaminated.jsonl") == []
    [kept] = read_jsonl(tmp_path / "out" / "siblings_kept.jsonl")
    assert (kept["id"], kept["test_id"], kept["label"]) == ("sibling", "test:29", "sibling")
    assert f"the test item's {number} not in the row" in kept["reason"]
    assert "Siblings kept: 1 rows" in (tmp_path / "out" / "stats.md").read_text()
    assert build(tmp_path, rows, "--contamination_policy", "sibling")[0] == 0
    [removed] = read_jsonl(tmp_path / "out" / "removed_contaminated.jsonl")
    assert (removed["id"], removed["contamination"]["label"]) == ("sibling", "sibling")
    assert {r["id"] for r in read_jsonl(tmp_path / "out" / "PersonaMathQA.jsonl")} == {"original"}


def test_shuffle_is_seeded(tmp_path):
    rows = {"cot.jsonl": [make_row(f"q{i}", f"What is {i} plus {i}?") for i in range(30)]}

    def order(*flags):
        assert build(tmp_path, rows, *flags)[0] == 0
        return [r["id"] for r in read_jsonl(tmp_path / "out" / "PersonaMathQA.jsonl")]

    seed_1 = order("--shuffle_seed", "1")
    assert order("--shuffle_seed", "1") == seed_1
    assert order("--shuffle_seed", "2") != seed_1
    assert sorted(order("--shuffle_seed", "2")) == sorted(seed_1)
    assert order("--no_shuffle") == [f"q{i}" for i in range(30)] != seed_1


def test_persona_coverage_and_yields(tmp_path):
    personas = [("A nurse.", "isco-22-1"), ("A nurse.", "isco-22-1"), ("A nurse.", "isco-22-1"),
                ("A teacher.", "isco-23-4"), ("A teacher.", "isco-23-4"),
                ("A cook.", "isco-51-2"), ("A beekeeper.", "llm:0123456789ab"), ("A beekeeper.", "llm:0123456789ab")]
    rows = {"cot.jsonl": [make_row("plain", "How many legs do 3 spiders have?")],
            "persona.jsonl": [make_row(f"p{i}", f"Persona question number {i}: what is {i} times {i}?",
                                       stage="persona", persona=text, persona_id=pid)
                              for i, (text, pid) in enumerate(personas)]}
    for stage, attempted, kept in (("cot", 5, 1), ("persona", 16, 8)):
        write_json(tmp_path / f"{stage}.stats.json", {"stage": stage, "inputs": 5, "attempted": attempted,
                                                       "kept": kept, "yield": kept / attempted, "complete": True})
    assert build(tmp_path, rows)[0] == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["personas"] == {"rows_with_persona": 8, "distinct_personas": 4, "distinct_persona_ids": 4,
                                 "rows_per_persona": {"min": 1, "median": 2.0, "max": 3},
                                 "isco_sub_major_groups": {"covered": 3, "of": 43, "codes": ["22", "23", "51"]}}
    assert [(y["stage"], y["attempted"], y["kept"], y["yield"]) for y in stats["yield"]] == \
           [("cot", 5, 1, 0.2), ("persona", 16, 8, 0.5)]
    assert stats["kept"]["by_stage"] == {"cot": 1, "persona": 8, "reflection": 0, "reflection_persona": 0}


def test_diversity_hand_computed(tmp_path):
    rows = {"cot.jsonl": [make_row("a", "The cat sat."), make_row("b", "the dog, sat!")]}
    rows["cot.jsonl"][0]["response"] = "A cat."
    rows["cot.jsonl"][1]["response"] = "A dog."
    assert build(tmp_path, rows)[0] == 0
    diversity = json.loads((tmp_path / "out" / "stats.json").read_text())["diversity"]
    # problems: the cat sat the dog sat -> 4 types, 6 tokens; responses: a cat a dog -> 3 types, 4 tokens
    assert diversity == {"problem": {"types": 4, "tokens": 6, "type_token_ratio": 4 / 6},
                         "response": {"types": 3, "tokens": 4, "type_token_ratio": 3 / 4}}


@pytest.mark.parametrize("bad_line,message", [
    ('{"id": "x", "problem": "What', r"cot\.jsonl:2: malformed JSON"),
    (json.dumps({k: v for k, v in make_row("x", "What is 2+2?").items() if k != "response"}),
     r"cot\.jsonl:2: not a stage output row \(missing response\)"),
    (json.dumps(make_row("x", "What is 2+2?", stage="solve")), r"cot\.jsonl:2: unknown stage 'solve'"),
    (json.dumps(make_row("first", "What is 2+2?")), r"cot\.jsonl:2: cot id 'first' already read at .*cot\.jsonl:1"),
])
def test_bad_input_names_file_and_line(tmp_path, capsys, bad_line, message):
    (tmp_path / "cot.jsonl").write_text(json.dumps(make_row("first", "What is 1+1?")) + "\n" + bad_line + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--inputs", str(tmp_path / "cot.jsonl"), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err)
    assert not (tmp_path / "out").exists()


def test_bad_input_cli(tmp_path):
    (tmp_path / "cot.jsonl").write_text(json.dumps(make_row("a", "What is 1+1?")) + "\n{not json\n")
    result = run_script("build_dataset.py", "--inputs", str(tmp_path / "cot.jsonl"),
                        "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'cot.jsonl'}:2: malformed JSON (")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_no_rows_kept(tmp_path, capsys):
    leak = gsm8k_test_question(28)
    rows = {"cot.jsonl": [make_row("leak", leak), make_row("leak-again", leak.lower())]}
    status, out = build(tmp_path, rows)
    assert status == 1
    assert "no rows kept: all 2 rows read were removed (1 exact duplicates, 0 near duplicates, 1 contaminated)" \
           in capsys.readouterr().err
    assert read_jsonl(out / "PersonaMathQA.jsonl") == []
    assert len(read_jsonl(out / "removed_contaminated.jsonl")) == 1
    assert json.loads((out / "stats.json").read_text())["kept"]["total"] == 0
