"""Packed projection weights for batch-1 decoding: q/k/v in one [q+k+v, H] tensor, gate/up in one [2I, H] tensor.

Why: at batch 1 every decoder layer's step is seven matrix-vector products (q, k, v, o, gate, up, down); each is a
separate kernel with its own launch gap and tail, even inside a CUDA graph, and the small k/v ones (256 rows here)
cannot fill the GPU. Reading q/k/v (and gate/up) as one matrix makes five larger products per layer.

How, without changing the model: the weights are copied once into one new tensor per group and each parameter's
`.data` is re-pointed to its row slice of it, so the parameters, their names, `state_dict` keys and values, PEFT
targets and the memory footprint stay what they were (the old separate storages are freed; the packed tensor *is*
the parameters' storage). Nothing holds the packed tensor except the parameters: `packed_view(...)` rebuilds the
[rows, H] view from the first parameter's storage on demand. If the parameters are moved later (`model.to(...)`,
loading, DeepSpeed), they stop sharing one storage; `layout_ok` notices and the caller re-packs.

Only plain `nn.Linear` modules without hooks are packed (not bitsandbytes, not LoRA-wrapped, not offloaded ones).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .int8_weights import Int8Linear


class PackingError(ValueError):
    """The modules cannot share one packed weight (different types, shapes, dtypes, devices or bias layout)."""


def plain_linear(module: nn.Module) -> bool:
    """A bare `nn.Linear` or our weight-only `Int8Linear` on a real device without hooks (not bitsandbytes,
    LoRA-wrapped or offloaded): its weight (and scales) can be read directly by our own products."""
    return (type(module) in (nn.Linear, Int8Linear) and not module._forward_hooks and not module._forward_pre_hooks
            and not getattr(module, "_hf_hook", None) and module.weight.device.type != "meta")


def packable(linears: list[nn.Module]) -> bool:
    """True when `linears` are plain `nn.Linear`s (no hooks) with the same in_features, dtype, device, all with or all
    without bias: the only case `pack_linears` accepts."""
    if not linears or not all(plain_linear(m) for m in linears):
        return False
    first = linears[0].weight
    return all(type(m) is type(linears[0]) and m.weight.dim() == 2 and m.weight.shape[1] == first.shape[1] and m.weight.dtype == first.dtype
               and m.weight.device == first.device and (m.bias is None) == (linears[0].bias is None)
               for m in linears)


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
    """True when the weights (and biases) of `linears` still lie packed end to end in one storage each."""
    if not packable(linears):
        return False
    if not _contiguous_run([m.weight for m in linears]):
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


def packed_view(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The packed [sum(out_features), in_features] weight (and [sum(out_features)] bias or None) of an already
    packed group, as views of the parameters' shared storage (no copy). Raises PackingError if not packed."""
    if not layout_ok(linears):
        raise PackingError("the linears are not packed (call pack_linears first)")
    rows = sum(m.weight.shape[0] for m in linears)
    bias = linears[0].bias
    return _joined(linears[0].weight, rows), (_joined(bias, rows) if bias is not None else None)


@torch.no_grad()
def pack_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Copy the weights of `linears` into one new [sum(out), in] tensor (biases into one [sum(out)] tensor) and
    re-point each parameter's `.data` to its rows. Parameter objects, requires_grad, values and state_dict are
    unchanged; the old storages are released (unless something else holds them). Returns the packed views."""
    if not packable(linears):
        raise PackingError("only plain nn.Linear modules with one in_features, dtype, device and bias layout pack")
    if layout_ok(linears):
        return packed_view(linears)
    with torch.inference_mode(False):  # never make parameters inference tensors (training after generate must work)
        return _pack_new(linears)


def _pack_new(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = _pack_rows([m.weight for m in linears])
    bias = _pack_rows([m.bias for m in linears]) if linears[0].bias is not None else None
    if _scaled(linears):
        _pack_rows([m.weight_scale for m in linears])
    return weight, bias


def _pack_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Copy `tensors` into one new tensor, row blocks end to end, and re-point each one's `.data` to its rows."""
    packed = torch.cat([t.detach() for t in tensors])
    start = 0
    for t in tensors:
        t.data = packed[start : start + t.shape[0]]
        start += t.shape[0]
    return packed


@dataclass
class LayerPack:
    """One decoder layer's packed groups: q/k/v rows (q first) and gate/up rows (gate first)."""

    qkv: list[nn.Linear]
    gate_up: list[nn.Linear]


def decoder_layer_groups(lm: nn.Module) -> list[LayerPack] | None:
    """The q/k/v and gate/up linears of each decoder layer of a Llama-family causal LM (`lm.model.layers[i]` with
    `self_attn.{q,k,v}_proj` and `mlp.{gate,up}_proj`), or None if any of them is not a plain `nn.Linear`."""
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
        groups.append(LayerPack(qkv, gate_up))
    return groups


def pack_decoder(lm: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]] | None:
    """Pack (or re-pack, where parameters moved) every layer's q/k/v and gate/up of `lm`; returns per layer
    (qkv_weight, qkv_bias, gate_up_weight, gate_up_bias) (each weight a tensor, or (int8 weight, fp32 row scales)
    for `Int8Linear` layers) as views of the parameters' storage, or None when the
    model has other modules (then nothing is changed)."""
    groups = decoder_layer_groups(lm)
    if groups is None:
        return None
    out = []
    for g in groups:
        wqkv, bqkv = pack_linears(g.qkv)
        wgu, bgu = pack_linears(g.gate_up)
        out.append((_with_scale(wqkv, g.qkv), bqkv, _with_scale(wgu, g.gate_up), bgu))
    return out


def _with_scale(weight: torch.Tensor, linears: list[nn.Module]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A packed group's weight as the packed step takes it: the tensor, or for an Int8Linear group (int8 weight,
    its packed [sum(out_features)] fp32 row scales as a view, no copy)."""
    if not _scaled(linears):
        return weight
    return weight, _joined(linears[0].weight_scale, sum(m.out_features for m in linears))


def packed_signature(packs) -> tuple:
    """Addresses of the packed tensors: a CUDA graph captured with them stays valid while this is unchanged."""
    flat = [t for group in packs for entry in group for t in (entry if isinstance(entry, tuple) else (entry,))]
    return tuple(t.data_ptr() if t is not None else 0 for t in flat)
