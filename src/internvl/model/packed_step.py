"""The packed decode step of a Llama-family language model: one decoder layer at a time over packed q/k/v and
gate/up weights (`ops.packed_projections.pack_decoder`), for `fast_generate`. The layer body `packed_layer` is a pure
function, so it can be compiled once and reused by every layer ("layer" compile scope: seconds to compile instead of
about a minute for the whole 60-layer 40B step).

Shapes: h [B, 1, H]; the cache layer's keys/values [B, KVH, L, D]; `mask` bool [B, 1, 1, L] (True = attend),
`cache_mask` [B, L] (1 = a real token), `limit` [1] (the last cache index the new token attends to).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..ops.int8_weights import int8_linear
from ..ops.packed_projections import plain_linear


def packed_linear(x: torch.Tensor, w, b: torch.Tensor | None, one_row: bool) -> torch.Tensor:
    """x @ w.T + b for a packed weight `w`: a tensor (through our GEMV when `one_row`) or (int8 weight, row scales)."""
    if isinstance(w, tuple):
        return int8_linear(x, *w, b)
    return torch.ops.internvl.gemv(x, w, b) if one_row else nn.functional.linear(x, w, b)


def project(module: nn.Module, x: torch.Tensor, one_row: bool) -> torch.Tensor:
    """A linear of the step (o_proj, down_proj, LM head) through `packed_linear` when it is a plain linear (bf16 or
    int8); anything else (LoRA, bitsandbytes) through its own forward."""
    if not plain_linear(module):
        return module(x)
    scale = getattr(module, "weight_scale", None)
    return packed_linear(x, module.weight if scale is None else (module.weight, scale), module.bias, one_row)


def packed_layer(h: torch.Tensor, layer: nn.Module, pack: tuple, cache_layer, cos: torch.Tensor, sin: torch.Tensor,
                 mask: torch.Tensor, cache_mask: torch.Tensor, limit: torch.Tensor, *, one_row: bool,
                 attend: Callable) -> torch.Tensor:
    """One decoder layer, the same maths as its own forward: norm -> packed q/k/v -> RoPE -> cache update -> `attend`
    -> o_proj -> residual -> norm -> packed gate/up -> act * up -> down -> residual. h [B, 1, H] -> [B, 1, H]."""
    attn, mlp = layer.self_attn, layer.mlp
    w_qkv, b_qkv, w_gu, b_gu = pack
    batch = h.shape[0]
    dim = attn.head_dim
    n_q = attn.q_proj.out_features
    n_kv = attn.k_proj.out_features
    x = layer.input_layernorm(h)
    q, k, v = packed_linear(x, w_qkv, b_qkv, one_row).split([n_q, n_kv, n_kv], dim=-1)
    q = q.view(batch, 1, n_q // dim, dim).transpose(1, 2)
    k = k.view(batch, 1, n_kv // dim, dim).transpose(1, 2)
    v = v.view(batch, 1, n_kv // dim, dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys, values = cache_layer.update(k, v)
    a = attend(attn, q, keys, values, mask, cache_mask, limit)
    h = h + project(attn.o_proj, a.reshape(batch, 1, n_q), one_row)
    x = layer.post_attention_layernorm(h)
    gate, up = packed_linear(x, w_gu, b_gu, one_row).chunk(2, dim=-1)
    return h + project(mlp.down_proj, mlp.act_fn(gate) * up, one_row)


def packed_forward_logits(lm: nn.Module, cache, cache_mask: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor,
                          packs: list, *, one_row: bool, attend: Callable,
                          layer_fn: Callable = packed_layer) -> torch.Tensor:
    """The decode forward over packed weights: embeddings, RoPE tables and mask once, `layer_fn` per layer, the final
    norm and the LM head. ids/pos [B, 1] -> [B, V] logits; `cache_mask` [B, L] marks the cache's real tokens."""
    model = lm.model
    h = model.get_input_embeddings()(ids)  # [B, 1, H]
    cos, sin = model.rotary_emb(h, position_ids=pos)
    # the new token sits at cache index cumulative_length; it attends to real prompt tokens and earlier steps
    index = cache.layers[0].cumulative_length
    kv = torch.arange(cache_mask.shape[1], device=h.device)
    mask = (cache_mask.bool() & (kv <= index))[:, None, None, :]  # [B, 1, 1, L]
    limit = index.reshape(1).clone()  # each cache layer's update advances its own length in place
    for layer, pack, cache_layer in zip(model.layers, packs, cache.layers):
        h = layer_fn(h, layer, pack, cache_layer, cos, sin, mask, cache_mask, limit, one_row=one_row, attend=attend)
    h = model.norm(h)
    return project(lm.lm_head, h[:, -1, :], one_row)
