#!/usr/bin/env bash
# One-GPU DeepSpeed check of medrega-train on the `mid` preset (random init, tiny tokenizer, synthetic 448 px
# Text-to-Region data): ZeRO-2 and ZeRO-3, LoRA (r16, LLM) and full (LLM trained, ViT + projector frozen), bf16,
# gradient checkpointing. Writes per-run logs and trainer_state.json files, and a summary table of tokens/s
# (median over the logged steps after the first 2) and peak GPU memory, to ${OUT:-runs/gpu_check}.
#   bash lab/scripts/gpu_train_check.sh                 (needs peft + deepspeed; see docs/training.md)
#   STAGES="2" MODES="full" STEPS=6 bash lab/scripts/gpu_train_check.sh    (a subset)
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root: `python3 -m lab...` imports the lab from here
OUT="${OUT:-runs/gpu_check}"; STEPS="${STEPS:-8}"; BS="${BS:-8}"
mkdir -p "${OUT}" /tmp/gpu_check
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
META=$(python3 -m lab.scripts.gpu_check_prep /tmp/gpu_check 96 | tail -n 1)
for stage in ${STAGES:-2 3}; do
  for mode in ${MODES:-lora full}; do
    name="zero${stage}_${mode}"
    if [[ $mode == lora ]]; then FLAGS="--freeze_llm True --use_llm_lora 16"; LR=1e-4; else FLAGS="--freeze_llm False"; LR=1e-5; fi
    start=$(date +%s)
    torchrun --nproc-per-node=1 --master-port=$((29500 + stage)) -m internvl.train \
      --preset mid --tokenizer_path /tmp/gpu_check/tok --meta_path "${META}" --output_dir "/tmp/gpu_check/${name}" \
      --freeze_backbone True --freeze_mlp True ${FLAGS} --bf16 True --grad_checkpoint True \
      --deepspeed "/tmp/gpu_check/zero${stage}.json" --per_device_train_batch_size "${BS}" --max_steps "${STEPS}" \
      --learning_rate "${LR}" --logging_steps 1 --save_strategy no --report_to none --disable_tqdm True \
      --dataloader_num_workers 4 --max_seq_length 1024 --overwrite_output_dir True \
      > "${OUT}/${name}.log" 2>&1 || { echo "${name} failed"; tail -n 30 "${OUT}/${name}.log"; }
    echo "${name}: $(( $(date +%s) - start )) s wall"
    cp "/tmp/gpu_check/${name}/trainer_state.json" "${OUT}/${name}_state.json" 2>/dev/null || true
  done
done
python3 -m lab.scripts.summarize_train_logs "${OUT}"/zero*_state.json  \
  | tee "${OUT}/summary.md"
