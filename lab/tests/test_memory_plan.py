"""memory_plan: parameter counts from the meta-device build agree with a real model and a real PEFT wrap, and the
ZeRO-3 model-state figures follow DeepSpeed's estimator (18 bytes per trainable parameter over all GPUs)."""
from __future__ import annotations

import torch

from internvl.model import InternVLChatModel, load_preset
from internvl.train.lora import wrap_llm_lora
from internvl.train.memory_plan import GiB, count_params, main, plan_row


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
