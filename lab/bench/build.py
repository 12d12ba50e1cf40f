"""Random-weight models for the benchmark, materialised directly on the target device (never in host memory).

`build_ours` constructs `InternVLChatModel` on the meta device (no memory at all), casts it there to the target
dtype, allocates the storage on the device with `to_empty` and fills it with random values on the device; RoPE
buffers are recomputed. The 40B MedRegA shape is built this way on one GPU.

`build_native` builds transformers' own `InternVLForConditionalGeneration` with the same sizes (through the model
package's converter `internvl.model.hf_conversion`; the native class only knows pixel-shuffle v2, so compare with
ps_version "v2"). With `copy_from` the native model gets our weights, so both compute the same function.
"""
from __future__ import annotations

import logging

import torch
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.utils import get_balanced_memory
from torch import nn
from transformers import InternVLForConditionalGeneration

from internvl.model import InternVLChatModel
from internvl.model.hf_conversion import convert_config_to_hf, convert_state_dict_to_hf

logger = logging.getLogger(__name__)


@torch.no_grad()
def randomize_(model: nn.Module, *, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Fill every parameter in place on its device: matrices/embeddings ~ N(0, std), norm weights 1, layer scales
    0.1, biases 0. Recompute RoPE `inv_freq` buffers (meta construction leaves them empty)."""
    gens: dict[torch.device, torch.Generator] = {}  # one generator per device (a sharded model spans several)
    for name, param in model.named_parameters():
        gen = gens.get(param.device)
        if gen is None:
            gen = gens[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        leaf = name.rsplit(".", 1)[-1]
        if leaf in {"ls1", "ls2", "lambda_1", "lambda_2"}:
            param.fill_(0.1)
        elif param.dim() == 1 and ("norm" in name or leaf == "weight"):
            param.fill_(1.0) if leaf == "weight" else param.zero_()
        elif param.dim() == 1:
            param.zero_()
        else:
            param.normal_(0.0, std, generator=gen)
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and hasattr(module, "config"):
            # RoPE tables are not parameters: rebuild a fresh (tiny) module on the CPU and copy its fp32 tables.
            fresh = type(module)(module.config)
            for buf in ("inv_freq", "original_inv_freq"):
                if hasattr(fresh, buf):
                    module.register_buffer(buf, getattr(fresh, buf).to(module.inv_freq.device), persistent=False)
            if hasattr(fresh, "attention_scaling"):
                module.attention_scaling = fresh.attention_scaling
    return model


def materialize(factory, *, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Call `factory()` under the meta device, then allocate on `device` in `dtype` and randomise there."""
    with torch.device("meta"):
        model = factory()
    model = model.to(dtype=dtype)  # free on meta
    model = model.to_empty(device=device)
    return randomize_(model, seed=seed)


def build_ours(config, *, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
               attn_implementation: str = "sdpa"):
    """Our `InternVLChatModel` with random weights of `config` (an InternVLChatConfig) on `device`."""
    config.llm_config._attn_implementation = attn_implementation
    model = materialize(lambda: InternVLChatModel(config), device=device, dtype=dtype, seed=seed)
    return model


def native_config(config, *, image_token_id: int):
    """transformers `InternVLConfig` with the sizes of our InternVLChatConfig (the model package's converter)."""
    return convert_config_to_hf(config, image_token_id)


def build_native(config, *, image_token_id: int, device: str | torch.device = "cuda",
                 dtype: torch.dtype = torch.bfloat16, seed: int = 0, attn_implementation: str = "sdpa",
                 copy_from: nn.Module | None = None) -> tuple[nn.Module, bool]:
    """transformers' `InternVLForConditionalGeneration` with our sizes; returns (model, weights_copied).

    weights_copied is True when `copy_from` was given: the model package's converter
    (`internvl.model.hf_conversion`) mapped its state dict onto the native model, so both compute the same function
    (with ps_version v2, the only order the native class knows)."""
    hf_cfg = native_config(config, image_token_id=image_token_id)
    hf_cfg._attn_implementation = attn_implementation
    hf_cfg.text_config._attn_implementation = attn_implementation
    hf_cfg.vision_config._attn_implementation = attn_implementation
    model = materialize(lambda: InternVLForConditionalGeneration(hf_cfg), device=device, dtype=dtype, seed=seed)
    copied = False
    if copy_from is not None:
        state = convert_state_dict_to_hf(copy_from.state_dict())
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"converter left missing={missing[:5]} unexpected={unexpected[:5]}")
        copied = True
    return model, copied


def shard_device_map(model: nn.Module, max_memory: dict | None, dtype: torch.dtype) -> dict[str, str | int]:
    """accelerate's balanced device map of a (meta) model over `max_memory` ({gpu index or "cpu": "NGiB"}; None =
    every visible GPU), never splitting a ViT block or an LLM decoder layer: the map transformers'
    `from_pretrained(device_map="auto")` makes for a real checkpoint ("balanced": the layers spread evenly)."""
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    no_split += list(getattr(model.language_model, "_no_split_modules", None) or [])
    no_split = sorted(set(no_split))
    balanced = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    return infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)


def build_ours_sharded(config, device_map: dict[str, str | int], *, dtype: torch.dtype = torch.bfloat16,
                       seed: int = 0, attn_implementation: str = "sdpa"):
    """Our `InternVLChatModel` with random weights, each module of `device_map` ({module name: device}) allocated
    and filled directly on its device (meta construction; no host copy of the weights), then dispatched with
    accelerate hooks that move activations between devices, like a `device_map` load of a real checkpoint."""
    config.llm_config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = InternVLChatModel(config)
    model = model.to(dtype=dtype)
    placed: set[str] = set()
    for name, device in sorted(device_map.items(), key=lambda kv: -len(kv[0])):
        if device == "disk":
            raise ValueError(f"device_map entry {name!r}: disk offload is not supported for random-weight builds")
        module = model.get_submodule(name) if name else model
        dev = f"cuda:{device}" if isinstance(device, int) else device
        # deepest names first, so a parent entry only materialises what its children entries did not already place
        for pname, param in list(module.named_parameters(recurse=True)) + list(module.named_buffers(recurse=True)):
            full = f"{name}.{pname}" if name else pname
            if full in placed:
                continue
            owner_name, _, leaf = pname.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            fresh = torch.empty_like(param, device=dev)
            if isinstance(param, nn.Parameter):
                owner._parameters[leaf] = nn.Parameter(fresh, requires_grad=param.requires_grad)
            else:
                owner._buffers[leaf] = fresh
            placed.add(full)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"device_map leaves {len(missing)} parameters unplaced, e.g. {missing[:3]}")
    randomize_(model, seed=seed)
    main = device_map.get("language_model.model.embed_tokens", next(iter(device_map.values())))
    return dispatch_model(model, device_map=device_map,
                          main_device=torch.device(f"cuda:{main}" if isinstance(main, int) else main))
