"""Proof against an independent implementation: with ps_version v2 our logits equal transformers' native
InternVLForConditionalGeneration given the converted weights, for both ViT variants with a Llama LLM; the converter
script writes that layout; v1 differs from native only by the token order of the image features."""
import json
from pathlib import Path

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from internvl.constants import IMG_CONTEXT_TOKEN
from internvl.model import InternVLChatModel, load_preset
from internvl.model.convert_hf import main
from internvl.model.hf_conversion import (
    ConversionError,
    convert_checkpoint_to_hf,
    convert_config_to_hf,
    convert_state_dict_to_hf,
)

VARIANTS = {
    "6b": {},
    "300m": {"norm_type": "layer_norm", "qkv_bias": True, "qk_normalization": False},
}


def _model(variant: str, ps_version: str, vocab_size: int, ctx_id: int, select_layer: int = -1) -> InternVLChatModel:
    config = load_preset("tiny", ps_version=ps_version, select_layer=select_layer)
    config.llm_config.vocab_size = vocab_size
    for key, value in VARIANTS[variant].items():
        setattr(config.vision_config, key, value)
    torch.manual_seed(0)
    model = InternVLChatModel(config).eval()
    with torch.no_grad():  # non-trivial norms / biases / layer scales so every converted tensor matters
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(("bias", "ls1", "ls2")) or name.startswith("mlp1.0"):
                param.add_(0.2 * torch.randn_like(param))
    model.img_context_token_id = ctx_id
    return model


def _inputs(tokenizer, ctx_id: int, n_image: int):
    torch.manual_seed(1)
    ids = torch.randint(10, 900, (2, 24))
    ids[:, 3 : 3 + n_image] = ctx_id
    ids[1, 3 + n_image : 3 + 2 * n_image] = ctx_id  # sample 1 has two tiles
    pixel_values = torch.randn(3, 3, 56, 56)
    return ids, pixel_values


def _native(model: InternVLChatModel, ctx_id: int) -> InternVLForConditionalGeneration:
    native = InternVLForConditionalGeneration(convert_config_to_hf(model.config, ctx_id)).eval()
    missing, unexpected = native.load_state_dict(convert_state_dict_to_hf(model.state_dict()), strict=False)
    assert missing == [] and unexpected == []
    return native


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("select_layer", [-1, -2])
def test_v2_logits_equal_native(variant, select_layer, tiny_tokenizer):
    ctx = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    model = _model(variant, "v2", len(tiny_tokenizer), ctx, select_layer)
    native = _native(model, ctx)
    ids, pixel_values = _inputs(tiny_tokenizer, ctx, model.num_image_token)
    with torch.no_grad():
        ours = model(pixel_values=pixel_values, input_ids=ids).logits
        theirs = native(input_ids=ids, pixel_values=pixel_values).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_v1_equals_native_with_the_final_swap_removed(tiny_tokenizer, monkeypatch):
    ctx = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    model = _model("6b", "v1", len(tiny_tokenizer), ctx)
    native = _native(model, ctx)
    ids, pixel_values = _inputs(tiny_tokenizer, ctx, model.num_image_token)
    with torch.no_grad():
        ours = model(pixel_values=pixel_values, input_ids=ids).logits
        v2_native = native(input_ids=ids, pixel_values=pixel_values).logits
        assert (ours - v2_native).abs().max().item() > 1e-3  # the token order matters
        swap = native.model.pixel_shuffle
        monkeypatch.setattr(native.model, "pixel_shuffle", lambda x, scale_factor=0.5: swap(x, scale_factor).transpose(1, 2))
        v1_native = native(input_ids=ids, pixel_values=pixel_values).logits
    assert (ours - v1_native).abs().max().item() <= 1e-4


def test_unknown_key_is_refused():
    with pytest.raises(ConversionError, match="lora_A"):
        convert_state_dict_to_hf({"language_model.base_model.model.model.layers.0.q_proj.lora_A.default.weight":
                                  torch.zeros(1)})


def _save_checkpoint(model: InternVLChatModel, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory, max_shard_size="300KB")
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_converter_writes_a_loadable_native_checkpoint(variant, tiny_tokenizer, tmp_path):
    ctx = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    model = _model(variant, "v2", len(tiny_tokenizer), ctx)
    src = _save_checkpoint(model, tiny_tokenizer, tmp_path / "src")
    assert len(list(src.glob("model-*.safetensors"))) > 1
    dst = convert_checkpoint_to_hf(src, tmp_path / "hf")  # image token id read from the tokenizer files
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "internvl" and config["image_token_id"] == ctx
    assert config["vision_config"]["use_qk_norm"] is (variant == "6b")
    native, info = InternVLForConditionalGeneration.from_pretrained(dst, local_files_only=True,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, pixel_values = _inputs(tiny_tokenizer, ctx, model.num_image_token)
    with torch.no_grad():
        diff = (model(pixel_values=pixel_values, input_ids=ids).logits
                - native.eval()(input_ids=ids, pixel_values=pixel_values).logits)
    assert diff.abs().max().item() <= 1e-4


def test_converter_script_refuses_v1_unless_allowed(tiny_tokenizer, tmp_path, capsys):
    ctx = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    src = _save_checkpoint(_model("6b", "v1", len(tiny_tokenizer), ctx), tiny_tokenizer, tmp_path / "src")
    assert main([str(src), str(tmp_path / "hf")]) == 2
    assert "ps_version is v1" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="v1"):
        convert_checkpoint_to_hf(src, tmp_path / "hf2")
    assert main([str(src), str(tmp_path / "hf"), "--allow-v1", "--image-token-id", str(ctx + 1)]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["image_token_id"] == ctx + 1
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert main([str(tmp_path / "missing"), str(tmp_path / "hf3")]) == 2
    assert "not found" in capsys.readouterr().err
