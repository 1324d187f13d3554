"""viewer.html: every row of a built dataset and every decision about the others, in one offline page.

build_dataset.py writes viewer.html into the dataset folder, with its data in viewer_data/ beside it
(the page reads the files through <script> tags, which a browser loads from disk where fetch() is
refused). The data: the questions the rows came from; every kept row with its lineage (question ->
persona -> rewrite -> solution; wrong attempt -> reflection -> corrected solution); every item dropped
on the way, with its reason: questions solved wrong (each attempt with the answer extracted, and the
gold), rewrites that were unusable, invalid (which rule) or solved wrong, reflections still wrong,
duplicates (with the row kept instead), contaminated rows (with the test item, the retrieval scores
and the verdict); the siblings kept; and stats.json. The generation stages' rejected files are read
beside their outputs (cot.jsonl -> cot_failed.jsonl, ...). Math is shown as plain LaTeX in monospace:
no renderer is vendored. The page itself is personamath/resources/viewer.html.

What opening the page reads is index.js: the personas, and of each row and dropped item, column by
column, what the list and the filters need (ids, stage, source, persona, subject, level, reason kind,
the problem's first SNIPPET characters). problems.js, read just after the page is drawn, holds the
original questions and every row's whole problem (for the lineage and the search of problems).
Solutions, attempts, reflections and reasons are in chunks of CHUNK rows (kept-00000.js,
dropped-00000.js, ...), read when a row is shown or a search of solutions asks for all of them. At
v2's size the whole data is 415 MB: as one file it took 10.5 s to open, with the problems in the
index 7.8 s (bench/bench_viewer.py).
"""
import json
import os
import shutil
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from .config import read_settings_used
from .jsonl import iter_jsonl, replaced, write_text
from .parser import final_answer

PAGE = Path(__file__).parent / "resources" / "viewer.html"
# each generation stage's output -> the file of what it tried and did not keep
REJECTED_FILES = {"cot": "cot_failed", "persona": "persona_rejected", "reflection": "reflection_failed",
                  "reflection_persona": "reflection_persona_rejected"}


def reason_kind(reason: str) -> str:
    """The filterable kind of a rejection reason ('invalid rewrite: drops numbers ...' -> 'invalid rewrite')."""
    return reason.split(":", 1)[0]


CHUNK = 2000  # rows per file of texts: one row's file is read in well under a second
SNIPPET = 100  # characters of a problem in the index: what a line of the list shows
COLUMNS = ("id", "stage", "source", "parent", "persona", "subject", "level")  # of each row in the index


class ViewerData:
    """The page's data, gathered from the stage outputs and build_dataset's own files: the index in
    memory, the texts written to their chunk files as the rows come."""

    def __init__(self, folder: Path, answer_format: str = "boxed", chunk: int = CHUNK):
        self.folder, self.chunk_rows = folder, chunk
        self.answer_format = answer_format
        self.questions: dict[str, dict] = {}
        self.personas: dict[str, int] = {}
        self.index = {"kept": [], "dropped": []}  # each row's COLUMNS (and a dropped item's kind), and problem
        self.chunk = {"kept": [], "dropped": []}  # the texts of the current chunk, not yet written

    def persona_index(self, text) -> int:
        if not text:
            return -1
        return self.personas.setdefault(text, len(self.personas))

    def add_question(self, row: dict) -> None:
        """A generation-stage row of an original question (cot or cot_failed): its text and gold."""
        self.questions.setdefault(row["id"], {"source": row["source"], "problem": row["problem"], "gold": row["gold"],
                                              "subject": row.get("subject"), "level": row.get("level")})

    def _add(self, view: str, entry: dict, texts: dict) -> None:
        self.index[view].append(entry)
        self.chunk[view].append({k: v for k, v in texts.items() if v is not None})
        if len(self.chunk[view]) == self.chunk_rows:
            self._write_chunk(view)

    def _write_chunk(self, view: str) -> None:
        number = (len(self.index[view]) - 1) // self.chunk_rows
        _write_script(self.folder / f"{view}-{number:05d}.js", f"PERSONAMATH_TEXTS({json.dumps(view)},{number},",
                      self.chunk[view], ");\n")
        self.chunk[view] = []

    def _base(self, row: dict, stage: str) -> dict:
        question = self.questions.get(row.get("parent_id") or row["id"], {})
        return {"id": row["id"], "stage": stage, "source": row["source"], "parent": row.get("parent_id"),
                "persona": self.persona_index(row.get("persona")), "problem": row.get("problem"),
                "subject": row.get("subject") or question.get("subject"),
                "level": row.get("level") or question.get("level")}

    def add_kept(self, row: dict, generated: dict | None, sibling: dict | None) -> None:
        """A row of the dataset; `generated`: its stage's row (which also holds the reflection)."""
        generated = generated or row
        self._add("kept", self._base(generated, row["stage"]),
                  {"response": row["response"], "wrong": generated.get("reflected_on", row.get("wrong_attempt")),
                   "reflection": generated.get("reflection"), "sibling": sibling})

    def add_rejected(self, row: dict, stage: str) -> None:
        """What a generation stage tried and did not keep."""
        if stage == "cot":  # a question no attempt solved
            attempts = [{"response": a["response"], "answer": final_answer(a["response"], self.answer_format)}
                        for a in row.get("attempts", [])]
            self._drop(row, stage, "solved wrong", f"no attempt of {len(attempts)} reached the gold answer {row['gold']}",
                       attempts=attempts)
            return
        response = row.get("solution", row.get("response"))
        self._drop(row, stage, reason_kind(row["reason"]), row["reason"], response=response,
                   answer=None if response is None else final_answer(response, self.answer_format),
                   wrong=row.get("reflected_on", row.get("wrong_attempt")), reflection=row.get("reflection"))

    def add_removed(self, row: dict) -> None:
        """A row build_dataset removed: a duplicate or contaminated."""
        if "contamination" in row:
            c = row["contamination"]
            self._drop(row, row["stage"], "contaminated", f"the same problem as test item {c['test_id']}: {c['reason']}",
                       response=row["response"], contamination=c)
        else:
            kind = f"{row['reason']} duplicate"
            self._drop(row, row["stage"], kind, f"{kind} of {row['duplicate_of_stage']} {row['duplicate_of']} "
                                                f"(similarity {row['similarity']})", response=row["response"],
                       duplicate_of={"id": row["duplicate_of"], "stage": row["duplicate_of_stage"],
                                     "similarity": row["similarity"]})

    def _drop(self, row: dict, stage: str, kind: str, reason: str, **details) -> None:
        self._add("dropped", {**self._base(row, stage), "kind": kind},
                  {"reason": reason, "gold": row.get("gold"), **details})

    def finish(self, stats: dict) -> None:
        """The last chunks, then index.js (what the page reads first)."""
        for view in self.chunk:
            if self.chunk[view]:
                self._write_chunk(view)
        counts = Counter(f"{d['stage']}\t{d['kind']}" for d in self.index["dropped"])
        columns = {view: {name: [row[name] for row in rows] for name in COLUMNS + (("kind",) if view == "dropped" else ())}
                   | {"snippet": [(row["problem"] or "")[:SNIPPET] for row in rows]}
                   for view, rows in self.index.items()}
        _write_script(self.folder / "index.js", "window.PERSONAMATH_VIEWER = ", {
            "personas": list(self.personas), "chunk": self.chunk_rows, **columns,
            "dropped_counts": dict(sorted(counts.items())), "stats": stats,
            "built": f"built {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by personamath/viewer.py"}, ";\n")
        _write_script(self.folder / "problems.js", "PERSONAMATH_PROBLEMS(", {
            "questions": self.questions, **{view: [row["problem"] for row in rows] for view, rows in self.index.items()}},
            ");\n")


