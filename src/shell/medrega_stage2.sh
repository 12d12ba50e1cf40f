#!/usr/bin/env bash
#SBATCH --job-name=medrega-s2-lora
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --time=3-00:00:00
#SBATCH --output=logs/%x-%j.out
# MedRegA stage 2, LoRA on the LLM (what the paper says): ViT, projector and LLM base frozen; rank 16, alpha 32.
# Merge afterwards: python scripts/merge_lora.py --run_dir $OUTPUT --output_dir merged/
# lr 1e-5 cosine, warmup 3%, wd 0.05, global batch 128, seq 2048, bf16, gradient checkpointing, ZeRO-3,
# length-grouped sampling, 1 epoch (the paper says 2: set EPOCHS=2).
#   slurm:      sbatch src/shell/medrega_stage2_lora.sh            (from the repository root)
#   one node:   GPUS_PER_NODE=8 bash src/shell/medrega_stage2_lora.sh
# Overrides: MODEL (a checkpoint dir, or preset:NAME with TOKENIZER=dir), META, OUTPUT, BATCH_SIZE, PER_DEVICE_BATCH_SIZE, LR, EPOCHS, LORA_RANK, DS_CONFIG; extra flags are passed on.
set -euo pipefail
META="${META:-src/shell/meta_file.json}"
OUTPUT="${OUTPUT:-runs/medrega_stage2_lora}"
BATCH_SIZE="${BATCH_SIZE:-128}"
COMMON="$(dirname "${BASH_SOURCE[0]}")/common.sh"  # sbatch runs a spooled copy: then use the submit dir
[[ -f "${COMMON}" ]] || COMMON="${SLURM_SUBMIT_DIR:-$PWD}/src/shell/common.sh"
source "${COMMON}"
DS_CONFIG="${DS_CONFIG:-${SHELL_DIR}/zero_stage3_config.json}"

# stage 2, LoRA: only LoRA adapters on the LLM train; ViT, projector and LLM base frozen
medrega_launch \
  --freeze_llm True --freeze_mlp True --freeze_backbone True --use_llm_lora "${LORA_RANK:-16}" \
  --learning_rate "${LR:-1e-5}" --save_steps "${SAVE_STEPS:-1300}" \
  --deepspeed "${DS_CONFIG}" "$@"
