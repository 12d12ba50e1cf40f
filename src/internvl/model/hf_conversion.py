"""Convert an original-layout InternVL-Chat checkpoint to transformers' native `InternVLForConditionalGeneration`.

Why: the native classes (transformers >= 4.52) are an independent implementation; matching their logits is our proof
of correctness, and the converted directory runs with stock transformers/vLLM "-hf" tooling.

Keys: `vision_model.*` -> `model.vision_tower.*` (renamed by `_VISION_RENAMES`; each `attn.qkv` split into
q/k/v_proj), `mlp1.{0,1,3}` -> `model.multi_modal_projector.{layer_norm,linear_1,linear_2}`, `language_model.model.*`
-> `model.language_model.*`, `language_model.lm_head.weight` -> `lm_head.weight`.

Caveat: the native model always orders image tokens as pixel shuffle v2.  A v1 checkpoint (InternVL-Chat-V1.2,
MedRegA) converts weight-for-weight but will see its image tokens in a different order, so conversion refuses v1
unless `allow_v1=True`.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..constants import IMG_CONTEXT_TOKEN
from ..tokenization import TokenizerError, check_single_token_ids, load_tokenizer
from .configuration_internvl_chat import InternVLChatConfig

_VISION_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"^embeddings\.patch_embedding\.(weight|bias)$", r"embeddings.patch_embeddings.projection.\1"),
    (r"^encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)$", r"encoder.layer.\1.attention.projection_layer.\2"),
    (r"^encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.weight$", r"encoder.layer.\1.attention.\2.weight"),
    (r"^encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"encoder.layer.\1.mlp.\2.\3"),
    (r"^encoder\.layers\.(\d+)\.norm1\.(weight|bias)$", r"encoder.layer.\1.layernorm_before.\2"),
    (r"^encoder\.layers\.(\d+)\.norm2\.(weight|bias)$", r"encoder.layer.\1.layernorm_after.\2"),
    (r"^encoder\.layers\.(\d+)\.ls1$", r"encoder.layer.\1.lambda_1"),
    (r"^encoder\.layers\.(\d+)\.ls2$", r"encoder.layer.\1.lambda_2"),
)
_QKV = re.compile(r"^encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
_PROJECTOR = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}


class ConversionError(ValueError):
    """A key or config that has no counterpart in the native layout."""


def convert_key(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Native key(s) and tensor(s) for one original key (qkv gives three)."""
    if key.startswith("vision_model."):
        sub = key[len("vision_model."):]
        match = _QKV.match(sub)
        if match:
            layer, kind = match.groups()
            q, k, v = tensor.chunk(3, dim=0)
            base = f"model.vision_tower.encoder.layer.{layer}.attention"
            return [(f"{base}.q_proj.{kind}", q), (f"{base}.k_proj.{kind}", k), (f"{base}.v_proj.{kind}", v)]
        for pattern, replacement in _VISION_RENAMES:
            new, count = re.subn(pattern, replacement, sub)
            if count:
                return [("model.vision_tower." + new, tensor)]
    elif key.startswith("mlp1."):
        index, _, leaf = key[len("mlp1."):].partition(".")
        if index in _PROJECTOR:
            return [(f"model.multi_modal_projector.{_PROJECTOR[index]}.{leaf}", tensor)]
    elif key == "language_model.lm_head.weight":
        return [("lm_head.weight", tensor)]
    elif key.startswith("language_model.model."):
        return [("model.language_model." + key[len("language_model.model."):], tensor)]
    raise ConversionError(f"no native counterpart for key {key!r} (LoRA-wrapped checkpoints must be merged first)")


def convert_state_dict_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole state dict, original -> native layout (tensors are shared, qkv rows are views)."""
    return {new_key: new for key, tensor in state_dict.items() for new_key, new in convert_key(key, tensor)}


def convert_config_to_hf(config: InternVLChatConfig, image_token_id: int) -> Any:
    """`transformers.InternVLConfig` equivalent to `config` (text_config keeps the LLM config as is)."""
    from transformers import InternVLConfig, InternVLVisionConfig

    vc = config.vision_config
    same = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act", "norm_type",
            "layer_norm_eps", "image_size", "patch_size", "num_channels", "attention_dropout")
    renamed = {"attention_bias": "qkv_bias", "use_qk_norm": "qk_normalization",
               "layer_scale_init_value": "initializer_factor", "projection_dropout": "dropout"}
    vision = InternVLVisionConfig(**{name: getattr(vc, name) for name in same},
                                  **{new: getattr(vc, old) for new, old in renamed.items()},
                                  use_absolute_position_embeddings=True, use_mean_pooling=True)
    text = config.llm_config.to_dict()
    text["tie_word_embeddings"] = False
    return InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=config.num_image_token,
        downsample_ratio=config.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=config.select_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def _image_token_id_from_dir(directory: Path) -> int:
    """The id of `<IMG_CONTEXT>` in the tokenizer saved with the checkpoint."""
    try:
        return check_single_token_ids(load_tokenizer(directory), [IMG_CONTEXT_TOKEN])[IMG_CONTEXT_TOKEN]
    except TokenizerError as exc:
        raise ConversionError(f"{directory}: no single-token id for {IMG_CONTEXT_TOKEN} ({exc}); pass image_token_id "
                              "explicitly") from None


_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "generation_config.json")


def convert_checkpoint_to_hf(
    src: str | Path, dst: str | Path, image_token_id: int | None = None, allow_v1: bool = False
) -> Path:
    """Convert checkpoint directory `src` (original layout, safetensors) into `dst` (native layout), one shard at a
    time (a 40B checkpoint needs one shard of RAM), with the native config.json, index and tokenizer files."""
    from .loading import find_weight_files

    src, dst = Path(src), Path(dst)
    files = find_weight_files(src)
    config = InternVLChatConfig.from_pretrained(str(src), local_files_only=True)
    if config.ps_version == "v1" and not allow_v1:
        raise ConversionError(
            f"{src}: ps_version is v1 (column-major image tokens) but the native InternVL model always uses v2 "
            "order; the converted model would not reproduce this checkpoint. Pass allow_v1=True (--allow-v1) to "
            "convert anyway (e.g. to then override its pixel_shuffle)."
        )
    if image_token_id is None:
        image_token_id = _image_token_id_from_dir(src)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total_size = 0
    for file in files:
        converted: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handle, not a dict)
                for new_key, tensor in convert_key(key, handle.get_tensor(key)):
                    converted[new_key] = tensor.contiguous()
        save_file(converted, str(dst / file.name), metadata={"format": "pt"})
        for key, tensor in converted.items():
            weight_map[key] = file.name
            total_size += tensor.numel() * tensor.element_size()
    if len(files) > 1 or (src / "model.safetensors.index.json").is_file():
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    hf_config = convert_config_to_hf(config, image_token_id)
    hf_config.architectures = ["InternVLForConditionalGeneration"]
    if config.dtype is not None:
        hf_config.dtype = config.dtype
    hf_config.save_pretrained(str(dst))
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst
