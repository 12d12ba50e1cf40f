#!/usr/bin/env bash
# Thin launcher shared by the recipe scripts: runs `python -m internvl.train "$@"` on every GPU of every node.
#
# Under slurm (SLURM_JOB_ID set): one srun task per node starts torchrun; the rendezvous host is the first node of
# SLURM_JOB_NODELIST (c10d rendezvous, id = job id), so any number of nodes works.
# Without slurm: plain torchrun. One machine: nothing to set. Several machines (or two "nodes" on one host for a
# test): start this script once per node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set alike.
#
# Environment: GPUS_PER_NODE (default: all visible GPUs, 1 on CPU), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# TORCHRUN (default: torchrun).
set -euo pipefail

GPUS_PER_NODE="${GPUS_PER_NODE:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
MASTER_PORT="${MASTER_PORT:-34116}"
TORCHRUN="${TORCHRUN:-torchrun}"
export PYTHONUNBUFFERED=1
# NVLink multicast off: avoids NCCL NVLS hangs on shared multi-GPU hosts.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"

if [[ -n "${SLURM_JOB_ID:-}" && -z "${MEDREGA_NO_SLURM:-}" ]]; then
  NNODES="${SLURM_NNODES:-1}"
  MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | awk 'NR == 1')"  # awk reads all: no SIGPIPE under pipefail
  echo "[launch] slurm job ${SLURM_JOB_ID}: ${NNODES} node(s) x ${GPUS_PER_NODE} GPU(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
  exec srun --nodes="${NNODES}" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "${TORCHRUN}" --nnodes="${NNODES}" --nproc-per-node="${GPUS_PER_NODE}" \
      --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id="${SLURM_JOB_ID}" \
      -m internvl.train "$@"
fi

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
echo "[launch] torchrun: node ${NODE_RANK}/${NNODES} x ${GPUS_PER_NODE} process(es), master ${MASTER_ADDR}:${MASTER_PORT}"
exec "${TORCHRUN}" --nnodes="${NNODES}" --node-rank="${NODE_RANK}" --nproc-per-node="${GPUS_PER_NODE}" \
  --master-addr="${MASTER_ADDR}" --master-port="${MASTER_PORT}" -m internvl.train "$@"
