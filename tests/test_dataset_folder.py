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
from personamath.viewer import write_viewer

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
    assert "hf upload --repo-type dataset" in card.text


def read_viewer_data(folder: Path) -> dict:
    """viewer_data/ as the page sees it: the index's columns as rows, each with its problem from
    problems.js and its texts from its chunk file."""
    data = json.loads((folder / "index.js").read_text().removeprefix("window.PERSONAMATH_VIEWER = ").removesuffix(";\n"))
    problems = json.loads((folder / "problems.js").read_text().removeprefix("PERSONAMATH_PROBLEMS(").removesuffix(");\n"))
    data["questions"] = problems["questions"]
    for view in ("kept", "dropped"):
        columns = data[view]
        data[view] = [{name: values[k] for name, values in columns.items()} | {"problem": problems[view][k]}
                      for k in range(len(columns["id"]))]
        assert all(row["snippet"] == (row["problem"] or "")[:100] for row in data[view])
        texts = []
        for n, path in enumerate(sorted(folder.glob(f"{view}-*.js"))):
            head = f'PERSONAMATH_TEXTS("{view}",{n},'
            assert path.name == f"{view}-{n:05d}.js" and path.read_text().startswith(head)
            texts += json.loads(path.read_text().removeprefix(head).removesuffix(");\n"))
        assert len(texts) == len(data[view])
        data[view] = [{**row, **text} for row, text in zip(data[view], texts)]
    return data


def test_viewer_data_holds_every_row_and_every_dropped_item(built):
    gen = built.parent / "gen"
    data = read_viewer_data(built / "viewer_data")
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


def shown(page) -> str:
    """The detail pane's text once what was last asked for is drawn (its chunk of texts read)."""
    return page.evaluate("window.viewerSettled().then(() => document.getElementById('detail').textContent)")


def test_viewer_in_chromium(built, browser):
    page = browser.open(built / "viewer.html")
    assert page.errors == []
    dataset = read_jsonl(built / "PersonaMathQA.jsonl")
    count = lambda: page.evaluate("window.viewerSettled().then(() => document.getElementById('count').textContent)")  # noqa: E731
    assert count() == f"{len(dataset)} of {len(dataset)} rows"

    # a filter narrows the list to what the file holds
    personas = sum(r["stage"] == "persona" for r in dataset)
    page.evaluate("(() => { const s = document.getElementById('f-stage'); s.value = 'persona';"
                  " s.dispatchEvent(new Event('change')); })()")
    assert count() == f"{personas} of {len(dataset)} rows"

    # the selected persona row shows its lineage: the question, the persona, the marked rewrite, the solution
    detail = shown(page)
    first = next(r for r in dataset if r["stage"] == "persona")
    assert first["persona"] in detail and "Original question and the rewrite" in detail
    assert page.evaluate("document.querySelectorAll('#detail ins, #detail del').length") > 0
    page.screenshot(built / "viewer.png")

    # text search: of the problems; of the solutions too once asked (every chunk of texts read first)
    persona_rows = [r for r in dataset if r["stage"] == "persona"]
    in_no_problem = next(w for w in first["response"].split() if w.isalpha() and len(w) > 4 and
                         not any(w.lower() in r["problem"].lower() for r in persona_rows))
    for word in (first["problem"].split()[3], in_no_problem):
        page.evaluate("document.getElementById('f-solutions').checked = false")
        page.evaluate(f"(() => {{ const t = document.getElementById('f-text'); t.value = {json.dumps(word)};"
                      " t.dispatchEvent(new Event('input')); })()")
        page.evaluate("new Promise(r => setTimeout(r, 400))")
        in_problems = sum(word.lower() in r["problem"].lower() for r in persona_rows)
        assert count() == f"{in_problems} of {len(dataset)} rows"
        page.evaluate("document.getElementById('f-solutions').click()")
        anywhere = sum(word.lower() in r["problem"].lower() or word.lower() in r["response"].lower()
                       for r in persona_rows)
        assert count() == f"{anywhere} of {len(dataset)} rows"
    assert in_problems == 0 and anywhere > 0  # the second word: only in solutions
    page.evaluate("document.getElementById('f-solutions').click()")
    page.evaluate("document.getElementById('f-text').value = ''")

    # a dropped item shows its reason
    page.evaluate("document.querySelector('nav button[data-view=dropped]').click()")
    page.evaluate("(() => { const s = document.getElementById('f-kind'); s.value = 'contaminated';"
                  " s.dispatchEvent(new Event('change')); })()")
    assert count().startswith("1 of ")
    detail = shown(page)
    assert "the same problem as test item" in detail and "Verdict" in detail
    page.evaluate("(() => { const s = document.getElementById('f-kind'); s.value = 'solved wrong';"
                  " s.dispatchEvent(new Event('change')); })()")
    detail = shown(page)
    assert "Attempt 1: answer" in detail and "gold" in detail
    page.evaluate("document.querySelector('nav button[data-view=stats]').click()")
    assert "Dropped, by reason" in shown(page)
    assert page.errors == []

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(built / "viewer.png", SCREENSHOT)


