"""The training fast paths as one switchboard, shared by the trainer (`medrega-train`) and the benchmark:
`apply_train_speedups` turns on what is safe for one model on one device, `fused_loss_forward` is the fused LM-head
loss forward of the trainer's `compute_loss`.

Safety rules (each decision and its reason lands in the returned report):
- Not on CUDA: nothing changes unless `allow_cpu` (tests).
- DeepSpeed ZeRO-3: only ZeRO-3 leaf-module layers are compiled and fused (their weights are gathered by hooks on the
  layer itself, outside the compiled forward); in other layers per-linear hooks gather each weight, which dynamo
  cannot trace, so they stay eager.
- PEFT/LoRA: a tower whose layers hold LoRA modules is not compiled; fused projections only touch plain linears.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.modeling_layers import GradientCheckpointingLayer

from ..compat import restore_forwards, swap_forward
from .compile_layers import (
    compile_layers,
    fuse_projections,
    uncompile_layers,
    unfuse_projections,
)
from .cross_entropy import (
    causal_lm_loss,
    fsdp2_unsharded_weight,
    zero3_partitioned_head,
)

logger = logging.getLogger(__name__)

#: the towers of InternVLChatModel that are compiled separately (each can be skipped when LoRA-wrapped).
TOWERS = ("language_model", "vision_model")


@dataclasses.dataclass
class TrainSpeedups:
    """Which training fast paths to use (defaults: the measured winners on CUDA, docs/performance.md).

    compile_layers: regional torch.compile of every decoder / ViT layer (one graph per layer class), with `backend`,
        `compile_mode` / `compile_options`; gradient checkpointing is traced into the compiled graph.
    fuse_projections: q/k/v and gate/up as one matmul each inside compiled layers.
    ckpt_skip_llm_layers: leave the last N checkpointed LLM layers un-checkpointed (about 0.6 GiB per layer at
        8 x 1024 tokens on the `mid` model).
    """

    compile_layers: bool = True
    fuse_projections: bool = True
    ckpt_skip_llm_layers: int = 0
    backend: str = "inductor"
    compile_mode: str | None = None
    compile_options: dict | None = None


def _has_lora(module: nn.Module) -> bool:
    return any(type(m).__module__.startswith("peft.") for m in module.modules())


def zero3_hooked_layers(model: nn.Module) -> list[str]:
    """Names of the repeated layers (`GradientCheckpointingLayer`s) that are not ZeRO-3 leaf modules (`"leaf_module"`
    in the ZeRO config): their linears are gathered by per-linear hooks, which dynamo cannot trace."""
    from deepspeed.utils import z3_leaf_module

    return [name for name, module in model.named_modules()
            if isinstance(module, GradientCheckpointingLayer) and not z3_leaf_module(module)]


def set_ckpt_skip(model: nn.Module, skip_last: int) -> int:
    """Turn checkpointing off on the last `skip_last` LLM layers (only where it is on); returns how many."""
    decoder = getattr(model, "language_model", model).get_decoder()
    layers = [layer for layer in decoder.layers if getattr(layer, "gradient_checkpointing", False)]
    chosen = layers[len(layers) - skip_last:] if skip_last > 0 else []
    for layer in chosen:
        layer.gradient_checkpointing = False
    return len(chosen)


def apply_train_speedups(model: nn.Module, opts: TrainSpeedups | None = None, *, zero3: bool | None = None,
                         device: torch.device | str | None = None, allow_cpu: bool = False) -> dict[str, Any]:
    """Turn on the fast paths of `opts` that are safe for `model` on `device` (default: its first parameter's), after
    gradient checkpointing is configured. Returns a report: {"device", "compiled": {class: n}, "fused",
    "ckpt_skipped": n, "skipped": [why]}."""
    opts = opts or TrainSpeedups()
    first = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    zero3 = bool(is_deepspeed_zero3_enabled()) if zero3 is None else zero3
    report: dict[str, Any] = {"device": str(dev), "compiled": {}, "fused": {}, "ckpt_skipped": 0, "skipped": []}
    if dev.type != "cuda" and not allow_cpu:
        report["skipped"].append("not on CUDA: plain eager path")
        return report
    if opts.ckpt_skip_llm_layers:
        report["ckpt_skipped"] = set_ckpt_skip(model, opts.ckpt_skip_llm_layers)
    compile_on = opts.compile_layers
    skip = tuple(t for t in TOWERS if isinstance(getattr(model, t, None), nn.Module) and _has_lora(getattr(model, t)))
    if compile_on and skip:
        report["skipped"].append(f"no compile in LoRA-wrapped {', '.join(skip)}")
    if compile_on and zero3:
        partitioned = zero3_hooked_layers(model)
        if partitioned:
            report["skipped"].append(f"{len(partitioned)} layers not ZeRO-3 leaf modules (their weights are gathered "
                                     "by per-linear hooks): left eager")
        skip = skip + tuple(partitioned)
    if compile_on and opts.fuse_projections:
        roots = [(name, sub) for name, sub in model.named_modules() if isinstance(sub, GradientCheckpointingLayer)]
        if not roots:
            roots = [("", model)]
        fused: Counter = Counter()
        for name, sub in roots:
            if not any(name == s or name.startswith(s + ".") for s in skip if s):
                fused.update(fuse_projections(sub))
        report["fused"] = dict(fused)
    if compile_on:
        report["compiled"] = compile_layers(model, backend=opts.backend, mode=opts.compile_mode,
                                            skip=skip, options=opts.compile_options)
    logger.info("training fast paths: %s", report)
    return report


def remove_train_speedups(model: nn.Module) -> int:
    """Undo `apply_train_speedups` (compiled layers, fused projections); checkpoint skips stay."""
    return uncompile_layers(model) + unfuse_projections(model)


def fused_loss_forward(model: nn.Module, model_inputs: dict[str, Any], labels: torch.Tensor, *,
                       loss_weight: torch.Tensor | None = None, impl: str = "auto",
                       lm_head: nn.Module | None = None, num_items_in_batch: int | float | torch.Tensor | None = None,
                       loss_fn: Callable | None = None, **forward_kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The trainer's fused-loss forward: the model without [B, L, V] logits (`logits_to_keep=1`) or KV cache, then
    `causal_lm_loss` with the LM head on the supervised positions. Returns (loss, outputs).

    The final hidden states are read by a forward hook on the decoder's final norm (every supported LLM family has
    one; `output_hidden_states` would hook every layer, inside the compiled ones, breaking their graphs).
    `loss_fn` (default `causal_lm_loss`, with its arguments) and `forward_kwargs` (to the model) let the lab's
    whole-step CUDA graph run its sync-free variant (`lab.graph_step`).
    """
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine wrappers
    language_model = getattr(inner, "language_model", inner)
    if lm_head is None:
        lm_head = language_model.get_output_embeddings()
    captured: list[torch.Tensor] = []
    handle = language_model.get_decoder().norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        outputs = model(**model_inputs, logits_to_keep=1, use_cache=False, **forward_kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the final norm ran {len(captured)} times in one forward; expected once")
    hidden = captured[0]
    loss = loss_fn or causal_lm_loss

    def head_loss(head: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        return loss(rows, head, labels, loss_weight=loss_weight, num_items_in_batch=num_items_in_batch, impl=impl)

    if zero3_partitioned_head(lm_head):
        return run_as_forward(lm_head, head_loss, hidden), outputs
    fsdp2_unsharded_weight(lm_head)
    return head_loss(lm_head, hidden), outputs


def run_as_forward(module: nn.Module, fn, *args: Any) -> Any:
    """`fn(module, *args)` run as `module`'s forward, so that its hooks wrap it: under ZeRO-3 they gather the weights
    for the call and its backward, and the weight gradient reaches ZeRO-3's reduction while gathered."""
    swap_forward(module, fn, "_run_as_forward")
    try:
        return module(*args)
    finally:
        restore_forwards(module, "_run_as_forward")
