#!/usr/bin/env bash
#SBATCH --job-name=medrega-s1-mlp
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --time=2-00:00:00
#SBATCH --output=logs/%x-%j.out
# MedRegA stage 1 (alignment): only the projector mlp1 trains; ViT and LLM frozen; 1 epoch on caption/report data.
# MedRegA did not release this script or its hyperparameters; lr 2e-4 with global batch 256 follows InternVL's
# MLP-warm-up stage. ZeRO-3 by default, as in the stage-2 recipes; ZeRO-1 would be enough here (the frozen 40B
# weights carry no optimizer state): DS_CONFIG=src/shell/zero_stage1_config.json.
#   slurm:      sbatch src/shell/medrega_stage1_projector.sh       (from the repository root)
#   one node:   GPUS_PER_NODE=8 bash src/shell/medrega_stage1_projector.sh
# Overrides: MODEL (a checkpoint dir, or preset:NAME with TOKENIZER=dir), META, OUTPUT, BATCH_SIZE,
# PER_DEVICE_BATCH_SIZE, LR, EPOCHS, SAVE_STEPS, IMAGE_SIZE, DS_CONFIG; extra flags are passed on and win.
set -euo pipefail
: "${META:=src/shell/meta_file_stage1.json}" "${OUTPUT:=runs/medrega_stage1_projector}" "${BATCH_SIZE:=256}"  # this recipe's defaults
COMMON="$(dirname "${BASH_SOURCE[0]}")/common.sh"  # sbatch runs a spooled copy: then use the submit dir
[[ -f "${COMMON}" ]] || COMMON="${SLURM_SUBMIT_DIR:-$PWD}/src/shell/common.sh"
source "${COMMON}"

# stage 1: only the projector trains
medrega_launch --freeze_llm True --freeze_mlp False --freeze_backbone True \
  --learning_rate "${LR:-2e-4}" --save_steps "${SAVE_STEPS:-1000}" "$@"
