"""Evaluate a model on MATH with vLLM (greedy), graded by the authors' grader and by math-verify.

    python eval_math.py --model PATH --data_file MATH_test.jsonl

--protocol authors generates exactly as the authors' script did (their stop list, 4096 tokens): the
protocol to compare with the published table; the default, ours, stops only at the next Alpaca block.
See `python eval_math.py --help` and personamath/evaluation.py.
"""
from personamath.evaluation import main

if __name__ == "__main__":
    main("math")
