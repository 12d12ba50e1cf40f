"""The training loss, `causal_lm_loss` (called by the model's forward and by the trainer), its divisor `loss_items`,
and the cross-entropy kernels over the LM head that never keep the full [T, V] logits for backward.

Savings against the plain path (bf16 logits, an fp32 copy, both kept for backward): the head runs only on supervised
rows; head + softmax + loss run chunk by chunk with the gradients computed in the forward
(`PaddedLinearCrossEntropy`): the vocabulary is rounded up to a multiple of 128 rows (cuBLAS's fast aligned kernels)
and the elementwise part runs in place (`ce_grad_inplace`, compiled on CUDA). The loss is that of
`F.cross_entropy(hidden @ W.T, labels)` up to bf16 rounding of the logits.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX

#: rows per chunk in the PyTorch path; [chunk, V] fp32 logits are the transient memory.
DEFAULT_CHUNK = 2048
#: the padded path rounds the vocabulary up to a multiple of this (tensor-core friendly leading dimensions).
VOCAB_ALIGN = 128
#: bytes of matmul-dtype logits per chunk in the padded path (512 MiB = 8.4k rows of a 32k bf16 vocabulary).
DEFAULT_LOGITS_BUDGET = 512 * 2**20


def _row_weights(labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """fp32 [N] loss weight per row: `weights` (1 when None) on supervised rows, 0 on IGNORE_INDEX rows."""
    valid = labels != IGNORE_INDEX
    return valid.to(torch.float32) if weights is None else weights.to(torch.float32) * valid


def ce_grad_inplace(logits: torch.Tensor, labels: torch.Tensor, row_weights: torch.Tensor, vocab: int) -> torch.Tensor:
    """Weighted CE of one chunk, its logits gradient written in place: logits [c, Vp] (columns >= `vocab` are padding,
    -inf), labels [c], row_weights [c] fp32 (already normalised) -> sum_i w_i * CE_i (fp32); `logits` becomes
    w_i * (softmax_i - onehot_i). One reduction and one pointwise pass when compiled by inductor."""
    x = logits.float()
    cols = torch.arange(x.shape[1], device=x.device)
    x = x.masked_fill(cols >= vocab, float("-inf"))
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, labels[:, None]).squeeze(1)
    loss = ((lse - picked) * row_weights).sum()
    grad = (torch.exp(x - lse[:, None]) - (cols[None, :] == labels[:, None]).to(x.dtype)) * row_weights[:, None]
    logits.copy_(grad)
    return loss


@functools.cache
def _compiled_ce():
    """`ce_grad_inplace` compiled once per process (dynamic row counts: no recompile per batch)."""
    return torch.compile(ce_grad_inplace, dynamic=True)


def padded_rows_per_chunk(vocab: int, dtype: torch.dtype, budget_bytes: int = DEFAULT_LOGITS_BUDGET) -> int:
    """Rows per chunk so that [rows, padded vocab] logits of `dtype` stay within `budget_bytes` (at least 128)."""
    padded = -(-vocab // VOCAB_ALIGN) * VOCAB_ALIGN
    elem = torch.empty((), dtype=dtype).element_size()
    return max(128, int(budget_bytes // (padded * elem)))


class PaddedLinearCrossEntropy(torch.autograd.Function):
    """loss = sum_i w_i * CE(h_i W^T + b, y_i) / sum_i w_i in row chunks, gradients computed in forward (scaled in
    backward). The head weight is zero-padded to a multiple of `VOCAB_ALIGN` rows. Inputs: hidden [N, H], weight
    [V, H], bias [V] or None, labels [N], weights [N] or None (1 per supervised row), rows per chunk, compiled."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, weights, chunk_rows, compiled):  # type: ignore[override]
        n, vocab = hidden.shape[0], weight.shape[0]
        pad = -vocab % VOCAB_ALIGN
        w_pad = F.pad(weight, (0, 0, 0, pad)) if pad else weight  # [Vp, H]
        b_pad = (F.pad(bias, (0, pad)) if pad else bias) if bias is not None else None
        w = _row_weights(labels, weights)
        w = w / w.sum().clamp(min=torch.finfo(torch.float32).tiny)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        safe_labels = labels.clamp(min=0)
        fn = _compiled_ce() if compiled else ce_grad_inplace
        single = n <= chunk_rows
        grad_h = None if single or not need_h else torch.empty_like(hidden)
        grad_w = grad_b = None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_rows):
            end = min(start + chunk_rows, n)
            h = hidden[start:end]
            logits = F.linear(h, w_pad, b_pad)  # [c, Vp], matmul dtype
            loss = loss + fn(logits, safe_labels[start:end], w[start:end], vocab)
            if need_h:
                gh = logits @ w_pad  # [c, H]
                if single:
                    grad_h = gh
                else:
                    grad_h[start:end] = gh
            if need_w:
                gw = (logits.t() @ h)[:vocab]  # [V, H]
                grad_w = gw if single else (gw.float() if grad_w is None else grad_w.add_(gw))
            if need_b:
                gb = logits.float().sum(0)[:vocab]
                grad_b = gb if grad_b is None else grad_b.add_(gb)
        ctx.save_for_backward(
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        # the gradients saved in forward times `grad_out`; None for labels, weights, chunk_rows, compiled
        grads = tuple(g * grad_out.to(g.dtype) if g is not None else None for g in ctx.saved_tensors)
        return grads + (None,) * 4


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum(w * CE) / sum(w) from materialised logits [N, V] in fp32 (see `linear_cross_entropy`): the reference."""
    ce = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    w = _row_weights(labels, token_weights)
    return (ce * w).sum() / w.sum().clamp(min=torch.finfo(torch.float32).tiny)


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
    """sum(w * CE) / sum(w) of `hidden` [N, H] @ `weight.T` [V, H] (+ bias) against `labels` [N] (IGNORE_INDEX rows
    excluded; w = `token_weights` [N], 1 when None) without keeping [N, V] logits; softmax in fp32.

    impl: "auto" ("padded" on CUDA, else "chunked"), "padded" (rows chunked by a memory budget, elementwise part
    compiled on CUDA), "chunked" (fixed `chunk_size` rows, eager) or "plain" (materialised logits: the reference).
    """
    if impl == "auto":
        impl = "padded" if hidden.is_cuda else "chunked"
    if impl == "padded":
        compiled, rows = hidden.is_cuda, padded_rows_per_chunk(weight.shape[0], hidden.dtype)
    elif impl == "chunked":
        compiled, rows = False, int(chunk_size)
    if impl in ("padded", "chunked"):
        return PaddedLinearCrossEntropy.apply(hidden, weight, bias, labels, token_weights, rows, compiled)
    if impl == "plain":
        return weighted_cross_entropy(F.linear(hidden, weight, bias), labels, token_weights)
    raise ValueError(f"unknown cross-entropy impl {impl!r}; expected auto, padded, chunked or plain")


def plain_module_class(module: torch.nn.Module) -> type:
    """The module's own class, seen through FSDP2's dynamic subclass `FSDP<Name>(FSDPModule, <Name>)`."""
    cls = type(module)
    from torch.distributed.fsdp import FSDPModule

    if issubclass(cls, FSDPModule):
        bases = [b for b in cls.__bases__ if b is not FSDPModule]
        if len(bases) == 1:
            return bases[0]
    return cls


def fused_head_supported(lm_head: torch.nn.Module) -> bool:
    """Whether `causal_lm_loss` may read `lm_head.weight` directly: a plain nn.Linear (not a LoRA wrapper, whose delta
    would be skipped) with a materialised weight (not a ZeRO-3 partition). An FSDP2-sharded one counts: its weight is
    a DTensor of the full shape, unsharded for the loss by `fsdp2_unsharded_weight`."""
    if plain_module_class(lm_head) is not torch.nn.Linear:
        return False
    weight = lm_head.weight
    return not hasattr(weight, "ds_id") and weight.numel() == lm_head.in_features * lm_head.out_features


def fsdp2_unsharded_weight(lm_head: torch.nn.Module) -> None:
    """After the model's forward, make sure an FSDP2 LM head holds its unsharded weight, so the fused loss reads (and
    its backward accumulates into) the parameter FSDP2 reduce-scatters. A head unit that resharded after its forward is
    unsharded again (one all-gather); a resharded head that is not its own FSDP2 unit is a clear error."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not isinstance(lm_head.weight, DTensor):  # unsharded (or never sharded): nothing to do
        return
    if not isinstance(lm_head, FSDPModule):
        raise RuntimeError("the LM head's weight is still an FSDP2 shard after the model's forward and the head is not "
                           "its own FSDP2 unit: shard it separately (fully_shard(lm_head, reshard_after_forward=False))"
                           " or turn the fused LM-head loss off")
    lm_head.unshard()
    if isinstance(lm_head.weight, DTensor):
        raise RuntimeError("FSDP2 did not unshard the LM head's weight")


