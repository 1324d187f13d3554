"""Loading GSM8K and MATH records in every format this project meets, detected per file.

| task  | format       | question      | gold answer                         |
|-------|--------------|---------------|-------------------------------------|
| gsm8k | authors'     | `query`       | after `#### ` in `response`         |
| gsm8k | original     | `question`    | after `#### ` in `answer`           |
| math  | MATH-500     | `problem`     | `answer`                            |
| math  | original     | `problem`     | last `\\boxed{}` of `solution`      |
| math  | authors'     | `instruction` | last `\\boxed{}` of `output`        |

The reference solution (the gold answer's field, or MATH-500's `solution`) orders and filters the train
questions (`Selection`: gen_cot.py's --slice, --levels, --subjects, --max_solution_chars; chain.py's --slice).
"""
import json
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from . import parser
from .errors import UserError
from .jsonl import iter_jsonl

# The train questions of both sources (paths from the repository root): what the paper regenerates
TRAIN_FILES = {"gsm8k": "data/gsm8k/train.jsonl", "math": "data/math/MATH_train.jsonl"}


@dataclass
class Problem:
    id: str
    question: str
    gold: str
    level: str | None = None  # MATH difficulty, "1".."5" (or "?" as in two train records)
    subject: str | None = None  # MATH subject, e.g. "Algebra"
    solution: str | None = None  # the reference solution, GSM8K's with its <<calculation>> marks
    line: int | None = None  # the record's line in its file (its position in a JSON list or dataset)


def _stripped(answer: str) -> str | None:
    return answer.strip() or None


@dataclass(frozen=True)
class _Format:
    name: str
    question_key: str
    source_key: str  # the field the gold answer is read from
    gold_from: Callable[[str], str | None]
    solution_key: str  # the field of the reference solution

    def gold(self, record: dict) -> str | None:
        source = record[self.source_key]
        return self.gold_from(source) if isinstance(source, str) else None


FORMATS = {
    "gsm8k": (_Format("authors' GSM8K (query/response)", "query", "response", parser.gsm8k_gold, "response"),
              _Format("GSM8K (question/answer)", "question", "answer", parser.gsm8k_gold, "answer")),
    "math": (_Format("MATH-500 (problem/answer)", "problem", "answer", _stripped, "solution"),
             _Format("MATH (problem/solution)", "problem", "solution", parser.gold_boxed_answer, "solution"),
             _Format("authors' MATH (instruction/output)", "instruction", "output", parser.gold_boxed_answer,
                     "output")),
}


class FormatMismatch(UserError):
    """The records are not of the task asked for."""


def _detect(task: str, path, lineno: int, record: dict) -> _Format:
    for fmt in FORMATS[task]:
        if fmt.question_key in record and fmt.source_key in record:
            return fmt
    expected = "; ".join(f"{f.question_key}/{f.source_key}" for f in FORMATS[task])
    raise FormatMismatch(f"{path}:{lineno}: not a {task} record: has keys {sorted(record)}, expected {expected}")


def records(source):
    """(line number, record) of a JSONL file, a JSON file holding a list of objects (the authors'
    PersonaMathQA.json; numbered by position), or a `datasets` dataset named `name[:config]:split`."""
    if Path(source).is_file() and Path(source).suffix == ".json":
        yield from _json_list(Path(source))
        return
    if Path(source).is_file() or ":" not in str(source):
        yield from iter_jsonl(source)
        return
    import datasets

    name, *config, split = str(source).split(":")
    try:
        dataset = datasets.load_dataset(name, *config, split=split)
    except Exception as err:  # noqa: BLE001 - offline, unknown name, bad split: all the user's to fix
        raise UserError(f"{source}: cannot load dataset ({type(err).__name__}: {err})") from None
    yield from enumerate(dataset, start=1)


def _json_list(path: Path):
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):  # a JSONL file named .json
        yield from iter_jsonl(path)
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    for index, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise UserError(f"{path}: item {index} is not a JSON object")
        yield index, item


def _level(record: dict) -> str | None:
    level = record.get("level")
    if level is None:
        return None
    return str(level).removeprefix("Level ").strip()


def load_problems(task: str, path, limit: int | None = None) -> list[Problem]:
    """The records of a JSONL file (or `datasets` name) as Problems, the first `limit` of them or all; the
    format is detected from the first."""
    problems, fmt, stem = [], None, Path(path).stem
    if limit == 0:
        return problems
    for lineno, record in records(path):
        fmt = fmt or _detect(task, path, lineno, record)
        question = record.get(fmt.question_key)
        if not isinstance(question, str) or not question.strip():
            raise UserError(f"{path}:{lineno}: record has no question in `{fmt.question_key}`")
        if fmt.source_key not in record:
            raise UserError(f"{path}:{lineno}: record has no `{fmt.source_key}` (file is {fmt.name})")
        gold = fmt.gold(record)
        if gold is None:
            raise UserError(f"{path}:{lineno}: no gold answer in `{fmt.source_key}`")
        record_id = record.get("unique_id", record.get("idx", f"{stem}:{lineno}"))
        solution = record.get(fmt.solution_key)
        problems.append(Problem(id=str(record_id), question=question, gold=gold, level=_level(record),
                                subject=record.get("type", record.get("subject")),
                                solution=solution if isinstance(solution, str) else None, line=lineno))
        if len(problems) == limit:  # not one line more is read
            break
    if not problems:
        raise UserError(f"{path}: no records")
    return problems


