#!/usr/bin/env bash
# Retrain the bundled MedReg-mini model on ONE GPU, export it, evaluate it and write the score table (issue #17).
#
#   scripts/gpu_retrain_medreg_mini.sh OUT_DIR
#
# Before: build the data on a CPU machine (python3 -m scripts.build_medreg_mini --out data/built/medreg_mini) and carry
# data/built/medreg_mini (and, where the GPU machine lacks them, the wheels in .whl/: peft - imported by
# internvl.train for its LoRA paths even in a full fine-tune - pycocotools for medrega-eval's mAP, and the transformers
# the venv uses where the GPU's differs). No network needed.
# Steps: wheels from .whl/ into a private --target folder (never the system site-packages) -> tokenizer + random init
# -> medrega-train for MAX_STEPS (default 3600, batch 64: about 10 epochs of the ~23k training records) -> export
# (bf16 safetensors) -> medrega-eval run (float32, greedy) on every medreg_mini benchmark -> the trivial baselines
# scored the same way -> OUT_DIR/scores.md (+ .json). Scratch files (init, run checkpoints) stay in WORK (a temp dir),
# so OUT_DIR holds only: model/, train.log, train_results.json, eval/, baselines/, scores.md, scores.json.
# NO_SCORE=1: generate only (score the predictions on another machine).
# Smoke run on CPU (minutes; numbers meaningless): MAX_STEPS=2 BATCH_SIZE=2 EVAL_LIMIT=2 MAX_NEW_TOKENS=16 ...
set -euo pipefail
OUT=${1:?usage: scripts/gpu_retrain_medreg_mini.sh OUT_DIR}
DATA=${DATA:-data/built/medreg_mini}
PY=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d)}
export MAX_STEPS=${MAX_STEPS:-3600} DATA PYTHON=$PY
[ -f "$DATA/manifest.json" ] || { echo "$DATA: no MedReg-mini build; run scripts/build_medreg_mini.py first" >&2; exit 2; }
[ -f "$DATA/test/paraphrase_text2region.jsonl" ] || { echo "$DATA: built without the user-style records; rebuild" >&2; exit 2; }
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install --quiet --no-deps --no-index --target "$WORK/pydeps" .whl/*.whl
  export PYTHONPATH="$WORK/pydeps${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import peft" || { echo "peft is not importable: put its wheel in .whl/ (pip download peft --no-deps -d .whl)" >&2; exit 2; }

t0=$(date +%s)
scripts/train_medreg_mini.sh "$WORK/train" 2>&1 | tee "$OUT/train.log"
cp -r "$WORK/train/model" "$OUT/model"
cp "$WORK/train/run/train_results.json" "$OUT/" 2>/dev/null || true
echo "train + export: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/train.log"

if [ -z "${NO_SCORE:-}" ] && ! $PY -c "import scipy, pycocotools, yaml, PIL" 2> /dev/null; then
  echo "medrega-eval needs scipy, pycocotools, pyyaml and pillow here (carry pycocotools' wheel in .whl/); the model is" \
       "in $OUT/model - evaluate it elsewhere with the medrega-eval run line of this script" >&2
  exit 3
fi
BENCH=$($PY -c "from medrega_eval.benchmarks import load_registry
print(','.join(sorted(k for k in load_registry() if k.startswith('medreg_mini_'))) + ',medreg_mini_modality')")
$PY -m medrega_eval run --model "$OUT/model" --benchmark "$BENCH" --benchmark-file data/medreg_mini/benchmarks.yaml \
  --out "$OUT/eval" --batch-size 64 --max-new-tokens "${MAX_NEW_TOKENS:-256}" --dtype float32 \
  ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"} ${NO_SCORE:+--no-score} 2>&1 | tee "$OUT/eval.log"
if [ -n "${NO_SCORE:-}" ]; then  # a machine without the scorers' packages (jieba, ...): score elsewhere
  echo "predictions in $OUT/eval; score them with: medrega-eval score --pred OUT/eval/NAME/predictions/rank0.jsonl ..."
  exit 0
fi

$PY scripts/medreg_mini_baselines.py --data "$DATA" --out "$WORK/baselines"
for f in "$WORK"/baselines/*.jsonl; do
  stem=$(basename "$f" .jsonl)
  for suf in _name_mean_box _mean_box _majority _not_visible; do
    if [[ $stem == *"$suf" ]]; then bench=medreg_mini_${stem%"$suf"}; break; fi
  done
  $PY -m medrega_eval score --pred "$f" --benchmark "$bench" --benchmark-file data/medreg_mini/benchmarks.yaml \
    --out "$OUT/baselines/$stem" > /dev/null
done
$PY scripts/medreg_mini_scores.py --eval "$OUT/eval" --baselines "$OUT/baselines" --out "$OUT/scores.md"
echo "total: $(( $(date +%s) - t0 )) s"
