"""How the static-cache greedy decoder (`internvl.model.fast_generate`) runs (`DecodeConfig`), when
`InternVLChatModel.generate` hands a call to it and how its output is trimmed. Kept apart from the decoder so that
the model decides without importing it (the decoder imports Triton and registers custom ops).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..compat import transformers_at_least

#: language models above this many parameters get the "eager" backend and a one-layer compile under "auto": inductor's
#: compile of a whole deep step costs about a minute per shape (69 s against 12 s on the 40B model, H100).
AUTO_INDUCTOR_MAX_PARAMS = 5_000_000_000


@dataclass(frozen=True)
class DecodeConfig:
    """The decoder's one option; everything else is resolved per model, device and batch size by the measured rules
    of `StaticGreedyDecoder` (docs/performance.md, "The decoder's options"). Set it with
    `model.decode_config = DecodeConfig(...)`.

    backend: dynamo backend of the step: "auto" ("inductor" up to AUTO_INDUCTOR_MAX_PARAMS parameters, "eager"
        above), "inductor", "eager" (traced only) or None (plain eager step, no CUDA graph).

    The lab (`lab/decode_variants.py`) subclasses this with the variants that lost the measurements.
    """

    backend: str | None = "auto"

    #: the backends accepted, and the decoder class that runs the config (None: `StaticGreedyDecoder`).
    BACKENDS: ClassVar[tuple[str | None, ...]] = ("auto", "inductor", "eager", None)
    decoder_class: ClassVar[type | None] = None

    def __post_init__(self) -> None:
        if self.backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {self.BACKENDS}, got {self.backend!r}")


#: generate() kwargs the fast path understands; any other (sampling, beams, penalties, streamers, ...) falls back.
_SUPPORTED = {"max_new_tokens", "min_new_tokens", "eos_token_id", "pad_token_id", "do_sample", "num_beams",
              "use_cache", "generation_config", "temperature", "top_p", "top_k"}


def greedy_settings(generate_kwargs: dict, default_eos: int | list[int] | None = None) -> dict | None:
    """{"max_new_tokens", "min_new_tokens", "eos_token_id", "pad_token_id"} if `generate_kwargs` ask for plain greedy
    decoding, else None (use `generate`; so do transformers < 5.24, whose StaticCache lacks what the decoder needs)."""
    if set(generate_kwargs) - _SUPPORTED or not transformers_at_least("5.24"):
        return None
    cfg = generate_kwargs.get("generation_config")

    def pick(name: str, default=None):
        if name in generate_kwargs and generate_kwargs[name] is not None:
            return generate_kwargs[name]
        if cfg is not None and getattr(cfg, name, None) is not None:
            return getattr(cfg, name)
        return default

    if pick("do_sample", False) or int(pick("num_beams", 1)) != 1 or pick("use_cache", True) is False:
        return None
    if cfg is not None:
        if float(getattr(cfg, "repetition_penalty", 1.0) or 1.0) != 1.0:
            return None
        if (getattr(cfg, "num_return_sequences", 1) or 1) != 1 or (getattr(cfg, "min_length", 0) or 0) > 0:
            return None
        for name in ("no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                     "forced_bos_token_id", "forced_eos_token_id", "sequence_bias", "guidance_scale",
                     "output_scores", "output_logits", "return_dict_in_generate", "output_hidden_states",
                     "output_attentions", "assistant_model", "prompt_lookup_num_tokens", "stop_strings"):
            if getattr(cfg, name, None):
                return None
        if getattr(cfg, "max_length", None) is not None and pick("max_new_tokens") is None:
            return None
    max_new = pick("max_new_tokens")
    if max_new is None:
        return None
    eos = pick("eos_token_id", default_eos)
    eos_list = [eos] if isinstance(eos, int) else list(eos or [])
    pad = pick("pad_token_id", eos_list[0] if eos_list else 0)
    return {"max_new_tokens": int(max_new), "min_new_tokens": int(pick("min_new_tokens", 0) or 0),
            "eos_token_id": eos_list, "pad_token_id": int(pad)}


def trim_after_eos(tokens: torch.Tensor, eos: list[int], pad_token_id: int) -> torch.Tensor:
    """Drop trailing columns where every row has finished (what `generate` returns when all rows stop early)."""
    if not eos:
        return tokens
    finished = torch.isin(tokens, torch.tensor(eos, device=tokens.device)).long().cumsum(1) > 0
    # a column is needed while some row has not emitted EOS before it
    shifted = torch.cat([torch.zeros_like(finished[:, :1]), finished[:, :-1]], dim=1)
    needed = (~shifted).any(dim=0).nonzero()
    width = int(needed.max()) + 1 if needed.numel() else tokens.shape[1]
    return tokens[:, :width]


def has_training_compiled_layers(lm: nn.Module) -> bool:
    """True while the training fast paths have compiled `lm`'s layers (`ops.compile_layers`): the decode step cannot
    trace through those wrappers, so `generate` uses transformers' loop until the trainer removes them."""
    # the flag is a plain instance attribute (compat.swap_forward): read __dict__, not nn.Module's slow __getattr__
    return any(module.__dict__.get("_compiled_layer", False) for module in lm.modules())


def single_device(lm: nn.Module) -> bool:
    """True when every weight of `lm` sits on one CUDA device (the captured decode graph runs on one device)."""
    devices = {p.device for p in lm.parameters()}
    return len(devices) == 1 and next(iter(devices)).type == "cuda"
