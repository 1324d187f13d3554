# The two commands of the README: `make run` (the main job on the embedded model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The main job: the whole chain on the embedded model (chain.py; everything under runs/$(NAME)/).
# Sizes are recipe overrides, e.g. make run CHAIN_ARGS="chain.n_gsm8k=200 chain.n_math=200 eval_gsm8k.limit=100".
NAME ?= embedded
CHAIN_ARGS ?=

.PHONY: setup run test test-fast bench lock

setup:
	bash scripts/setup.sh

run: setup
	$(PY) chain.py --name $(NAME) $(CHAIN_ARGS)

test: setup
	$(PY) -m pytest tests

# The tests that start no vLLM engine and no DeepSpeed process (minutes, not half an hour), a worker per
# core, each free test to the first idle worker (the whole suite stays in one process: its tests share
# one engine).
test-fast: setup
	$(PY) -m pytest tests -m "not slow" -n auto --dist worksteal

# Regenerate requirements/{cpu,gpu}.lock.txt from requirements.txt (scripts/lock.sh; minutes).
lock:
	bash scripts/lock.sh

bench: setup
	$(PY) bench/bench_grading.py
	$(PY) bench/bench_generation.py
	$(PY) bench/bench_ratelimit.py
	$(PY) bench/bench_rehearsal.py --judge_top_k 1
	$(PY) bench/bench_viewer.py
	$(PY) bench/bench_build_dataset.py
	$(PY) bench/bench_train.py
