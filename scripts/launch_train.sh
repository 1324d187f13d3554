#!/usr/bin/env bash
# Launch train.py with the `deepspeed` launcher. run_zero2.sh and run_zero3.sh call this with their
# DeepSpeed config. The training settings and their defaults are train.py's alone: each knob below is
# passed on as its train.py flag only when it is set, and arguments given to the run_zero scripts go on
# to train.py too (`--config RECIPE` included: train.py reads its `train` section). What stays here:
# the DeepSpeed config, the launcher's GPUs/hosts/port, the precision.
#
# On GPUs it trains in bf16 (fp16 where the GPU has no bf16); without a GPU it runs in fp32 on
# DeepSpeed's CPU accelerator over gloo, each rank with its share of the cores.
set -euo pipefail
cd "$(dirname "$0")/.."

DS_CONFIG=${DS_CONFIG:?set DS_CONFIG (run_zero2.sh and run_zero3.sh do)}
MASTER_PORT=${MASTER_PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-}            # several nodes: the first node's address (default: the hostfile's first)
HOSTFILE=${HOSTFILE:-}                  # several nodes: a DeepSpeed hostfile ("host slots=8" per line)
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

# Each training knob that is set, as its train.py flag (unset: train.py's default).
settings=()
for knob in MODEL_PATH:model_name_or_path OUTPUT_DIR:output_dir PER_DEVICE_BATCH_SIZE:per_device_train_batch_size GRAD_ACCUM:gradient_accumulation_steps \
            EPOCHS:num_train_epochs LR:learning_rate WARMUP:warmup_steps SCHEDULER:lr_scheduler_type \
            WEIGHT_DECAY:weight_decay MAX_LENGTH:model_max_length PROMPT_TEMPLATE:prompt_template PACKING:packing \
            GRADIENT_CHECKPOINTING:gradient_checkpointing SAVE_STEPS:save_steps SAVE_TOTAL_LIMIT:save_total_limit \
            LOGGING_STEPS:logging_steps SEED:seed; do
    name=${knob%%:*}
    [ -n "${!name:-}" ] && settings+=("--${knob#*:}" "${!name}")
done
# shellcheck disable=SC2206  # DATA_PATH may name several files, space-separated
[ -n "${DATA_PATH:-}" ] && settings+=(--data_path $DATA_PATH)

# DeepSpeed's CPU allreduce leaves a shared-memory buffer per rank, named with the port: removed at the end.
trap 'rm -f /dev/shm/deepspeed_allreduce_buffer_*_"$MASTER_PORT"_*' EXIT
"$DEEPSPEED" "${launcher[@]}" train.py \
    --deepspeed "$DS_CONFIG" \
    "${precision[@]}" \
    "${settings[@]}" \
    "$@"
