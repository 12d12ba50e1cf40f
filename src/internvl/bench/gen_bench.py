"""Generation benchmark cases: one-image prompts, greedy, fixed `new_tokens` (EOS suppressed), tokens/s and TTFT.

TTFT is the median wall time of a call that produces one token (ViT + projector + prefill + first argmax);
tokens/s is batch x new_tokens over the median wall time of the full call; per-step decode time is
(full - TTFT) / (new_tokens - 1).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    times = []
    out = None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run_gen_case(name: str, generate: Callable[[int], torch.Tensor], *, batch: int, new_tokens: int,
                 warmup: int = 1, repeats: int = 2, warm_tokens: int | None = None) -> dict:
    """`generate(n)` must return [batch, n] new token ids. Warm-up calls (compiles, graph captures) are untimed;
    `warm_tokens` shortens the warm-up call for paths that compile nothing (default: `new_tokens`)."""
    compile_t0 = time.perf_counter()
    for _ in range(warmup):
        generate(warm_tokens or new_tokens)
        generate(1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - compile_t0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    ttft, _ = _timed(lambda: generate(1), repeats)
    full, out = _timed(lambda: generate(new_tokens), repeats)
    if out.shape != (batch, new_tokens):
        raise RuntimeError(f"{name}: expected [{batch}, {new_tokens}] new tokens, got {tuple(out.shape)}")
    step_ms = (full - ttft) / max(new_tokens - 1, 1) * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {
        "case": name,
        "batch": batch,
        "new_tokens": new_tokens,
        "seconds": full,
        "tokens_per_s": batch * new_tokens / full,
        "ttft_ms": ttft * 1e3,
        "decode_ms_per_step": step_ms,
        "warmup_s": warm_s,
        "peak_mem_gib": peak,
        "tokens": out.detach().cpu(),
    }


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How far two greedy outputs agree: exact rows and the mean length of the common prefix."""
    same = (a == b)
    prefix = same.long().cumprod(dim=1).sum(dim=1).float()
    return {"rows_equal": int(same.all(dim=1).sum()), "rows": int(a.shape[0]),
            "mean_common_prefix": float(prefix.mean())}
