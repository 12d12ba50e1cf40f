#!/usr/bin/env bash
# Train the bundled MedReg-mini model with medrega-train and export it (bf16 safetensors shards <= 15 MB).
#
#   scripts/train_medreg_mini.sh OUT_DIR [TIME_BUDGET_S]
#
# Needs data/built/medreg_mini (scripts/build_medreg_mini.py). Steps: tokenizer + random init
# (scripts/init_medreg_mini_model.py) -> a 40-step probe run to measure seconds/step on this machine -> the real run,
# sized so that it fits TIME_BUDGET_S (default 300 s of training; cosine schedule over exactly those steps) ->
# export to OUT_DIR/model. The probe's time includes start-up (data loader workers, first CUDA kernels), so it
# overestimates the time per step (on an H200: 2.6 steps/s probed vs 10.9 steps/s in the real run) and the run ends
# well inside the budget. MAX_STEPS=N skips the probe: MAX_STEPS=689 reproduces the committed model's run.
# Works on one GPU (bf16) or on CPU (slow: use MAX_STEPS and expect hours on 2 cores).
set -euo pipefail
OUT=${1:?usage: scripts/train_medreg_mini.sh OUT_DIR [TIME_BUDGET_S]}
BUDGET=${2:-300}
DATA=${DATA:-data/built/medreg_mini}
BS=${BATCH_SIZE:-64}
LR=${LR:-1e-3}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
BF16=False; WORKERS=2
if $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then BF16=True; WORKERS=8; fi

common=(--meta_path "$DATA/meta_file.json" --bf16 "$BF16" --per_device_train_batch_size "$BS"
        --learning_rate "$LR" --weight_decay 0.05 --warmup_steps 0.03 --lr_scheduler_type cosine
        --max_seq_length 1024 --no_grad_checkpoint --dataloader_num_workers "$WORKERS" --report_to none
        --save_strategy no --logging_steps 25 --seed 0 --overwrite_output_dir True)

$PY scripts/init_medreg_mini_model.py --data "$DATA" --out "$OUT/init"
if [ -z "${MAX_STEPS:-}" ]; then
  $PY -m internvl.train --model_name_or_path "$OUT/init" --output_dir "$OUT/probe" --max_steps 40 "${common[@]}"
  MAX_STEPS=$($PY - "$OUT/probe/train_results.json" "$BUDGET" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(max(100, int(float(sys.argv[2]) / (float(r["train_runtime"]) / 40))))
PYEOF
)
  rm -rf "$OUT/probe"
fi
echo "training for $MAX_STEPS steps (batch $BS, lr $LR, bf16 $BF16)"
$PY -m internvl.train --model_name_or_path "$OUT/init" --output_dir "$OUT/run" --max_steps "$MAX_STEPS" "${common[@]}"
$PY scripts/export_medreg_mini_model.py --run "$OUT/run" --tokenizer "$OUT/init" --out "$OUT/model"
