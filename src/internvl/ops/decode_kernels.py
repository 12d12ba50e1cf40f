"""Triton kernels for the small-batch decode step, where the generic paths stay far from the copy bandwidth
(docs/performance.md):

- `gemv` / `gemv_int8`: y = x W^T + b for one row of x; each program reads BLOCK_N whole weight rows (bf16, or int8
  with one fp32 scale per row) in BLOCK_K chunks, sums in fp32 and rounds once. `int8_rows`: the same for up to 16
  rows against int8 weights (a tensor-core product). Block sizes are measured per shape on the first call outside
  CUDA-graph capture (cold L2), and cached.
- `gqa_decode_attention`: flash-decoding of one query per row over a static cache: the cache is split into chunks
  over thread blocks (one KV head each, its query heads the rows of one product, online softmax), then a small
  kernel merges the chunks. Keys attend where `mask[b, l] != 0` and `l <= limit` (a device tensor: no host sync).

The public ones are `torch.library` custom ops (opaque to inductor) with PyTorch fallbacks on devices without
Triton. TRITON_INTERPRET=1 before import runs the Triton code on the CPU (the tests do).
"""
from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only installs without triton
    triton = None
    tl = None


#: whether the Triton code runs in its CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


#: oldest NVIDIA compute capability the kernels are used on (bf16 tensor-core products need Ampere; measured on Hopper).
MIN_CAPABILITY = (8, 0)


