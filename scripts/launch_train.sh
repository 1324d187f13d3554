#!/usr/bin/env bash
# Launch train.py with the `deepspeed` launcher and the paper's defaults. run_zero2.sh and run_zero3.sh
# call this with their DeepSpeed config; every knob is an environment variable, and arguments given
# to those scripts are passed on to train.py (where they override the defaults below).
#
# On GPUs it trains in bf16 (fp16 where the GPU has no bf16); without a GPU it runs in fp32 on
# DeepSpeed's CPU accelerator over gloo, each rank with its share of the cores.
set -euo pipefail
cd "$(dirname "$0")/.."

DS_CONFIG=${DS_CONFIG:?set DS_CONFIG (run_zero2.sh and run_zero3.sh do)}
# Default: the embedded model, converted on first use into the user cache ($PERSONAMATH_CACHE).
MODEL_PATH=${MODEL_PATH:-$(python -m personamath.embedded_model)}
DATA_PATH=${DATA_PATH:-runs/dataset/PersonaMathQA.jsonl}  # several files: space-separated
OUTPUT_DIR=${OUTPUT_DIR:-runs/train/$(basename "$MODEL_PATH")-$(basename "$DS_CONFIG" .json)}
MASTER_PORT=${MASTER_PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-}            # several nodes: the first node's address (default: the hostfile's first)
HOSTFILE=${HOSTFILE:-}                  # several nodes: a DeepSpeed hostfile ("host slots=8" per line)
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-1}  # the authors': 1 x 4 accumulation x 4 GPUs = 16
GRAD_ACCUM=${GRAD_ACCUM:-4}
EPOCHS=${EPOCHS:-3}
LR=${LR:-2e-5}
WARMUP=${WARMUP:-0.03}
SCHEDULER=${SCHEDULER:-cosine}
WEIGHT_DECAY=${WEIGHT_DECAY:-0}
MAX_LENGTH=${MAX_LENGTH:-4096}
PROMPT_TEMPLATE=${PROMPT_TEMPLATE:-alpaca}
PACKING=${PACKING:-True}                # padding-free batches; the same examples per step either way
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-False}
SAVE_STEPS=${SAVE_STEPS:-1000}
SAVE_TOTAL_LIMIT=${SAVE_TOTAL_LIMIT:-2}
LOGGING_STEPS=${LOGGING_STEPS:-1}
SEED=${SEED:-42}
DEEPSPEED=${DEEPSPEED:-deepspeed}

PRECISION=${PRECISION:-auto}           # auto: bf16 on a GPU that has it, else fp16; fp32 on the CPU

launcher=(--master_port "$MASTER_PORT")
if GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); [ "$GPUS" -gt 0 ]; then
    if [ "$PRECISION" = auto ]; then
        PRECISION=fp16
        python -c 'import sys, torch; sys.exit(not torch.cuda.is_bf16_supported())' && PRECISION=bf16
    fi
else
    GPUS=1
    export DS_ACCELERATOR=cpu
    [ "$PRECISION" = auto ] && PRECISION=fp32
    # Each rank gets its share of the cores: oversubscribed torch threads run several times slower.
    cores=$(nproc)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / ${NUM_GPUS:-1} > 0 ? cores / ${NUM_GPUS:-1} : 1 ))}
fi
case "$PRECISION" in
    bf16) precision=(--bf16 True) ;;
    fp16) precision=(--fp16 True) ;;
    fp32) precision=() ;;
    *) echo "PRECISION must be auto, bf16, fp16 or fp32, not $PRECISION" >&2; exit 2 ;;
esac
if [ -n "$HOSTFILE" ]; then
    launcher+=(--hostfile "$HOSTFILE")
    [ -n "$MASTER_ADDR" ] && launcher+=(--master_addr "$MASTER_ADDR")
    [ -n "${NUM_GPUS:-}" ] && launcher+=(--num_gpus "$NUM_GPUS")
else
    launcher+=(--num_gpus "${NUM_GPUS:-$GPUS}")
fi

# shellcheck disable=SC2086  # DATA_PATH may name several files
exec "$DEEPSPEED" "${launcher[@]}" train.py \
    --model_name_or_path "$MODEL_PATH" \
    --data_path $DATA_PATH \
    --output_dir "$OUTPUT_DIR" \
    --deepspeed "$DS_CONFIG" \
    "${precision[@]}" \
    --prompt_template "$PROMPT_TEMPLATE" \
    --packing "$PACKING" \
    --model_max_length "$MAX_LENGTH" \
    --num_train_epochs "$EPOCHS" \
    --per_device_train_batch_size "$PER_DEVICE_BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --learning_rate "$LR" \
    --warmup_steps "$WARMUP" \
    --lr_scheduler_type "$SCHEDULER" \
    --weight_decay "$WEIGHT_DECAY" \
    --gradient_checkpointing "$GRADIENT_CHECKPOINTING" \
    --eval_strategy no \
    --save_strategy steps \
    --save_steps "$SAVE_STEPS" \
    --save_total_limit "$SAVE_TOTAL_LIMIT" \
    --logging_steps "$LOGGING_STEPS" \
    --seed "$SEED" \
    --report_to none \
    "$@"
