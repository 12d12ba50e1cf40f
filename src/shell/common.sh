#!/usr/bin/env bash
# Sourced by the recipe scripts: locates src/shell, computes the gradient accumulation for a global batch, and holds
# the launch flags all MedRegA recipes share, so that each recipe states only what differs.
# Inputs (environment; META, OUTPUT and BATCH_SIZE (global) get their defaults from each recipe): MODEL, TOKENIZER,
# META, OUTPUT, BATCH_SIZE, PER_DEVICE_BATCH_SIZE, GPUS_PER_NODE, NNODES (or SLURM_NNODES), EPOCHS, IMAGE_SIZE,
# DS_CONFIG (none: no DeepSpeed), ENGINE (deepspeed | fsdp2), FSDP_CONFIG, MEDREGA_DEVICE (cuda | cpu; default: cuda
# when torch sees a GPU), MEDREGA_NO_SLURM.
# Output: SHELL_DIR, WORLD_SIZE_TOTAL, GRADIENT_ACC, MODEL_FLAGS, DEVICE_FLAGS, MEDREGA_COMMON_FLAGS, and
# medrega_launch FLAGS...
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

MEDREGA_DEVICE="${MEDREGA_DEVICE:-$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
# the nodes torchrun really runs: slurm's count unless MEDREGA_NO_SLURM makes launch.sh ignore the allocation
if [[ -n "${SLURM_JOB_ID:-}" && -z "${MEDREGA_NO_SLURM:-}" ]]; then NODES="${SLURM_NNODES:-1}"; else NODES="${NNODES:-1}"; fi
WORLD_SIZE_TOTAL=$(( GPUS_PER_NODE * NODES ))
if (( BATCH_SIZE % (PER_DEVICE_BATCH_SIZE * WORLD_SIZE_TOTAL) != 0 )); then
  echo "BATCH_SIZE=${BATCH_SIZE} is not a multiple of PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE} x ${WORLD_SIZE_TOTAL} GPUs" >&2
  exit 2
fi
GRADIENT_ACC=$(( BATCH_SIZE / PER_DEVICE_BATCH_SIZE / WORLD_SIZE_TOTAL ))
export GPUS_PER_NODE

# MODEL=preset:NAME starts from a bundled preset with random init (needs TOKENIZER=<local tokenizer dir>);
# anything else is a checkpoint directory in the original layout. Tile size: IMAGE_SIZE if set; else 448 (MedRegA's)
# for a preset, and the checkpoint's own size for a checkpoint (448 for MedRegA / InternVL-Chat-V1-2).
if [[ "${MODEL}" == preset:* ]]; then
  [[ -n "${TOKENIZER:-}" ]] || { echo "MODEL=${MODEL} needs TOKENIZER=<tokenizer dir>" >&2; exit 2; }
  MODEL_FLAGS=(--preset "${MODEL#preset:}" --tokenizer_path "${TOKENIZER}" --force_image_size "${IMAGE_SIZE:-448}")
else
  MODEL_FLAGS=(--model_name_or_path "${MODEL}")
  [[ -z "${IMAGE_SIZE:-}" ]] || MODEL_FLAGS+=(--force_image_size "${IMAGE_SIZE}")
fi
# GPUs: bf16 and DeepSpeed ZeRO-3 (DS_CONFIG, default ${SHELL_DIR}/zero_stage3_tuned_config.json: the released ZeRO-3
# config with every ViT/LLM layer one gather unit ("leaf_module", DeepSpeed >= 0.19.8; an older DeepSpeed rejects the
# key), so the compiled layers stay on: 1.5-2.6x the released config's tokens/s on one H100, same losses, see
# docs/performance.md; DS_CONFIG=${SHELL_DIR}/zero_stage3_config.json is the released config as is).
# A CPU-only machine: float32 on the CPU, no DeepSpeed unless DS_CONFIG is given (then DeepSpeed's CPU accelerator
# runs it). DS_CONFIG=none: no DeepSpeed on GPUs either (MODE=qlora).
# ENGINE=fsdp2 (opt-in, instead of DeepSpeed): PyTorch FSDP2 through accelerate (FSDP_CONFIG, default
# ${SHELL_DIR}/fsdp2_config.json); the frozen ViT and projector are replicated in bf16 outside FSDP2 (medrega-train's
# default --fsdp_frozen_towers replicated; pass --fsdp_frozen_towers sharded after the script's arguments to shard them).
ENGINE="${ENGINE:-deepspeed}"
[[ "${ENGINE}" == deepspeed || "${ENGINE}" == fsdp2 ]] ||
  { echo "ENGINE=${ENGINE}: expected deepspeed or fsdp2" >&2; exit 2; }
