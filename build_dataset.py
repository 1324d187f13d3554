"""Merge the generation stages' outputs into PersonaMathQA, the training set.

    python build_dataset.py          # runs/gen/{cot,persona,reflection,reflection_persona}.jsonl -> runs/dataset

Removes exact and near duplicates and problems that overlap the GSM8K/MATH test sets, shuffles, and
writes PersonaMathQA.jsonl, the removed rows with the reason, stats.json and stats.md.
See `python build_dataset.py --help` and personamath/dataset.py.
"""
import sys

from personamath.dataset import main

if __name__ == "__main__":
    sys.exit(main())
