"""Decode variants that are not the product's defaults: explicit packing / attention / GEMV / tuning / compile-scope
choices instead of the product's measured rules, an fp32 "math" attention for inductor to fuse, and FlexAttention
(flex-decoding) in the packed step and in the model's own forward. They were measured against the defaults and lost
(docs/performance.md, "How the defaults were chosen"); the benchmark keeps them to re-measure.

`LabDecodeConfig` adds those options to the product's `DecodeConfig` ("auto" = the product's rule) and runs through
`LabGreedyDecoder`, a `StaticGreedyDecoder` that honours them; pass it wherever a `DecodeConfig` goes
(`model.decode_config = LabDecodeConfig(attention="flex")`, `decoder_for(lm, config)`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

from internvl.model.decode_config import DecodeConfig
from internvl.model.fast_generate import StaticGreedyDecoder, register_decode_attention, sdpa_gqa_decode_attention

#: name under which the FlexAttention decode attention is registered with transformers (`attention="flex"`).
DECODE_FLEX_ATTN = "internvl_flex_gqa_decode"


def math_gqa_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                              scaling: float) -> torch.Tensor:
    """Decode attention written as fp32 multiply-sum, softmax, multiply-sum, for inductor to fuse into its own
    reduction kernels (no attention library call). Grouped-query heads are folded like `sdpa_gqa_decode_attention`.

    query [B, H, 1, D], key/value [B, KVH, L, D], mask bool [B, 1, 1, L] (True = attend) -> [B, 1, H, D]."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(batch, kv_heads, heads // kv_heads, 1, dim).float()
    scores = (q * key[:, :, None].float()).sum(-1) * scaling  # [B, KVH, G, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = (probs[..., None] * value[:, :, None].float()).sum(-2)  # [B, KVH, G, D]
    return out.to(query.dtype).reshape(batch, 1, heads, dim)


def flex_gqa_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                              scaling: float | None, limit: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention through FlexAttention: inside an inductor-compiled step this becomes Triton's flex-decoding
    kernel (the cache split across thread blocks, grouped-query heads handled natively, the mask applied as a score
    modification), one small kernel where cuDNN's prefill-oriented kernel spends ~14 us per layer on one query.

    query [B, H, Lq, D], key/value [B, KVH, L, D] -> [B, Lq, H, D]. Either `mask` bool [B, 1, 1, L] (True = attend),
    or `mask` [B, L] (nonzero = a real token) with `limit` [1] long (the last cache index to attend to): the decode
    step's own buffers, so the score modification reads graph inputs only (inductor's CPU template needs that)."""
    if limit is None:
        keep = mask[:, 0, 0, :]  # [B, L]

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(keep[b, kv_idx], score, -float("inf"))
    else:
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where((mask[b, kv_idx] != 0) & (kv_idx <= limit[0]), score, -float("inf"))

    out = flex_attention(query, key, value, score_mod=score_mod, scale=scaling,
                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous()


def flex_decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs):
    """transformers attention interface: `flex_gqa_decode_attention` for one query token with a boolean mask (the
    decode step), `sdpa_gqa_decode_attention` for everything else (the prefill)."""
    if (query.shape[2] != 1 or dropout != 0.0 or attention_mask is None or attention_mask.dtype != torch.bool
            or kwargs.get("position_bias") is not None):
        return sdpa_gqa_decode_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                         **kwargs)
    mask = attention_mask.expand(query.shape[0], 1, 1, key.shape[2])
    return flex_gqa_decode_attention(query, key, value, mask, scaling), None


class LabGreedyDecoder(StaticGreedyDecoder):
    """`StaticGreedyDecoder` with the lab's attention kinds: "math" (packed step only) and "flex" (packed step, and
    the model's own forward through the attention interface; the prefill keeps SDPA)."""

    def __init__(self, lm: nn.Module, config: DecodeConfig | None = None) -> None:
        super().__init__(lm, config if config is not None else LabDecodeConfig())
        register_decode_attention(DECODE_FLEX_ATTN, flex_decode_attention)

    # each option: its explicit value, else ("auto") the product's rule
    def _packed_step_possible(self) -> bool:
        return self.config.packed is not False and super()._packed_step_possible()

    def _packs(self) -> list | None:
        return None if self.config.packed is False else super()._packs()

    def _gemv_on(self) -> bool:
        if self.config.gemv == "auto":
            return super()._gemv_on()
        return bool(self.config.gemv) and self._packed_step_possible()

    def _attention(self) -> str:
        return super()._attention() if self.config.attention == "auto" else self.config.attention

    def _tuned(self, batch: int) -> bool:
        return self.config.tuning is True or (self.config.tuning == "auto" and super()._tuned(batch))

    def _packed_step(self, batch: int) -> bool:
        return super()._packed_step(batch) if self.config.packed == "auto" else bool(self.config.packed)

    def _layer_scope(self) -> bool:
        if self.config.backend is None or self.config.compile_scope == "step":
            return False
        return self.config.compile_scope == "layer" or super()._layer_scope()

    def _packed_attention(self, attention: str, module: nn.Module, q: torch.Tensor, keys: torch.Tensor,
                          values: torch.Tensor, mask: torch.Tensor, cache_mask: torch.Tensor,
                          limit: torch.Tensor) -> torch.Tensor:
        if attention == "math":
            return math_gqa_decode_attention(q, keys, values, mask, module.scaling)
        if attention == "flex":
            return flex_gqa_decode_attention(q, keys, values, cache_mask, module.scaling, limit=limit)
        return super()._packed_attention(attention, module, q, keys, values, mask, cache_mask, limit)

    def decode_attn_implementation(self) -> str:
        return DECODE_FLEX_ATTN if self._attention() == "flex" else super().decode_attn_implementation()


@dataclass(frozen=True)
class LabDecodeConfig(DecodeConfig):
    """`DecodeConfig` with explicit choices, run by `LabGreedyDecoder` ("auto": the product's rule):

    compile_scope: "step" (the whole step) or "layer" (one decoder layer reused by every layer).
    packed: pack q/k/v and gate/up and run our own layer loop (True), never (False).
    attention: "sdpa", "triton" (packed step only), "math" (packed step only) or "flex".
    gemv: run the batch-1 packed step's products through our Triton GEMV.
    tuning: inductor's coordinate-descent tuning.
    """

    compile_scope: str = "auto"
    packed: bool | str = "auto"
    attention: str = "auto"
    gemv: bool | str = "auto"
    tuning: bool | str = "auto"

    ATTENTIONS: ClassVar[tuple[str, ...]] = ("auto", "sdpa", "triton", "math", "flex")
    decoder_class: ClassVar[type | None] = LabGreedyDecoder

    def __post_init__(self) -> None:
        super().__post_init__()
        allowed = {"compile_scope": ("auto", "step", "layer"), "attention": self.ATTENTIONS,
                   "packed": (True, False, "auto"), "gemv": (True, False, "auto"), "tuning": (True, False, "auto")}
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name} must be one of {values}, got {getattr(self, name)!r}")
