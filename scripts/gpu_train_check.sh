#!/usr/bin/env bash
# One-GPU DeepSpeed check of medrega-train on the `mid` preset (random init, tiny tokenizer, synthetic 448 px
# Text-to-Region data): ZeRO-2 and ZeRO-3, LoRA (r16, LLM) and full (LLM trained, ViT + projector frozen), bf16,
# gradient checkpointing. Writes per-run logs and trainer_state.json files, and a summary table of tokens/s
# (median over the logged steps after the first 2) and peak GPU memory, to ${OUT:-runs/gpu_check}.
#   bash scripts/gpu_train_check.sh                 (needs peft + deepspeed; see docs/training.md)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"; STEPS="${STEPS:-8}"; BS="${BS:-8}"
mkdir -p "${OUT}" /tmp/gpu_check
export PYTHONPATH="${PWD}/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
META=$(python3 scripts/write_square_data.py --out /tmp/gpu_check/data --n 96 --size 448 | tail -n 1)
python3 - <<'PY'
import json, sys
sys.path[:0] = ["src", "tests"]
from fixtures.tokenizer import build_tiny_tokenizer_dir
build_tiny_tokenizer_dir(__import__("pathlib").Path("/tmp/gpu_check/tok"))
for stage in (2, 3):  # torch AdamW inside DeepSpeed: no CUDA op build needed on a bare machine
    cfg = json.load(open(f"src/shell/zero_stage{stage}_config.json"))
    cfg["optimizer"]["params"]["torch_adam"] = True
    json.dump(cfg, open(f"/tmp/gpu_check/zero{stage}.json", "w"), indent=1)
PY
for stage in 2 3; do
  for mode in lora full; do
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
python3 - "${OUT}" <<'PY'
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1]); rows = ["| run | tokens/s (median) | samples/s | peak GPU mem GiB | first/last loss |", "|---|---|---|---|---|"]
for f in sorted(out.glob("*_state.json")):
    logs = [e for e in json.loads(f.read_text())["log_history"] if "loss" in e]
    tail = logs[2:] or logs
    rows.append(f"| {f.name.removesuffix('_state.json')} | {statistics.median(e['tokens_per_second'] for e in tail if 'tokens_per_second' in e):.0f} | "
                f"{statistics.median(e['samples_per_second'] for e in tail if 'samples_per_second' in e):.2f} | "
                f"{max(e.get('gpu_mem_peak_gib', 0) for e in logs):.2f} | {logs[0]['loss']:.3f} / {logs[-1]['loss']:.3f} |")
(out / "summary.md").write_text("\n".join(rows) + "\n"); print("\n".join(rows))
PY
