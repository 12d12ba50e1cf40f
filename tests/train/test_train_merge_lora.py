"""LoRA on the tiny InternVL preset: adapters saved in PEFT format, merged by `medrega-merge-lora` (internvl.train.merge_lora) into an
original-layout checkpoint that loads with zero missing keys and reproduces the adapter model's logits."""
from __future__ import annotations

import json

import torch

from internvl.constants import IMG_CONTEXT_TOKEN
from internvl.model import InternVLChatModel
from internvl.train.arguments import DataTrainingArguments, ModelArguments
from internvl.train.build import build_model_and_tokenizer
from internvl.train.lora import save_lora_run
from internvl.train.merge_lora import main as merge_main

def _inputs(model, tokenizer):
    ctx = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    text = tokenizer("<|im_start|>user\nwhere is the liver?<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[ctx] * model.num_image_token + text])
    pixel_values = torch.randn(1, 3, model.config.image_size, model.config.image_size,
                               generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "pixel_values": pixel_values, "image_flags": torch.ones(1, dtype=torch.long)}


def test_merge_lora_gives_original_layout_and_same_logits(tmp_path, tiny_tokenizer_dir):
    torch.manual_seed(0)
    model_args = ModelArguments(preset="tiny", tokenizer_path=str(tiny_tokenizer_dir), use_llm_lora=4,
                                use_backbone_lora=2, freeze_backbone=True, freeze_llm=True, freeze_mlp=False,
                                lora_dropout=0.0, grad_checkpoint=False)
    data_args = DataTrainingArguments(meta_path="unused.json")
    built = build_model_and_tokenizer(model_args, data_args, base_save_dir=tmp_path / "base")
    model, tokenizer = built.model.eval(), built.tokenizer
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("language_model" in n and "lora_" in n for n in trainable)
    assert any("vision_model" in n and "lora_" in n for n in trainable)
    assert all("lora_" in n or n.startswith("mlp1.") for n in trainable)
    with torch.no_grad():  # stand-in for training: non-zero adapters and a changed projector
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    inputs = _inputs(model, tokenizer)
    with torch.no_grad():
        expected = model(**inputs).logits

    run = tmp_path / "run"
    save_lora_run(model, run, base_model=built.base_model_dir)
    tokenizer.save_pretrained(str(run))
    for part in ("language_model", "vision_model"):
        cfg = json.loads((run / "adapters" / part / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == (4 if part == "language_model" else 2)
        assert cfg["lora_alpha"] == 2 * cfg["r"]
        assert (run / "adapters" / part / "adapter_model.safetensors").is_file()

    merged_dir = tmp_path / "merged"
    assert merge_main(["--run_dir", str(run), "--output_dir", str(merged_dir), "--verify"]) == 0
    merged, info = InternVLChatModel.from_pretrained(str(merged_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    base_keys = set(InternVLChatModel.from_pretrained(str(tmp_path / "base")).state_dict())
    assert set(merged.state_dict()) == base_keys
    assert merged.config.use_llm_lora == 0 and merged.config.use_backbone_lora == 0
    merged.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    with torch.no_grad():
        got = merged.eval()(**inputs).logits
    assert (got - expected).abs().max() <= 1e-4
    base = InternVLChatModel.from_pretrained(str(tmp_path / "base")).eval()
    base.img_context_token_id = merged.img_context_token_id
    with torch.no_grad():
        assert (base(**inputs).logits - expected).abs().max() > 1e-3  # the adapters did change the model


def test_merge_lora_rejects_a_non_lora_dir(tmp_path, capsys):
    assert merge_main(["--run_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")]) == 2
    assert "lora_run.json" in capsys.readouterr().err
