#!/usr/bin/env bash
# Sourced by the recipe scripts: locates src/shell, computes the gradient accumulation for a global batch.
# Inputs (environment, with defaults set by each recipe): BATCH_SIZE (global), PER_DEVICE_BATCH_SIZE, GPUS_PER_NODE,
# NNODES (or SLURM_NNODES). Output: SHELL_DIR, WORLD_SIZE_TOTAL, GRADIENT_ACC.
set -euo pipefail

if [[ -n "${MEDREGA_SHELL_DIR:-}" ]]; then
  SHELL_DIR="${MEDREGA_SHELL_DIR}"
elif [[ -f "$(dirname "${BASH_SOURCE[0]}")/launch.sh" ]]; then
  SHELL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
else  # sbatch runs a spooled copy of the script: use the submit dir (submit from the repository root)
  SHELL_DIR="${SLURM_SUBMIT_DIR:-$PWD}/src/shell"
fi
[[ -f "${SHELL_DIR}/launch.sh" ]] || { echo "cannot find src/shell/launch.sh (set MEDREGA_SHELL_DIR)" >&2; exit 2; }

GPUS_PER_NODE="${GPUS_PER_NODE:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
NODES="${SLURM_NNODES:-${NNODES:-1}}"
WORLD_SIZE_TOTAL=$(( GPUS_PER_NODE * NODES ))
if (( BATCH_SIZE % (PER_DEVICE_BATCH_SIZE * WORLD_SIZE_TOTAL) != 0 )); then
  echo "BATCH_SIZE=${BATCH_SIZE} is not a multiple of PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE} x ${WORLD_SIZE_TOTAL} GPUs" >&2
  exit 2
fi
GRADIENT_ACC=$(( BATCH_SIZE / PER_DEVICE_BATCH_SIZE / WORLD_SIZE_TOTAL ))
export GPUS_PER_NODE

# MODEL=preset:NAME starts from a bundled preset with random init (needs TOKENIZER=<local tokenizer dir>);
# anything else is a checkpoint directory in the original layout.
if [[ "${MODEL}" == preset:* ]]; then
  [[ -n "${TOKENIZER:-}" ]] || { echo "MODEL=${MODEL} needs TOKENIZER=<tokenizer dir>" >&2; exit 2; }
  MODEL_FLAGS=(--preset "${MODEL#preset:}" --tokenizer_path "${TOKENIZER}")
else
  MODEL_FLAGS=(--model_name_or_path "${MODEL}")
fi
echo "[recipe] global batch ${BATCH_SIZE} = ${PER_DEVICE_BATCH_SIZE} per GPU x ${WORLD_SIZE_TOTAL} GPUs x ${GRADIENT_ACC} accumulation"
