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
MODEL="${MODEL:-pretrained/InternVL-Chat-V1-2}"
META="${META:-src/shell/meta_file.json}"
OUTPUT="${OUTPUT:-runs/medrega_stage2_lora}"
BATCH_SIZE="${BATCH_SIZE:-128}"
PER_DEVICE_BATCH_SIZE="${PER_DEVICE_BATCH_SIZE:-4}"
COMMON="$(dirname "${BASH_SOURCE[0]}")/common.sh"  # sbatch runs a spooled copy: then use the submit dir
[[ -f "${COMMON}" ]] || COMMON="${SLURM_SUBMIT_DIR:-$PWD}/src/shell/common.sh"
source "${COMMON}"
DS_CONFIG="${DS_CONFIG:-${SHELL_DIR}/zero_stage3_config.json}"
mkdir -p "${OUTPUT}" logs

bash "${SHELL_DIR}/launch.sh" \
  "${MODEL_FLAGS[@]}" --meta_path "${META}" --output_dir "${OUTPUT}" \
  --conv_style Hermes-2 --force_image_size 448 --down_sample_ratio 0.5 --ps_version v1 \
  --drop_path_rate 0.0 --pad2square False --vision_select_layer -1 \
  --freeze_llm True --freeze_mlp True --freeze_backbone True --use_llm_lora "${LORA_RANK:-16}" \
  --bf16 True --num_train_epochs "${EPOCHS:-1}" \
  --per_device_train_batch_size "${PER_DEVICE_BATCH_SIZE}" --gradient_accumulation_steps "${GRADIENT_ACC}" \
  --learning_rate "${LR:-1e-5}" --weight_decay 0.05 --warmup_ratio 0.03 --lr_scheduler_type cosine \
  --save_strategy steps --save_steps "${SAVE_STEPS:-1300}" --save_total_limit 2 --logging_steps 1 \
  --report_to tensorboard --max_seq_length 2048 --group_by_length True --grad_checkpoint True \
  --dataloader_num_workers 4 --resume_from_checkpoint auto \
  --deepspeed "${DS_CONFIG}" "$@"
