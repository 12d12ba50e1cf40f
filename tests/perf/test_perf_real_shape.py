"""The benchmark's real-shape section on the tiny preset (CPU): bf16/fp32 build through batch_chat, and the
LLM.int8 variant (bitsandbytes) quantising exactly the loader's module set."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from internvl.bench.build import build_ours
from internvl.bench.real_shape import quantize_int8_, run_real_shape
from internvl.model import load_preset

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
