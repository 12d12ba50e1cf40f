#!/usr/bin/env bash
# Performance regression check: the same lab.bench sections for an older tree and this one, in one call on one GPU,
# so the ratios compare like with like (machines are shared and noisy; never compare across calls or cards).
#
#   rm -rf _old && mkdir _old && git archive REV src lab | tar -x -C _old    # here, before the run (not committed)
#   bash lab/scripts/gpu_side_by_side.sh gen "new old"                      # on the GPU machine, $OUT set
#   bash lab/scripts/gpu_side_by_side.sh train,recipe                       # a second call: the training side
#
# The run carries the ignored folders .whl/ (packages: docs/performance.md, "Carrying packages to the GPU machine")
# and _old/. Each tree gets TREE_TIMEOUT seconds (default 280: two trees fit a 600 s call); output in $OUT/new and
# $OUT/old.
set -u
sections=${1:?sections, e.g. gen or train,recipe}
trees=${2:-new old}
[ -d _old/src ] || { echo "no _old/src: create it with git archive (see the header)" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
args=(--sections "$sections" --preset mid --steps 5 --warmup 3 --gen-batches 1,8 --native-batches 1
      --static-batches "" --plain-batches "" --gen-variants "" --gen-variants-batched "" --new-tokens 128
      --recipe-models mid --recipe-engines plain --recipe-lora 0 --recipe-steps 5 --recipe-warmup 3
      --train-variants default)
for tree in $trees; do
  dir=.; [ "$tree" = old ] && dir=_old
  echo "=== $tree ($dir)"
  (cd "$dir" && PYTHONPATH="/tmp/site:$PWD/src:$PWD" timeout "${TREE_TIMEOUT:-280}" \
     python3 -m lab.bench "${args[@]}" --out "$OUT/$tree") 2>&1 | grep -v Warning | tail -40
done
