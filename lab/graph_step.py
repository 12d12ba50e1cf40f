"""A whole training step (forward, loss, backward, optimizer step) captured as one CUDA graph and replayed.

Why: a step of the benchmark's `mid` model launches about 2,500 kernels. Even with every layer compiled, the host
(dynamo guards, autograd, kernel launches) takes longer than the GPU work, and the full-step profile shows the GPU
idle a third of the step (docs/performance.md). Replaying one captured graph per batch shape leaves the host one
launch per step.

How:
- The step body is the trainer's fused-loss forward (`fused_loss_forward`) in its sync-free form: image features
  merged without reading counts back, and the LM head run on a fixed number of supervised rows (`capacity`, the count
  rounded up to `supervised_bucket`). Then backward, optional gradient clipping and `optimizer.step()`.
- A batch's signature (shapes and dtypes of its tensors, the capacity, whether rows are plain causal) keys a graph.
  The first `eager_steps` batches of a signature run the same body eagerly: real training steps, which also compile
  the layers and create the optimizer state. The next one is captured and replayed. Later batches of that signature
  are copied into the graph's static inputs and replayed. At most `max_graphs` signatures are captured (one shared
  memory pool); other signatures keep running eagerly, so the results never depend on which path ran.
- The host checks, before every step, what the sync-free body cannot: the image-token count against the real tiles,
  the supervised rows against the capacity, and padding or packing. It reads the counts once per step; with the
  whole step in one graph that costs a launch latency, not a host-bound step.
- Plain causal rows: under capture transformers cannot look at position_ids, so it builds an explicit 4-D mask,
  which would move SDPA off its fast causal kernels. When the host has seen no padding and no packing, the step
  makes the LLM's SDPA mask function return None (SDPA's `is_causal` path) while the body runs
  (`causal_only_sdpa_masks`). Packed or padded rows keep transformers' explicit mask.

Limits, all checked with errors: capture needs CUDA and an optimizer built with `capturable=True`; each step
overwrites the gradients (no accumulation across calls); the optimizer's learning rate is read at capture time
unless it is a tensor updated in place. On the CPU every step runs eagerly (the tests' path).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as masks

from internvl.constants import IGNORE_INDEX
from internvl.ops.cross_entropy import linear_cross_entropy
from internvl.ops.train_speedups import fused_loss_forward

logger = logging.getLogger(__name__)

#: the batch entries the step reads (labels plus the model inputs); absent or None entries are part of the signature.
BATCH_KEYS = ("input_ids", "labels", "pixel_values", "image_flags", "attention_mask", "position_ids", "loss_weight")


def fixed_capacity_loss(hidden_states: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, *, capacity: int,
                        loss_weight: torch.Tensor | None = None, impl: str = "auto",
                        num_items_in_batch: None = None) -> torch.Tensor:
    """`causal_lm_loss` (the weighted token mean) over exactly `capacity` supervised rows, gathered without a host
    sync (`torch.nonzero_static`; unused slots carry IGNORE_INDEX): static shapes for CUDA-graph capture. The caller
    guarantees capacity >= the supervised positions (`GraphStep.plan` checks it on the host)."""
    if capacity < 1 or num_items_in_batch is not None:
        raise ValueError(f"capacity must be >= 1 (got {capacity}), without num_items_in_batch")
    labels = labels.to(hidden_states.device)
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    coords = torch.nonzero_static(keep, size=capacity, fill_value=0)  # [capacity, 2] (batch row, position)
    flat = coords[:, 0] * hidden_states.shape[1] + coords[:, 1]  # position t predicts label t + 1
    used = torch.arange(capacity, device=keep.device) < keep.sum()
    rows = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, flat)
    targets = torch.where(used, shift_labels[coords[:, 0], coords[:, 1]], IGNORE_INDEX)
    weights = None
    if loss_weight is not None:
        weights = loss_weight.to(hidden_states.device)[:, 1:][coords[:, 0], coords[:, 1]] * used
    return linear_cross_entropy(rows, lm_head.weight, targets, bias=lm_head.bias, token_weights=weights, impl=impl)


@contextlib.contextmanager
def causal_only_sdpa_masks() -> Iterator[None]:
    """While active, transformers' SDPA mask builder returns None (SDPA runs `is_causal=True`).

    Only correct for rows without padding and without packing, which the caller has checked on the host. Restores
    the previous mapping on exit."""
    local = getattr(masks, "_local_mapping", {})
    previous = local.get("sdpa")
    masks["sdpa"] = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if previous is None:
            del masks["sdpa"]
        else:
            masks["sdpa"] = previous


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What the host decided for one batch: its tensors' signature, the supervised-row capacity, plain causal rows or
    not. All three key its graph."""

    signature: tuple
    capacity: int
    causal_only: bool

    @property
    def key(self) -> tuple:
        return (self.signature, self.capacity, self.causal_only)


