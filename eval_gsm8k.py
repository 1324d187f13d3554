"""Evaluate a model on GSM8K with vLLM (greedy), graded by the authors' grader and by math-verify.

    python eval_gsm8k.py --model PATH --data_file GSM8K_test.jsonl

By default it generates exactly as the authors' script did (--protocol authors: their stop list, 4096
tokens), the protocol to compare with the published table; --protocol ours stops only at the next
Alpaca block (and takes --prompt chat).
See `python eval_gsm8k.py --help` and personamath/evaluation.py.
"""
from personamath.evaluation import main

if __name__ == "__main__":
    main("gsm8k")
