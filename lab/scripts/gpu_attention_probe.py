"""GPU probe: SDPA backends (cuDNN, FlashAttention-2, memory-efficient) on the benchmark's attention shapes, forward
and forward + backward in bf16: the `mid` LLM's causal grouped-query attention (8 x 32 query / 4 KV heads x 1024
tokens, head dim 64; native `enable_gqa` and repeated KV) and its ViT's full attention (8 x 16 heads x 1025 tokens).
Prints milliseconds per call as JSON (measured: cuDNN is the fastest on both; docs/performance.md).

    python -m lab.scripts.gpu_attention_probe
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lab.bench.runtime import cuda_milliseconds

CASES = {
    "llm_causal_gqa": {"batch": 8, "q_heads": 32, "kv_heads": 4, "tokens": 1024, "head_dim": 64, "causal": True},
    "vit_full": {"batch": 8, "q_heads": 16, "kv_heads": 16, "tokens": 1025, "head_dim": 64, "causal": False},
}
BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


def time_case(case: dict, backend: SDPBackend, gqa: str) -> dict:
    """fwd and fwd+bwd ms of one shape on one backend; gqa: "native" (enable_gqa), "repeat" (repeated KV), "none"."""
    b, hq, hk, n, d = case["batch"], case["q_heads"], case["kv_heads"], case["tokens"], case["head_dim"]
    q = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hk, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hk, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16)
    kwargs = {"enable_gqa": True} if gqa == "native" else {}

    def forward() -> torch.Tensor:
        keys, values = (k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)) if gqa == "repeat" else (k, v)
        return F.scaled_dot_product_attention(q, keys, values, is_causal=case["causal"], **kwargs)

    with sdpa_kernel([backend]):
        return {"fwd_ms": round(cuda_milliseconds(forward), 4),
                "fwd+bwd_ms": round(cuda_milliseconds(lambda: torch.autograd.grad(forward(), (q, k, v), grad)), 4)}


def main() -> None:
    torch.manual_seed(0)
    res: dict[str, object] = {}
    for name, case in CASES.items():
        for backend in BACKENDS:
            for gqa in ("native", "repeat") if case["q_heads"] != case["kv_heads"] else ("none",):
                key = f"{name}/{backend.name}/{gqa}"
                try:
                    res[key] = time_case(case, backend, gqa)
                except RuntimeError as exc:
                    res[key] = f"error: {str(exc)[:120]}"
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