if [[ "${MEDREGA_DEVICE}" == cuda && "${ENGINE}" == fsdp2 ]]; then
  [[ -z "${DS_CONFIG:-}" || "${DS_CONFIG}" == none ]] || { echo "ENGINE=fsdp2 takes no DS_CONFIG" >&2; exit 2; }
  DEVICE_FLAGS=(--bf16 True --fsdp full_shard --fsdp_config "${FSDP_CONFIG:-${SHELL_DIR}/fsdp2_config.json}")
elif [[ "${MEDREGA_DEVICE}" == cuda ]]; then
  DEVICE_FLAGS=(--bf16 True)
  [[ "${DS_CONFIG:-}" == none ]] || DEVICE_FLAGS+=(--deepspeed "${DS_CONFIG:-${SHELL_DIR}/zero_stage3_tuned_config.json}")
else
  DEVICE_FLAGS=(--bf16 False --use_cpu True)
  [[ -z "${DS_CONFIG:-}" || "${DS_CONFIG}" == none ]] || DEVICE_FLAGS+=(--deepspeed "${DS_CONFIG}")
fi
echo "[recipe] global batch ${BATCH_SIZE} = ${PER_DEVICE_BATCH_SIZE} per process x ${WORLD_SIZE_TOTAL} processes" \
     "(${NODES} node(s) x ${GPUS_PER_NODE}) x ${GRADIENT_ACC} accumulation; device ${MEDREGA_DEVICE}"

# What every MedRegA recipe passes to medrega-train: the model and data, the InternVL-Chat-V1-2 / MedRegA vision and
# template settings, the device flags above, and the released stage-2 schedule (wd 0.05, cosine with 3% warmup, seq
# 2048, length-grouped, gradient checkpointing, resume). Per recipe: freezing, LoRA, --learning_rate, --save_steps.
MEDREGA_COMMON_FLAGS=(
  "${MODEL_FLAGS[@]}" --meta_path "${META}" --output_dir "${OUTPUT}"
  --conv_style Hermes-2 --down_sample_ratio 0.5 --ps_version v1
  --drop_path_rate 0.0 --pad2square False --vision_select_layer -1
  "${DEVICE_FLAGS[@]}" --num_train_epochs "${EPOCHS:-1}"
  --per_device_train_batch_size "${PER_DEVICE_BATCH_SIZE}" --gradient_accumulation_steps "${GRADIENT_ACC}"
  --weight_decay 0.05 --warmup_ratio 0.03 --lr_scheduler_type cosine
  --save_strategy steps --save_total_limit 2 --logging_steps 1
  --report_to tensorboard --max_seq_length 2048 --group_by_length True --grad_checkpoint True
  --dataloader_num_workers 4 --resume_from_checkpoint auto
)

# medrega_launch FLAGS...: start medrega-train on every GPU of every node (launch.sh) with the common flags, then the
# recipe's own FLAGS (the recipe passes its "$@" last, so extra command-line flags win). logs/ is where the #SBATCH
# --output lines write (the repository ships it: slurm opens that file before the script runs).
medrega_launch() {
  mkdir -p "${OUTPUT}" logs
  bash "${SHELL_DIR}/launch.sh" "${MEDREGA_COMMON_FLAGS[@]}" "$@"
}
