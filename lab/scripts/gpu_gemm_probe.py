"""GPU probe: the training step's matrix products under PyTorch's two BLAS back ends (cuBLAS, cuBLASLt).

For every linear layer of the benchmark's `mid` model (ViT qkv / proj / fc1 / fc2 over 8 x 1025 tokens, LLM fused qkv /
o / fused gate-up / down over 8 x 1024 tokens) it times the forward product (with the bias where the layer has one),
the input gradient and the weight gradient, in bf16, under `torch.backends.cuda.preferred_blas_library("cublas")` and
`("cublaslt")`, and prints milliseconds and TFLOP/s per product as JSON, with the per-step total of each back end
(layers x products).

    python -m lab.scripts.gpu_gemm_probe
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from lab.bench.runtime import cuda_milliseconds

#: name -> (rows, in features, out features, bias, layers)
LAYERS = {
    "vit.qkv": (8200, 1024, 3072, True, 24),
    "vit.proj": (8200, 1024, 1024, True, 24),
    "vit.fc1": (8200, 1024, 4096, True, 24),
    "vit.fc2": (8200, 4096, 1024, True, 24),
    "llm.qkv": (8192, 2048, 2560, False, 22),
    "llm.o": (8192, 2048, 2048, False, 22),
    "llm.gate_up": (8192, 2048, 11264, False, 22),
    "llm.down": (8192, 5632, 2048, False, 22),
}


def main() -> None:
    torch.manual_seed(0)
    res: dict[str, dict] = {}
    totals = {"cublas": 0.0, "cublaslt": 0.0}
    for name, (rows, fan_in, fan_out, has_bias, layers) in LAYERS.items():
        x = torch.randn(rows, fan_in, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(fan_out, fan_in, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(fan_out, device="cuda", dtype=torch.bfloat16) if has_bias else None
        g = torch.randn(rows, fan_out, device="cuda", dtype=torch.bfloat16)
        flops = 2 * rows * fan_in * fan_out
        products = {"fwd": lambda x=x, w=w, b=b: F.linear(x, w, b), "dgrad": lambda g=g, w=w: g @ w,
                    "wgrad": lambda g=g, x=x: g.t() @ x}
        for library in totals:
            torch.backends.cuda.preferred_blas_library(library)
            for product, fn in products.items():
                ms = cuda_milliseconds(fn)
                res.setdefault(f"{name}/{product}", {})[library] = {"ms": round(ms, 4),
                                                                   "tflops": round(flops / ms / 1e9, 1)}
                totals[library] += ms * layers
    torch.backends.cuda.preferred_blas_library("cublas")
    print(json.dumps({"products": res, "ms_per_step": {k: round(v, 2) for k, v in totals.items()}}, indent=1))


if __name__ == "__main__":
    main()
