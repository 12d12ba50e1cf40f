"""InternVL-Chat model: configs, InternViT, InternVLChatModel, presets and loading helpers.

Importing this package registers `internvl_chat` / `intern_vit_6b` with transformers' AutoConfig and AutoModel, so
`AutoModel.from_pretrained(dir)` works on a released checkpoint directory without `trust_remote_code`.
"""
from transformers import AutoConfig, AutoModel

from .configuration_intern_vit import InternVisionConfig
from .configuration_internvl_chat import InternVLChatConfig
from .decode_config import DecodeConfig
from .loading import CheckpointError, build_on_meta, count_parameters, load_pretrained
from .modeling_intern_vit import InternVisionModel
from .modeling_internvl_chat import (
    ImageTokenMismatchError,
    InternVLChatModel,
    pixel_shuffle,
)
from .presets import list_presets, load_preset

AutoConfig.register(InternVisionConfig.model_type, InternVisionConfig, exist_ok=True)
AutoConfig.register(InternVLChatConfig.model_type, InternVLChatConfig, exist_ok=True)
AutoModel.register(InternVisionConfig, InternVisionModel, exist_ok=True)
AutoModel.register(InternVLChatConfig, InternVLChatModel, exist_ok=True)

__all__ = [
    "CheckpointError",
    "DecodeConfig",
    "ImageTokenMismatchError",
    "InternVLChatConfig",
    "InternVLChatModel",
    "InternVisionConfig",
    "InternVisionModel",
    "build_on_meta",
    "count_parameters",
    "list_presets",
    "load_preset",
    "load_pretrained",
    "pixel_shuffle",
]
