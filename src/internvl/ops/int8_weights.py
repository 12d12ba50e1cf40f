"""Weight-only int8 for the language model's linears: int8 weights with one fp32 scale per output row (symmetric),
activations in bf16.

The 40B model's bf16 weights (75 GiB) do not fit one 80 GB H100 with a KV cache, and LLM.int8 (bitsandbytes) decodes
8-11x slower than bf16 (its outlier split cannot be graph captured). A batch-1 step reads every weight once, so
halving their bytes halves its floor when the product dequantises on the fly (`decode_kernels.gemv_int8`).
`Int8Linear` keeps the `nn.Linear` interface, so `packed_projections` packs int8 layers (scales included) like bf16
ones. Quantise with `quantize_int8_weights_` or `load_pretrained(..., weight_dtype="int8")`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..constants import SKIP_QUANT_MODULES

# decode_kernels registers the internvl::gemv_int8 op that `int8_linear` calls (it imports Triton where installed)
from .decode_kernels import INT8_ROWS_MAX, dequantize_int8_rows, int8_rows, triton_ready


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8 quantisation: weight [N, K] float -> (int8 [N, K], fp32 scale [N]) with
    weight ~= int8 * scale[:, None] and |int8| <= 127 (all-zero rows get scale 1)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@torch.library.custom_op("internvl::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (q * scale).T + bias in x's dtype: one row through `gemv_int8`, up to `INT8_ROWS_MAX` rows through
    `int8_rows` where Triton runs (the int8 weight read once), more rows through `F.linear` over the converted weight
    with the output columns scaled (fp16: the weight dequantised first). A custom op, opaque to inductor, whose own
    weight-only-int8 rewrite fails to lower on CUDA (torch 2.13, the 40B step at batch 8)."""
    if x.numel() == x.shape[-1]:
        return torch.ops.internvl.gemv_int8(x, q, scale, bias)
    rows = x.numel() // x.shape[-1]
    if rows <= INT8_ROWS_MAX and triton_ready(q) and q.stride(1) == 1:  # a few rows: read the int8 weight once
        flat = x.reshape(rows, x.shape[-1]).contiguous()
        return int8_rows(flat, q, scale.contiguous(), bias).reshape(*x.shape[:-1], q.shape[0])
    if x.dtype == torch.float16:  # int8 sums over K could overflow fp16 before scaling: dequantise first
        return nn.functional.linear(x, dequantize_int8_rows(q, scale, x.dtype), bias)
    # int8 -> bf16/fp32 is exact; scaling the output columns instead of the weight saves a pass over the weight
    y = nn.functional.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    return y + bias if bias is not None else y


@int8_linear.register_fake
def _int8_linear_fake(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], q.shape[0])


class Int8Linear(nn.Module):
    """A linear layer with weight-only int8: `weight` [out, in] int8 (a parameter without gradient, so packing can
    re-point it), `weight_scale` [out] fp32, `bias` [out] in the compute dtype or None."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None) -> Int8Linear:
        """Quantise `linear` (on `device`, default where its weight lies) into a new Int8Linear there."""
        device = torch.device(device) if device is not None else linear.weight.device
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  dtype=linear.weight.dtype)
        q, scale = quantize_rows(linear.weight.to(device))
        out.weight = nn.Parameter(q, requires_grad=False)
        out.weight_scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def in_skip_modules(name: str, skip: Sequence[str]) -> bool:
    """Whether module `name` lies in one of `skip`: an entry equal to the name or to a run of its dotted components
    (`"lm_head"` skips `"language_model.lm_head"`), as transformers reads `llm_int8_skip_modules`."""
    return any(name == s or name.startswith(s + ".") or name.endswith("." + s) or f".{s}." in name for s in skip)


@torch.no_grad()
def replace_linears_(model: nn.Module, skip_modules: Sequence[str], make: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace every plain `nn.Linear` of `model` outside `skip_modules` by `make(linear)`, one at a time (so at most
    one extra layer is alive at once). Returns how many were replaced."""
    targets = [name for name, module in model.named_modules()
               if type(module) is nn.Linear and not in_skip_modules(name, skip_modules)]
    for name in targets:
        model.set_submodule(name, make(model.get_submodule(name)))
    return len(targets)


@torch.no_grad()
def quantize_int8_weights_(model: nn.Module, skip_modules: Sequence[str] = SKIP_QUANT_MODULES,
                           device: torch.device | str | None = None) -> int:
    """Replace every plain `nn.Linear` of `model` outside `skip_modules` (default: ViT, projector and LM head stay) by
    an `Int8Linear` quantised on `device` (default where it lies), one at a time, so a CPU-loaded model moves to the
    GPU holding at most one bf16 linear there. Returns how many were replaced."""
    return replace_linears_(model, skip_modules, lambda linear: Int8Linear.from_linear(linear, device))
