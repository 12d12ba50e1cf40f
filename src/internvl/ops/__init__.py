"""Fused / memory-lean training ops: the training loss (`causal_lm_loss`, with the LM-head cross-entropy kernels that
avoid full logits)."""
from .cross_entropy import (
    IGNORE_INDEX,
    causal_lm_loss,
    fused_head_supported,
    linear_cross_entropy,
    loss_items,
    weighted_cross_entropy,
)

__all__ = [
    "IGNORE_INDEX",
    "causal_lm_loss",
    "fused_head_supported",
    "linear_cross_entropy",
    "loss_items",
    "weighted_cross_entropy",
]
