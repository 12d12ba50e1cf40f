"""Micro-benchmark of the batch-1 decode kernels (`--sections kernels`): each one-row product of a preset's decoder
layer and LM head, and the one-query attention, timed with a cold L2 (as in a decode step, which streams every
weight once) for our Triton kernels against cuBLAS / cuDNN and inductor's tuned reduction, with the bf16 error of
ours against the fp32 reference. Reports microseconds and achieved read bandwidth."""
from __future__ import annotations

import torch

from internvl.model import load_preset
from internvl.model.fast_generate import sdpa_gqa_decode_attention
from internvl.ops.decode_kernels import (
    _gemv_best,
    _launch_gemv,
    _tuned_gemv_config,
    gemv,
    gemv_int8,
    gqa_decode_attention,
    reference_gqa_decode_attention,
)
from internvl.ops.int8_weights import dequantize_int8_rows, quantize_rows


def describe_tuning() -> dict[str, str]:
    """The GEMV configurations chosen so far (for the benchmark's JSON): "NxK dtype" -> "BLOCK_N/BLOCK_K/warps"."""
    return {f"{key[0][0]}x{key[0][1]} {str(key[2]).removeprefix('torch.')}": "/".join(map(str, cfg))
            for key, cfg in _gemv_best.items()}


def _bench_us(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=50)) * 1e3


def layer_products(llm_config) -> dict[str, tuple[int, int]]:
    """name -> (rows N, inputs K) of the products one decode step runs per layer (q/k/v and gate/up packed) and once
    (the LM head)."""
    h = llm_config.hidden_size
    dim = getattr(llm_config, "head_dim", None) or h // llm_config.num_attention_heads
    q = llm_config.num_attention_heads * dim
    kv = llm_config.num_key_value_heads * dim
    i = llm_config.intermediate_size
    return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * i, h), "down": (h, i),
            "lm_head": (llm_config.vocab_size, h)}


def int8_gemv_cells(x: torch.Tensor, w: torch.Tensor) -> dict:
    """The weight-only int8 cells of one product (`w` quantised per row): us and TB/s (int8 bytes + row scales) of
    the tuned `gemv_int8` through its op and launched directly (what a CUDA graph replays), its tuned configuration,
    and the max relative error against the fp32 product over the dequantised weight."""
    q, scale = quantize_rows(w)
    ref = torch.nn.functional.linear(x.float(), dequantize_int8_rows(q, scale, torch.float32))
    y = gemv_int8(x, q, scale, None)  # tunes this shape
    n, k = q.shape
    bytes_read = n * k + 4 * n
    config = _tuned_gemv_config(x.reshape(-1), q, None, y.reshape(-1), scale)
    cells = {"int8_MB": bytes_read / 1e6, "int8_config": "/".join(map(str, config)),
             "int8_max_rel_err": float(((y.float() - ref).abs().max() / ref.abs().max()).item())}
    us = _bench_us(lambda: gemv_int8(x, q, scale, None))
    cells.update(int8_us=us, int8_TBps=bytes_read / us / 1e6)
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    cells["int8_launch_us"] = _bench_us(lambda: _launch_gemv(x.reshape(-1), q, None, out, config, scale))
    return cells


def gemv_rows(llm_config, device: str = "cuda", *, int8: bool = True) -> list[dict]:
    """One row per product: us and TB/s of ours (tuned), cuBLAS (`F.linear`) and inductor (coordinate-descent tuned
    `F.linear`, which it rewrites to a reduction at one row), and ours' max relative error against fp32; with
    `int8`, also the weight-only int8 GEMV on the same weight quantised (`int8_gemv_cells`)."""
    rows = []
    for name, (n, k) in layer_products(llm_config).items():
        # one compiled function per shape (a shared one would hit dynamo's recompile limit and fall back to eager)
        tuned_linear = torch.compile(lambda a, b: torch.nn.functional.linear(a, b), dynamic=False,
                                     options={"coordinate_descent_tuning": True})
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * k**-0.5
        x = torch.randn(1, 1, k, device=device, dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x.float(), w.float())
        ours = gemv(x, w, None)  # tunes this shape
        err = float(((ours.float() - ref).abs().max() / ref.abs().max()).item())
        bytes_read = n * k * 2
        row = {"product": name, "rows": n, "inputs": k, "MB": bytes_read / 1e6, "ours_max_rel_err": err}
        calls = {"ours": lambda a=x, b=w: gemv(a, b, None),
                 "cublas": lambda a=x, b=w: torch.nn.functional.linear(a, b),
                 "inductor": lambda a=x, b=w, f=tuned_linear: f(a, b)}
        for label, fn in calls.items():
            try:
                fn()
                us = _bench_us(fn)
                row[f"{label}_us"] = us
                row[f"{label}_TBps"] = bytes_read / us / 1e6
            except Exception as exc:  # noqa: BLE001 - one backend failing must not lose the others
                row[f"{label}_error"] = repr(exc)[:200]
        if int8:
            row.update(int8_gemv_cells(x, w))
        rows.append(row)
    rows.append({"product": "tuned configs", "configs": describe_tuning()})
    return rows


