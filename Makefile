# The two commands of the README: `make run` (the main job on the embedded model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
EMBEDDED := .cache/models/SmolLM2-135M-Instruct
# Slice sizes of the main job; raise them for a longer, less noisy run. MATH-500 is used for the
# MATH slice because its order mixes subjects and levels (MATH_test.jsonl is sorted by subject).
N_GSM8K ?= 16
N_MATH ?= 16
MAX_TOKENS ?= 512

.PHONY: setup run test bench

setup:
	bash scripts/setup.sh

run: setup
	$(PY) eval_gsm8k.py --model $(EMBEDDED) --data_file data/GSM8K_test.jsonl --limit $(N_GSM8K) \
		--max_tokens $(MAX_TOKENS) --output_dir runs/embedded/eval_gsm8k
	$(PY) eval_math.py --model $(EMBEDDED) --data_file data/math/math500_test.jsonl --limit $(N_MATH) \
		--max_tokens $(MAX_TOKENS) --output_dir runs/embedded/eval_math

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) bench/bench_grading.py
	$(PY) bench/bench_generation.py
	$(PY) bench/bench_train.py
