"""Instance-level swap of RMSNorm and SwiGLU-MLP forwards for fused Triton kernels (liger-kernel) on CUDA.

Why: in a 2B-class LLM with hidden size 2048, the un-fused elementwise work of the stock HF modules (RMSNorm's fp32
upcast, pow, mean, rsqrt, two multiplies; SiLU then multiply on the [T, 8192] MLP activations) is a large share of
a training step. liger-kernel fuses each into one kernel forward and one backward.

The swap is per module instance: it replaces `module.forward` only, so parameters, state-dict keys, other models in
the same process (for example the native baseline in the benchmark) and the CPU path are untouched. The maths is
the same as the HF modules ("llama" casting: normalise in fp32, cast back, multiply by the weight).
"""
from __future__ import annotations

import logging
import types

import torch
from torch import nn

from .cross_entropy import liger_available

logger = logging.getLogger(__name__)


def _is_rms_norm(module: nn.Module) -> bool:
    """HF-style RMSNorm: a class named *RMSNorm with a 1-D `weight` and a `variance_epsilon` (or `eps`) float."""
    if not type(module).__name__.endswith("RMSNorm"):
        return False
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and isinstance(eps, float)


def _is_swiglu_mlp(module: nn.Module) -> bool:
    """HF-style gated MLP: gate_proj / up_proj / down_proj linears and a SiLU activation."""
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    act = getattr(module, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ in {"SiLU", "SiLUActivation"}


def _rms_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    return LigerRMSNormFunction.apply(hidden_states, self.weight, eps, 0.0, "llama", False)


def _swiglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


def enable_fast_kernels(model: nn.Module, *, rms_norm: bool = True, swiglu: bool = True) -> dict[str, int]:
    """Swap the forwards of every RMSNorm / SwiGLU MLP inside `model` for liger's fused kernels.

    Only acts when the model is on CUDA and liger-kernel imports; otherwise it changes nothing. Returns how many
    modules were swapped, e.g. {"rms_norm": 49, "swiglu": 24} (zeros when nothing was done).
    """
    counts = {"rms_norm": 0, "swiglu": 0}
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cuda" or not liger_available():
        return counts
    for module in model.modules():
        if rms_norm and _is_rms_norm(module) and not getattr(module, "_fast_kernel", False):
            module.forward = types.MethodType(_rms_forward, module)
            module._fast_kernel = True
            counts["rms_norm"] += 1
        elif swiglu and _is_swiglu_mlp(module) and not getattr(module, "_fast_kernel", False):
            module.forward = types.MethodType(_swiglu_forward, module)
            module._fast_kernel = True
            counts["swiglu"] += 1
    logger.info("fast kernels enabled: %s", counts)
    return counts


def disable_fast_kernels(model: nn.Module) -> int:
    """Undo `enable_fast_kernels` (restores the class forwards); returns how many modules were restored."""
    restored = 0
    for module in model.modules():
        if getattr(module, "_fast_kernel", False):
            del module.forward
            module._fast_kernel = False
            restored += 1
    return restored
