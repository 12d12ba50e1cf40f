"""Model building when a ZeRO-3 DeepSpeed config is active (as under `--deepspeed zero_stage3_config.json`).

A GPU run showed that building a preset inside transformers' automatic `zero.Init` partitions only the LLM and then
the embedding resize reads `shape == (0,)` and writes NaN rows. The preset must be built whole, the ZeRO-3 flag must be
restored afterwards, and the embeddings must be finite."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

from internvl.train.arguments import DataTrainingArguments, ModelArguments
from internvl.train.build import build_model_and_tokenizer

SHELL = Path(__file__).resolve().parents[2] / "src" / "shell"


def test_preset_is_built_whole_under_zero3(tmp_path, tiny_tokenizer_dir):
    config = json.loads((SHELL / "zero_stage3_config.json").read_text())
    config.update(train_micro_batch_size_per_gpu=1, train_batch_size=1, gradient_accumulation_steps=1)
    keep_alive = HfDeepSpeedConfig(config)  # transformers holds only a weak reference
    assert is_deepspeed_zero3_enabled()
    built = build_model_and_tokenizer(
        ModelArguments(preset="tiny", tokenizer_path=str(tiny_tokenizer_dir), use_llm_lora=4, freeze_llm=True,
                       grad_checkpoint=False),
        DataTrainingArguments(meta_path="unused.json"), base_save_dir=tmp_path / "base")
    assert is_deepspeed_zero3_enabled()  # restored for the Trainer
    params = dict(built.model.named_parameters())
    assert not any(hasattr(p, "ds_id") for p in params.values())  # nothing partitioned at construction
    embed = built.model.get_input_embeddings().weight
    assert embed.shape == (len(built.tokenizer), built.model.config.llm_config.hidden_size)
    assert all(torch.isfinite(p).all() for p in params.values())
    assert built.total_params == sum(p.numel() for p in params.values())
    del keep_alive
