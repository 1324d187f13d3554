"""JSONL reading and writing. Errors name the file and line; writes never leave a half-written file."""
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError


def iter_jsonl(path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line; a malformed line is a UserError."""
    for lineno, _, record in iter_jsonl_at(path):
        yield lineno, record


def iter_jsonl_at(path) -> Iterator[tuple[int, int, dict]]:
    """Yield (line number, byte offset of the line, record) for each non-blank line (read_at reads the
    record back); a malformed line, or one that is not UTF-8, is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with path.open("rb") as f:
        offset = 0
        for lineno, line in enumerate(f, start=1):
            at, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {err.start + 1})") from None
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, at, record


def read_jsonl(path) -> list[dict]:
    return [record for _, record in iter_jsonl(path)]


@contextmanager
def replaced(path):
    """A temporary path beside `path` to write, renamed over `path` when the block ends without an error
    (atomic on POSIX), removed when it ends with one: `path` never holds a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


class JsonlWriter:
    """Records written one at a time to a temporary file beside `path`, renamed over it by commit()
    (atomic on POSIX): `path` never holds a half-written file, and a writer closed without commit
    (the run failed) removes its temporary file and leaves `path` as it was."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.file = self.tmp.open("w", encoding="utf-8")
        self.count = 0

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def commit(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
            self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, *rest):
        self.discard() if kind is not None else self.commit()


def write_jsonl(path, records: Iterable[dict]) -> None:
    """Write all records to a temporary file, then rename it over `path` (atomic on POSIX)."""
    with JsonlWriter(path) as out:
        for record in records:
            out.write(record)


def write_text(path, text: str) -> None:
    with replaced(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
