"""The dataset folder build_dataset writes, from a small real run: the generation stages against the
fake server (questions solved wrong, invalid rewrites, reflections), then build_dataset with a
duplicate and a test question added. Its card parses as the Hub's card metadata and states the
counts the data holds; its Parquet file loads as the JSONL's rows; its viewer.html opens from disk in
headless Chromium with no console error, filters narrow to the counts the files hold, a row shows
its lineage and a dropped item its reason. The screenshot of the main view is docs/images/viewer.png."""
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from browser import Browser, chromium_or_skip
from conftest import DATA, ROOT, run_here

from fake_server import FakeServerConfig, start_in_thread
from personamath.data import load_any, load_problems
from personamath.jsonl import read_jsonl, write_jsonl

N = 20  # questions of each source
SCREENSHOT = ROOT / "docs" / "images" / "viewer.png"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The dataset folder of a small real run: gen_cot, persona_augment, reflection against the fake
    server, then build_dataset over their outputs and one more file holding a copy of a kept question
    (a duplicate) and a GSM8K test question (contaminated)."""
    tmp = tmp_path_factory.mktemp("viewer")
    gen, out = tmp / "gen", tmp / "dataset"
    gsm8k, math = DATA / "gsm8k" / "train.jsonl", DATA / "math" / "MATH_train.jsonl"
    problems = load_problems("gsm8k", gsm8k)[:N] + load_problems("math", math)[:N]
    llm = ["--model", "fake-llm", "--output_dir", str(gen), "--timeout", "30"]
    with start_in_thread(FakeServerConfig(problems=problems, bad_rewrites=0.3)) as server:
        for script, *args in (("gen_cot.py", "--inputs", str(gsm8k), str(math), "--limit", str(2 * N)),
                              ("persona_augment.py", "--k", "2"), ("reflection.py", "--k", "2")):
            result = run_here(script, "--base_url", server.url, *llm, *args)
            assert result.returncode == 0, result.stderr[-3000:]
    [solved, *_] = read_jsonl(gen / "cot.jsonl")
    test_question = load_any(DATA / "gsm8k" / "test.jsonl")[1][5].question
    extra = [{**solved, "id": "extra/copy"}, {**solved, "id": "extra/test", "problem": test_question}]
    write_jsonl(tmp / "extra.jsonl", extra)
    inputs = [gen / f"{name}.jsonl" for name in ("cot", "persona", "reflection", "reflection_persona")]
    result = run_here("build_dataset.py", "--inputs", *map(str, inputs), str(tmp / "extra.jsonl"),
                      "--output_dir", str(out), "--decontaminate", str(DATA / "gsm8k" / "test.jsonl"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "viewer.html" in result.stdout
    return out


@pytest.fixture(scope="module")
def browser():
    chromium_or_skip(pytest)
    with Browser() as b:
        yield b


def test_card_parses_as_hub_metadata_and_states_what_the_data_holds(built, monkeypatch):
    """README.md: the Hub's YAML header (huggingface_hub's DatasetCard parses it, strictly), its
    `configs` naming the Parquet file that `datasets` loads as the JSONL's rows, and the body's counts
    and settings those of the run."""
    import datasets
    from huggingface_hub import DatasetCard

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    card = DatasetCard((built / "README.md").read_text())
    meta = card.data.to_dict()
    dataset = read_jsonl(built / "PersonaMathQA.jsonl")
    assert (meta["license"], meta["language"], meta["pretty_name"]) == ("mit", ["en"], "PersonaMathQA")
    assert meta["size_categories"] == ["n<1K"] and len(dataset) < 1000
    assert meta["source_datasets"] == ["openai/gsm8k", "hendrycks/competition_math"]
    assert set(meta["task_categories"]) <= {"question-answering", "text-generation"}  # Hub task ids
    [config] = meta["configs"]
    [data_file] = config["data_files"]
    rows = datasets.load_dataset("parquet", data_files=str(built / data_file["path"]), split=data_file["split"])
    assert rows.to_list() == dataset
    stats = json.loads((built / "stats.json").read_text())
    for stage, counts in stats["kept"]["by_stage_source"].items():
        assert f"| {stage} | {counts['gsm8k']:,} | {counts['math']:,} | {stats['kept']['by_stage'][stage]:,} |" in card.text
    assert f"{stats['removed']['contaminated']:,} contaminated rows were removed" in card.text
    assert "| gen_cot | fake-llm |" in card.text and "| persona_augment | fake-llm |" in card.text
    assert "huggingface-cli upload --repo-type dataset" in card.text


def test_viewer_data_holds_every_row_and_every_dropped_item(built):
    gen = built.parent / "gen"
    text = (built / "viewer_data.js").read_text()
    data = json.loads(text.removeprefix("window.PERSONAMATH_VIEWER = ").removesuffix(";\n"))
    dataset = read_jsonl(built / "PersonaMathQA.jsonl")
    assert [(r["stage"], r["id"]) for r in data["kept"]] == [(r["stage"], r["id"]) for r in dataset]
    rejected = {name: read_jsonl(gen / f"{name}.jsonl") for name in
                ("cot_failed", "persona_rejected", "reflection_failed", "reflection_persona_rejected")}
    removed = read_jsonl(built / "removed_duplicates.jsonl") + read_jsonl(built / "removed_contaminated.jsonl")
    assert len(data["dropped"]) == sum(map(len, rejected.values())) + len(removed)
    kinds = Counter(d["kind"] for d in data["dropped"])
    assert kinds["solved wrong"] >= len(rejected["cot_failed"]) > 0  # the fake server's hard questions
    assert kinds["invalid rewrite"] > 0 and kinds["exact duplicate"] == 1 and kinds["contaminated"] == 1
    # every reflection row carries the attempt it corrected and the reflection
    reflection_rows = [r for r in data["kept"] if r["stage"] == "reflection"]
    assert reflection_rows and all(r["wrong"] and r["reflection"] for r in reflection_rows)


def test_viewer_in_chromium(built, browser):
    page = browser.open(built / "viewer.html")
    assert page.errors == []
    dataset = read_jsonl(built / "PersonaMathQA.jsonl")
    count = lambda: page.evaluate("document.getElementById('count').textContent")  # noqa: E731
    assert count() == f"{len(dataset)} of {len(dataset)} rows"

    # a filter narrows the list to what the file holds
    personas = sum(r["stage"] == "persona" for r in dataset)
    page.evaluate("(() => { const s = document.getElementById('f-stage'); s.value = 'persona';"
                  " s.dispatchEvent(new Event('change')); })()")
    assert count() == f"{personas} of {len(dataset)} rows"

    # the selected persona row shows its lineage: the question, the persona, the marked rewrite, the solution
    detail = page.evaluate("document.getElementById('detail').textContent")
    first = next(r for r in dataset if r["stage"] == "persona")
    assert first["persona"] in detail and "Original question and the rewrite" in detail
    assert page.evaluate("document.querySelectorAll('#detail ins, #detail del').length") > 0
    page.screenshot(built / "viewer.png")

    # text search
    word = first["problem"].split()[3]
    page.evaluate(f"(() => {{ const t = document.getElementById('f-text'); t.value = {json.dumps(word)};"
                  " t.dispatchEvent(new Event('input')); })()")
    page.evaluate("new Promise(r => setTimeout(r, 400))")
    matching = sum(r["stage"] == "persona" and (word.lower() in r["problem"].lower() or word.lower() in
                                                r["response"].lower()) for r in dataset)
    assert count() == f"{matching} of {len(dataset)} rows"

    # a dropped item shows its reason
    page.evaluate("document.querySelector('nav button[data-view=dropped]').click()")
    page.evaluate("(() => { const s = document.getElementById('f-kind'); s.value = 'contaminated';"
                  " s.dispatchEvent(new Event('change')); })()")
    assert count().startswith("1 of ")
    detail = page.evaluate("document.getElementById('detail').textContent")
    assert "the same problem as test item" in detail and "Verdict" in detail
    page.evaluate("(() => { const s = document.getElementById('f-kind'); s.value = 'solved wrong';"
                  " s.dispatchEvent(new Event('change')); })()")
    detail = page.evaluate("document.getElementById('detail').textContent")
    assert "Attempt 1: answer" in detail and "gold" in detail
    page.evaluate("document.querySelector('nav button[data-view=stats]').click()")
    assert "Dropped, by reason" in page.evaluate("document.getElementById('detail').textContent")
    assert page.errors == []

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(built / "viewer.png", SCREENSHOT)


def test_viewer_without_its_data_file_says_so(built, browser, tmp_path):
    shutil.copy(built / "viewer.html", tmp_path / "viewer.html")
    page = browser.open(tmp_path / "viewer.html", ready="document.querySelector('.error')")
    assert "viewer_data.js did not load" in page.evaluate("document.body.textContent")
