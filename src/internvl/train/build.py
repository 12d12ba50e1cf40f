"""Build the tokenizer and the model for a training run: load or random-init, apply overrides, freeze, add LoRA.

These are training decisions driven by the `medrega-train` flags; the model package only builds and loads models.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers.integrations import deepspeed as hf_deepspeed
from transformers.integrations import is_deepspeed_zero3_enabled

from internvl.compat import active_hf_deepspeed_config, set_attn_implementation
from internvl.constants import IMG_CONTEXT_TOKEN
from internvl.model import InternVLChatConfig, InternVLChatModel, load_preset
from internvl.tokenization import add_special_tokens, load_tokenizer, save_tokenizer
from internvl.train.arguments import DataTrainingArguments, ModelArguments, resolve_freeze_defaults
from internvl.train.lora import wrap_backbone_lora, wrap_llm_lora
from internvl.train import qlora

logger = logging.getLogger(__name__)


@dataclass
class BuiltModel:
    """What `build_model_and_tokenizer` returns: the model, its tokenizer, where its frozen base lives, and the
    parameter counts per tower (`trainable_by_tower`)."""

    model: InternVLChatModel
    tokenizer: object
    base_model_dir: str | None
    trainable_by_tower: dict[str, dict[str, int]]

    @property
    def trainable_params(self) -> int:
        return sum(t["trainable"] for t in self.trainable_by_tower.values())

    @property
    def total_params(self) -> int:
        return sum(t["total"] for t in self.trainable_by_tower.values())


def apply_overrides(config: InternVLChatConfig, model_args: ModelArguments, data_args: DataTrainingArguments,
                    from_preset: bool) -> None:
    """Copy the vision/template flags onto the config (original trainer behaviour); with a preset,
    `force_image_size` is also the ViT's native size (no position-embedding resize)."""
    config.select_layer = model_args.vision_select_layer
    config.ps_version = model_args.ps_version
    config.template = data_args.conv_style
    config.downsample_ratio = data_args.down_sample_ratio
    for name in ("pad2square", "dynamic_image_size", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch"):
        setattr(config, name, getattr(data_args, name))
    config.vision_config.drop_path_rate = model_args.drop_path_rate
    config.use_llm_lora = 0
    config.use_backbone_lora = 0
    if data_args.force_image_size is not None:
        if from_preset:
            config.vision_config.image_size = data_args.force_image_size
        config.force_image_size = data_args.force_image_size
    set_attn_implementation(config.llm_config, model_args.attn_implementation)
    config.llm_config.use_cache = False


def apply_freezing(model: nn.Module, model_args: ModelArguments) -> None:
    """Set requires_grad per module as the (defaulted, `resolve_freeze_defaults`) freeze flags say, then wrap LoRA
    (which freezes its base weights)."""
    resolve_freeze_defaults(model_args)
    if model_args.freeze_backbone:
        model.vision_model.requires_grad_(False)
        if model_args.unfreeze_vit_layers:
            for layer in model.vision_model.encoder.layers[model_args.unfreeze_vit_layers:]:
                layer.requires_grad_(True)
    if model_args.freeze_llm:
        model.language_model.requires_grad_(False)
    if model_args.freeze_mlp:
        model.mlp1.requires_grad_(False)
    if model_args.use_backbone_lora:
        wrap_backbone_lora(model, model_args.use_backbone_lora, model_args.lora_dropout)
        if not model_args.freeze_backbone:
            logger.info("use_backbone_lora: the ViT base weights are frozen, only its LoRA weights train")
    if model_args.use_llm_lora:
        wrap_llm_lora(model, model_args.use_llm_lora, model_args.lora_dropout)
    if model_args.unfreeze_lm_head:
        model.language_model.get_output_embeddings().requires_grad_(True)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing on the LLM layers and the ViT layers (works with frozen inputs and LoRA)."""
    kwargs = {"use_reentrant": False}
    for module in (model.language_model, model.vision_model):
        if hasattr(module, "activation_checkpointing_enable"):
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            logger.warning("%s has no activation checkpointing", type(module).__name__)


@contextlib.contextmanager
def whole_model_construction() -> Iterator[None]:
    """Build a random-init model whole even when a ZeRO-3 DeepSpeed config is active: transformers would wrap the
    LLM's construction in `deepspeed.zero.Init`, leaving `weight.shape == (0,)` on partitioned parameters (the
    embedding resize then goes wrong). DeepSpeed partitions the model when the engine starts."""
    active = active_hf_deepspeed_config()
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if active is not None:
            hf_deepspeed.set_hf_deepspeed_config(active)


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())


def four_bit_spec(model_args: ModelArguments, dtype: torch.dtype, device: torch.device | str | None) -> dict | None:
    """The 4-bit spec of a --load_in_4bit run (`qlora.quant_spec`), or None: not asked, or bitsandbytes cannot run
    4-bit on `device` (then the reason is printed and LoRA trains on the unquantised base)."""
    if not model_args.load_in_4bit:
        return None
    reason = qlora.four_bit_unavailable(torch.device(device or "cpu"), dtype)
    if reason is not None:
        message = (f"--load_in_4bit: 4-bit quantisation skipped on {device or 'cpu'}: {reason}; "
                   "LoRA trains on the unquantised base")
        print(f"medrega-train: {message}", file=sys.stderr)
        logger.warning(message)
        return None
    return qlora.quant_spec(model_args.bnb_4bit_quant_type, model_args.use_bnb_nested_quant, dtype)


def _load(path: str | Path, dtype: torch.dtype, spec: dict | None, device, **kwargs) -> InternVLChatModel:
    """`from_pretrained` of a local checkpoint, its LLM linears in 4 bit on `device` when a spec is given."""
    if spec is not None:
        kwargs.update(quantization_config=qlora.qlora_config(spec), device_map={"": torch.device(device or "cpu")})
    return InternVLChatModel.from_pretrained(str(path), dtype=dtype, local_files_only=True, **kwargs)


def build_model_and_tokenizer(model_args: ModelArguments, data_args: DataTrainingArguments, *,
                              use_deepspeed_bf16: bool = False,
                              base_save_dir: str | Path | None = None, save_base: bool = True,
                              device: torch.device | str | None = None) -> BuiltModel:
    """Tokenizer + model ready for the Trainer.

    `--preset` builds a random-init model whose LLM vocabulary equals the tokenizer (with InternVL's special tokens);
    `--model_name_or_path` loads a checkpoint in the original layout. With LoRA on a preset, the random base is saved
    to `base_save_dir` first so the adapters can be merged later (by the process with `save_base`; under
    torch.distributed the others wait for it). With --load_in_4bit the LLM linears are loaded in 4
    bit onto `device` (a preset: from the saved base). Weights are bf16 with `use_deepspeed_bf16` (DeepSpeed keeps
    fp32 masters; QLoRA), else fp32 (bf16 autocast).
    """
    tokenizer_dir = model_args.tokenizer_path or model_args.model_name_or_path
    tokenizer = load_tokenizer(tokenizer_dir, model_max_length=data_args.max_seq_length)
    add_special_tokens(tokenizer)
    dtype = torch.bfloat16 if use_deepspeed_bf16 else torch.float32
    spec = four_bit_spec(model_args, dtype, device)
    lora = bool(model_args.use_llm_lora or model_args.use_backbone_lora)
    if model_args.preset is not None:
        config = load_preset(model_args.preset)
        apply_overrides(config, model_args, data_args, from_preset=True)
        config.llm_config.vocab_size = len(tokenizer)
        with whole_model_construction():
            model = InternVLChatModel(config).to(dtype)
        base_dir = None
    else:
        config = InternVLChatConfig.from_pretrained(model_args.model_name_or_path, local_files_only=True)
        native_size = config.image_size
        apply_overrides(config, model_args, data_args, from_preset=False)
        resize = data_args.force_image_size not in (None, native_size)
        if resize:
            config.force_image_size = native_size  # load at the stored size, then resize once below
        model = _load(model_args.model_name_or_path, dtype, spec, device, config=config)
        if resize:
            resize_position_embeddings(model, data_args.force_image_size)
        base_dir = str(model_args.model_name_or_path)
    if len(tokenizer) > model.config.llm_config.vocab_size:
        if is_deepspeed_zero3_enabled():
            raise ValueError(f"{tokenizer_dir}: the tokenizer has {len(tokenizer)} tokens but the checkpoint's LLM only "
                             f"{model.config.llm_config.vocab_size} rows; grow the embeddings once without ZeRO-3 "
                             "(internvl.tokenization.add_special_tokens + save_pretrained) and train from that")
        add_special_tokens(tokenizer, model)
    if lora and model_args.preset is not None:
        if base_save_dir is None:
            raise ValueError("LoRA on a random-init preset needs a place to save the base weights (base_save_dir)")
        if save_base:
            model.save_pretrained(str(base_save_dir))
            save_tokenizer(tokenizer, base_save_dir)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        base_dir = str(base_save_dir)
        if spec is not None:  # the random base is saved whole; train on its 4-bit load, as from a checkpoint
            model = _load(base_dir, dtype, spec, device)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    if spec is not None:
        qlora.prepare_kbit_training(model)
        model.qlora_spec = spec
    apply_freezing(model, model_args)
    if spec is not None:
        qlora.allow_trainer_on_adapters(model)
    if model_args.grad_checkpoint:
        enable_gradient_checkpointing(model)
    towers = trainable_by_tower(model)
    report_trainable(towers, model_args)
    return BuiltModel(model=model, tokenizer=tokenizer, base_model_dir=base_dir, trainable_by_tower=towers)


TOWERS = ("vision", "projector", "llm", "lora")
_TOWER_OF_PREFIX = {"vision_model.": "vision", "mlp1.": "projector", "language_model.": "llm"}
_TOWER_FLAG = {"vision": "--freeze_backbone", "projector": "--freeze_mlp", "llm": "--freeze_llm"}


def trainable_by_tower(model: nn.Module) -> dict[str, dict[str, int]]:
    """{tower: {"trainable": n, "total": n}} for vision (InternViT), projector (mlp1), llm and lora (every LoRA
    A/B weight, whichever tower it sits in); the base weights under LoRA count in their own tower."""
    out = {name: {"trainable": 0, "total": 0} for name in TOWERS}
    for name, param in model.named_parameters():
        tower = "lora" if ".lora_" in name else next(
            (t for prefix, t in _TOWER_OF_PREFIX.items() if name.startswith(prefix)), "llm")
        out[tower]["total"] += _numel(param)
        if param.requires_grad:
            out[tower]["trainable"] += _numel(param)
    return out


def report_trainable(towers: dict[str, dict[str, int]], model_args: ModelArguments) -> None:
    """Log the trainable parameters per tower, and warn when LoRA is on while a tower trains fully."""
    total = sum(t["total"] for t in towers.values())
    trainable = sum(t["trainable"] for t in towers.values())
    rows = {**towers, "total": {"trainable": trainable, "total": total}}
    logger.info("trainable parameters per tower:\n%s", "\n".join(
        f"  {name:<9} {t['trainable']:>14,d} of {t['total']:>14,d}  ({100.0 * t['trainable'] / max(total, 1):6.2f}%)"
        for name, t in rows.items()))
    full = [name for name in _TOWER_FLAG if towers[name]["trainable"]]
    if full and (model_args.use_llm_lora or model_args.use_backbone_lora):
        logger.warning("LoRA is on, but these towers also train in full: %s. If only the adapters should train, pass "
                       "%s (or leave those flags out: under LoRA they default to frozen).",
                       ", ".join(f"{name} {towers[name]['trainable']:,d}" for name in full),
                       " ".join(f"{_TOWER_FLAG[name]} True" for name in full))


def resize_position_embeddings(model: nn.Module, new_size: int) -> None:
    """Change the tile size of a loaded model: bicubic-resize the ViT position grid once and update the config."""
    if is_deepspeed_zero3_enabled():
        raise ValueError(f"cannot resize the ViT position grid to {new_size} under ZeRO-3 (partitioned weights); "
                         "resize once without ZeRO-3 and save that checkpoint")
    old = model.config.vision_config.image_size
    model.vision_model.resize_pos_embeddings(old_size=old, new_size=new_size, patch_size=model.config.vision_config.patch_size)
    model.config.vision_config.image_size = new_size
    model.config.force_image_size = new_size
    model.num_image_token = model.config.num_image_token
