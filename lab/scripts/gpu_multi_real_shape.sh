#!/usr/bin/env bash
# The real MedRegA shape (40.07B parameters, random bf16 weights) sharded over 2 GPUs with a balanced device_map
# (each decoder layer / ViT block built and randomised on its own GPU, no host copy), timed through batch_chat at
# batch 1 and 8: tokens/s, time to first token and peak memory per GPU. Needs a host with >= 2 GPUs (not run yet:
# multi-GPU machines were withheld when this was written). Exits non-zero when a case fails (lab.bench). Same-run
# baseline: none is possible on one 80 GB H100 (the bf16 weights take 74.7 GiB); on 2 x H200 the single-GPU case
# runs too, for the ratio.
#   bash lab/scripts/gpu_multi_real_shape.sh        (OUT=dir to change where bench.json / bench_table.txt go)
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root: `python3 -m lab...` imports the lab from here
OUT="${OUT:-runs/gpu_multi_real_shape}"
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m lab.bench --sections real --real-devices 2 --real-quant bf16 --out "${OUT}/sharded2"
FREE=$(python3 -c "import torch; print(int(torch.cuda.mem_get_info(0)[1] / 2**30))")
if (( FREE >= 100 )); then
  python3 -m lab.bench --sections real --real-devices 1 --real-quant bf16,int8 --out "${OUT}/single"
fi
