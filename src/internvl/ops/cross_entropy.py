"""Cross-entropy over the LM head without materialising the full logits tensor.

Why: for a batch of T tokens and a vocabulary of V the plain path builds [T, V] bf16 logits, upcasts them to fp32 and
keeps both for backward (8 x 1024 tokens x 64k vocab = 1 GB bf16 + 2 GB fp32 plus their gradients). Two savings:

1. Only supervised positions need logits. `causal_lm_loss` shifts the labels, gathers the hidden states whose next
   token is supervised (the image tokens and the prompt are not) and runs the head on those rows only.
2. The head + softmax + loss are computed chunk by chunk; each chunk's gradients with respect to the hidden states
   and the head weight are computed in the forward pass (the loss is the last op), so no logits are kept for
   backward. On CUDA with liger-kernel installed its Triton kernel does this (`LigerFusedLinearCrossEntropyFunction`);
   elsewhere, and whenever per-token loss weights are given, a pure-PyTorch chunked function does.

Both give the same loss as `F.cross_entropy(hidden @ W.T, labels)` up to bf16 rounding of the logits (the tests
check <= 1e-3 relative on the tiny preset).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
#: rows per chunk in the PyTorch path; [chunk, V] fp32 logits are the transient memory.
DEFAULT_CHUNK = 2048


def liger_available() -> bool:
    """True when liger-kernel (and hence Triton) can be imported."""
    return importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """loss = sum_i w_i * CE(h_i W^T + b, y_i) / sum_i w_i, computed in row chunks with gradients in forward.

    Inputs: hidden [N, H], weight [V, H], bias [V] or None, labels [N] (IGNORE_INDEX rows get weight 0),
    weights [N] float or None (None = 1 per supervised row), chunk_size. Returns a scalar fp32 loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, weights, chunk_size):  # type: ignore[override]
        n = hidden.shape[0]
        valid = labels != IGNORE_INDEX
        w = valid.to(torch.float32) if weights is None else weights.to(torch.float32) * valid
        denom = w.sum().clamp(min=torch.finfo(torch.float32).tiny)
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        safe_labels = labels.clamp(min=0)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end]
            logits = F.linear(h, weight, bias).float()  # [c, V]
            lse = torch.logsumexp(logits, dim=-1)
            y = safe_labels[start:end]
            wc = w[start:end] / denom
            picked = logits.gather(1, y[:, None]).squeeze(1)
            loss += ((lse - picked) * wc).sum()
            if need_h or need_w or need_b:
                g = torch.softmax(logits, dim=-1)  # d CE / d logits = softmax - onehot
                g[torch.arange(end - start, device=g.device), y] -= 1.0
                g *= wc[:, None]
                g_lp = g.to(hidden.dtype)
                if need_h:
                    grad_h[start:end] = g_lp @ weight
                if need_w:
                    grad_w += g_lp.t() @ h
                if need_b:
                    grad_b += g.sum(0)
        ctx.save_for_backward(
            grad_h if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out
        return (
            grad_h * scale.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * scale.to(grad_w.dtype) if grad_w is not None else None,
            grad_b * scale.to(grad_b.dtype) if grad_b is not None else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    impl: str = "auto",
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Weighted-mean CE of `hidden @ weight.T (+ bias)` against `labels` without keeping [N, V] logits.

    Args:
        hidden: [N, H] rows (any float dtype; the matmul runs in it, the softmax in fp32).
        weight: [V, H] LM-head weight. labels: [N] long with IGNORE_INDEX for unsupervised rows.
        token_weights: optional [N] per-row loss weights (packed "square"/"sample" averaging): the loss is
            sum(w * ce) / sum(w) over supervised rows. None means the plain token mean.
        impl: "auto" (liger on CUDA when available and no token weights, else "chunked"), "liger", "chunked"
            or "plain" (materialises logits; the reference).
    """
    if hidden.dim() != 2 or labels.dim() != 1 or hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden must be [N, H] and labels [N]; got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    if impl == "auto":
        impl = "liger" if (hidden.is_cuda and token_weights is None and liger_available()) else "chunked"
    if impl == "plain":
        logits = F.linear(hidden, weight, bias).float()
        ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        valid = (labels != IGNORE_INDEX).to(torch.float32)
        w = valid if token_weights is None else token_weights.to(torch.float32) * valid
        return (ce * w).sum() / w.sum().clamp(min=torch.finfo(torch.float32).tiny)
    if impl == "chunked":
        return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, token_weights, int(chunk_size))
    if impl == "liger":
        if token_weights is not None:
            raise ValueError("the liger path takes no per-token weights; use impl='chunked'")
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        if not bool((labels != IGNORE_INDEX).any()):
            # liger divides by the count of supervised rows; keep the graph and return an exact zero.
            return (hidden.sum() * 0.0).float() + (weight.sum() * 0.0).float()
        loss = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, labels, bias, None, IGNORE_INDEX)
        return loss[0] if isinstance(loss, tuple) else loss
    raise ValueError(f"unknown cross-entropy impl {impl!r}; expected auto, liger, chunked or plain")


def fused_head_supported(lm_head: torch.nn.Module) -> bool:
    """Whether `causal_lm_loss` may read `lm_head.weight` directly: a plain nn.Linear (not a LoRA/peft wrapper, whose
    delta would be skipped) with a materialised weight (not a DeepSpeed ZeRO-3 partition, gathered only inside the
    module's own forward)."""
    if type(lm_head) is not torch.nn.Linear:
        return False
    weight = lm_head.weight
    return not hasattr(weight, "ds_id") and weight.numel() == lm_head.in_features * lm_head.out_features


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: torch.nn.Linear,
    labels: torch.Tensor,
    *,
    loss_weight: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Next-token loss from the last hidden states, running the LM head on supervised positions only.

    Args:
        hidden_states: [B, T, H] final hidden states (after the final norm).
        lm_head: the output projection (weight [V, H]).
        labels: [B, T] token ids with IGNORE_INDEX where unsupervised (unshifted, as in HF).
        loss_weight: optional [B, T] per-token weights aligned with `labels` (packing's square/sample averaging).
        num_items_in_batch: when given (and no loss_weight), the loss is the sum over supervised positions divided by
            it (HF Trainer's exact averaging under gradient accumulation).
    Returns the weighted mean over supervised next-token predictions (a scalar, fp32).
    """
    if hidden_states.shape[:2] != labels.shape:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)} disagree")
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    rows = hidden_states[:, :-1][keep]  # [n, H] (boolean gather: one host sync for n)
    targets = shift_labels[keep]
    weights = loss_weight[:, 1:][keep] if loss_weight is not None else None
    if rows.shape[0] == 0:
        return hidden_states.sum() * 0.0 + lm_head.weight.sum() * 0.0
    loss = linear_cross_entropy(rows, lm_head.weight, targets, bias=lm_head.bias, token_weights=weights, impl=impl)
    if num_items_in_batch is not None and weights is None:
        denom = torch.as_tensor(num_items_in_batch, device=loss.device, dtype=loss.dtype).clamp(min=1)
        loss = loss * rows.shape[0] / denom
    return loss