@dataclasses.dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor | None]
    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    lrs: list  # each param group's lr at capture time (a float lr is baked into the graph)


def _signature(batch: dict[str, Any]) -> tuple:
    return tuple((k, None if batch.get(k) is None else (tuple(batch[k].shape), batch[k].dtype)) for k in BATCH_KEYS)


class CudaGraphTrainStep:
    """`step(batch) -> loss`: one optimizer step of an InternVLChatModel on `batch`, replayed as a CUDA graph.

    batch: a dict with input_ids [B,L], labels [B,L], and optionally pixel_values [T,3,S,S], image_flags [T],
    attention_mask [B,L], position_ids [B,L], loss_weight [B,L]. Returns the loss (a detached fp32 scalar tensor,
    not read back). `last_grad_norm` holds the pre-clipping gradient norm when `max_grad_norm` is set.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, impl: str = "auto",
                 supervised_bucket: int = 256, eager_steps: int = 2, max_graphs: int = 4,
                 max_grad_norm: float | None = None) -> None:
        if supervised_bucket < 1 or eager_steps < 1 or max_graphs < 0:
            raise ValueError("supervised_bucket and eager_steps must be >= 1 and max_graphs >= 0")
        self.model, self.optimizer, self.impl = model, optimizer, impl
        self.supervised_bucket, self.eager_steps, self.max_graphs = supervised_bucket, eager_steps, max_graphs
        self.max_grad_norm = max_grad_norm
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self._inner = inner = getattr(model, "module", model)  # DDP-style wrappers
        self._sdpa = getattr(getattr(inner, "language_model", inner).config, "_attn_implementation", None) == "sdpa"
        self._cuda = bool(self.params) and self.params[0].is_cuda
        if self._cuda and max_graphs and not all(g.get("capturable", False) for g in optimizer.param_groups):
            raise ValueError("CUDA-graph steps need an optimizer built with capturable=True "
                             "(e.g. torch.optim.AdamW(params, fused=True, capturable=True))")
        self._graphs: dict[tuple, _Graph] = {}
        self._seen: dict[tuple, int] = {}
        self._pool = None
        self._stream = torch.cuda.Stream() if self._cuda else None
        self.last_grad_norm: torch.Tensor | None = None
        self.steps = {"eager": 0, "captured": 0, "replayed": 0}

    # ----- host-side checks -----
    def plan(self, batch: dict[str, Any], what: str = "batch") -> StepPlan:
        """Check `batch` on the host (one read of a few counts) and decide its capacity and mask mode.

        Raises ValueError (ImageTokenMismatchError for image tokens) naming `what` on anything the sync-free body
        would get wrong."""
        for name in ("input_ids", "labels"):
            if batch.get(name) is None:
                raise ValueError(f"{what}: the step needs {name!r}")
        ids, labels = batch["input_ids"], batch["labels"]
        if ids.shape != labels.shape or ids.dim() != 2:
            raise ValueError(f"{what}: input_ids {tuple(ids.shape)} and labels {tuple(labels.shape)} must be the same "
                             "[B, L] shape")
        token_id = self._inner.img_context_token_id
        pixels, flags = batch.get("pixel_values"), batch.get("image_flags")
        mask, positions = batch.get("attention_mask"), batch.get("position_ids")
        zero = torch.zeros((), dtype=torch.long, device=ids.device)
        real_tiles = zero + pixels.shape[0] if pixels is not None else zero
        if pixels is not None and flags is not None:
            real_tiles = (flags.reshape(-1) == 1).sum()
        expected = torch.arange(ids.shape[1], device=ids.device)
        counts = [
            (labels[:, 1:] != IGNORE_INDEX).sum(),
            (ids == token_id).sum() if token_id is not None else zero,
            real_tiles,
            (mask == 0).sum() if mask is not None else zero,  # padding
            (positions != expected).sum() if positions is not None else zero,  # packing
        ]
        supervised, n_tokens, tiles, padding, packing = torch.stack([c.to(ids.device) for c in counts]).tolist()
        if pixels is None and n_tokens:
            raise ValueError(f"{what}: input_ids hold {n_tokens} <IMG_CONTEXT> tokens but the batch has no pixel_values")
        if pixels is not None:
            error = self._inner.image_token_mismatch(n_tokens, tiles, what)
            if error is not None:
                raise error
        causal_only = self._sdpa and padding == 0 and packing == 0
        capacity = max(1, -(-supervised // self.supervised_bucket) * self.supervised_bucket)
        return StepPlan(signature=_signature(batch), capacity=capacity, causal_only=causal_only)

    # ----- the step body -----
    def _body(self, batch: dict[str, Any], plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        inputs = {k: batch.get(k) for k in ("pixel_values", "input_ids", "attention_mask", "position_ids",
                                            "image_flags")}
        masks = causal_only_sdpa_masks() if plan.causal_only else contextlib.nullcontext()
        with masks:
            loss_fn = functools.partial(fixed_capacity_loss, capacity=plan.capacity)
            loss, _ = fused_loss_forward(self.model, inputs, batch["labels"], loss_weight=batch.get("loss_weight"),
                                         impl=self.impl, loss_fn=loss_fn, sync_free=True)
        loss.backward()
        norm = None
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=self._cuda)
        self.optimizer.step()
        return loss.detach(), norm

    def _eager(self, batch: dict[str, Any], plan: StepPlan) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        self.steps["eager"] += 1
        if not self._cuda:
            loss, self.last_grad_norm = self._body(batch, plan)
            return loss
        main = torch.cuda.current_stream()
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            loss, norm = self._body(batch, plan)
            loss, norm = loss.clone(), (norm.clone() if norm is not None else None)
        main.wait_stream(self._stream)
        for t in (loss, norm):
            if t is not None:
                t.record_stream(main)
        self.last_grad_norm = norm
        return loss

    def _capture(self, batch: dict[str, Any], plan: StepPlan) -> _Graph:
        static = {k: (None if batch.get(k) is None else batch[k].detach().clone()) for k in BATCH_KEYS}
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            torch.cuda.empty_cache()  # the eager steps' cached blocks; the graph pool holds the step from now on
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward assigns the grads (no accumulation)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                loss, norm = self._body(static, plan)
        except RuntimeError as exc:
            raise RuntimeError(f"capturing the training step failed ({exc}); something in the forward reads a value "
                               "back to the host or changes shape with the data. Run without the CUDA-graph step "
                               "(or with max_graphs=0) and report the batch signature: "
                               f"{plan.signature}") from exc
        logger.info("captured a CUDA-graph training step for signature %s (capacity %d, causal-only %s)",
                    plan.signature, plan.capacity, plan.causal_only)
        self.steps["captured"] += 1
        return _Graph(graph, static, loss, norm, [g["lr"] for g in self.optimizer.param_groups])

    def check_lr_unchanged(self, lrs: list) -> None:
        """A float learning rate is a constant of the captured graph: refuse to replay after it changed (a scheduler
        must update a tensor lr in place instead)."""
        for i, (then, group) in enumerate(zip(lrs, self.optimizer.param_groups)):
            now = group["lr"]
            if not isinstance(now, torch.Tensor) and (isinstance(then, torch.Tensor) or now != then):
                raise ValueError(f"param group {i}: the learning rate changed from {then} to {now} after the step was "
                                 "captured; a float lr is baked into the CUDA graph. Build the optimizer with a tensor "
                                 "lr (lr=torch.tensor(lr, device='cuda')) and update it in place (lr.fill_(new)).")

    def route(self, key: tuple) -> str:
        """How a batch of signature `key` runs: "replay" (its graph exists), "capture" (its first sighting after
        `eager_steps` eager ones, while fewer than `max_graphs` graphs exist) or "eager". Counts the sighting."""
        if key in self._graphs:
            return "replay"
        self._seen[key] = seen = self._seen.get(key, 0) + 1
        return "eager" if seen <= self.eager_steps or len(self._graphs) >= self.max_graphs else "capture"

    def __call__(self, batch: dict[str, Any], what: str = "batch") -> torch.Tensor:
        plan = self.plan(batch, what)
        if not self._cuda:
            return self._eager(batch, plan)
        how = self.route(plan.key)
        if how == "eager":
            return self._eager(batch, plan)
        if how == "capture":
            entry = self._graphs[plan.key] = self._capture(batch, plan)
        else:
            entry = self._graphs[plan.key]
            self.check_lr_unchanged(entry.lrs)
            for name, tensor in entry.inputs.items():
                if tensor is not None:
                    tensor.copy_(batch[name], non_blocking=True)
        entry.graph.replay()
        self.steps["replayed"] += 1
        self.last_grad_norm = entry.grad_norm.clone() if entry.grad_norm is not None else None
        return entry.loss.clone()
