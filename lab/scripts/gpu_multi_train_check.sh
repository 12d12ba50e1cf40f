#!/usr/bin/env bash
# Multi-GPU checks of medrega-train (needs a host with >= 2 GPUs, peft + deepspeed). On the `mid` preset (random
# init, tiny tokenizer, synthetic 448 px data):
#   1. ZeRO-2 and ZeRO-3, LoRA (dropout 0, so the runs can agree) and full, on 1 GPU with per-GPU batch 4 x gradient
#      accumulation 2 (global batch 8) and on 2 GPUs with per-GPU batch 4 x accumulation 1 (same global batch): the
#      per-step losses must agree within MAX_DIFF (the loss is averaged per token over all micro-batches and ranks,
#      so only bf16 rounding differs);
#   2. the recipe's torchrun path with two "nodes" on one host: MODE=full src/shell/medrega_stage2.sh started twice
#      (NNODES=2, NODE_RANK=0/1, one GPU each, MASTER_ADDR=127.0.0.1; MEDREGA_NO_SLURM=1, so inside a slurm
#      allocation it keeps this layout), compared with the 2-GPU single-node ZeRO-3 run the same way.
# Reports tokens/s, samples/s and peak memory per GPU (rank 0) and the largest per-step loss difference; exits 1 if
# any run fails or any comparison is off.
#   bash lab/scripts/gpu_multi_train_check.sh   (OUT=dir STEPS=n MAX_DIFF=x to change; logs, trainer_state.json
#                                                and summary.md under OUT)
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root: `python3 -m lab...` imports the lab from here
OUT="${OUT:-runs/gpu_multi_check}"; STEPS="${STEPS:-20}"; MAX_DIFF="${MAX_DIFF:-0.02}"; WORK=/tmp/gpu_multi_check
mkdir -p "${OUT}" "${WORK}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
META=$(python3 -m lab.scripts.gpu_check_prep "${WORK}" 128 | tail -n 1)
COMMON=(--preset mid --tokenizer_path "${WORK}/tok" --meta_path "${META}" --freeze_backbone True --freeze_mlp True
        --bf16 True --grad_checkpoint True --max_steps "${STEPS}" --logging_steps 1 --save_strategy no
        --report_to none --disable_tqdm True --dataloader_num_workers 4 --max_seq_length 1024 --seed 11
        --per_device_train_batch_size 4 --overwrite_output_dir True
        --warmup_ratio 0.03 --lr_scheduler_type cosine --weight_decay 0.05)  # = the recipe schedule
FAILED=()

run() {  # run NAME NPROC GRAD_ACC STAGE MODE
  local name=$1 nproc=$2 acc=$3 stage=$4 mode=$5 flags
  if [[ $mode == lora ]]; then flags=(--freeze_llm True --use_llm_lora 16 --lora_dropout 0 --learning_rate 1e-4)
  else flags=(--freeze_llm False --learning_rate 1e-5); fi
  local start; start=$(date +%s)
  torchrun --nproc-per-node="${nproc}" --master-port=29611 -m internvl.train "${COMMON[@]}" "${flags[@]}" \
    --gradient_accumulation_steps "${acc}" --deepspeed "${WORK}/zero${stage}.json" --output_dir "${WORK}/${name}" \
    > "${OUT}/${name}.log" 2>&1 || { echo "${name} FAILED"; tail -n 40 "${OUT}/${name}.log"; FAILED+=("${name}"); }
  echo "${name}: $(( $(date +%s) - start )) s"
  cp "${WORK}/${name}/trainer_state.json" "${OUT}/${name}_state.json" 2>/dev/null || true
}

compare() {  # compare REFERENCE_STATE STATE: per-step losses within MAX_DIFF, or the check fails
  python3 -m lab.scripts.summarize_train_logs "$1" "$2" --reference "$1" --max-diff "${MAX_DIFF}" \
    | tee -a "${OUT}/summary.md" || FAILED+=("$(basename "$2") vs $(basename "$1")")
}

for stage in 2 3; do
  for mode in lora full; do
    CUDA_VISIBLE_DEVICES=0 run "z${stage}_${mode}_1gpu" 1 2 "${stage}" "${mode}"
    CUDA_VISIBLE_DEVICES=0,1 run "z${stage}_${mode}_2gpu" 2 1 "${stage}" "${mode}"
    compare "${OUT}/z${stage}_${mode}_1gpu_state.json" "${OUT}/z${stage}_${mode}_2gpu_state.json"
  done
done

# Two "nodes" on one host through the recipe script (the path slurm jobs take, minus srun).
start=$(date +%s)
pids=()
for rank in 0 1; do
  CUDA_VISIBLE_DEVICES=${rank} MEDREGA_NO_SLURM=1 NNODES=2 NODE_RANK=${rank} GPUS_PER_NODE=1 MASTER_ADDR=127.0.0.1 \
  MASTER_PORT=29622 MODE=full MODEL=preset:mid TOKENIZER="${WORK}/tok" META="${META}" OUTPUT="${WORK}/two_nodes" \
  BATCH_SIZE=8 PER_DEVICE_BATCH_SIZE=4 DS_CONFIG="${WORK}/zero3.json" \
    bash src/shell/medrega_stage2.sh --max_steps "${STEPS}" --report_to none --save_strategy no --seed 11 \
      --disable_tqdm True --dataloader_num_workers 4 --max_seq_length 1024 --group_by_length False \
      --overwrite_output_dir True > "${OUT}/two_nodes_rank${rank}.log" 2>&1 &
  pids+=($!)
done
for i in 0 1; do
  wait "${pids[$i]}" || { echo "two-node run, node ${i} FAILED (see ${OUT}/two_nodes_rank${i}.log)"; FAILED+=("two_nodes_rank${i}"); }
done
echo "two_nodes: $(( $(date +%s) - start )) s"
cp "${WORK}/two_nodes/trainer_state.json" "${OUT}/two_nodes_state.json" 2>/dev/null || true
compare "${OUT}/z3_full_2gpu_state.json" "${OUT}/two_nodes_state.json"

if (( ${#FAILED[@]} )); then
  echo "FAILED: ${FAILED[*]}" >&2
  exit 1
fi
echo "all multi-GPU checks passed (per-step losses within ${MAX_DIFF})"
