"""The benchmark's real-shape section on the tiny preset (CPU): bf16/fp32 build through batch_chat, and the
LLM.int8 variant (bitsandbytes) quantising exactly the loader's module set."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from internvl.model import load_preset
from internvl.model.loading import build_on_meta
from lab.bench.build import build_ours, build_ours_sharded, shard_device_map
from lab.bench.real_shape import bench_tokenizer, quantize_int8_, run_real_shape

bnb = pytest.importorskip("bitsandbytes")


def _llm_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("language_model.")
            and not n.endswith("lm_head")]


def test_quantize_int8_replaces_exactly_the_llm_body_linears():
    model = build_ours(load_preset("tiny"), device="cpu", dtype=torch.float32).eval()
    expected = _llm_linears(model)
    vit_and_projector = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in expected]
    count = quantize_int8_(model)
    assert count == len(expected) > 0
    for name in expected:
        module = model.get_submodule(name)
        assert isinstance(module, bnb.nn.Linear8bitLt), name
        assert module.weight.dtype == torch.int8
    for name in vit_and_projector:  # vision_model, mlp1 and lm_head stay in full precision
        assert type(model.get_submodule(name)) is nn.Linear, name


def test_int8_linear_matches_full_precision_within_quantisation_error():
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(256, 128, bias=True))
    holder[0].bias.data.normal_()
    x = torch.randn(4, 256)
    ref = holder(x)
    assert quantize_int8_(holder, skip_modules=()) == 1
    out = holder(x)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel  # int8 absmax per row: ~0.4% typical error
    assert rel > 0.0  # it really is quantised


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_run_real_shape_on_tiny_cpu(quantize):
    res = run_real_shape(batches=(1, 2), new_tokens=3, device="cpu", preset="tiny", dtype=torch.float32,
                         quantize=quantize)
    assert res["quantize"] == (quantize or "bf16")
    assert (res["quantized_linears"] > 0) == (quantize == "int8")
    assert [c["batch"] for c in res["cases"]] == [1, 2]
    for case in res["cases"]:
        assert case["tokens_per_s"] > 0 and case["ttft_ms"] > 0
        assert len(case["answer_chars"]) == case["batch"]


def test_run_real_shape_rejects_unknown_quantization():
    with pytest.raises(ValueError, match="quantize"):
        run_real_shape(device="cpu", preset="tiny", quantize="int4")


def test_sharded_build_places_every_module_per_map_and_chats():
    config = load_preset("tiny")
    auto = shard_device_map(build_on_meta(config).to(torch.float32), {"cpu": "1GiB"}, torch.float32)
    assert set(auto.values()) == {"cpu"}
    device_map = {"vision_model": "cpu", "mlp1": "cpu", "language_model.model.layers.0": "cpu", "language_model": "cpu"}
    model = build_ours_sharded(load_preset("tiny"), device_map, dtype=torch.float32).eval()
    assert all(p.device.type == "cpu" for p in model.parameters())
    weight = model.language_model.model.layers[0].mlp.gate_proj.weight
    assert 0.015 < float(weight.std()) < 0.025  # randomised, not left as empty storage
    with tempfile.TemporaryDirectory() as tmp:
        tok = bench_tokenizer(Path(tmp))
    size = config.force_image_size or config.vision_config.image_size
    answers = model.batch_chat(tok, torch.randn(2, 3, size, size), ["Which organ is shown?", "Is there pleural effusion?"],
                               generation_config={"max_new_tokens": 3, "do_sample": False})
    assert len(answers) == 2


def test_sharded_build_rejects_unplaced_modules():
    with pytest.raises(ValueError, match="unplaced"):
        build_ours_sharded(load_preset("tiny"), {"vision_model": "cpu"}, dtype=torch.float32)


def test_real_shape_devices_needs_that_many_gpus():
    with pytest.raises(RuntimeError, match="CUDA GPUs"):
        run_real_shape(device="cpu", preset="tiny", devices=2)
