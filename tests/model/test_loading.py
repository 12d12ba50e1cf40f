"""Loading and saving: released-layout directories (single or sharded safetensors + index) load with zero
missing/unexpected keys and no remote code; save_pretrained writes the same layout; errors are clear."""
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel

from internvl.model import InternVLChatConfig, InternVLChatModel
from internvl.model.loading import (
    CheckpointError,
    bitsandbytes_config,
    find_weight_files,
    load_pretrained,
    resolve_dtype,
)


def _write_released_checkpoint(directory, config, vocab_size, shards=1):
    """Write a directory the way the original release did: its ``config`` (released-style, given ``vocab_size``) as
    config.json + safetensors written by hand."""
    directory.mkdir(parents=True)
    config["llm_config"]["vocab_size"] = vocab_size
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(3)
    reference = InternVLChatModel(InternVLChatConfig(**config))
    state = {k: v.clone().contiguous() for k, v in reference.state_dict().items()}
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        keys = sorted(state)
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in keys[i::shards]}
            save_file(part, str(directory / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return state


@pytest.mark.parametrize("shards", [1, 3])
def test_released_layout_loads_with_zero_missing_or_unexpected(tmp_path, tiny_tokenizer, released_style_config, shards):
    state = _write_released_checkpoint(tmp_path / "ckpt", released_style_config, len(tiny_tokenizer), shards)
    model, info = InternVLChatModel.from_pretrained(tmp_path / "ckpt", output_loading_info=True, dtype=torch.float32)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_save_pretrained_writes_the_same_layout(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "out", max_shard_size="300KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tiny_model.state_dict())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "internvl_chat" and config["architectures"] == ["InternVLChatModel"]
    assert "auto_map" not in config
    again = load_pretrained(tmp_path / "out", dtype=torch.float32)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in tiny_model.state_dict().items())
    assert not again.training


def test_automodel_loads_without_remote_code(tmp_path, tiny_tokenizer, released_style_config):
    # the released config carries an auto_map
    _write_released_checkpoint(tmp_path / "ckpt", released_style_config, len(tiny_tokenizer))
    model = AutoModel.from_pretrained(tmp_path / "ckpt", local_files_only=True, trust_remote_code=False)
    assert type(model) is InternVLChatModel
    with pytest.raises(ValueError, match="trust_remote_code"):
        InternVLChatModel.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)


def test_bf16_and_device_map(tmp_path, tiny_tokenizer, released_style_config):
    _write_released_checkpoint(tmp_path / "ckpt", released_style_config, len(tiny_tokenizer))
    model = load_pretrained(tmp_path / "ckpt", dtype="bfloat16", device_map={"": "cpu"})
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.img_context_token_id = tiny_tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    with torch.no_grad():
        out = model.chat(tiny_tokenizer, torch.randn(1, 3, 56, 56), "Where is the liver?",
                         dict(max_new_tokens=3, do_sample=False))
    assert isinstance(out, str)


def test_missing_or_unexpected_keys_raise(tmp_path, tiny_tokenizer, released_style_config):
    state = _write_released_checkpoint(tmp_path / "ckpt", released_style_config, len(tiny_tokenizer))
    state.pop("mlp1.3.bias")
    state["mlp1.9.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"mlp1\.3\.bias|mlp1\.9\.weight"):
        load_pretrained(tmp_path / "ckpt", dtype=torch.float32)


def test_resolve_dtype_names():
    assert resolve_dtype("bf16") is resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("fp16") is resolve_dtype("half") is torch.float16
    assert resolve_dtype("fp32") is resolve_dtype("float") is torch.float32
    assert resolve_dtype("float64") is torch.float64  # any floating-point torch dtype name
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("auto") == "auto" and resolve_dtype(None) is None
    for bad in ("int8", "int3", "no_such_dtype"):
        with pytest.raises(ValueError, match="unknown dtype"):
            resolve_dtype(bad)


def test_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        find_weight_files(tmp_path / "nope")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="never unpickles"):
        find_weight_files(tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="do not exist"):
        find_weight_files(tmp_path / "pickled")


def test_quantization_config(monkeypatch):
    assert bitsandbytes_config() is None
    with pytest.raises(ValueError, match="one of"):
        bitsandbytes_config(load_in_8bit=True, load_in_4bit=True)
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"medrega-toolkit\[quant\]"):
        bitsandbytes_config(load_in_4bit=True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes"
                        else real_find_spec(name, *a))
    config = bitsandbytes_config(load_in_4bit=True)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert set(config.llm_int8_skip_modules) == {"vision_model", "mlp1", "lm_head"}
    assert bitsandbytes_config(load_in_8bit=True).load_in_8bit


