"""Configuration of InternVL-Chat (model_type `internvl_chat`), as used by InternVL-Chat-V1.2 and MedRegA.

Field names, defaults and quirks follow the original, so a released `config.json` loads unchanged: `llm_config` is
any transformers causal-LM config (by `model_type`, else `architectures[0]`); a missing `ps_version` means "v1"
(V1.2/MedRegA rely on it); embeddings are never tied; `system_message` overrides the template's system prompt.
"""
from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .configuration_intern_vit import InternVisionConfig

# Architectures the original dispatched on; InternLM2 needs remote code, which this package never runs.
_ARCH_TO_MODEL_TYPE = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "MistralForCausalLM": "mistral",
}
_PS_VERSIONS = ("v1", "v2")


def _build_llm_config(llm_config: Any) -> PreTrainedConfig:
    """`llm_config` as a transformers config: a dict is dispatched on its `model_type` (else on `architectures[0]`,
    else llama); embeddings are untied."""
    if isinstance(llm_config, PreTrainedConfig):
        llm_config.tie_word_embeddings = False
        return llm_config
    if llm_config is None:
        llm_config = {}
    if not isinstance(llm_config, dict):
        raise TypeError(f"InternVLChatConfig.llm_config must be a dict or a PreTrainedConfig, got {type(llm_config)}")
    llm_config = dict(llm_config)
    if "model_type" not in llm_config:
        arch = (llm_config.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in _ARCH_TO_MODEL_TYPE:
            raise ValueError(
                f"InternVLChatConfig.llm_config has no model_type and its architecture {arch!r} is not one of "
                f"{sorted(_ARCH_TO_MODEL_TYPE)} (InternLM2 needs remote code, which is not supported)"
            )
        llm_config["model_type"] = _ARCH_TO_MODEL_TYPE[arch]
    llm_config["tie_word_embeddings"] = False
    model_type = llm_config["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"InternVLChatConfig.llm_config: unknown model_type {model_type!r}")
    return CONFIG_MAPPING[model_type](**llm_config)


def _build_vision_config(vision_config: Any) -> InternVisionConfig:
    if isinstance(vision_config, InternVisionConfig):
        return vision_config
    if vision_config is None:
        return InternVisionConfig()
    if not isinstance(vision_config, dict):
        raise TypeError(f"InternVLChatConfig.vision_config must be a dict or an InternVisionConfig, got {type(vision_config)}")
    return InternVisionConfig(**vision_config)


class InternVLChatConfig(PreTrainedConfig):
    """Top-level configuration: vision tower + pixel shuffle + `mlp1` projector + causal LM.

    Shapes derived from it: each `force_image_size` tile gives
    `num_image_token = (image_size // patch_size) ** 2 * downsample_ratio ** 2` tokens (256 for 448/14/0.5), each of
    width `vision_config.hidden_size / downsample_ratio ** 2` before `mlp1` projects it to the LLM width.
    """

    model_type = "internvl_chat"
    # Built by hand in __post_init__ (works the same on every transformers 5.x).
    sub_configs: ClassVar[dict[str, type]] = {"vision_config": InternVisionConfig, "llm_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    llm_config: dict | PreTrainedConfig | None = None
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    pad2square: bool = False
    select_layer: int = -1
    force_image_size: int | None = None
    downsample_ratio: float | int = 0.5
    template: str | None = None
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    ps_version: str = "v1"
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    system_message: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs) -> None:
        self.vision_config = _build_vision_config(self.vision_config)
        self.llm_config = _build_llm_config(self.llm_config)
        if self.ps_version is None:
            self.ps_version = "v1"
        if self.ps_version not in _PS_VERSIONS:
            raise ValueError(f"InternVLChatConfig.ps_version must be one of {_PS_VERSIONS}, got {self.ps_version!r}")
        scale = 1.0 / self.downsample_ratio
        if abs(scale - round(scale)) > 1e-6:
            raise ValueError(
                f"InternVLChatConfig.downsample_ratio must be 1/k for an integer k, got {self.downsample_ratio}"
            )
        kwargs.pop("tie_word_embeddings", None)
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = False
        self.llm_config.tie_word_embeddings = False
        grid = self.image_size // self.vision_config.patch_size
        if (grid * self.downsample_ratio) != int(grid * self.downsample_ratio):
            raise ValueError(
                f"InternVLChatConfig: the {grid}x{grid} patch grid cannot be pixel-shuffled by "
                f"downsample_ratio {self.downsample_ratio}"
            )

    @property
    def image_size(self) -> int:
        """Side of one image tile in pixels: `force_image_size`, else the ViT's own `image_size`."""
        return self.force_image_size or self.vision_config.image_size

    @image_size.setter
    def image_size(self, value: int) -> None:
        # Some released configs carry derived keys; accept them only when consistent.
        if value != self.image_size:
            raise ValueError(f"InternVLChatConfig: image_size {value} disagrees with the derived {self.image_size}")

    @property
    def num_image_token(self) -> int:
        """Number of `<IMG_CONTEXT>` tokens per tile (256 for V1.2/MedRegA)."""
        grid = self.image_size // self.vision_config.patch_size
        return int(grid * grid * self.downsample_ratio**2)

    @property
    def hidden_size(self) -> int:
        """Width of the language model (also the output width of `mlp1`)."""
        return self.llm_config.hidden_size

    @hidden_size.setter
    def hidden_size(self, value: int) -> None:
        if value != self.llm_config.hidden_size:
            raise ValueError(
                f"InternVLChatConfig: hidden_size {value} disagrees with llm_config.hidden_size "
                f"{self.llm_config.hidden_size}"
            )
