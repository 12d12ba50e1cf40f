"""Packed projection weights for decoding: q/k/v in one [q+k+v, H] tensor, gate/up in one [2I, H] tensor, so a
batch-1 step runs five larger products per layer instead of seven small ones (each with its own launch and tail).

The weights are copied once into one new tensor per group and each parameter's `.data` is re-pointed to its row
slice, so parameters, names, `state_dict` and memory footprint stay what they were. Parameters moved later (`model.to`, loading, DeepSpeed) stop sharing one
storage; `layout_ok` notices and the caller re-packs. Only plain `nn.Linear` / `Int8Linear` modules without hooks
are packed (not bitsandbytes, LoRA-wrapped or offloaded ones).
"""
from __future__ import annotations

import torch
from torch import nn

from .int8_weights import Int8Linear


def plain_linear(module: nn.Module) -> bool:
    """A bare `nn.Linear` or `Int8Linear` on a real device without hooks: its weight (and scales) can be read directly
    by our own products."""
    return (type(module) in (nn.Linear, Int8Linear) and not module._forward_hooks and not module._forward_pre_hooks
            and not getattr(module, "_hf_hook", None) and module.weight.device.type != "meta")


def packable(linears: list[nn.Module]) -> bool:
    """Whether `linears` are plain linears of one type, in_features, dtype and device, all with or all without bias."""
    if not linears or not all(plain_linear(m) for m in linears):
        return False
    first = linears[0]
    return all(type(m) is type(first) and m.weight.dim() == 2 and m.weight.shape[1] == first.weight.shape[1]
               and m.weight.dtype == first.weight.dtype and m.weight.device == first.weight.device
               and (m.bias is None) == (first.bias is None) for m in linears)


def _contiguous_run(tensors: list[torch.Tensor]) -> bool:
    """True when `tensors` are contiguous row blocks laid end to end in one storage (a packed group)."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset:
            return False
        offset += t.numel()
    return True


def layout_ok(linears: list[nn.Linear]) -> bool:
    """True when the weights (biases, int8 scales) of `linears` still lie packed end to end in one storage each."""
    if not packable(linears) or not _contiguous_run([m.weight for m in linears]):
        return False
    if _scaled(linears) and not _contiguous_run([m.weight_scale for m in linears]):
        return False
    return linears[0].bias is None or _contiguous_run([m.bias for m in linears])


def _scaled(linears: list[nn.Module]) -> bool:
    """Int8Linear groups carry per-row scales, packed like the weights."""
    return type(linears[0]) is Int8Linear


def _joined(first: torch.Tensor, rows: int) -> torch.Tensor:
    """The `rows` rows of a packed group that starts at the contiguous `first`, as one view of their storage."""
    first = first.detach()
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


@torch.no_grad()
def pack_linears(linears: list[nn.Linear]) -> tuple:
    """Copy the weights (biases, scales) of `linears` into one new tensor each and re-point every parameter's `.data`
    to its rows (nothing to do when already packed); parameter objects, values and state_dict are unchanged. Returns
    the packed (weight, bias or None) as views of the parameters' storage, the weight as (int8 weight, fp32 row
    scales) for `Int8Linear` groups. The caller checked `packable(linears)` (`decoder_layer_groups`)."""
    if not layout_ok(linears):
        with torch.inference_mode(False):  # never make parameters inference tensors (training after generate works)
            for name in ("weight", "bias", "weight_scale"):
                if getattr(linears[0], name, None) is not None:
                    _pack_rows([getattr(m, name) for m in linears])
    rows = sum(m.weight.shape[0] for m in linears)
    weight, bias = _joined(linears[0].weight, rows), linears[0].bias
    if _scaled(linears):
        weight = (weight, _joined(linears[0].weight_scale, rows))
    return weight, (_joined(bias, rows) if bias is not None else None)


def _pack_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Copy `tensors` into one new tensor, row blocks end to end, and re-point each one's `.data` to its rows."""
    packed = torch.cat([t.detach() for t in tensors])
    start = 0
    for t in tensors:
        t.data = packed[start : start + t.shape[0]]
        start += t.shape[0]
    return packed


def decoder_layer_groups(lm: nn.Module) -> list[tuple[list, list]] | None:
    """The (q/k/v, gate/up) linears of each decoder layer of a Llama-family causal LM (`lm.model.layers[i]`), or
    None if any of them is missing or not packable."""
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None:
        return None
    groups = []
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        try:
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            gate_up = [mlp.gate_proj, mlp.up_proj]
        except AttributeError:
            return None
        if not (packable(qkv) and packable(gate_up)):
            return None
        groups.append((qkv, gate_up))
    return groups


def pack_decoder(lm: nn.Module) -> list[tuple] | None:
    """Pack (or re-pack, where parameters moved) every layer's q/k/v and gate/up of `lm`; returns per layer
    (qkv_weight, qkv_bias, gate_up_weight, gate_up_bias), each weight a tensor or, for `Int8Linear` layers,
    (int8 weight, fp32 row scales), all views of the parameters' storage; None (nothing changed) for other models."""
    groups = decoder_layer_groups(lm)
    if groups is None:
        return None
    return [(*pack_linears(qkv), *pack_linears(gate_up)) for qkv, gate_up in groups]


def packed_signature(packs) -> tuple:
    """Addresses of the packed tensors: a CUDA graph captured with them stays valid while this is unchanged."""
    flat = [t for group in packs for entry in group for t in (entry if isinstance(entry, tuple) else (entry,))]
    return tuple(t.data_ptr() if t is not None else 0 for t in flat)
