"""Build data/MATH_test.jsonl, the MATH test set in the authors' eval format, from data/math/MATH_test.jsonl.

The authors' eval_math.py reads `instruction` (the problem) and `output` (a full solution whose last
`\\boxed{}` is the gold answer). `level`, `type` and `unique_id` are kept for per-level reporting.
data/GSM8K_test.jsonl needs no building: it is the authors' file, copied (see data/SOURCES.md).

    python scripts/make_authors_test_files.py
"""
from pathlib import Path

from personamath.jsonl import read_jsonl, write_jsonl

DATA = Path(__file__).resolve().parent.parent / "data"


def main() -> None:
    rows = [{"instruction": r["problem"], "output": r["solution"], "level": r["level"], "type": r["type"],
             "unique_id": r["unique_id"]} for r in read_jsonl(DATA / "math" / "MATH_test.jsonl")]
    write_jsonl(DATA / "MATH_test.jsonl", rows)
    print(f"wrote {len(rows)} rows to {DATA / 'MATH_test.jsonl'}")


if __name__ == "__main__":
    main()
