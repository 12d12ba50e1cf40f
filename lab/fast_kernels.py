"""Instance-level swap of RMSNorm, SwiGLU-MLP and RoPE forwards for liger-kernel's fused Triton kernels on CUDA: the
lab's session-1 training path (bench variants `s1`, `padded`), which lost to the compiled layers of the trainer
(`internvl.ops.compile_layers`); liger-kernel is not a dependency of the toolkit.

The un-fused elementwise work of the stock modules (RMSNorm's fp32 upcast, pow, mean, rsqrt, two multiplies; SiLU
then multiply on the MLP activations) is a large share of a small model's training step; liger fuses each into one
kernel forward and one backward. Only `module.forward` is replaced, so parameters, state-dict keys and other models
are untouched; the maths is the HF modules' ("llama" casting).
"""
from __future__ import annotations

import importlib.util
import inspect
import logging

import torch
from torch import nn

from internvl.compat import attend_rope, restore_forwards, swap_forward

logger = logging.getLogger(__name__)


def liger_available() -> bool:
    """True when liger-kernel (and hence Triton) can be imported."""
    return importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


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


# The three kernels (module-level so CPU tests can substitute PyTorch equivalents and test the plumbing). liger-kernel
# is imported inside them: it is an optional CUDA/Triton dependency, absent on CPU machines.
def _liger_rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)


def _liger_silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(a, b)


def _liger_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    from liger_kernel.ops.rope import LigerRopeFunction

    return LigerRopeFunction.apply(q, k, cos, sin)


def _rms_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    return _liger_rms(hidden_states, self.weight, eps)


def _swiglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_liger_silu_mul(self.gate_proj(x), self.up_proj(x)))


def _is_rope_attention(module: nn.Module) -> bool:
    """A transformers >= 5.24 Llama-style attention (q/k/v/o projections, `head_dim`, `cache=` keyword)."""
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return False
    if not hasattr(module, "head_dim") or not hasattr(module, "layer_idx"):
        return False
    return "cache" in inspect.signature(type(module).forward).parameters


def _rope_attn_forward(self: nn.Module, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                       cache=None, **kwargs):
    """transformers' Llama/Qwen2 attention forward with RoPE applied by liger's fused kernel (same maths)."""
    qkv = [proj(hidden_states) for proj in (self.q_proj, self.k_proj, self.v_proj)]
    return attend_rope(self, qkv, _liger_rope, position_embeddings, attention_mask, cache, **kwargs)


_SWAPS = {"rms_norm": (_is_rms_norm, _rms_forward), "swiglu": (_is_swiglu_mlp, _swiglu_forward),
          "rope": (_is_rope_attention, _rope_attn_forward)}


@torch.no_grad()
def _verify(kind: str, module: nn.Module, rope_source: nn.Module | None) -> str | None:
    """Run one swapped module against its class forward on random input; return an error text or None."""
    if kind == "rope" and rope_source is None:
        return "no rotary embedding module found"
    param = next(module.parameters())
    linear = module.gate_proj if kind == "swiglu" else getattr(module, "q_proj", None)
    width = param.shape[0] if kind == "rms_norm" else linear.in_features
    try:
        x = torch.randn(2, 5, width, device=param.device, dtype=param.dtype)
        kwargs: dict = {}
        if kind == "rope":
            pos = torch.arange(5, device=param.device)[None].expand(2, -1)
            kwargs = {"position_embeddings": rope_source(x, pos), "attention_mask": None}
        ref = type(module).forward(module, x, **kwargs)
        out = module.forward(x, **kwargs)
        ref, out = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
        err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12)).item()
        return None if err < 2e-2 else f"relative error {err:.3g} against the plain forward"
    except Exception as exc:  # noqa: BLE001 - any failure disables that kernel
        return repr(exc)


def enable_fast_kernels(model: nn.Module, *, allow_cpu: bool = False) -> dict[str, int]:
    """Swap the forwards of every RMSNorm, SwiGLU MLP and (Llama/Qwen2) attention RoPE inside `model` for liger's
    fused kernels, per instance, on CUDA with liger-kernel installed (`allow_cpu`: anywhere, for tests with the
    kernels substituted). Each kind is checked once against the plain forward on random input and reverted (logged)
    if it fails. Returns how many modules were swapped per kind."""
    counts = dict.fromkeys(_SWAPS, 0)
    first = next(model.parameters(), None)
    if first is None or (not allow_cpu and (first.device.type != "cuda" or not liger_available())):
        return counts
    rope_source = next((m.rotary_emb for m in model.modules() if hasattr(m, "rotary_emb") and hasattr(m, "layers")),
                       None)
    swapped: dict[str, list[nn.Module]] = {k: [] for k in counts}
    for module in model.modules():
        if getattr(module, "_fast_kernel", False):
            continue
        for kind, (match, forward) in _SWAPS.items():
            if match(module):
                swap_forward(module, forward, "_fast_kernel")
                swapped[kind].append(module)
                break
    for kind, modules in swapped.items():
        if not modules:
            continue
        problem = _verify(kind, modules[0], rope_source)
        if problem is not None:
            logger.warning("fast %s kernel disabled: %s", kind, problem)
            for module in modules:
                restore_forwards(module, "_fast_kernel")
            continue
        counts[kind] = len(modules)
    logger.info("fast kernels enabled: %s", counts)
    return counts


def disable_fast_kernels(model: nn.Module) -> int:
    """Undo `enable_fast_kernels` (restores the class forwards); returns how many modules were restored."""
    return restore_forwards(model, "_fast_kernel")


def enable_outside_compiled(model: nn.Module, *, allow_cpu: bool = False) -> dict[str, int]:
    """`enable_fast_kernels` on the parts of `model` outside its compiled layers (`internvl.ops.compile_layers`):
    inside them inductor does the same fusion, and a swap there would break the compiled graph. The whole model when
    nothing is compiled. Returns how many modules were swapped per kind."""
    compiled = {id(m) for layer in model.modules() if getattr(layer, "_compiled_layer", False) for m in layer.modules()}
    if not compiled:
        return enable_fast_kernels(model, allow_cpu=allow_cpu)
    counts = dict.fromkeys(_SWAPS, 0)
    for part in _eager_submodules(model, compiled):
        for kind, n in enable_fast_kernels(part, allow_cpu=allow_cpu).items():
            counts[kind] += n
    return counts


def _eager_submodules(root: nn.Module, compiled: set[int]) -> list[nn.Module]:
    """The largest submodules of `root` that contain no compiled layer."""
    if not any(id(m) in compiled for m in root.modules()):
        return [root]
    out: list[nn.Module] = []
    for child in root.children():
        if id(child) not in compiled:
            out.extend(_eager_submodules(child, compiled))
    return out