def attention_rows(llm_config, *, lengths=(640, 2048), batches=(1, 32), device: str = "cuda") -> list[dict]:
    """One row per (batch, cache length): us of ours, of the grouped-query SDPA the decoder uses otherwise (cuDNN /
    flash picked by PyTorch), and ours' max error against the fp32 reference (keys up to 3/4 of the cache)."""
    heads, kv_heads = llm_config.num_attention_heads, llm_config.num_key_value_heads
    dim = getattr(llm_config, "head_dim", None) or llm_config.hidden_size // heads

    class _Module:  # what sdpa_gqa_decode_attention reads off the attention module
        num_key_value_groups = heads // kv_heads

    scale = dim**-0.5
    rows = []
    for batch in batches:
        for length in lengths:
            q = torch.randn(batch, heads, 1, dim, device=device, dtype=torch.bfloat16)
            k = torch.randn(batch, kv_heads, length, dim, device=device, dtype=torch.bfloat16)
            v = torch.randn(batch, kv_heads, length, dim, device=device, dtype=torch.bfloat16)
            mask = torch.ones(batch, length, dtype=torch.long, device=device)
            limit = torch.tensor([length * 3 // 4], device=device)
            keep = (mask.bool() & (torch.arange(length, device=device) <= limit))[:, None, None, :]
            ours = gqa_decode_attention(q, k, v, mask, limit, scale)
            ref = reference_gqa_decode_attention(q.float(), k.float(), v.float(), mask, limit, scale)
            row = {"batch": batch, "cache": length, "ours_max_abs_err": float((ours.float() - ref).abs().max())}
            args = (q, k, v)
            calls = {"ours": lambda t=args, m=mask, lim=limit: gqa_decode_attention(*t, m, lim, scale),
                     "sdpa": lambda t=args, m=keep: sdpa_gqa_decode_attention(_Module, *t, m, scaling=scale)}
            for label, fn in calls.items():
                try:
                    fn()
                    row[f"{label}_us"] = _bench_us(fn)
                except Exception as exc:  # noqa: BLE001
                    row[f"{label}_error"] = repr(exc)[:200]
            rows.append(row)
    return rows


def kernel_lines(res: dict) -> list[str]:
    """The printed block of the kernels section."""
    out = []
    for preset, block in (res.get("kernels") or {}).items():
        out.append(f"\n== batch-1 decode kernels, {preset} shapes (cold L2; us, TB/s) ==")
        for r in block.get("gemv", []):
            if "configs" in r:
                out.append("tuned GEMV configs (BLOCK_N/BLOCK_K/warps): "
                           + ", ".join(f"{k}: {v}" for k, v in r["configs"].items()))
                continue
            cells = [f"{r['product']:8s} {r['rows']:6d}x{r['inputs']:<6d} {r['MB']:7.1f} MB"]
            for label in ("ours", "cublas", "inductor"):
                if f"{label}_us" in r:
                    cells.append(f"{label} {r[f'{label}_us']:7.2f} us {r[f'{label}_TBps']:4.2f} TB/s")
                else:
                    cells.append(f"{label} ERROR")
            cells.append(f"err {r['ours_max_rel_err']:.1e}")
            if "int8_us" in r:
                cells.append(f"| int8 {r['int8_us']:7.2f} us {r['int8_TBps']:4.2f} TB/s ({r['int8_config']}; "
                             f"launch alone {r['int8_launch_us']:.2f} us) err {r['int8_max_rel_err']:.1e}")
            out.append("  ".join(cells))
        for r in block.get("attention", []):
            ours, sdpa = r.get("ours_us"), r.get("sdpa_us")
            ratio = f"{sdpa / ours:.2f}x" if ours and sdpa else ""
            out.append(f"attention batch {r['batch']:3d} cache {r['cache']:5d}: ours "
                       f"{ours if ours is None else round(ours, 2)} us, sdpa {sdpa if sdpa is None else round(sdpa, 2)}"
                       f" us ({ratio}), max err {r['ours_max_abs_err']:.1e}")
    return out


def section_kernels(args, res: dict) -> None:
    """Kernel micro-benchmarks for the `mid` and `medrega` decoder shapes (random bf16 tensors, nothing built)."""
    block = res.setdefault("kernels", {})
    for preset in dict.fromkeys([args.preset, "medrega"]):
        cfg = load_preset(preset).llm_config
        block[preset] = {"gemv": gemv_rows(cfg), "attention": attention_rows(cfg)}
