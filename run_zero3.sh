#!/usr/bin/env bash
# Fine-tune under DeepSpeed ZeRO-3 with the paper's defaults (lr 2e-5, 3 epochs, cosine, warmup 0.03).
# Knobs are environment variables (see scripts/launch_train.sh); arguments go on to train.py, a recipe
# too (--config configs/recipes/paper-v1.yaml reads its `train` section). E.g.
#   MODEL_PATH=meta-llama/Llama-2-7b-hf DATA_PATH=PersonaMathQA.jsonl OUTPUT_DIR=out NUM_GPUS=8 bash run_zero3.sh
DS_CONFIG=${DS_CONFIG:-configs/ds_zero3.json} exec bash "$(dirname "$0")/scripts/launch_train.sh" "$@"
