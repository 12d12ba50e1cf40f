#!/usr/bin/env bash
#SBATCH --job-name=medrega-s2-qlora
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=16
#SBATCH --time=3-00:00:00
#SBATCH --output=logs/%x-%j.out
# MedRegA stage 2 on one GPU (QLoRA): MODE=qlora of medrega_stage2.sh, i.e. LoRA r16 on the LLM loaded in 4-bit NF4
# (bitsandbytes), ViT + projector + LM head frozen in bf16, gradient checkpointing, no DeepSpeed, global batch 128
# (4 x 2048 tokens per micro-batch, 32 accumulation steps on one GPU). Same overrides as medrega_stage2.sh.
#   one GPU:  MODEL=/ckpt/medrega bash src/shell/medrega_stage2_qlora.sh
#   slurm:    sbatch src/shell/medrega_stage2_qlora.sh                  (from the repository root)
#   merge:    medrega-merge-lora --run_dir runs/medrega_stage2_qlora --output_dir merged/ --dtype bfloat16 --verify
set -euo pipefail
HERE="$(dirname "${BASH_SOURCE[0]}")"  # sbatch runs a spooled copy: then use the submit dir
[[ -f "${HERE}/medrega_stage2.sh" ]] || HERE="${SLURM_SUBMIT_DIR:-$PWD}/src/shell"
MODE=qlora exec bash "${HERE}/medrega_stage2.sh" "$@"
