"""Presets are data: every shipped JSON loads; the real V1.2/MedRegA preset has the published shapes and ~40.07B
parameters (built on the meta device); mid and tiny have the intended sizes."""
import json

import pytest

from internvl.model import InternVLChatConfig, list_presets, load_preset
from internvl.model.loading import build_on_meta, count_parameters
from internvl.model.presets import preset_dict


def test_every_shipped_preset_loads():
    assert set(list_presets()) >= {"internvl-chat-v1-2", "medrega", "mid", "tiny"}
    for name in list_presets():
        config = load_preset(name)
        assert isinstance(config, InternVLChatConfig)
        assert config.template == "Hermes-2" and config.ps_version == "v1" and not config.tie_word_embeddings


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="tiny"):
        load_preset("no-such-preset")


def test_overrides_and_fresh_copies():
    assert load_preset("tiny", ps_version="v2").ps_version == "v2"
    preset_dict("tiny")["select_layer"] = 5
    assert preset_dict("tiny")["select_layer"] == -1


def _vit_params(c: dict) -> int:
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    grid = c["image_size"] // c["patch_size"]
    emb = h + h * 3 * c["patch_size"] ** 2 + h + (grid * grid + 1) * h
    per_layer = (3 * h * h + (3 * h if c["qkv_bias"] else 0) + (2 * h if c["qk_normalization"] else 0)
                 + h * h + h + h * i + i + i * h + h
                 + (4 * h if c["norm_type"] == "layer_norm" else 2 * h) + 2 * h)
    return emb + layers * per_layer


def _llama_params(c: dict) -> int:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return 2 * v * h + c["num_hidden_layers"] * per_layer + h


@pytest.mark.parametrize("name", ["internvl-chat-v1-2", "medrega"])
def test_real_preset_parameter_count_on_meta(name):
    raw = preset_dict(name)
    vit, llm = raw["vision_config"], raw["llm_config"]
    assert (vit["num_hidden_layers"], vit["hidden_size"], vit["num_attention_heads"], vit["intermediate_size"]) == (
        45, 3200, 25, 12800)
    assert (llm["num_hidden_layers"], llm["hidden_size"], llm["intermediate_size"], llm["num_attention_heads"],
            llm["num_key_value_heads"], llm["rope_theta"], llm["rms_norm_eps"], llm["max_position_embeddings"]) == (
        60, 7168, 20480, 56, 8, 5e6, 1e-5, 4096)
    config = load_preset(name)
    assert config.num_image_token == 256
    model = build_on_meta(config)
    assert model.mlp1[1].in_features == 12800 and model.mlp1[1].out_features == 7168
    assert model.mlp1[3].in_features == 7168
    counts = count_parameters(model)
    assert counts["vision_model"] == _vit_params(vit)
    assert counts["language_model"] == _llama_params(llm)
    assert round(counts["vision_model"] / 1e9, 3) == 5.536
    assert round(counts["mlp1"] / 1e9, 3) == 0.143
    assert round(counts["language_model"] / 1e9, 3) == 34.389
    assert round(counts["total"] / 1e9, 2) == 40.07
    assert counts["total"] == counts["vision_model"] + counts["mlp1"] + counts["language_model"]
    assert next(model.parameters()).is_meta


def test_mid_preset_is_300m_vit_plus_1b_llama():
    counts = count_parameters(build_on_meta(load_preset("mid")))
    assert 0.29e9 < counts["vision_model"] < 0.32e9
    assert 1.0e9 < counts["language_model"] < 1.2e9
    raw = preset_dict("mid")["vision_config"]
    assert raw["norm_type"] == "layer_norm" and raw["qkv_bias"] and not raw["qk_normalization"]


def test_tiny_preset_matches_the_tiny_tokenizer(tiny_tokenizer, tiny_config):
    assert load_preset("tiny").llm_config.vocab_size == len(tiny_tokenizer)
    assert tiny_config.llm_config.vocab_size == len(tiny_tokenizer)
    assert load_preset("tiny").llm_config.eos_token_id == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_preset_files_are_valid_json_with_descriptions():
    from importlib import resources

    for entry in resources.files("internvl.model.presets").iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text(encoding="utf-8"))
            assert set(data) == {"name", "description", "config"} and data["description"]
