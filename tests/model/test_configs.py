"""InternVisionConfig / InternVLChatConfig: released config.json dicts load unchanged, defaults match the original."""
import json

import pytest
from transformers import AutoConfig, LlamaConfig

from internvl.model import InternVisionConfig, InternVLChatConfig


def test_released_config_loads_unchanged(released_style_config):
    config = InternVLChatConfig(**released_style_config)
    assert isinstance(config.vision_config, InternVisionConfig)
    assert isinstance(config.llm_config, LlamaConfig)
    assert config.ps_version == "v1"  # missing key means v1, as in the original
    assert config.vision_config.norm_type == "rms_norm"  # absent in the 6B configs: class default
    assert config.vision_config.num_hidden_layers == 2 and config.vision_config.qk_normalization is True
    assert config.llm_config.rope_parameters["rope_theta"] == 5000000.0
    assert config.template == "Hermes-2" and config.force_image_size == 56
    assert config.num_image_token == 4  # (56 / 14)^2 * 0.25
    assert config.tie_word_embeddings is False and config.llm_config.tie_word_embeddings is False


def test_tie_word_embeddings_is_forced_off(released_style_config):
    data = released_style_config
    data["tie_word_embeddings"] = True
    data["llm_config"]["tie_word_embeddings"] = True
    config = InternVLChatConfig(**data)
    assert config.tie_word_embeddings is False and config.llm_config.tie_word_embeddings is False


def test_llm_model_type_from_architectures(released_style_config):
    data = released_style_config
    del data["llm_config"]["model_type"]
    assert isinstance(InternVLChatConfig(**data).llm_config, LlamaConfig)
    data["llm_config"]["architectures"] = ["InternLM2ForCausalLM"]
    with pytest.raises(ValueError, match="InternLM2ForCausalLM"):
        InternVLChatConfig(**data)


def test_original_defaults():
    vision = InternVisionConfig()
    assert (vision.hidden_size, vision.num_attention_heads, vision.num_hidden_layers) == (3200, 25, 48)
    assert vision.hidden_size // vision.num_attention_heads == 128 and vision.initializer_factor == 0.1 and vision.qkv_bias is False
    chat = InternVLChatConfig()
    assert chat.ps_version == "v1" and chat.select_layer == -1 and chat.downsample_ratio == 0.5
    assert chat.max_dynamic_patch == 6 and chat.min_dynamic_patch == 1 and chat.system_message is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ps_version": "v3"}, "ps_version"),
        ({"downsample_ratio": 0.3}, "downsample_ratio"),
        ({"vision_config": {"hidden_size": 30, "num_attention_heads": 4}}, "divisible"),
        ({"vision_config": {"norm_type": "batch_norm"}}, "norm_type"),
        ({"hidden_size": 65}, "hidden_size"),
    ],
)
def test_bad_values_raise(change, message, released_style_config):
    data = released_style_config
    for key, value in change.items():
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    with pytest.raises(ValueError, match=message):
        InternVLChatConfig(**data)


def test_json_round_trip_keeps_original_field_names(tmp_path, released_style_config):
    config = InternVLChatConfig(**released_style_config)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("vision_config", "llm_config", "downsample_ratio", "ps_version", "select_layer", "force_image_size",
                "template", "dynamic_image_size", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch",
                "pad2square", "use_backbone_lora", "use_llm_lora"):
        assert key in saved, key
    assert saved["model_type"] == "internvl_chat" and saved["vision_config"]["model_type"] == "intern_vit_6b"
    assert saved["llm_config"]["model_type"] == "llama"
    again = InternVLChatConfig.from_pretrained(tmp_path, local_files_only=True)
    assert again.to_dict()["llm_config"] == config.to_dict()["llm_config"]
    assert again.vision_config.to_dict() == config.vision_config.to_dict()


def test_autoconfig_without_remote_code(tmp_path, released_style_config):
    (tmp_path / "config.json").write_text(json.dumps(released_style_config))
    config = AutoConfig.from_pretrained(tmp_path, local_files_only=True, trust_remote_code=False)
    assert isinstance(config, InternVLChatConfig)
