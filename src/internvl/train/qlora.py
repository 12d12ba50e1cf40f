"""QLoRA for InternVL-Chat / MedRegA: the LLM's linear layers in 4-bit NF4 (bitsandbytes), LoRA on top of them.

What `medrega-train --load_in_4bit True --use_llm_lora 16` does (the one-GPU recipe, `MODE=qlora` of
`src/shell/medrega_stage2.sh`): the checkpoint is loaded through transformers' `BitsAndBytesConfig` (`qlora_config`),
every LLM `nn.Linear` but the LM head in NF4 (the ViT and the projector stay in bf16, `QLORA_SKIP_MODULES`), and only
fp32 LoRA adapters on the 4-bit linears train. The merge folds them into a bf16 base that went through the same NF4
round trip (`dequantize_round_trip_`), so the merged checkpoint computes what the trained model computed.

bitsandbytes >= 0.48 runs NF4 on the CPU too (pure PyTorch fallback); `four_bit_unavailable` probes the device and
gives the reason when it cannot, and the build then trains LoRA on the unquantised base and says so.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from internvl.constants import SKIP_QUANT_MODULES
from internvl.ops.int8_weights import in_skip_modules

logger = logging.getLogger(__name__)

#: Modules that keep their dtype under 4-bit loading: the vision tower, the projector and the LM head (as in QLoRA:
#: the output layer stays in 16 bit); the loader's list, matched by `in_skip_modules` as transformers matches it.
QLORA_SKIP_MODULES = list(SKIP_QUANT_MODULES)
#: Block size of bitsandbytes' 4-bit quantisation (its default, the one transformers uses).
BLOCKSIZE = 64


def quant_spec(quant_type: str, double_quant: bool, compute_dtype: torch.dtype) -> dict[str, Any]:
    """The JSON-able record of a 4-bit base (saved in `lora_run.json`, read back by the merge)."""
    return {"quant_type": quant_type, "double_quant": bool(double_quant), "blocksize": BLOCKSIZE,
            "dtype": str(compute_dtype).removeprefix("torch."), "skip_modules": list(QLORA_SKIP_MODULES)}


def qlora_config(spec: dict[str, Any]):
    """transformers' `BitsAndBytesConfig` for `spec` (4-bit LLM linears, skip list, compute dtype)."""
    from transformers import BitsAndBytesConfig

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
        layer = nn.Linear(64, 64, bias=False, dtype=dtype)
        quantised = quantize_linear(layer, "nf4", True, dtype, torch.device(device))
        x = torch.randn(2, 64, device=device, dtype=dtype, requires_grad=True)
        quantised(x).sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            return f"bitsandbytes {bnb.__version__}: the 4-bit matmul on {device} gave no finite gradient"
    except Exception as exc:  # any backend failure means: no 4-bit here; the caller says why and goes on unquantised
        return f"bitsandbytes {bnb.__version__} cannot run NF4 on {device}: {type(exc).__name__}: {exc}"
    return None


def quantize_linear(layer: nn.Linear, quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
                    device: torch.device) -> nn.Module:
    """A `bitsandbytes.nn.Linear4bit` holding `layer`'s weight quantised on `device` (the weight is quantised when
    it is moved there; `layer` may then be dropped, freeing its 16/32-bit weight)."""
    import bitsandbytes as bnb

    out = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                            device="meta")
    out.weight = bnb.nn.Params4bit(layer.weight.data.to(compute_dtype), requires_grad=False, quant_type=quant_type,
                                   compress_statistics=double_quant, blocksize=BLOCKSIZE)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.data.to(compute_dtype), requires_grad=False)
    return out.to(device)


def quantize_linears_(module: nn.Module, spec: dict[str, Any], device: torch.device) -> int:
    """Replace every `nn.Linear` under `module` (except `spec["skip_modules"]` names) by its 4-bit version, in place.
    Used where transformers' loader cannot be (a model materialised layer by layer on the GPU). Returns the count."""
    dtype = getattr(torch, spec["dtype"])
    targets = [(name, child) for name, child in module.named_modules() if type(child) is nn.Linear
               and not in_skip_modules(name, spec["skip_modules"])]
    for name, child in targets:
        module.set_submodule(name, quantize_linear(child, spec["quant_type"], spec["double_quant"], dtype, device))
    return len(targets)


def prepare_kbit_training(model: nn.Module) -> None:
    """PEFT's `prepare_model_for_kbit_training`, adapted to a composite model: the LLM's base weights are frozen
    (the ViT and projector follow their --freeze flags). Left out on purpose: its fp32 upcast of all 16-bit weights
    (it guards fp16 overflow; bf16 has fp32's range, and upcasting the 5.9B ViT and the 0.9B embeddings/head of
    MedRegA would add 28 GB) and its input-grad hook (needed by reentrant checkpointing only; ours is non-reentrant,
    and the hook would make the embedding output a leaf that the image-token scatter writes into)."""
    getattr(model, "language_model", model).requires_grad_(False)


def allow_trainer_on_adapters(model: nn.Module) -> None:
    """Let transformers' Trainer take a composite model whose quantised LLM carries LoRA adapters.

    The Trainer refuses a model flagged `is_quantized` unless the model itself is a `PeftModel` (so that a purely
    quantised model is never trained). Here the quantised part, `language_model`, *is* a PeftModel with trainable
    adapters; this checks that and clears the top-level flag. The quantisation stays recorded in
    `model.quantization_method` / `model.config.quantization_config` (the Trainer still does not `.to()` the model).
    """
    from peft import PeftModel

    if not getattr(model, "is_quantized", False):
        return
    language_model = getattr(model, "language_model", None)
    if not isinstance(language_model, PeftModel) or not any(p.requires_grad for p in language_model.parameters()):
        raise ValueError("a 4-bit model trains only through LoRA adapters on its LLM (--use_llm_lora > 0)")
    model.is_quantized = False


def dequantize_round_trip_(language_model: nn.Module, spec: dict[str, Any]) -> int:
    """Replace the weight of every plain `nn.Linear` of `language_model` that was 4-bit in training (not in
    `spec["skip_modules"]`) by dequant(quant(weight)), computed as training did (from `spec["dtype"]`, NF4 blocks of
    `spec["blocksize"]`). Adapters merged afterwards then reproduce the trained (quantised) model. Runs on the
    weights' device (bitsandbytes' CPU backend works). Returns the number of weights changed."""
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