def test_offloaded_weights_on_meta_device_still_run(tmp_path, tiny_model, tiny_tokenizer):
    """device_map with offloading keeps some weights on the meta device (accelerate loads them per call): the model
    must not try to move inputs to those weights' device (the GPU CPU-offload failure this reproduces)."""
    tiny_model.save_pretrained(tmp_path / "ckpt")
    device_map = {"vision_model.embeddings": "disk", "vision_model.encoder": "cpu", "mlp1": "disk",
                  "language_model.model.embed_tokens": "disk", "language_model.model.layers": "cpu",
                  "language_model.model.norm": "cpu", "language_model.model.rotary_emb": "cpu",
                  "language_model.lm_head": "disk"}
    model = load_pretrained(tmp_path / "ckpt", dtype=torch.float32, device_map=device_map,
                            offload_folder=str(tmp_path / "offload"))
    assert any(p.is_meta for p in model.parameters())
    model.img_context_token_id = tiny_model.img_context_token_id
    pixel_values = torch.randn(1, 3, 56, 56)
    ids = torch.randint(10, 900, (1, 12))
    ids[0, 2:6] = tiny_model.img_context_token_id
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixel_values, input_ids=ids).logits,
                                   tiny_model(pixel_values=pixel_values, input_ids=ids).logits)
    gen = dict(max_new_tokens=4, do_sample=False)
    assert model.chat(tiny_tokenizer, pixel_values, "Where is the liver?", gen) == tiny_model.chat(
        tiny_tokenizer, pixel_values, "Where is the liver?", gen)


def test_weight_dtype_int8_quantises_the_language_model_only(tmp_path, tiny_model, tiny_tokenizer):
    """load_pretrained(weight_dtype="int8"): every language-model linear but the LM head becomes an Int8Linear (int8
    weight, fp32 row scales), the ViT and projector keep float weights, logits stay within 5% of the float model's
    largest logit; contradictory options are refused."""
    from internvl.ops.int8_weights import Int8Linear

    tiny_model.save_pretrained(tmp_path / "ckpt")
    model = load_pretrained(tmp_path / "ckpt", dtype=torch.float32, weight_dtype="int8")
    lm = model.language_model
    assert type(lm.model.layers[0].self_attn.q_proj) is Int8Linear and lm.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    assert type(lm.lm_head) is torch.nn.Linear and type(model.mlp1[1]) is torch.nn.Linear
    assert not any(type(m) is Int8Linear for m in model.vision_model.modules())
    ids = torch.randint(0, len(tiny_tokenizer), (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_model.language_model(input_ids=ids).logits
        out = lm(input_ids=ids).logits
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    with pytest.raises(ValueError, match="pick one"):
        load_pretrained(tmp_path / "ckpt", weight_dtype="int8", load_in_8bit=True)
    with pytest.raises(ValueError, match="one device"):
        load_pretrained(tmp_path / "ckpt", weight_dtype="int8", device_map="auto")
    with pytest.raises(ValueError, match="weight_dtype"):
        load_pretrained(tmp_path / "ckpt", weight_dtype="int4")
