"""viewer.html: every row of a built dataset and every decision about the others, in one offline page.

build_dataset.py writes viewer.html into the dataset folder, with viewer_data.js beside it (the page
reads it through a <script> tag, which a browser loads from disk where fetch() is refused). The data:
the questions the rows came from; every kept row with its lineage (question -> persona -> rewrite ->
solution; wrong attempt -> reflection -> corrected solution); every item dropped on the way, with its
reason: questions solved wrong (each attempt with the answer extracted, and the gold), rewrites that
were unusable, invalid (which rule) or solved wrong, reflections still wrong, duplicates (with the row
kept instead), contaminated rows (with the test item, the retrieval scores and the verdict); the
siblings kept; and stats.json. The generation stages' rejected files are read beside their outputs
(cot.jsonl -> cot_failed.jsonl, ...). Math is shown as plain LaTeX in monospace: no renderer is vendored.
The page itself is personamath/resources/viewer.html.
"""
import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from .config import read_settings_used
from .jsonl import iter_jsonl, replaced, write_text
from .parser import final_answer

PAGE = Path(__file__).parent / "resources" / "viewer.html"
# each generation stage's output -> the file of what it tried and did not keep
REJECTED_FILES = {"cot": "cot_failed", "persona": "persona_rejected", "reflection": "reflection_failed",
                  "reflection_persona": "reflection_persona_rejected"}


def _kind(reason: str) -> str:
    """The filterable kind of a rejection reason ('invalid rewrite: drops numbers ...' -> 'invalid rewrite')."""
    return reason.split(":", 1)[0]


class ViewerData:
    """The page's data, gathered from the stage outputs and build_dataset's own files."""

    def __init__(self, answer_format: str = "boxed"):
        self.answer_format = answer_format
        self.questions: dict[str, dict] = {}
        self.personas: dict[str, int] = {}
        self.kept: list[dict] = []
        self.dropped: list[dict] = []

    def persona_index(self, text) -> int:
        if not text:
            return -1
        return self.personas.setdefault(text, len(self.personas))

    def add_question(self, row: dict) -> None:
        """A generation-stage row of an original question (cot or cot_failed): its text and gold."""
        self.questions.setdefault(row["id"], {"source": row["source"], "problem": row["problem"], "gold": row["gold"],
                                              "subject": row.get("subject"), "level": row.get("level")})

    def _base(self, row: dict, stage: str) -> dict:
        question = self.questions.get(row.get("parent_id") or row["id"], {})
        return {"id": row["id"], "stage": stage, "source": row["source"], "parent": row.get("parent_id"),
                "persona": self.persona_index(row.get("persona")), "problem": row.get("problem"),
                "subject": row.get("subject") or question.get("subject"),
                "level": row.get("level") or question.get("level")}

    def add_kept(self, row: dict, generated: dict | None, sibling: dict | None) -> None:
        """A row of the dataset; `generated`: its stage's row (which also holds the reflection)."""
        generated = generated or row
        self.kept.append({**self._base(generated, row["stage"]), "response": row["response"],
                          "wrong": generated.get("reflected_on", row.get("wrong_attempt")),
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
        self._drop(row, stage, _kind(row["reason"]), row["reason"], response=response,
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
        self.dropped.append({**self._base(row, stage), "kind": kind, "reason": reason, "gold": row.get("gold"),
                             **{k: v for k, v in details.items() if v is not None}})

    def as_dict(self, stats: dict) -> dict:
        counts = Counter(f"{d['stage']}\t{d['kind']}" for d in self.dropped)
        return {"questions": self.questions, "personas": list(self.personas), "kept": self.kept,
                "dropped": self.dropped, "dropped_counts": dict(sorted(counts.items())), "stats": stats,
                "built": f"built {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by personamath/viewer.py"}


def write_data_script(path: Path, data: dict) -> None:
    """`window.PERSONAMATH_VIEWER = {...};`: the data as a script's object literal (JSON is one), written
    piece by piece (so that it is never in memory twice as text), through a temporary file. Not a
    string for JSON.parse: measured in Chromium, a 43 MB one took 2.6 s to load against 0.65 s as a
    literal, and at v2's size (over 300 MB) minutes, near V8's longest string."""
    def literal(value) -> str:
        return json.dumps(value, ensure_ascii=False)

    with replaced(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.write("window.PERSONAMATH_VIEWER = {")
        for n, (key, value) in enumerate(data.items()):
            f.write(("," if n else "") + literal(key) + ":")
            if isinstance(value, list):
                f.write("[")
                for i, item in enumerate(value):
                    f.write(("," if i else "") + literal(item))
                f.write("]")
            else:
                f.write(literal(value))
        f.write("};\n")


def write_viewer(out_dir: Path, inputs: list, dataset: list[dict], removed: list[dict], siblings: list[dict],
                 stats: dict) -> Path:
    """viewer.html and viewer_data.js in out_dir, for the dataset built from `inputs` (stage outputs);
    `removed`: build_dataset's duplicates and contaminated rows. Returns the page's path."""
    inputs = [Path(p) for p in inputs]
    # the answers extracted as gen_cot read them, by its --answer_format
    data = ViewerData(read_settings_used(inputs[0].parent, "gen_cot").get("answer_format", "boxed")
                      if inputs else "boxed")
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
    write_data_script(out_dir / "viewer_data.js", data.as_dict(stats))
    page = out_dir / "viewer.html"
    write_text(page, PAGE.read_text(encoding="utf-8"))
    return page