def load_any(path, limit: int | None = None) -> tuple[str, list[Problem]]:
    """The task (gsm8k or math) whose format the records have, and the (first `limit`) records as Problems."""
    for task in FORMATS:
        try:
            return task, load_problems(task, path, limit)
        except FormatMismatch:
            continue
    raise UserError(f"{path}: neither GSM8K nor MATH records")


# --- which train questions a run takes, in which order ------------------------------------------------------

ORDERS = {
    "first": "the files' order",
    "easy": "easiest first: GSM8K by the calculation steps (<<...>> marks) of the reference solution, then its "
            "length; MATH level 1 first, then by the length of the solution (a small model has a chance there)",
}
ORDER_HELP = "; ".join(f"{name}: {meaning}" for name, meaning in ORDERS.items())
MATH_LEVELS = ("1", "2", "3", "4", "5")
MATH_SUBJECTS = ("Algebra", "Counting & Probability", "Geometry", "Intermediate Algebra", "Number Theory",
                 "Prealgebra", "Precalculus")


def _easiness(task: str) -> Callable[[Problem], tuple]:
    if task == "gsm8k":
        return lambda p: (p.solution.count("<<"), len(p.solution))
    return lambda p: (p.level != "1", len(p.solution))


@dataclass(frozen=True)
class Selection:
    """Which questions of a file a run takes, and in which order: MATH levels and subjects (GSM8K questions
    have neither and are not filtered by them), the most characters of the reference solution, then the
    order (ORDERS). Sorting is stable, so a selection is the same on every run."""
    order: str = "first"
    levels: tuple[str, ...] | None = None
    subjects: tuple[str, ...] | None = None
    max_solution_chars: int | None = None

    def __post_init__(self):
        if self.order not in ORDERS:
            raise UserError(f"--slice {self.order}: not one of {', '.join(ORDERS)}")
        if self.max_solution_chars is not None and self.max_solution_chars < 1:
            raise UserError(f"--max_solution_chars {self.max_solution_chars}: must be at least 1")

    def takes_all_in_order(self) -> bool:
        """True when it takes every question in the file's order, so that the first N are the first N lines."""
        return self == Selection(order="first")

    def describe(self) -> str:
        parts = [f"--slice {self.order}"]
        parts += [f"--levels {' '.join(self.levels)}"] if self.levels else []
        parts += [f"--subjects {' '.join(map(repr, self.subjects))}"] if self.subjects else []
        parts += [f"--max_solution_chars {self.max_solution_chars}"] if self.max_solution_chars else []
        return " ".join(parts)

    def keeps(self, task: str, problem: Problem) -> bool:
        if task == "math" and self.levels and problem.level not in self.levels:
            return False
        if task == "math" and self.subjects and problem.subject not in self.subjects:
            return False
        return self.max_solution_chars is None or len(problem.solution) <= self.max_solution_chars

    def take(self, source, task: str, problems: list[Problem], limit: int | None = None) -> list[Problem]:
        """The problems it keeps, in its order, the first `limit` of them; none is an error naming `source`."""
        if self.order == "easy" or self.max_solution_chars is not None:
            unsolved = next((p for p in problems if p.solution is None), None)
            if unsolved is not None:
                raise UserError(f"{source}: record {unsolved.line} has no reference solution, which "
                                f"{self.describe()} needs")
        kept = [p for p in problems if self.keeps(task, p)]
        if self.order == "easy":
            kept.sort(key=_easiness(task))
        if not kept:
            raise UserError(f"{source}: none of its {len(problems)} questions passes {self.describe()}")
        return kept[:limit]


def load_selected(path, selection: Selection, limit: int | None = None) -> tuple[str, list[Problem]]:
    """load_any, then the problems `selection` takes (the first `limit`); ids stay those of the file."""
    if selection.takes_all_in_order():
        return load_any(path, limit)
    task, problems = load_any(path)
    return task, selection.take(path, task, problems, limit)


def select_records(task: str, path, selection: Selection, limit: int | None = None) -> list[dict]:
    """The records of the problems `selection` takes from a file, as they are there plus their id (`idx`),
    so that a file of them gives each problem the id it has in `path`."""
    chosen = selection.take(path, task, load_problems(task, path), limit)
    by_line = dict(records(path))
    return [{**by_line[problem.line], "idx": problem.id} for problem in chosen]