def dequantize_int8_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Weight-only int8 (`internvl.ops.int8_weights`): int8 [N, K] and fp32 scale [N] -> the weight [N, K] in `dtype`
    (products in fp32, rounded once)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def triton_ready(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run on `t`'s device: an NVIDIA GPU of compute capability >= MIN_CAPABILITY with
    Triton (not ROCm: unmeasured there), or any device under the interpreter. Elsewhere the ops use PyTorch."""
    if triton is None:
        return False
    if INTERPRETED:
        return True
    return t.is_cuda and torch.version.hip is None and torch.cuda.get_device_capability(t.device) >= MIN_CAPABILITY


# ------------------------------------------------------------------------------------------------------------------
# one-row matrix-vector product
# ------------------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, s_ptr, y_ptr, N, stride_wn, K: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # HAS_SCALE: int8 weights with one fp32 scale per row (weight-only int8), applied once after the sum
        # K is a compile-time constant: the loop is fully specialised per weight shape (a handful per model)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for step in range(tl.cdiv(K, BLOCK_K)):
            cols = step * BLOCK_K + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_SCALE:
            y *= tl.load(s_ptr + rows, mask=row_ok, other=0.0)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


#: (BLOCK_N, BLOCK_K, num_warps) candidates measured on first use of a shape; the first is the untuned default.
GEMV_CONFIGS: tuple[tuple[int, int, int], ...] = (
    (4, 512, 4), (1, 1024, 4), (1, 2048, 8), (2, 512, 4), (2, 1024, 4), (2, 1024, 8), (4, 256, 4), (4, 1024, 8),
    (8, 256, 4), (8, 512, 8), (16, 128, 4), (16, 256, 8), (1, 512, 2), (2, 256, 2), (4, 128, 2),
)
#: int8 weights carry half the bytes per element: the same bytes per load need twice the columns, so their tuning
#: also tries these wider blocks.
GEMV_INT8_EXTRA_CONFIGS: tuple[tuple[int, int, int], ...] = ((2, 2048, 8), (4, 2048, 8), (1, 4096, 8))
_gemv_best: dict[tuple, tuple[int, int, int]] = {}


def _launch_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                 config: tuple[int, int, int], scale: torch.Tensor | None = None) -> None:
    block_n, block_k, warps = config
    n, k = weight.shape
    grid = (triton.cdiv(n, block_n),)
    _gemv_kernel[grid](x, weight, bias if bias is not None else weight, scale if scale is not None else weight, out,
                       n, weight.stride(0), K=k, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
                       BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)


def _measured_best(cache: dict, key: tuple, candidates, launch, weight: torch.Tensor) -> tuple:
    """The fastest of `candidates` (the first is the untuned default) for `key`, each timed once with `launch(config)`
    (cold L2, as a decode step streams every weight once) and cached; the default where nothing can be timed (the
    interpreter, a CPU tensor, during CUDA-graph capture: the next uncaptured call tunes)."""
    best = cache.get(key)
    if best is not None:
        return best
    if INTERPRETED or not weight.is_cuda or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    from triton.testing import do_bench

    times = {cfg: do_bench(lambda c=cfg: launch(c), warmup=5, rep=20) for cfg in candidates}
    best = cache[key] = min(times, key=times.get)
    return best


def _tuned_gemv_config(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       out: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[int, int, int]:
    """The fastest GEMV_CONFIGS entry (int8 weights: also GEMV_INT8_EXTRA_CONFIGS) for this shape."""
    key = (tuple(weight.shape), weight.stride(0), weight.dtype, x.dtype, bias is not None, weight.device)
    # blocks much larger than the matrix are not tried
    candidates = [cfg for cfg in GEMV_CONFIGS + (GEMV_INT8_EXTRA_CONFIGS if weight.dtype == torch.int8 else ())
                  if cfg[0] <= weight.shape[0] * 2 and cfg[1] <= max(triton.next_power_of_2(weight.shape[1]), 128)]
    return _measured_best(_gemv_best, key, candidates or [GEMV_CONFIGS[0]],
                          lambda c: _launch_gemv(x, weight, bias, out, c, scale), weight)


@torch.library.custom_op("internvl::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias for x [..., K] holding ONE row (all leading dims 1), weight [N, K] with unit column
    stride -> y [..., N] in x's dtype. Matches `F.linear` up to fp32 summation order."""
    if x.numel() != x.shape[-1]:
        raise ValueError(f"gemv takes one row, got x of shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.stride(1) != 1:
        raise ValueError(f"gemv needs weight [N, {x.shape[-1]}] with unit column stride, got "
                         f"{tuple(weight.shape)} strides {weight.stride()}")
    if not triton_ready(weight):
        return torch.nn.functional.linear(x, weight, bias)
    return _run_gemv(x, weight, bias)


def _run_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              scale: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton GEMV of the one row `x` [..., K] (tuned per shape) -> [..., N] in x's dtype."""
    flat = x.reshape(-1).contiguous()
    out = torch.empty(weight.shape[0], dtype=x.dtype, device=x.device)
    _launch_gemv(flat, weight, bias, out, _tuned_gemv_config(flat, weight, bias, out, scale), scale)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@gemv.register_fake
def _gemv_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("internvl::gemv_int8", mutates_args=())
def gemv_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (weight * scale[:, None]).T + bias for x [..., K] holding ONE row, weight [N, K] int8 (unit column
    stride), scale [N] fp32 -> y [..., N] in x's dtype: weight-only int8 (`internvl.ops.int8_weights`), dequantised
    on the fly (fp32 products, the row's scale applied once to the sum). Off Triton: dequantise, then `F.linear`."""
    if x.numel() != x.shape[-1]:
        raise ValueError(f"gemv_int8 takes one row, got x of shape {tuple(x.shape)}")
    if (weight.dim() != 2 or weight.dtype != torch.int8 or weight.shape[1] != x.shape[-1] or weight.stride(1) != 1
            or tuple(scale.shape) != (weight.shape[0],)):
        raise ValueError(f"gemv_int8 needs an int8 weight [N, {x.shape[-1]}] with unit column stride and scale [N], "
                         f"got {weight.dtype} {tuple(weight.shape)} strides {weight.stride()}, scale "
                         f"{tuple(scale.shape)}")
    if not triton_ready(weight):
        return torch.nn.functional.linear(x, dequantize_int8_rows(weight, scale, x.dtype), bias)
    return _run_gemv(x, weight, bias, scale.contiguous())


@gemv_int8.register_fake
def _gemv_int8_fake(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# ------------------------------------------------------------------------------------------------------------------
# a few rows against int8 weights (weight-only int8 at small batch)
# ------------------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _int8_rows_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_ym, K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        # each program reads BLOCK_N int8 weight rows once for all M (<= BLOCK_M) rows of x: a tensor-core product
        # of x [BLOCK_M, BLOCK_K] with the weight block converted to x's dtype (exact: |int8| <= 127), fp32 sums,
        # the rows' scales applied once at the end
        rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_m = tl.arange(0, BLOCK_M)
        n_ok = rows_n < N
        m_ok = rows_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(tl.cdiv(K, BLOCK_K)):
            cols = step * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = cols < K
            x = tl.load(x_ptr + rows_m[:, None] * stride_xm + cols[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(w_ptr + rows_n[:, None] * stride_wn + cols[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0)
            if IEEE:  # fp32 activations: full-precision products (Triton's default for fp32 would be TF32)
                acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        y = acc * tl.load(s_ptr + rows_n, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + rows_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows_m[:, None] * stride_ym + rows_n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


#: most rows `int8_rows` takes (one tensor-core tile of rows); more rows convert the weight and use cuBLAS.
INT8_ROWS_MAX = 16
#: (BLOCK_N, BLOCK_K, num_warps) candidates of `int8_rows`, measured per shape on first use; the first is the default.
INT8_ROWS_CONFIGS: tuple[tuple[int, int, int], ...] = (
    (32, 256, 4), (16, 256, 4), (16, 512, 4), (32, 128, 4), (32, 512, 4), (64, 128, 4), (64, 256, 4), (64, 256, 8),
    (128, 128, 8), (16, 1024, 8),
)
_int8_rows_best: dict[tuple, tuple[int, int, int]] = {}


def _launch_int8_rows(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                      out: torch.Tensor, config: tuple[int, int, int]) -> None:
    block_n, block_k, warps = config
    m, k = x.shape
    n = weight.shape[0]
    _int8_rows_kernel[(triton.cdiv(n, block_n),)](
        x, weight, scale, bias if bias is not None else scale, out, m, n, x.stride(0), weight.stride(0),
        out.stride(0), K=k, HAS_BIAS=bias is not None, BLOCK_M=INT8_ROWS_MAX, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32, num_warps=warps)


def int8_rows(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ (weight * scale[:, None]).T + bias for x [M, K] with 2 <= M <= INT8_ROWS_MAX rows (contiguous),
    weight [N, K] int8 (unit column stride), scale [N] fp32 -> y [M, N] in x's dtype, reading the int8 weight once
    (a batch-8 decode step of the int8 40B model otherwise converts every weight to bf16 for cuBLAS). Triton only:
    callers check `triton_ready(weight)`. The block sizes are measured per (M, N, K) on the first uncaptured call."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    key = (x.shape[0], tuple(weight.shape), x.dtype, bias is not None, weight.device)
    config = _measured_best(_int8_rows_best, key, INT8_ROWS_CONFIGS,
                            lambda c: _launch_int8_rows(x, weight, scale, bias, out, c), weight)
    _launch_int8_rows(x, weight, scale, bias, out, config)
    return out


# ------------------------------------------------------------------------------------------------------------------
# one-query grouped-query attention over a static cache (flash-decoding)
# ------------------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _attn_chunk_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, limit_ptr, po_ptr, pm_ptr, pl_ptr,
                           L, KVH, scale,
                           stride_qb, stride_qh, stride_kb, stride_kh, stride_kl,
                           stride_vb, stride_vh, stride_vl, stride_mb,
                           G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr,
                           ITERS: tl.constexpr, IEEE: tl.constexpr):
        # each program covers CHUNK = ITERS * BLOCK_L cache slots; slots past `limit` are masked (no memory traffic)
        bkv = tl.program_id(0)  # b * KVH + kv head
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        b = bkv // KVH
        kvh = bkv % KVH
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + (kvh * G + g)[:, None] * stride_qh + d[None, :],
                    mask=(g < G)[:, None], other=0.0)
        limit = tl.load(limit_ptr)
        start = split * (ITERS * BLOCK_L)
        stop = tl.minimum(tl.minimum(start + ITERS * BLOCK_L, L), limit + 1)
        m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, D), dtype=tl.float32)
        k_base = k_ptr + b * stride_kb + kvh * stride_kh
        v_base = v_ptr + b * stride_vb + kvh * stride_vh
        for it in range(ITERS):
            offs = start + it * BLOCK_L + tl.arange(0, BLOCK_L)
            inside = offs < stop
            keep = inside & (tl.load(mask_ptr + b * stride_mb + offs, mask=inside, other=0) != 0)
            k = tl.load(k_base + offs[:, None] * stride_kl + d[None, :], mask=inside[:, None], other=0.0)
            if IEEE:  # fp32 caches: full-precision products (Triton's default for fp32 would be TF32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale  # [BLOCK_G, BLOCK_L] fp32
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing kept yet stay at zero weight
            alpha = tl.exp(m_i - m_ref)
            p = tl.exp(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs[:, None] * stride_vl + d[None, :], mask=inside[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        part = (bkv * n_splits + split) * BLOCK_G + g  # partial row of (batch, kv head, split, group member)
        tl.store(pm_ptr + part, m_i)
        tl.store(pl_ptr + part, l_i)
        tl.store(po_ptr + part[:, None] * D + d[None, :], acc)

    @triton.jit
    def _attn_merge_kernel(po_ptr, pm_ptr, pl_ptr, out_ptr, n_splits,
                           G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
        row = tl.program_id(0)  # b * H + head = (b * KVH + kvh) * G + member
        bkv = row // G
        member = row % G
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, D)
        part = (bkv * n_splits + s) * BLOCK_G + member
        ok = s < n_splits
        m = tl.load(pm_ptr + part, mask=ok, other=float("-inf"))
        l = tl.load(pl_ptr + part, mask=ok, other=0.0)
        o = tl.load(po_ptr + part[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        m_all = tl.max(m, axis=0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))
        total = tl.sum(w * l, axis=0)
        out = tl.sum(w[:, None] * o, axis=0) / total
        tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


#: cached keys per chunk-kernel iteration, and the most thread blocks the chunks are spread over per (batch, KV head).
ATTN_BLOCK_L = 64
ATTN_MAX_SPLITS = 64


def attention_kernel_supported(head_dim: int, groups: int) -> bool:
    """Shapes the Triton decode attention takes: a power-of-two head dim >= 16 (tensor-core products) and any
    number of query heads per KV head (padded to >= 16 rows)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and groups >= 1


def reference_gqa_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                                   limit: torch.Tensor, scale: float) -> torch.Tensor:
    """Eager reference (and fallback) of `gqa_decode_attention`: SDPA over the kept keys, K/V heads repeated."""
    batch, heads, _, dim = q.shape
    groups = heads // k.shape[1]
    positions = torch.arange(k.shape[2], device=k.device)
    keep = (mask != 0) & (positions <= limit.reshape(()))  # [B, L]
    kk = k.repeat_interleave(groups, dim=1)
    vv = v.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=keep[:, None, None, :], scale=scale)
    return out.transpose(1, 2).reshape(batch, 1, heads, dim)


@torch.library.custom_op("internvl::gqa_decode_attention", mutates_args=())
def gqa_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         limit: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one new token per row over a static KV cache.

    q [B, H, 1, D], k/v [B, KVH, L, D] (unit stride over D), mask [B, L] (nonzero = a real token), limit [1] long
    (the last cache index to attend to: the new token's own slot) -> [B, 1, H, D] in q's dtype. Query head h reads KV
    head h // (H / KVH), as transformers' `repeat_kv` does."""
    batch, heads, q_len, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    if q_len != 1 or heads % kv_heads or k.shape != v.shape or tuple(mask.shape) != (batch, length):
        raise ValueError(f"gqa_decode_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"mask {tuple(mask.shape)} do not fit [B,H,1,D], [B,KVH,L,D], [B,L]")
    groups = heads // kv_heads
    if not (triton_ready(q) and attention_kernel_supported(dim, groups)) or k.stride(3) != 1 or v.stride(3) != 1:
        return reference_gqa_decode_attention(q, k, v, mask, limit, scale)
    q = q.contiguous()
    block_g = max(16, triton.next_power_of_2(groups))
    n_splits = max(1, min(ATTN_MAX_SPLITS, triton.cdiv(length, ATTN_BLOCK_L)))
    chunk = triton.cdiv(triton.cdiv(length, n_splits), ATTN_BLOCK_L) * ATTN_BLOCK_L
    n_splits = triton.cdiv(length, chunk)
    rows = batch * kv_heads * n_splits * block_g
    part_o = torch.empty(rows, dim, dtype=torch.float32, device=q.device)
    part_m = torch.empty(rows, dtype=torch.float32, device=q.device)
    part_l = torch.empty(rows, dtype=torch.float32, device=q.device)
    _attn_chunk_kernel[(batch * kv_heads, n_splits)](
        q, k, v, mask, limit, part_o, part_m, part_l, length, kv_heads, float(scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0), G=groups, BLOCK_G=block_g, D=dim, BLOCK_L=ATTN_BLOCK_L,
        ITERS=chunk // ATTN_BLOCK_L, IEEE=q.dtype == torch.float32, num_warps=4)
    out = torch.empty(batch, 1, heads, dim, dtype=q.dtype, device=q.device)
    _attn_merge_kernel[(batch * heads,)](part_o, part_m, part_l, out, n_splits, G=groups, BLOCK_G=block_g, D=dim,
                                         BLOCK_S=max(2, triton.next_power_of_2(n_splits)), num_warps=2)
    return out


@gqa_decode_attention.register_fake
def _gqa_decode_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                               limit: torch.Tensor, scale: float) -> torch.Tensor:
    batch, heads, _, dim = q.shape
    return q.new_empty(batch, 1, heads, dim)
