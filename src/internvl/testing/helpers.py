"""Decode prompts and their plain `generate` reference, shared by the decode guards of `tests/perf` and the lab's
decode-variant tests (`lab/tests`)."""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["decode_prompts", "greedy_reference"]


def decode_prompts(batch: int = 3, length: int = 7, hidden: int = 32,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds [B, L, H], attention mask [B, L]) with left padding on rows 0 (3 positions) and 1 (1)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, length, hidden, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return emb, mask


def greedy_reference(lm: Any, emb: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' own greedy `generate` of ``n`` tokens (no EOS stop): the reference the fast decoders must equal."""
    return lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
