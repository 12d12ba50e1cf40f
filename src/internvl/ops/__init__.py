"""Fused / memory-lean training ops: LM-head cross-entropy without full logits, fused norm and SwiGLU kernels."""
from .cross_entropy import IGNORE_INDEX, causal_lm_loss, fused_head_supported, liger_available, linear_cross_entropy
from .fast_kernels import disable_fast_kernels, enable_fast_kernels

__all__ = [
    "IGNORE_INDEX",
    "causal_lm_loss",
    "disable_fast_kernels",
    "enable_fast_kernels",
    "fused_head_supported",
    "liger_available",
    "linear_cross_entropy",
]