def test_viewer_without_its_data_file_says_so(built, browser, tmp_path):
    shutil.copy(built / "viewer.html", tmp_path / "viewer.html")
    page = browser.open(tmp_path / "viewer.html", ready="document.querySelector('.error')")
    assert "viewer_data/index.js did not load" in page.evaluate("document.body.textContent")


def test_viewer_reads_each_rows_texts_from_its_chunk(built, browser, tmp_path):
    """Texts in chunks of 4 rows: each row shown (first, last, across a boundary, kept and dropped) is
    the row of the files, read from its own chunk file; a chunk file missing is said, not a blank page."""
    gen = built.parent / "gen"
    inputs = [gen / f"{name}.jsonl" for name in ("cot", "persona", "reflection", "reflection_persona")]
    dataset = read_jsonl(built / "PersonaMathQA.jsonl")
    removed = read_jsonl(built / "removed_duplicates.jsonl") + read_jsonl(built / "removed_contaminated.jsonl")
    stats = json.loads((built / "stats.json").read_text())
    page_path = write_viewer(tmp_path, inputs, dataset, removed, read_jsonl(built / "siblings_kept.jsonl"), stats,
                             chunk=4)
    assert len(list((tmp_path / "viewer_data").glob("kept-*.js"))) == -(-len(dataset) // 4)
    data = read_viewer_data(tmp_path / "viewer_data")
    page = browser.open(page_path)
    for k in (0, 3, 4, len(dataset) - 1):
        page.evaluate(f"state.busy = select({k})")
        assert dataset[k]["response"][:200] in shown(page)
    page.evaluate("document.querySelector('nav button[data-view=dropped]').click()")
    last = len(data["dropped"]) - 1
    page.evaluate(f"state.busy = select({last})")
    assert data["dropped"][last]["reason"] in shown(page)
    assert page.errors == []
    (tmp_path / "viewer_data" / "kept-00001.js").unlink()
    page = browser.open(page_path)
    page.evaluate("state.busy = select(5)")
    assert "viewer_data/kept-00001.js did not load" in shown(page)


def test_report_tells_what_happened_to_the_data(built):
    """report.py over the run: each stage's count of every reason matches its rejected file, each with
    an example, every reason is defined in docs/data.md, and the grading counts add up (a rewrite solved
    wrong was judged: the stats once said graded 0 beside 4 rewrites solved wrong)."""
    run = built.parent
    result = run_here("report.py", "--run_dir", str(run))
    assert result.returncode == 0, result.stderr[-2000:]
    report = (run / "report.md").read_text()
    defined = (ROOT / "docs" / "data.md").read_text()
    for stage, rejected in (("cot", "cot_failed"), ("persona", "persona_rejected"), ("reflection", "reflection_failed"),
                            ("reflection_persona", "reflection_persona_rejected")):
        rows = read_jsonl(built.parent / "gen" / f"{rejected}.jsonl")
        stats = json.loads((built.parent / "gen" / f"{stage}.stats.json").read_text())
        kinds = Counter(r["reason"].split(":", 1)[0] for r in rows)
        section = report.split(f"### {stage}\n", 1)[1].split("\n### ", 1)[0]
        for kind, n in kinds.items():
            first = next(r for r in rows if r["reason"].startswith(kind))
            assert f"| {kind} | {n} | `{first['id']}`" in section, (stage, kind, section)
            assert f"**{kind}**" in defined, kind  # defined where the report links
        grading = stats["grading"]
        assert grading["judged"] == grading["correct"] + sum(grading["wrong"].values())
        if stage in ("cot", "persona"):  # one verdict an attempt (reflection_persona also judges its fixes)
            assert sum(grading["wrong"].values()) == kinds["solved wrong" if stage == "cot" else "rewrite solved wrong"]
            assert grading["correct"] == stats["kept"]
    removed = json.loads((built / "stats.json").read_text())["removed"]
    assert f"| exact duplicate | {removed['exact_duplicates']} | `extra/copy`" in report
    assert f"| contaminated | {removed['contaminated']} | `extra/test`" in report
    for kind in ("exact duplicate", "near duplicate", "contaminated"):
        assert f"**{kind}**" in defined
