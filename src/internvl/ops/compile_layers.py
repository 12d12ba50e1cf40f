"""Regional `torch.compile` of the repeated transformer layers, and runtime-fused q/k/v and gate/up projections.

A training step launches thousands of small elementwise kernels (norms, RoPE, SwiGLU/GELU, residuals, layer scale),
twice per layer with gradient checkpointing. Compiling each layer lets inductor fuse them and generate the backward;
all instances of a layer class share one compiled function. Only the instance's `forward` is replaced, so module
hooks stay outside the compiled region and state-dict keys do not change. transformers'
`GradientCheckpointingLayer.forward` is itself the checkpoint wrapper, so the recomputation is traced into the
compiled backward. `fuse_projections` runs q/k/v (and gate/up) of plain linears as
one matmul against `torch.cat` of their weights.
"""
from __future__ import annotations

import logging
import sys

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ..compat import attend_rope, restore_forwards, swap_forward

logger = logging.getLogger(__name__)

_COMPILED: dict[tuple, object] = {}
#: dynamo's per-function recompile limit (renamed from `cache_size_limit` in torch 2.6)
RECOMPILE_LIMIT_NAME = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def raise_recompile_limit(limit: int) -> None:
    """Raise dynamo's per-function recompile limit to at least `limit` for the process (compiled layers and the
    decode step recompile once per shape; the default 8 would fall back to eager after 8 shapes)."""
    setattr(torch._dynamo.config, RECOMPILE_LIMIT_NAME, max(getattr(torch._dynamo.config, RECOMPILE_LIMIT_NAME), limit))


def _plain_linear(module: object) -> bool:
    return type(module) is nn.Linear


def _fusable_attention(module: nn.Module) -> bool:
    """A Llama-style attention (plain q/k/v/o linears, head_dim, the modeling module's apply_rotary_pos_emb)."""
    if not all(_plain_linear(getattr(module, n, None)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return False
    if not hasattr(module, "head_dim") or not hasattr(module, "layer_idx"):
        return False
    return hasattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb")


def _fusable_mlp(module: nn.Module) -> bool:
    """A gated MLP: plain gate/up/down linears and an `act_fn`."""
    return all(_plain_linear(getattr(module, n, None)) for n in ("gate_proj", "up_proj", "down_proj")) and \
        callable(getattr(module, "act_fn", None))


def _cat_linear(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> list[torch.Tensor]:
    """One matmul of x against the row-concatenated weights of `linears`; returns each projection's output."""
    weight = torch.cat([lin.weight for lin in linears])
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                          for lin in linears])
    return list(F.linear(x, weight, bias).split([lin.out_features for lin in linears], dim=-1))


def fused_attention_forward(self: nn.Module, hidden_states: torch.Tensor, position_embeddings=None,
                            attention_mask=None, cache=None, **kwargs):
    """transformers' Llama attention forward with q/k/v as one matmul (same maths, same parameters)."""
    qkv = _cat_linear(hidden_states, (self.q_proj, self.k_proj, self.v_proj))
    rope = sys.modules[type(self).__module__].apply_rotary_pos_emb
    return attend_rope(self, qkv, rope, position_embeddings, attention_mask, cache, **kwargs)


def fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gated MLP with gate and up as one matmul: down(act(gate(x)) * up(x))."""
    gate, up = _cat_linear(x, (self.gate_proj, self.up_proj))
    return self.down_proj(self.act_fn(gate) * up)


def fuse_projections(model: nn.Module) -> dict[str, int]:
    """Swap (per instance) the forward of every fusable attention and gated MLP for the fused-matmul forward; returns
    {"qkv": n, "gate_up": m}."""
    counts = {"qkv": 0, "gate_up": 0}
    for module in model.modules():
        if getattr(module, "_fused_proj", False):
            continue
        if _fusable_attention(module):
            swap_forward(module, fused_attention_forward, "_fused_proj")
            counts["qkv"] += 1
        elif _fusable_mlp(module):
            swap_forward(module, fused_mlp_forward, "_fused_proj")
            counts["gate_up"] += 1
    return counts


def unfuse_projections(model: nn.Module) -> int:
    """Undo `fuse_projections`; returns how many modules were restored."""
    return restore_forwards(model, "_fused_proj")


def _own_code(fn, name: str):
    """A trampoline to `fn` with a code object of its own: dynamo caches graphs per code object, and every layer class
    shares `GradientCheckpointingLayer`'s wrapper, so the ViT's shapes would otherwise look like a varying LLM shape
    (recompiled dynamic)."""

    def call(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    call.__code__ = call.__code__.replace(co_name=name, co_qualname=name)
    call.__name__ = call.__qualname__ = name
    return call


def _compiled_for(cls: type, *, backend: str, mode: str | None, options: dict | None = None):
    """One compiled function per (layer class, options), shared by all instances of the class."""
    key = (cls, backend, mode, tuple(sorted((options or {}).items())))
    if key not in _COMPILED:
        kwargs = {"backend": backend, "mode": mode, **({"options": options} if options else {})}
        _COMPILED[key] = torch.compile(_own_code(cls.forward, f"{cls.__name__}_forward"), **kwargs)
    return _COMPILED[key]


def compile_layers(model: nn.Module, *, backend: str = "inductor", mode: str | None = None,
                   skip: tuple[str, ...] = (), options: dict | None = None) -> dict[str, int]:
    """Compile every `GradientCheckpointingLayer` inside `model` (decoder layers, InternViT blocks) per layer class,
    except under the module-name prefixes `skip`; returns {class name: layers compiled}. Raises dynamo's recompile
    limit to at least 64 (eval, checkpointing on/off and new shapes must not fall back to eager)."""
    raise_recompile_limit(64)
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, GradientCheckpointingLayer) or getattr(module, "_compiled_layer", False):
            continue
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        fn = _compiled_for(type(module), backend=backend, mode=mode, options=options)
        swap_forward(module, fn, "_compiled_layer")
        counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    logger.info("compiled layers (%s): %s", backend, counts)
    return counts


def uncompile_layers(model: nn.Module) -> int:
    """Undo `compile_layers` (restores the class forwards); returns how many layers were restored."""
    return restore_forwards(model, "_compiled_layer")
