"""QLoRA for InternVL-Chat / MedRegA: the LLM's linear layers in 4-bit NF4 (bitsandbytes), LoRA on top of them.

`medrega-train --load_in_4bit True --use_llm_lora 16` (`MODE=qlora` of `src/shell/medrega_stage2.sh`) loads the
checkpoint through transformers' `BitsAndBytesConfig` (`qlora_config`): every LLM `nn.Linear` but the LM head in NF4,
ViT and projector in bf16 (`QLORA_SKIP_MODULES`); only fp32 LoRA adapters train. The merge folds them into a base
that went through the same NF4 round trip (`dequantize_round_trip_`), so the merged model computes what was trained.
Where bitsandbytes cannot run NF4 (`four_bit_unavailable` says why), LoRA trains on the unquantised base.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from internvl.constants import SKIP_QUANT_MODULES
from internvl.ops.int8_weights import in_skip_modules

#: Modules that keep their dtype under 4-bit loading: the vision tower, the projector and the LM head (as in QLoRA).
QLORA_SKIP_MODULES = list(SKIP_QUANT_MODULES)
#: Block size of bitsandbytes' 4-bit quantisation (its default, the one transformers uses).
BLOCKSIZE = 64


def quant_spec(quant_type: str, double_quant: bool, compute_dtype: torch.dtype) -> dict[str, Any]:
    """The JSON-able record of a 4-bit base (saved in `lora_run.json`, read back by the merge)."""
    return {"quant_type": quant_type, "double_quant": bool(double_quant), "blocksize": BLOCKSIZE,
            "dtype": str(compute_dtype).removeprefix("torch."), "skip_modules": list(QLORA_SKIP_MODULES)}


def qlora_config(spec: dict[str, Any]):
    """transformers' `BitsAndBytesConfig` for `spec` (4-bit LLM linears, skip list, compute dtype)."""
    dtype = getattr(torch, spec["dtype"])
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec["quant_type"],
                              bnb_4bit_use_double_quant=spec["double_quant"], bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_storage=torch.uint8, llm_int8_skip_modules=list(spec["skip_modules"]))


def four_bit_unavailable(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str | None:
    """None when bitsandbytes can quantise to NF4 and run a 4-bit matmul (forward + backward) on `device`; else the
    reason, one line (bitsandbytes missing, no backend for the device, ...)."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        return f"bitsandbytes is not installed ({exc}); pip install 'bitsandbytes>=0.48'"
    try:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4").to(device)  # quantises
        x = torch.randn(2, 64, device=device, dtype=dtype, requires_grad=True)
        layer(x).sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            return f"bitsandbytes {bnb.__version__}: the 4-bit matmul on {device} gave no finite gradient"
    except Exception as exc:  # any backend failure means: no 4-bit here; the caller says why and goes on unquantised
        return f"bitsandbytes {bnb.__version__} cannot run NF4 on {device}: {type(exc).__name__}: {exc}"
    return None


def prepare_kbit_training(model: nn.Module) -> None:
    """PEFT's `prepare_model_for_kbit_training` for a composite model: freeze the LLM's base weights. Left out on
    purpose: its fp32 upcast of 16-bit weights (an fp16 guard; +28 GB on MedRegA) and its input-grad hook (for
    reentrant checkpointing only; it would make the embedding output a leaf the image-token scatter writes into)."""
    getattr(model, "language_model", model).requires_grad_(False)


def allow_trainer_on_adapters(model: nn.Module) -> None:
    """Let transformers' Trainer take a composite model whose quantised LLM carries LoRA adapters (`--load_in_4bit`
    requires `--use_llm_lora`): it refuses a model flagged `is_quantized` unless the model itself is a `PeftModel`.
    Clears that top-level flag; the quantisation stays in `model.config`."""
    model.is_quantized = False


def dequantize_round_trip_(language_model: nn.Module, spec: dict[str, Any]) -> int:
    """Replace the weight of every plain `nn.Linear` of `language_model` that was 4-bit in training (not in
    `spec["skip_modules"]`) by dequant(quant(weight)) as training computed it, so that adapters merged afterwards
    reproduce the trained model. Returns the number of weights changed."""
    import bitsandbytes.functional as bnbf

    dtype = getattr(torch, spec["dtype"])
    count = 0
    for name, module in language_model.named_modules():
        lora_part = any(p.startswith("lora_") for p in name.split("."))
        if type(module) is not nn.Linear or lora_part or in_skip_modules(name, spec["skip_modules"]):
            continue
        weight = module.weight.data
        packed, state = bnbf.quantize_4bit(weight.to(dtype), blocksize=spec["blocksize"],
                                           compress_statistics=spec["double_quant"], quant_type=spec["quant_type"])
        module.weight.data = bnbf.dequantize_4bit(packed, state).to(weight.dtype).reshape(weight.shape)
        count += 1
    return count

