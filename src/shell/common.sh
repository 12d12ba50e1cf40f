#!/usr/bin/env bash
# Sourced by the recipe scripts: locates src/shell, computes the gradient accumulation for a global batch, and holds
# the launch flags all MedRegA recipes share, so that each recipe states only what differs.
# Inputs (environment; META, OUTPUT and BATCH_SIZE (global) get their defaults from each recipe): MODEL, TOKENIZER,
# META, OUTPUT, BATCH_SIZE, PER_DEVICE_BATCH_SIZE, GPUS_PER_NODE, NNODES (or SLURM_NNODES), EPOCHS.
# Output: SHELL_DIR, WORLD_SIZE_TOTAL, GRADIENT_ACC, MODEL_FLAGS, MEDREGA_COMMON_FLAGS, and medrega_launch FLAGS...
set -euo pipefail

# Defaults shared by all recipes.
MODEL="${MODEL:-pretrained/InternVL-Chat-V1-2}"
PER_DEVICE_BATCH_SIZE="${PER_DEVICE_BATCH_SIZE:-4}"

if [[ -n "${MEDREGA_SHELL_DIR:-}" ]]; then
  SHELL_DIR="${MEDREGA_SHELL_DIR}"
elif [[ -f "$(dirname "${BASH_SOURCE[0]}")/launch.sh" ]]; then
  SHELL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
else  # sbatch runs a spooled copy of the script: use the submit dir (submit from the repository root)
  SHELL_DIR="${SLURM_SUBMIT_DIR:-$PWD}/src/shell"
fi
[[ -f "${SHELL_DIR}/launch.sh" ]] || { echo "cannot find src/shell/launch.sh (set MEDREGA_SHELL_DIR)" >&2; exit 2; }

GPUS_PER_NODE="${GPUS_PER_NODE:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
NODES="${SLURM_NNODES:-${NNODES:-1}}"
WORLD_SIZE_TOTAL=$(( GPUS_PER_NODE * NODES ))
if (( BATCH_SIZE % (PER_DEVICE_BATCH_SIZE * WORLD_SIZE_TOTAL) != 0 )); then
  echo "BATCH_SIZE=${BATCH_SIZE} is not a multiple of PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE} x ${WORLD_SIZE_TOTAL} GPUs" >&2
  exit 2
fi
GRADIENT_ACC=$(( BATCH_SIZE / PER_DEVICE_BATCH_SIZE / WORLD_SIZE_TOTAL ))
export GPUS_PER_NODE

# MODEL=preset:NAME starts from a bundled preset with random init (needs TOKENIZER=<local tokenizer dir>);
# anything else is a checkpoint directory in the original layout.
if [[ "${MODEL}" == preset:* ]]; then
  [[ -n "${TOKENIZER:-}" ]] || { echo "MODEL=${MODEL} needs TOKENIZER=<tokenizer dir>" >&2; exit 2; }
  MODEL_FLAGS=(--preset "${MODEL#preset:}" --tokenizer_path "${TOKENIZER}")
else
  MODEL_FLAGS=(--model_name_or_path "${MODEL}")
fi
echo "[recipe] global batch ${BATCH_SIZE} = ${PER_DEVICE_BATCH_SIZE} per GPU x ${WORLD_SIZE_TOTAL} GPUs x ${GRADIENT_ACC} accumulation"

# What every MedRegA recipe passes to medrega-train: the model and data, the InternVL-Chat-V1-2 / MedRegA vision and
# template settings, and the released stage-2 schedule (bf16, wd 0.05, cosine with 3% warmup, seq 2048,
# length-grouped, gradient checkpointing, resume). Per recipe: freezing, LoRA, --learning_rate, --save_steps,
# --deepspeed.
MEDREGA_COMMON_FLAGS=(
  "${MODEL_FLAGS[@]}" --meta_path "${META}" --output_dir "${OUTPUT}"
  --conv_style Hermes-2 --force_image_size 448 --down_sample_ratio 0.5 --ps_version v1
  --drop_path_rate 0.0 --pad2square False --vision_select_layer -1
  --bf16 True --num_train_epochs "${EPOCHS:-1}"
  --per_device_train_batch_size "${PER_DEVICE_BATCH_SIZE}" --gradient_accumulation_steps "${GRADIENT_ACC}"
  --weight_decay 0.05 --warmup_ratio 0.03 --lr_scheduler_type cosine
  --save_strategy steps --save_total_limit 2 --logging_steps 1
  --report_to tensorboard --max_seq_length 2048 --group_by_length True --grad_checkpoint True
  --dataloader_num_workers 4 --resume_from_checkpoint auto
)

# medrega_launch FLAGS...: start medrega-train on every GPU of every node (launch.sh) with the common flags, then the
# recipe's own FLAGS (the recipe passes its "$@" last, so extra command-line flags win).
medrega_launch() {
  mkdir -p "${OUTPUT}" logs
  bash "${SHELL_DIR}/launch.sh" "${MEDREGA_COMMON_FLAGS[@]}" "$@"
}
