"""Model building for training: freezing flags per module, and a checkpoint trained at another tile size
(`--force_image_size`) gets its ViT position grid resized once and the matching number of image tokens."""
from __future__ import annotations

import torch

from internvl.constants import IMG_CONTEXT_TOKEN
from internvl.train.arguments import DataTrainingArguments, ModelArguments
from internvl.train.build import build_model_and_tokenizer


def _trainable(model) -> set[str]:
    return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}


def test_freezing_flags(tiny_tokenizer_dir):
    data = DataTrainingArguments(meta_path="unused.json")
    tok = str(tiny_tokenizer_dir)
    stage1 = build_model_and_tokenizer(ModelArguments(preset="tiny", tokenizer_path=tok, freeze_llm=True,
                                                      freeze_backbone=True, grad_checkpoint=False), data).model
    assert _trainable(stage1) == {"mlp1"}
    partial = build_model_and_tokenizer(ModelArguments(preset="tiny", tokenizer_path=tok, freeze_backbone=True,
                                                       unfreeze_vit_layers=-1, freeze_mlp=True,
                                                       grad_checkpoint=False), data).model
    vit = {n for n, p in partial.vision_model.named_parameters() if p.requires_grad}
    assert vit and all(n.startswith("encoder.layers.1.") for n in vit)  # the last of 2 blocks only
    assert not any(p.requires_grad for p in partial.mlp1.parameters())
    head = build_model_and_tokenizer(ModelArguments(preset="tiny", tokenizer_path=tok, freeze_llm=True,
                                                    freeze_backbone=True, freeze_mlp=True, unfreeze_lm_head=True,
                                                    grad_checkpoint=False), data).model
    assert {n for n, p in head.named_parameters() if p.requires_grad} == {"language_model.lm_head.weight"}


def test_force_image_size_resizes_a_loaded_checkpoint(tmp_path, tiny_tokenizer_dir):
    base = build_model_and_tokenizer(ModelArguments(preset="tiny", tokenizer_path=str(tiny_tokenizer_dir),
                                                    grad_checkpoint=False),
                                     DataTrainingArguments(meta_path="unused.json"))
    base.model.save_pretrained(str(tmp_path / "ckpt"))
    base.tokenizer.save_pretrained(str(tmp_path / "ckpt"))
    assert base.model.num_image_token == 4  # 56 px tiles
    built = build_model_and_tokenizer(ModelArguments(model_name_or_path=str(tmp_path / "ckpt"), grad_checkpoint=False),
                                      DataTrainingArguments(meta_path="unused.json", force_image_size=28))
    model = built.model.eval()
    assert model.config.image_size == 28 and model.num_image_token == 1 and model.config.num_image_token == 1
    assert model.vision_model.embeddings.position_embedding.shape[1] == 1 + 2 * 2
    ctx = built.tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    out = model(pixel_values=torch.randn(1, 3, 28, 28), input_ids=torch.tensor([[ctx, 5, 6]]),
                image_flags=torch.ones(1, dtype=torch.long))
    assert torch.isfinite(out.logits).all()
