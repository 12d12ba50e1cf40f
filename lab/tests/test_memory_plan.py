"""lab.memory_plan: parameter counts from the meta-device build agree with a real model and a real PEFT wrap, and the
ZeRO-3 model-state figures follow DeepSpeed's estimator (18 bytes per trainable parameter over all GPUs); the QLoRA
rows' NF4 bytes match a quantised bitsandbytes layer."""
from __future__ import annotations

import bitsandbytes as bnb
import torch

from internvl.model import InternVLChatModel, load_preset
from internvl.train.lora import wrap_llm_lora
from lab.memory_plan import NF4_BYTES, GiB, count_params, main, plan_row, qlora_row


def test_counts_match_a_real_model_and_lora_wrap():
    counts, config = count_params("tiny", lora_rank=4)
    torch.manual_seed(0)
    model = InternVLChatModel(load_preset("tiny"))
    assert counts.llm == sum(p.numel() for p in model.language_model.parameters())
    assert counts.total == sum(p.numel() for p in model.parameters())
    wrap_llm_lora(model, r=4)
    assert counts.lora_llm == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_plan_rows_follow_the_estimator_and_scale_with_gpus(capsys):
    counts, config = count_params("medrega", lora_rank=16)
    assert 39e9 < counts.total < 41e9  # MedRegA is 40.2B parameters
    full8 = plan_row(counts, config, "full", 8, 8, 2048, 1)
    full16 = plan_row(counts, config, "full", 16, 8, 2048, 1)
    expected = (4 * counts.largest_layer + int(18 * counts.llm / 8)) / GiB
    assert abs(full8["states_GiB"] - expected) < 1e-6
    assert full16["states_GiB"] < full8["states_GiB"] and full16["activations_GiB"] == full8["activations_GiB"]
    lora8 = plan_row(counts, config, "lora", 8, 8, 2048, 1)
    assert lora8["total_GiB"] < full8["total_GiB"]
    assert main(["--gpus", "8", "16"]) == 0
    out = capsys.readouterr().out
    assert out.count("| lora |") == 2 and out.count("| full |") == 2


def test_memory_plan_nf4_bytes_match_a_quantised_layer_and_qlora_rows_print(capsys):
    layer = bnb.nn.Linear4bit(1024, 4096, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                              quant_type="nf4").to("cpu")  # quantised on the move, as in training
    state = layer.weight.quant_state
    stored = (layer.weight.numel() + state.absmax.numel() * state.absmax.element_size()
              + state.state2.absmax.numel() * state.state2.absmax.element_size())
    assert abs(stored / (1024 * 4096) - NF4_BYTES[True]) < 1e-3
    counts, config = count_params("medrega", lora_rank=16)
    assert 33e9 < counts.llm_linear < counts.llm and counts.largest_linear == 7168 * 20480
    rows = [qlora_row(counts, config, 2048, mb) for mb in (1, 4)]
    assert rows[0]["frozen_GiB"] == rows[1]["frozen_GiB"] and rows[0]["total_GiB"] < rows[1]["total_GiB"]
    assert abs(rows[0]["states_GiB"] * 2**30 - 16 * counts.lora_llm) < 1
    assert main(["--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "| qlora | 1 |" in out and "| qlora | 4 |" in out
