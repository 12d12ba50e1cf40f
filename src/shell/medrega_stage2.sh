#!/usr/bin/env bash
#SBATCH --job-name=medrega-s2
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --time=3-00:00:00
#SBATCH --output=logs/%x-%j.out
# MedRegA stage 2 (instruction tuning). MODE says what trains; everything else is the released script's schedule:
#   MODE=lora (default; what the paper says): LoRA r=16 (alpha 32) on the LLM; ViT, projector and LLM base frozen.
#             Merge afterwards: medrega-merge-lora --run_dir $OUTPUT --output_dir merged/
#   MODE=full (what the released script does, despite its `_lora` file name): the whole LLM; ViT and projector frozen.
#   MODE=qlora (one GPU, e.g. one 80 GB H100 for the 40B): MODE=lora on an LLM loaded in 4-bit NF4 (bitsandbytes;
#             ViT, projector and LM head stay bf16), no DeepSpeed, 1 GPU per node by default (more GPUs: plain data
#             parallel, each holding the whole 4-bit model). Merge as for lora (adapters go into the dequantised
#             base). Also src/shell/medrega_stage2_qlora.sh. Memory: python -m lab.memory_plan
# lr 1e-5 cosine, warmup 3%, wd 0.05, global batch 128, seq 2048, gradient checkpointing, length-grouped sampling,
# 1 epoch (the paper says 2: set EPOCHS=2); on GPUs bf16 + ZeRO-3, on a CPU-only machine float32 without DeepSpeed.
#   slurm:      sbatch src/shell/medrega_stage2.sh                 (from the repository root; MODE=full sbatch ...)
#   one node:   GPUS_PER_NODE=8 MODE=full bash src/shell/medrega_stage2.sh
# Overrides: MODE, MODEL (a checkpoint dir, or preset:NAME with TOKENIZER=dir), META, OUTPUT, BATCH_SIZE,
# PER_DEVICE_BATCH_SIZE, LR, EPOCHS, LORA_RANK, SAVE_STEPS, IMAGE_SIZE, DS_CONFIG (default on GPUs:
# src/shell/zero_stage3_tuned_config.json; zero_stage3_config.json = the released one; none = no DeepSpeed), ENGINE=fsdp2 (opt-in: FSDP2 instead of DeepSpeed), GPUS_PER_NODE;
# extra flags are passed on and win.
set -euo pipefail
MODE="${MODE:-lora}"
case "${MODE}" in  # the only difference between the two stage-2 recipes: what trains
  lora) WHAT_TRAINS=(--freeze_llm True --freeze_mlp True --freeze_backbone True --use_llm_lora "${LORA_RANK:-16}") ;;
  full) WHAT_TRAINS=(--freeze_llm False --freeze_mlp True --freeze_backbone True) ;;
  qlora) WHAT_TRAINS=(--freeze_llm True --freeze_mlp True --freeze_backbone True --use_llm_lora "${LORA_RANK:-16}"
                      --load_in_4bit True --bnb_4bit_quant_type nf4 --use_bnb_nested_quant True)
         : "${DS_CONFIG:=none}" "${GPUS_PER_NODE:=1}" ;;
  *) echo "MODE=${MODE}: expected lora, full or qlora" >&2; exit 2 ;;
esac
: "${META:=src/shell/meta_file.json}" "${OUTPUT:=runs/medrega_stage2_${MODE}}" "${BATCH_SIZE:=128}"  # this recipe's defaults
COMMON="$(dirname "${BASH_SOURCE[0]}")/common.sh"  # sbatch runs a spooled copy: then use the submit dir
[[ -f "${COMMON}" ]] || COMMON="${SLURM_SUBMIT_DIR:-$PWD}/src/shell/common.sh"
source "${COMMON}"

medrega_launch "${WHAT_TRAINS[@]}" --learning_rate "${LR:-1e-5}" --save_steps "${SAVE_STEPS:-1300}" "$@"
