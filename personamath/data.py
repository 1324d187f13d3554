"""Loading GSM8K and MATH records in every format this project meets, detected per file.

| task  | format       | question      | gold answer                         |
|-------|--------------|---------------|-------------------------------------|
| gsm8k | authors'     | `query`       | after `#### ` in `response`         |
| gsm8k | original     | `question`    | after `#### ` in `answer`           |
| math  | MATH-500     | `problem`     | `answer`                            |
| math  | original     | `problem`     | last `\\boxed{}` of `solution`      |
| math  | authors'     | `instruction` | last `\\boxed{}` of `output`        |
"""
import json
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from . import parser
from .errors import UserError
from .jsonl import iter_jsonl


@dataclass
class Problem:
    id: str
    question: str
    gold: str
    level: str | None = None  # MATH difficulty, "1".."5" (or "?" as in two train records)
    subject: str | None = None  # MATH subject, e.g. "Algebra"


def _stripped(answer: str) -> str | None:
    return answer.strip() or None


@dataclass(frozen=True)
class _Format:
    name: str
    question_key: str
    source_key: str  # the field the gold answer is read from
    gold_from: Callable[[str], str | None]

    def gold(self, record: dict) -> str | None:
        source = record[self.source_key]
        return self.gold_from(source) if isinstance(source, str) else None


FORMATS = {
    "gsm8k": (_Format("authors' GSM8K (query/response)", "query", "response", parser.gsm8k_gold),
              _Format("GSM8K (question/answer)", "question", "answer", parser.gsm8k_gold)),
    "math": (_Format("MATH-500 (problem/answer)", "problem", "answer", _stripped),
             _Format("MATH (problem/solution)", "problem", "solution", parser.gold_boxed_answer),
             _Format("authors' MATH (instruction/output)", "instruction", "output", parser.gold_boxed_answer)),
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
        problems.append(Problem(id=str(record_id), question=question, gold=gold, level=_level(record),
                                subject=record.get("type", record.get("subject"))))
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
