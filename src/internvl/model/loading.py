"""Loading helpers for real checkpoints: bf16, device_map sharding, 8-bit/4-bit (bitsandbytes), weight-only int8,
meta construction. `load_pretrained` adds to `InternVLChatModel.from_pretrained` the checks and defaults a user of a
40B model wants: a local directory of safetensors (pickled weights refused), bf16, `device_map="auto"` over the GPUs,
bitsandbytes quantisation of the language model only (the ViT, `mlp1` and `lm_head` stay bf16: quantising the vision
tower costs accuracy for little memory), and an error for any missing or unexpected key.
"""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..constants import SKIP_QUANT_MODULES
from .configuration_internvl_chat import InternVLChatConfig
from .modeling_internvl_chat import InternVLChatModel


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded (missing, no safetensors, missing/unexpected keys...)."""


def find_weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, from its index when sharded; `CheckpointError` naming the
    directory when there is no config.json, no safetensors, or only pickled weights (never unpickled)."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found (only local directories are supported)")
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) that do not exist: {missing}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pth", ".pt", ".ckpt"))
    if pickled:
        raise CheckpointError(
            f"{directory}: only pickled weights found ({pickled[:3]}...); convert them to safetensors first "
            "(this toolkit never unpickles weights)"
        )
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """A dtype name ('bf16', 'float16', any floating torch dtype name), 'auto' or a torch.dtype -> what
    from_pretrained takes; anything else is a ValueError."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, _DTYPE_ALIASES.get(dtype, dtype), None) if isinstance(dtype, str) else None
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    raise ValueError(f"unknown dtype {dtype!r}; use a floating torch dtype name ({', '.join(_DTYPE_ALIASES)}, "
                     "bfloat16, float16, float32, ...) or 'auto'")


def bitsandbytes_config(
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    skip_modules: Sequence[str] = SKIP_QUANT_MODULES,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> Any:
    """A `transformers.BitsAndBytesConfig` (nf4 with double quantisation for 4-bit), or None when neither flag is
    set; ImportError with the install hint without bitsandbytes."""
    if load_in_8bit and load_in_4bit:
        raise ValueError("choose one of load_in_8bit and load_in_4bit")
    if not (load_in_8bit or load_in_4bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "8-bit/4-bit loading needs bitsandbytes: pip install 'medrega-toolkit[quant]' (or pip install bitsandbytes)"
        )
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=list(skip_modules),
    )


def load_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = torch.bfloat16,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, str] | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    attn_implementation: str | None = None,
    skip_quant_modules: Sequence[str] = SKIP_QUANT_MODULES,
    weight_dtype: str | None = None,
    **kwargs: Any,
) -> InternVLChatModel:
    """Load an InternVL-Chat / MedRegA checkpoint directory for inference (eval mode).

    dtype: a torch dtype or its name (`resolve_dtype`), or "auto"/None for the checkpoint's own. device_map: None
    (CPU), "auto" or {module_name: device}. Raises `CheckpointError` for a bad directory or any missing, unexpected
    or mismatched key. weight_dtype="int8": weight-only int8 (`ops.int8_weights`) for the language model's linears
    outside `skip_quant_modules`, decoded by our Triton GEMV (unlike `load_in_8bit`'s slow LLM.int8); the checkpoint
    is read on the CPU and each linear quantised on its way to the one device `device_map` names, so that device
    never holds the bf16 language model (the 40B model takes about 43 GiB).
    """
    find_weight_files(path)
    dtype = resolve_dtype(dtype)
    compute_dtype = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
    int8_device = None
    if weight_dtype is not None:
        if weight_dtype != "int8":
            raise ValueError(f"weight_dtype must be None or 'int8', got {weight_dtype!r}")
        if load_in_8bit or load_in_4bit:
            raise ValueError("weight_dtype='int8' and load_in_8bit/load_in_4bit are different quantisations; pick one")
        if isinstance(device_map, dict) or device_map == "auto":
            raise ValueError("weight_dtype='int8' loads onto one device: pass device_map=None or a device ('cuda:0')")
        int8_device = torch.device(device_map) if device_map is not None else None
        device_map = None
    quant = bitsandbytes_config(load_in_8bit, load_in_4bit, skip_quant_modules, compute_dtype)
    if quant is not None and device_map is None:
        device_map = "auto"
    optional = {"quantization_config": quant, "device_map": device_map, "max_memory": max_memory,
                "attn_implementation": attn_implementation}
    extra = {**kwargs, **{k: v for k, v in optional.items() if v is not None}}
    model, info = InternVLChatModel.from_pretrained(str(path), dtype=dtype, output_loading_info=True, **extra)
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise CheckpointError(f"{path}: checkpoint does not match the config: {problems or info['error_msgs']}")
    if weight_dtype == "int8":
        from ..ops.int8_weights import quantize_int8_weights_  # lazy: imports Triton (about 3 s), int8 loads only

        quantize_int8_weights_(model, skip_quant_modules, device=int8_device)
        if int8_device is not None:
            model.to(int8_device)
    return model.eval()


def build_on_meta(config: InternVLChatConfig) -> InternVLChatModel:
    """Construct the model without allocating weights (for parameter counts, device maps, sharded init)."""
    with torch.device("meta"):
        return InternVLChatModel(config)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts of `vision_model`, `mlp1`, `language_model` and their `total` (works on meta models)."""
    counts = {
        name: sum(p.numel() for p in getattr(model, name).parameters())
        for name in ("vision_model", "mlp1", "language_model")
    }
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