def zero3_partitioned_head(lm_head: torch.nn.Module) -> bool:
    """A plain nn.Linear LM head whose weight is a ZeRO-3 partition: the fused loss must run as the head's own forward
    (`train_speedups.run_as_forward`), where DeepSpeed gathers it."""
    return type(lm_head) is torch.nn.Linear and hasattr(lm_head.weight, "ds_id")


def loss_items(labels: torch.Tensor, loss_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The divisor one micro-batch contributes to `causal_lm_loss`'s `num_items_in_batch` (fp32 scalar): its
    supervised next-token positions, or their summed `loss_weight`. The trainer sums it over an optimizer step's
    micro-batches and ranks, so each token weighs the same however samples fall into micro-batches."""
    supervised = labels[:, 1:] != IGNORE_INDEX
    if loss_weight is None:
        return supervised.sum().float()
    return (loss_weight[:, 1:].float().to(labels.device) * supervised).sum()


def supervised_rows(hidden_states: torch.Tensor, labels: torch.Tensor, loss_weight: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The supervised next-token rows of `hidden_states` [B, T, H] for unshifted `labels` [B, T]: (rows [n, H],
    targets [n], their `loss_weight` [n] or None). One boolean gather, one host sync for n."""
    if hidden_states.shape[:2] != labels.shape:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)} disagree")
    shift_labels = labels.to(hidden_states.device)[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    weights = loss_weight.to(hidden_states.device)[:, 1:][keep] if loss_weight is not None else None
    return hidden_states[:, :-1][keep], shift_labels[keep], weights


def empty_loss(hidden_states: torch.Tensor, lm_head: torch.nn.Module | None) -> torch.Tensor:
    """The loss of a batch with no supervised row: an exact fp32 zero that keeps the graph (every rank's backward
    then reaches the same parameters)."""
    unused = hidden_states.sum() * 0.0
    return (unused + lm_head.weight.sum() * 0.0 if lm_head is not None else unused).float()


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: torch.nn.Linear | None,
    labels: torch.Tensor,
    *,
    loss_weight: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """The training loss that the model's `forward(labels=...)` and the trainer both call: sum_i w_i * CE_i / D over
    supervised next-token positions (labels [B, T] unshifted, IGNORE_INDEX where unsupervised), w = `loss_weight`
    [B, T] (1 when None), D = `num_items_in_batch` (the optimizer step's `loss_items`: exact under gradient
    accumulation) or else this micro-batch's sum of w. fp32 scalar, 0 with a graph when nothing is supervised.

    `hidden_states` [B, T, H] are final hidden states, run through `lm_head` on the supervised rows only
    (`linear_cross_entropy(impl=impl)`); with `lm_head=None` they are already logits [B, T, V].
    """
    rows, targets, weights = supervised_rows(hidden_states, labels, loss_weight)
    if rows.shape[0] == 0:
        return empty_loss(hidden_states, lm_head)
    if lm_head is None:
        mean = weighted_cross_entropy(rows, targets, weights)
    else:
        mean = linear_cross_entropy(rows, lm_head.weight, targets, bias=lm_head.bias, token_weights=weights, impl=impl)
    if num_items_in_batch is None:
        return mean
    total_weight = weights.float().sum() if weights is not None else rows.shape[0]
    denom = torch.as_tensor(num_items_in_batch, device=mean.device, dtype=mean.dtype)
    return mean * total_weight / denom.clamp(min=torch.finfo(torch.float32).tiny)
