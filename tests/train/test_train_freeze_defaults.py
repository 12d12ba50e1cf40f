"""Freeze defaults under LoRA (only the adapters train unless a tower is unfrozen on purpose), the per-tower
trainable-parameter breakdown logged at the start of training, and the warning when LoRA runs beside a tower that
trains in full (`--use_llm_lora N --freeze_backbone False` trains the whole ViT too)."""
from __future__ import annotations

import logging

import pytest

from internvl.train.arguments import DataTrainingArguments, ModelArguments, parse_args
from internvl.train.build import build_model_and_tokenizer

BASE = ["--model_name_or_path", "ckpt", "--meta_path", "m.json", "--output_dir", "o", "--use_cpu", "True"]


@pytest.mark.parametrize("extra,expect", [
    ([], (False, False, False)),                                          # no LoRA: the original trainer's defaults
    (["--use_llm_lora", "8"], (True, True, True)),                        # LoRA: only the adapters
    (["--use_backbone_lora", "4"], (True, True, True)),
    (["--use_llm_lora", "8", "--freeze_backbone", "False"], (True, False, True)),   # explicit flags win
    (["--freeze_mlp", "True"], (False, False, True)),
])
def test_freeze_defaults_follow_lora(extra, expect):
    model_args, _, _ = parse_args(BASE + extra)
    assert (model_args.freeze_llm, model_args.freeze_backbone, model_args.freeze_mlp) == expect


def test_lora_alone_trains_only_the_adapters_and_logs_the_breakdown(tmp_path, tiny_tokenizer_dir, caplog):
    caplog.set_level(logging.INFO, logger="internvl.train.build")
    built = build_model_and_tokenizer(ModelArguments(preset="tiny", tokenizer_path=str(tiny_tokenizer_dir),
                                                     use_llm_lora=4, grad_checkpoint=False),
                                      DataTrainingArguments(meta_path="unused.json"), base_save_dir=tmp_path / "b")
    towers = built.trainable_by_tower
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert towers["lora"]["trainable"] == built.trainable_params > 0
    assert all(towers[t]["trainable"] == 0 for t in ("vision", "projector", "llm"))
    assert sum(t["total"] for t in towers.values()) == built.total_params == sum(
        p.numel() for p in built.model.parameters())
    assert "trainable parameters per tower" in caplog.text and "lora" in caplog.text
    assert "also train in full" not in caplog.text


def test_lora_beside_an_unfrozen_tower_warns(tmp_path, tiny_tokenizer_dir, caplog):
    caplog.set_level(logging.INFO, logger="internvl.train.build")
    built = build_model_and_tokenizer(ModelArguments(preset="tiny", tokenizer_path=str(tiny_tokenizer_dir),
                                                     use_llm_lora=4, freeze_backbone=False, grad_checkpoint=False),
                                      DataTrainingArguments(meta_path="unused.json"), base_save_dir=tmp_path / "b")
    towers = built.trainable_by_tower
    vit = sum(p.numel() for p in built.model.vision_model.parameters())
    assert towers["vision"]["trainable"] == vit and towers["projector"]["trainable"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "vision" in warnings[0] and "--freeze_backbone True" in warnings[0]
    assert "projector" not in warnings[0]
