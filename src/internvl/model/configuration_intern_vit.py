"""Configuration of InternViT, the vision tower of InternVL-Chat: the original's field names and defaults (the
48-block InternViT-6B; V1.2/MedRegA set 45 blocks at 448 px), so a released `vision_config` loads unchanged. 6B-style:
`norm_type="rms_norm"`, `qk_normalization=True`, `qkv_bias=False`; 300M-style: "layer_norm", False, True.
"""
from __future__ import annotations

from transformers import PreTrainedConfig

_NORM_TYPES = ("rms_norm", "layer_norm")


class InternVisionConfig(PreTrainedConfig):
    """Hyper-parameters of `InternVisionModel`. `initializer_factor`: initial layer scale `ls1`/`ls2`;
    `drop_path_rate`: the last block's (linspace from 0); `use_flash_attn`: kept for released configs, unused (SDPA)."""

    model_type = "intern_vit_6b"
    base_config_key = "vision_config"

    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 224
    qkv_bias: bool = False
    hidden_size: int = 3200
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    qk_normalization: bool = True
    num_hidden_layers: int = 48
    use_flash_attn: bool = True
    hidden_act: str = "gelu"
    norm_type: str = "rms_norm"
    layer_norm_eps: float | int = 1e-6
    dropout: float | int = 0.0
    drop_path_rate: float | int = 0.0
    attention_dropout: float | int = 0.0
    initializer_range: float | int = 0.02
    initializer_factor: float | int = 0.1

    def __post_init__(self, **kwargs) -> None:
        if self.norm_type not in _NORM_TYPES:
            raise ValueError(f"InternVisionConfig.norm_type must be one of {_NORM_TYPES}, got {self.norm_type!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"InternVisionConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"InternVisionConfig: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        super().__post_init__(**kwargs)
