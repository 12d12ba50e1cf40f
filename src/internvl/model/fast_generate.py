"""Fast greedy decoding: a static KV cache and, on CUDA, one decode step captured once as a CUDA graph.

The stock `generate` loop is launch-bound (hundreds of small kernels per token plus a host sync per token). Here the
decode step is a pure function of fixed device buffers: dynamo traces it with `fullgraph=True` (no host syncs),
inductor may fuse it, and a CUDA graph replays it once per token. The argmax, the "finished" flags and the output
write are inside the graph; the host checks the flags every `CHECK_EVERY` tokens. On the CPU the same step runs
eagerly, which is how the tests compare it token for token with `generate`.

Shapes: `inputs_embeds` [B, L, H] (left-padded), `attention_mask` [B, L] (1 = real token) -> [B, max_new_tokens] new
token ids; after a row's first EOS the row is filled with `pad_token_id`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, StaticCache
from transformers.cache_utils import Cache, StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ..compat import attn_implementation, set_attn_implementation
from ..ops.compile_layers import raise_recompile_limit
from ..ops.decode_kernels import attention_kernel_supported, triton_ready
from ..ops.packed_projections import decoder_layer_groups, pack_decoder, packed_signature
from .decode_config import AUTO_INDUCTOR_MAX_PARAMS, DecodeConfig
from .packed_step import packed_forward_logits, packed_layer

logger = logging.getLogger(__name__)

#: cache lengths are rounded up to this multiple so compiled steps and graphs are reused across similar prompts.
CACHE_ROUND = 256
#: decode states (static caches + graphs) kept per decoder; the least recently used one is dropped beyond this.
MAX_STATES = 4
#: tokens between host checks of "all rows finished".
CHECK_EVERY = 32
#: dynamo recompile limit (at least) once a decode step is built (one entry per (batch, cache length) shape).
RECOMPILE_LIMIT = 64
#: name under which the grouped-query decode attention is registered with transformers.
DECODE_ATTN = "internvl_sdpa_gqa_decode"
#: model types whose decoder layers the packed step reproduces (checked further in `packed_step_supported`).
PACKED_MODEL_TYPES = ("llama", "qwen2")


def sdpa_gqa_decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs):
    """SDPA that, for one query token with grouped KV heads, folds each KV head's query heads into the query axis
    instead of repeating K/V (`repeat_kv` copies the whole static cache per layer and step). Everything else goes to
    transformers' SDPA. query [B, H, 1, D], key/value [B, KVH, L, D], mask bool [B, 1, 1, L] or None -> [B, 1, H, D]."""
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or dropout != 0.0 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, dim = query.shape
    q = query.reshape(batch, heads // groups, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def packed_step_supported(lm: nn.Module) -> bool:
    """Whether our packed decode step reproduces `lm`: a Llama / Qwen2 causal LM with full attention in every layer,
    no tensor-parallel plan, no logit softcapping and plain-Linear q/k/v, gate/up."""
    cfg = getattr(lm, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in PACKED_MODEL_TYPES:
        return False
    if not hasattr(lm, "lm_head") or getattr(cfg, "final_logit_softcapping", None):
        return False
    if getattr(cfg, "use_sliding_window", False) or any(t != "full_attention"
                                                        for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return False
    return decoder_layer_groups(lm) is not None


def register_decode_attention(name: str, function) -> None:
    """Register `function` as transformers attention implementation `name` (with SDPA's mask builder)."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)


class _PrefixLayer(StaticLayer):
    """The first `max_cache_len` positions of another `StaticLayer`, for the prefill: updates write into the full
    layer's buffers and advance its length; attention reads only the prefix."""

    def __init__(self, full: StaticLayer, length: int) -> None:
        super().__init__(max_cache_len=length)
        self.full = full

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        full = self.full
        if not full.is_initialized:
            full.lazy_initialization(key_states, value_states)
        self.keys = full.keys[:, :, : self.max_cache_len]
        self.values = full.values[:, :, : self.max_cache_len]
        self.device, self.cumulative_length, self.is_initialized = full.device, full.cumulative_length, True
        return super().update(key_states, value_states, *args, **kwargs)


def reset_cache(cache: StaticCache) -> None:
    """`cache.reset()`, in two multi-tensor kernels where every layer is an initialised plain `StaticLayer` (instead
    of three launches per layer, on the time to first token)."""
    layers = cache.layers
    if all(type(layer) is StaticLayer and layer.is_initialized for layer in layers):
        # one call per dtype: foreach kernels take their fast route only over tensors of one dtype
        torch._foreach_zero_([t for layer in layers for t in (layer.keys, layer.values)])
        torch._foreach_zero_([layer.cumulative_length for layer in layers])
    else:
        cache.reset()


def prefix_cache(cache: StaticCache, length: int) -> Cache | None:
    """A cache over the first `length` positions of the empty static `cache` (sharing its buffers), or None when a
    layer is not a plain `StaticLayer`."""
    if not all(type(layer) is StaticLayer for layer in cache.layers) or length > cache.layers[0].max_cache_len:
        return None
    return Cache(layers=[_PrefixLayer(layer, length) for layer in cache.layers])


class _PackRecord:
    """What `pack_decoder` left behind, re-checked cheaply on every call instead of walking the model again: each
    packed linear (and decoder layer) still in place, without hooks, its weight, bias and scales at the recorded
    addresses. Configuration edits after packing are not watched."""

    def __init__(self, lm: nn.Module, packs: list) -> None:
        self.packs = packs
        layers = lm.model.layers
        self.entries = [(layers._modules, str(i), layer, {}, _addresses({})) for i, layer in enumerate(layers)]
        for layer in layers:
            for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                  (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                for name in names:
                    module = parent._modules[name]
                    params = module._parameters
                    self.entries.append((parent._modules, name, module, params, _addresses(params)))

    def valid(self) -> bool:
        for modules, name, module, params, addresses in self.entries:
            if (modules.get(name) is not module or module._forward_hooks or module._forward_pre_hooks
                    or _addresses(params) != addresses):
                return False
        return True


def _addresses(params: dict) -> tuple[int, int, int]:
    """Where a linear's weight, bias and (int8) row scales lie (0 = absent)."""
    return tuple(params[k].data_ptr() if params.get(k) is not None else 0 for k in ("weight", "bias", "weight_scale"))


@dataclass
class _DecodeState:
    """Fixed device buffers that one captured decode step reads and writes (their addresses never change)."""

    cache: object
    mask: torch.Tensor  # [B, cache_len] long, 1 = attend
    ids: torch.Tensor  # [B, 1] long, the token fed to the next step
    pos: torch.Tensor  # [B, 1] long, its position id
    step: torch.Tensor  # [1] long, index in `out` that the next step writes
    out: torch.Tensor  # [B, max_new] long, generated tokens
    finished: torch.Tensor  # [B] bool
    eos: torch.Tensor  # [E] long (may be empty)
    min_new: torch.Tensor  # [1] long: EOS is suppressed while step < min_new
    graph: object = None
    step_fn: object = None
    packs: list | None = None  # packed weights the step reads; None = the model's own forward


class StaticGreedyDecoder:
    """Greedy decoder over a transformers causal LM (Llama, Qwen2, ...) fed with input embeddings. Packing, the
    attention kind, our GEMV, tuning and the compile scope follow the measured rules below; `config.backend` "auto"
    is resolved once from the model's size.

    The lab's decoder (`lab/decode_variants.py`) overrides those rules and adds attention kinds through
    `decode_attn_implementation` (the model's own forward) and `_packed_attention` (the packed step).
    """

    def __init__(self, lm: nn.Module, config: DecodeConfig | None = None) -> None:
        self.config = config if config is not None else DecodeConfig()
        self.lm = lm
        self._large = sum(p.numel() for p in lm.parameters()) > AUTO_INDUCTOR_MAX_PARAMS
        backend = self.config.backend
        self.compile_backend = ("eager" if self._large else "inductor") if backend == "auto" else backend
        self._layer_fn = None  # the compiled `packed_layer` under the "layer" compile scope
        self._states: dict[tuple, _DecodeState] = {}
        self._pack_signature: tuple | None = None
        self._pack_record: _PackRecord | None = None  # the last packing, while it stays valid
        self._pack_checked = False  # True inside a generate call once `_packs` has checked the packing
        register_decode_attention(DECODE_ATTN, sdpa_gqa_decode_attention)

    def _device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def _graph_mode(self) -> bool:
        # only a dynamo-traced step is known to be free of host syncs, so only that one is captured
        return self.compile_backend is not None and self._device().type == "cuda"

    def _new_state(self, batch: int, cache_len: int, max_new: int, eos: list[int]) -> _DecodeState:
        dev = self._device()

        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=dev)

        return _DecodeState(
            cache=StaticCache(config=self.lm.config, max_cache_len=cache_len),
            mask=torch.ones(batch, cache_len, dtype=torch.long, device=dev), ids=zeros(batch, 1),
            pos=zeros(batch, 1), step=zeros(1), out=zeros(batch, max_new), finished=zeros(batch, dtype=torch.bool),
            eos=torch.tensor(eos, dtype=torch.long, device=dev), min_new=zeros(1),
        )

    def _forward_logits(self, st: _DecodeState, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode forward through the model's own forward: [B, 1] ids -> [B, V] logits of the last position."""
        embeds = self.lm.get_input_embeddings()(ids)
        out = self.lm(inputs_embeds=embeds, attention_mask=st.mask, position_ids=pos, cache=st.cache, use_cache=True,
                      logits_to_keep=1)
        return out.logits[:, -1, :]

    def _select(self, st: _DecodeState, logits: torch.Tensor, pad_token_id: int) -> torch.Tensor:
        """Greedy choice with EOS suppressed before `min_new` tokens; finished rows emit `pad_token_id`."""
        if st.eos.numel():
            block = (st.step < st.min_new).to(logits.dtype) * torch.finfo(logits.dtype).min
            logits = logits.index_add(1, st.eos, block.expand(logits.shape[0], st.eos.numel()))
        nxt = logits.argmax(-1)
        return torch.where(st.finished, torch.full_like(nxt, pad_token_id), nxt)

    def _record(self, st: _DecodeState, nxt: torch.Tensor) -> None:
        """Write `nxt` [B] at `out[:, step]`, update the finished flags and advance the step buffers in place."""
        st.out.index_copy_(1, st.step, nxt[:, None])
        if st.eos.numel():
            st.finished |= torch.isin(nxt, st.eos)
        st.ids.copy_(nxt[:, None])
        st.pos.add_(1)
        st.step.add_(1)

    def _packed_attention(self, attention: str, module: nn.Module, q: torch.Tensor, keys: torch.Tensor,
                          values: torch.Tensor, mask: torch.Tensor, cache_mask: torch.Tensor,
                          limit: torch.Tensor) -> torch.Tensor:
        """One layer's attention in the packed step: q [B, H, 1, D], keys/values [B, KVH, L, D] (the static cache),
        `mask` bool [B, 1, 1, L] (True = attend), `cache_mask` [B, L] (1 = a real token) with `limit` [1] (the last
        cache index to attend to) -> [B, 1, H, D]."""
        if attention == "triton":
            return torch.ops.internvl.gqa_decode_attention(q, keys, values, cache_mask, limit, module.scaling)
        out, _ = sdpa_gqa_decode_attention(module, q, keys, values, mask, scaling=module.scaling)
        return out

    def decode_attn_implementation(self) -> str:
        """The transformers attention implementation the model's own forward uses while an SDPA model decodes."""
        return DECODE_ATTN

    # ---- the measured rules (docs/performance.md, "The decoder's options"; the lab's decoder overrides them) ----
    def _packed_step_possible(self) -> bool:
        """The packed step reproduces this model; answered from the last packing while that is still in place (the
        full check walks every layer: milliseconds per call on a deep model)."""
        record = self._pack_record
        if record is not None and (self._pack_checked or torch.compiler.is_compiling() or record.valid()):
            return True  # checked by this call's `_packs` already (also while dynamo traces the step)
        self._pack_record = None
        return packed_step_supported(self.lm)

    def _kernels_auto(self) -> bool:
        """Whether our Triton kernels run: Triton runs on the model's device and the packed step applies."""
        return triton_ready(next(self.lm.parameters())) and self._packed_step_possible()

    def _gemv_on(self) -> bool:
        """Whether the batch-1 packed step runs its products through our GEMV."""
        return self._kernels_auto()

    def _attention(self) -> str:
        """The packed step's attention: "triton" where our kernel runs and takes the head shape, else "sdpa"."""
        cfg = self.lm.config
        heads = cfg.num_attention_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        groups = heads // (getattr(cfg, "num_key_value_heads", None) or heads)
        return "triton" if self._kernels_auto() and attention_kernel_supported(dim, groups) else "sdpa"

    def _tuned(self, batch: int) -> bool:
        """Inductor's coordinate-descent tuning: at batch 1 unless our GEMV runs there (then measured slower)."""
        return batch == 1 and not self._gemv_on()

    def _packed_step(self, batch: int) -> bool:
        """Whether a state of this batch size runs the packed step (weights are packed either way): wherever our
        kernels run, else except for inductor's tuned step."""
        if self._attention() == "triton" or (batch == 1 and self._gemv_on()):
            return True
        return not (self.compile_backend == "inductor" and self._tuned(batch))

    def _layer_scope(self) -> bool:
        """Whether the packed step compiles one decoder layer (reused by all) instead of the whole step: above
        AUTO_INDUCTOR_MAX_PARAMS (on the 40B model the same step time for 18 instead of 42 s of warm-up per shape)."""
        return self.config.backend is not None and self._large

    def _layer_backend(self) -> str:
        """The compiled layer's backend: the configured one, "inductor" for "auto" (one layer compiles in seconds)."""
        return "inductor" if self.config.backend == "auto" else self.config.backend

    # ---- the step ----
    def _make_step(self, st: _DecodeState, pad_token_id: int):
        if st.packs is not None:
            # the attention kind and GEMV choice are resolved once per state, not per token
            attention, one_row = self._attention(), st.ids.shape[0] == 1 and self._gemv_on()

            def attend(module, q, keys, values, mask, cache_mask, limit):
                return self._packed_attention(attention, module, q, keys, values, mask, cache_mask, limit)

            def forward(ids: torch.Tensor, pos: torch.Tensor, packs: list) -> torch.Tensor:
                return packed_forward_logits(self.lm, st.cache, st.mask, ids, pos, packs, one_row=one_row,
                                             attend=attend, layer_fn=self._layer_fn or packed_layer)
        else:
            def forward(ids: torch.Tensor, pos: torch.Tensor, packs: None) -> torch.Tensor:
                return self._forward_logits(st, ids, pos)

        core = forward
        if st.packs is not None and self._layer_scope():
            if self._layer_fn is None:  # one compiled layer for every layer and state (recompiled per shape only)
                self._layer_fn = torch.compile(packed_layer, fullgraph=True, dynamic=False,
                                               backend=self._layer_backend())
        elif self.compile_backend is not None:
            tuned = self.compile_backend == "inductor" and self._tuned(st.ids.shape[0])
            core = torch.compile(forward, fullgraph=True, dynamic=False, backend=self.compile_backend,
                                 options={"coordinate_descent_tuning": True} if tuned else None)

        raise_recompile_limit(RECOMPILE_LIMIT)  # once per state, not a config patch per token

        def step() -> None:
            logits = core(st.ids, st.pos, st.packs)
            self._record(st, self._select(st, logits.float(), pad_token_id))

        return step

    def _packs(self) -> list | None:
        """Pack (or re-pack) the q/k/v and gate/up weights when the packed step applies; returns the packed views or
        None. When the packed addresses change, every cached state is dropped (their graphs read the old ones)."""
        if self._pack_record is not None and self._pack_record.valid():
            return self._pack_record.packs  # unchanged since packed: same addresses, states kept
        self._pack_record = None
        packs = pack_decoder(self.lm) if packed_step_supported(self.lm) else None
        if packs is not None:
            self._pack_record = _PackRecord(self.lm, packs)
        signature = packed_signature(packs) if packs is not None else None
        if signature != self._pack_signature:
            self._states.clear()
            self._pack_signature = signature
        return packs

    def _checked_packs(self) -> list | None:
        """`_packs`, then the rules below answer from it for the rest of this generate call (one walk per call)."""
        packs = self._packs()
        self._pack_checked = True
        return packs

    @torch.inference_mode()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
        """Greedy-decode after left-padded prompts; returns [B, max_new_tokens] ids (see `_generate`). While it runs,
        an SDPA language model uses the grouped-query decode attention (same maths, no K/V repeat)."""
        cfg = self.lm.config
        previous = attn_implementation(cfg)
        if previous == "sdpa":
            set_attn_implementation(cfg, self.decode_attn_implementation())
        try:
            return self._generate(inputs_embeds, attention_mask, **kwargs)
        finally:
            self._pack_checked = False
            set_attn_implementation(cfg, previous)

    def _generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, *, max_new_tokens: int,
                  eos_token_id: int | list[int] | None = None, pad_token_id: int = 0, min_new_tokens: int = 0,
                  padded: bool | None = None) -> torch.Tensor:
        """`padded`: whether `attention_mask` holds any 0, from a caller that has read it on the host and checked
        that every row ends with a real token (saves two host syncs); None: checked here."""
        if inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be [B, L, H], got shape {tuple(inputs_embeds.shape)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        batch, length, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != {(batch, length)}")
        if padded is None:
            if bool((attention_mask[:, -1] == 0).any()):
                raise ValueError("fast greedy decoding needs left-padded prompts (attention_mask[:, -1] must be 1)")
            padded = bool((attention_mask == 0).any())
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        packs = self._checked_packs()
        cache_len = -(-(length + max_new_tokens) // CACHE_ROUND) * CACHE_ROUND
        key = (batch, cache_len, max_new_tokens, tuple(eos), pad_token_id)
        st = self._states.pop(key, None)
        if st is None:
            while len(self._states) >= MAX_STATES:
                self._states.pop(next(iter(self._states)))  # least recently used (dicts keep insertion order)
            st = self._new_state(batch, cache_len, max_new_tokens, eos)
        else:
            reset_cache(st.cache)
        self._states[key] = st
        st.packs = packs if self._packed_step(batch) else None

        # fill the fixed buffers for this call (the addresses the captured graph reads)
        am = attention_mask.to(torch.long)
        st.mask.fill_(1)
        st.mask[:, :length].copy_(am)
        st.step.zero_()
        st.out.fill_(pad_token_id)
        st.finished.zero_()
        st.min_new.fill_(min_new_tokens)

        # prefill (eager; prompt lengths vary): positions count real tokens only, like `generate` does
        position_ids = (am.cumsum(-1) - 1).clamp(min=0)
        out = self._prefill(st, inputs_embeds, am, position_ids, padded=padded)
        first = self._select(st, out.logits[:, -1, :].float(), pad_token_id)
        st.pos.copy_(position_ids[:, -1:])  # _record advances it to the first new token's position
        self._record(st, first)

        if max_new_tokens > 1:
            run_step = self._prepare_step(st, pad_token_id)
            for done in range(2, max_new_tokens + 1):
                run_step()
                if st.eos.numel() and done % CHECK_EVERY == 0 and bool(st.finished.all()):
                    break
        return st.out.clone()

    def _prefill(self, st: _DecodeState, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, *, padded: bool):
        """The prompt's forward, writing its keys/values into the static cache; returns the model output.

        It runs over `prefix_cache` so that attention sees exactly the prompt, as with a dynamic cache: without
        padding no mask is built and SDPA runs causal flash attention; with padding the [B, 1, L, L] mask. (Over the
        whole cache transformers would build a [B, 1, L, cache_len] mask, ruling out the flash kernel.)"""
        cache = prefix_cache(st.cache, inputs_embeds.shape[1])
        if cache is None:
            cache, mask = st.cache, (st.mask if padded else None)
        else:
            mask = attention_mask if padded else None
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, cache=cache,
                       use_cache=True, logits_to_keep=1)

    def _prepare_step(self, st: _DecodeState, pad_token_id: int):
        """A callable that performs one decode step; on CUDA it replays a graph captured on first use."""
        if st.step_fn is None:
            st.step_fn = self._make_step(st, pad_token_id)
        if not self._graph_mode():
            return st.step_fn
        if st.graph is None:
            st.graph = self._capture(st)
        return st.graph.replay

    def _capture(self, st: _DecodeState):
        """Warm the step up on a side stream (compiles it), restore the buffers, then capture one step."""
        saved = {name: getattr(st, name).clone() for name in ("ids", "pos", "step", "out", "finished")}
        saved_len = [layer.cumulative_length.clone() for layer in st.cache.layers]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                st.step_fn()
                self._restore(st, saved, saved_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            st.step_fn()
        self._restore(st, saved, saved_len)  # capture does not execute: the buffers still hold the pre-step values
        logger.info("captured a decode-step CUDA graph for batch %d, cache %d", st.ids.shape[0], st.mask.shape[1])
        return graph

    @staticmethod
    def _restore(st: _DecodeState, saved: dict, saved_len: list) -> None:
        for name, value in saved.items():
            getattr(st, name).copy_(value)
        for layer, value in zip(st.cache.layers, saved_len):
            layer.cumulative_length.copy_(value)


def decoder_for(lm: nn.Module, config: DecodeConfig | None = None) -> StaticGreedyDecoder:
    """The decoder of a language model under `config` (default `DecodeConfig()`), cached on the model while the
    configuration stays the same, so its static caches and CUDA graphs are reused across calls."""
    config = config if config is not None else DecodeConfig()
    dec = getattr(lm, "_static_greedy_decoder", None)
    if dec is None or dec.config != config:
        dec = (config.decoder_class or StaticGreedyDecoder)(lm, config)
        object.__setattr__(lm, "_static_greedy_decoder", dec)  # not a submodule
    return dec