def _write_value(f, value) -> None:
    """A value as a script's literal (JSON is one), a list item by item (never in memory twice as text).
    Not a string for JSON.parse: measured in Chromium, a 43 MB one took 2.6 s to load against 0.65 s as
    a literal, and at v2's size minutes, near V8's longest string."""
    if isinstance(value, list):
        f.write("[")
        for i, item in enumerate(value):
            f.write(("," if i else "") + json.dumps(item, ensure_ascii=False))
        f.write("]")
    elif isinstance(value, dict):
        f.write("{")
        for n, (key, item) in enumerate(value.items()):
            f.write(("," if n else "") + json.dumps(key) + ":")
            _write_value(f, item)
        f.write("}")
    else:
        f.write(json.dumps(value, ensure_ascii=False))


def _write_script(path: Path, before: str, value, after: str) -> None:
    with replaced(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.write(before)
        _write_value(f, value)
        f.write(after)


def write_viewer(out_dir: Path, inputs: list, dataset: Iterable[dict], removed: Iterable[dict], siblings: list[dict],
                 stats: dict, chunk: int = CHUNK) -> Path:
    """viewer.html and its data folder viewer_data/ in out_dir, for the dataset built from `inputs`
    (stage outputs; `dataset` and `removed`, build_dataset's duplicates and contaminated rows, are
    each read once); `chunk`: rows per
    file of texts. The folder is written
    beside the old one and swapped in at the end (the page never reads half of a build). Returns the
    page's path."""
    inputs = [Path(p) for p in inputs]
    folder, building = out_dir / "viewer_data", out_dir / "viewer_data.tmp"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    # the answers extracted as gen_cot read them, by its --answer_format
    data = ViewerData(building, read_settings_used(inputs[0].parent, "gen_cot").get("answer_format", "boxed")
                      if inputs else "boxed", chunk)
    reflected, rejected = {}, []  # the reflection stages' rows, which hold what the dataset's do not
    for path in inputs:
        stage = path.stem if path.stem in REJECTED_FILES else None
        rejected_path = path.with_name(f"{REJECTED_FILES[stage]}.jsonl") if stage else None
        for _, row in iter_jsonl(path):
            if row.get("parent_id") is None:
                data.add_question(row)
            if row.get("stage") in ("reflection", "reflection_persona"):
                reflected[(row["stage"], row["id"])] = row
        if rejected_path is not None and rejected_path.is_file():
            rejected.append((rejected_path, stage))
            if stage == "cot":  # the questions no attempt solved
                for _, row in iter_jsonl(rejected_path):
                    data.add_question(row)
    sibling_of = {(s["stage"], s["id"]): {k: s[k] for k in ("test_id", "test_problem", "reason")} for s in siblings}
    for row in dataset:
        key = (row["stage"], row["id"])
        data.add_kept(row, reflected.get(key), sibling_of.get(key))
    for path, stage in rejected:
        for _, row in iter_jsonl(path):
            data.add_rejected(row, stage)
    for row in removed:
        data.add_removed(row)
    data.finish(stats)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(building, folder)
    page = out_dir / "viewer.html"
    write_text(page, PAGE.read_text(encoding="utf-8"))
    return page
