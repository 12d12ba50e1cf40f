"""Fused / memory-lean training ops: the training loss (`causal_lm_loss`, with the LM-head cross-entropy kernels that
avoid full logits), fused norm and SwiGLU kernels."""
from .cross_entropy import (
    IGNORE_INDEX,
    causal_lm_loss,
    fused_head_supported,
    liger_available,
    linear_cross_entropy,
    loss_items,
    weighted_cross_entropy,
)
from .fast_kernels import disable_fast_kernels, enable_fast_kernels

__all__ = [
    "IGNORE_INDEX",
    "causal_lm_loss",
    "disable_fast_kernels",
    "enable_fast_kernels",
    "fused_head_supported",
    "liger_available",
    "linear_cross_entropy",
    "loss_items",
    "weighted_cross_entropy",
]
