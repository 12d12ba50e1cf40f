"""Weight-decay groups: the optimizer DeepSpeed builds from its config gets the same two groups as the Trainer's own
optimizer (decay for weights; none for norms and biases), for a full and a LoRA model."""
from __future__ import annotations

import pytest
import torch
from accelerate.utils import DummyOptim
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from internvl.model.modeling_intern_vit import InternRMSNorm

from internvl.train.arguments import DataTrainingArguments, MedRegTrainingArguments, ModelArguments
from internvl.train.build import build_model_and_tokenizer
from internvl.train.trainer import MedRegTrainer

NORM_CLASSES = (torch.nn.LayerNorm, LlamaRMSNorm, InternRMSNorm)


def _named_groups(model, groups) -> list[tuple[float, set[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted((g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in groups if g["params"])


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_deepspeed_placeholder_gets_the_trainer_groups(tmp_path, tiny_tokenizer_dir, lora):
    built = build_model_and_tokenizer(ModelArguments(preset="tiny", tokenizer_path=str(tiny_tokenizer_dir),
                                                     use_llm_lora=lora, grad_checkpoint=False),
                                      DataTrainingArguments(meta_path="unused.json"), base_save_dir=tmp_path / "b")
    model = built.model
    args = MedRegTrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, weight_decay=0.05, report_to="none")
    plain = MedRegTrainer(model=model, args=args)
    trainer_groups = _named_groups(model, plain.create_optimizer().param_groups)

    with_ds = MedRegTrainer(model=model, args=args)
    # what transformers' deepspeed_init hands over when the DeepSpeed config names an optimizer
    with_ds.optimizer = DummyOptim(params=[p for p in model.parameters() if p.requires_grad])
    assert with_ds.create_optimizer() is with_ds.optimizer
    assert _named_groups(model, with_ds.optimizer.params) == trainer_groups

    decay = dict(trainer_groups)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*decay.values()) == trainable
    norms = {f"{prefix}.{name}" for prefix, module in model.named_modules() if prefix
             and isinstance(module, NORM_CLASSES) for name, _ in module.named_parameters(
                 recurse=False)}
    no_decay = decay.get(0.0, set())
    assert no_decay == {n for n in trainable if n in norms or n.endswith(".bias")}
    if not lora:  # the full model has norms (ViT RMSNorm, LLM RMSNorm, the projector's LayerNorm) and biases
        assert any(".norm1." in n for n in no_decay) and "mlp1.0.weight" in no_decay
        assert "language_model.model.norm.weight" in no_decay and any(n.endswith(".bias") for n in no_decay)
