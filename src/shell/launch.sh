#!/usr/bin/env bash
# Thin launcher shared by the recipe scripts: runs `python -m internvl.train "$@"` on every GPU of every node.
#
# Under slurm (SLURM_JOB_ID set, MEDREGA_NO_SLURM unset): one srun task per node starts torchrun with c10d
# rendezvous; the rendezvous host is the first node of SLURM_JOB_NODELIST (id = job id), and each node's agent
# advertises its slurm node name (SLURMD_NODENAME, the name scontrol lists, so the other nodes resolve it) through
# --local-addr. srun gets --cpus-per-task from the allocation (since Slurm 22.05 srun does not inherit it).
# Without slurm, or with MEDREGA_NO_SLURM=1 inside an allocation (e.g. an interactive salloc in which you start one
# process per node yourself): plain torchrun. One machine: nothing to set (a free port is picked). Several machines
# (or two "nodes" on one host for a test): start this script once per node with NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT set alike.
# Which network interface gloo/NCCL use between nodes: GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (e.g. ib0, eth0).
#
# Environment: GPUS_PER_NODE (default: all visible GPUs, 1 on CPU), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# TORCHRUN (default: torchrun), MEDREGA_NO_SLURM.
set -euo pipefail

GPUS_PER_NODE="${GPUS_PER_NODE:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
TORCHRUN="${TORCHRUN:-torchrun}"
export PYTHONUNBUFFERED=1
# NVLink multicast off: avoids NCCL NVLS hangs on shared multi-GPU hosts.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"

if [[ -n "${SLURM_JOB_ID:-}" && -z "${MEDREGA_NO_SLURM:-}" ]]; then
  NNODES="${SLURM_NNODES:-1}"
  MASTER_PORT="${MASTER_PORT:-34116}"
  MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | awk 'NR == 1')"  # awk reads all: no SIGPIPE under pipefail
  CPUS=()
  [[ -z "${SLURM_CPUS_PER_TASK:-}" ]] || CPUS=(--cpus-per-task="${SLURM_CPUS_PER_TASK}")
  echo "[launch] slurm job ${SLURM_JOB_ID}: ${NNODES} node(s) x ${GPUS_PER_NODE} GPU(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
  # bash -c runs on each node, so --local-addr is that node's own name
  exec srun --nodes="${NNODES}" --ntasks-per-node=1 "${CPUS[@]}" --kill-on-bad-exit=1 \
    bash -c 'exec "$0" --local-addr="${SLURMD_NODENAME:-$(hostname)}" "$@"' \
    "${TORCHRUN}" --nnodes="${NNODES}" --nproc-per-node="${GPUS_PER_NODE}" \
      --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id="${SLURM_JOB_ID}" \
      -m internvl.train "$@"
fi

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
if [[ "${NNODES}" == 1 && -z "${MASTER_ADDR:-}" && -z "${MASTER_PORT:-}" ]]; then
  echo "[launch] torchrun: 1 node x ${GPUS_PER_NODE} process(es), standalone"
  exec "${TORCHRUN}" --standalone --nnodes=1 --nproc-per-node="${GPUS_PER_NODE}" -m internvl.train "$@"
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-34116}"
echo "[launch] torchrun: node ${NODE_RANK}/${NNODES} x ${GPUS_PER_NODE} process(es), master ${MASTER_ADDR}:${MASTER_PORT}"
exec "${TORCHRUN}" --nnodes="${NNODES}" --node-rank="${NODE_RANK}" --nproc-per-node="${GPUS_PER_NODE}" \
  --master-addr="${MASTER_ADDR}" --master-port="${MASTER_PORT}" -m internvl.train "$@"
