"""The real-shape section's weight-only int8 case (`--real-quant int8wo`) on the tiny preset (CPU): built layer by
layer with exactly the loader's module set in int8, chats through batch_chat, and reports the weight-bytes floor."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from internvl.model import load_preset
from internvl.ops.int8_weights import Int8Linear
from lab.bench.build import build_ours
from lab.bench.flops import decode_weight_bytes
from lab.bench.real_shape import build_int8wo, run_real_shape


def test_build_int8wo_quantises_the_llm_body_only():
    model = build_int8wo(load_preset("tiny"), device="cpu", dtype=torch.float32)
    int8 = {n for n, m in model.named_modules() if type(m) is Int8Linear}
    body = {n for n, m in model.named_modules() if n.startswith("language_model.model.layers.")
            and (type(m) is Int8Linear or type(m) is nn.Linear)}
    assert int8 == body and len(int8) == 7 * model.config.llm_config.num_hidden_layers
    assert type(model.language_model.lm_head) is nn.Linear
    assert all(t.device.type == "cpu" for t in model.parameters())
    layer = model.language_model.model.layers[0]
    assert layer.self_attn.q_proj.weight.dtype == torch.int8 and layer.input_layernorm.weight.eq(1).all()
    rotary = model.language_model.model.rotary_emb  # RoPE tables recomputed, not left as empty storage
    assert torch.equal(rotary.inv_freq, type(rotary)(rotary.config).inv_freq)
    # an int8 body reads about a quarter of the fp32 weight bytes per step (+ scales, norms and the float LM head)
    assert decode_weight_bytes(model) < decode_weight_bytes(build_ours(load_preset("tiny"), device="cpu",
                                                                      dtype=torch.float32))


def test_run_real_shape_int8wo_on_tiny_cpu_reports_the_floor():
    res = run_real_shape(batches=(1, 2), new_tokens=3, device="cpu", preset="tiny", dtype=torch.float32,
                         quantize="int8wo", copy_bytes_per_s=1e10)
    assert res["quantize"] == "int8wo" and res["quantized_linears"] == 7 * load_preset("tiny").llm_config.num_hidden_layers
    assert res["floor_ms"] == pytest.approx(res["decode_weight_bytes"] / 1e10 * 1e3)
    one, two = res["cases"]
    assert one["floor_fraction"] == pytest.approx(res["floor_ms"] / one["decode_ms_per_step"])
    assert "floor_ms" not in two and all(c["tokens_per_s"] > 0 and len(c["answer_chars"]) == c["batch"]
                                         for c in res["cases"])
