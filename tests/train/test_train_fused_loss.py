"""The trainer's fused LM-head loss (head + CE on supervised positions only, chunked) gives the same loss and
gradients as the plain full-logits loss on the tiny preset, with and without packing weights, and is skipped when the
head is wrapped."""
from __future__ import annotations

import copy

import pytest

from internvl.data.collate import PackedCollator, pad_collate
from internvl.train.arguments import (
    DataTrainingArguments,
    MedRegTrainingArguments,
    ModelArguments,
)
from internvl.train.build import build_model_and_tokenizer
from internvl.train.trainer import MedRegTrainer

from .loss_grads import assert_same_loss_and_grads, loss_and_grads, tiny_square_setup


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed-square"])
def test_fused_loss_matches_plain(tmp_path, tiny_tokenizer_dir, packed):
    built, items, args = tiny_square_setup(tmp_path, tiny_tokenizer_dir, seed=5, grad_checkpoint=False)
    batch = PackedCollator(max_packed_tokens=512, loss_reduction="square")(items) if packed else pad_collate(items)
    results = []
    for fused in (False, True):
        model = copy.deepcopy(built.model).train()
        trainer = MedRegTrainer(model=model, args=args, fused_lm_loss=fused)
        assert (trainer._fused_head() is not None) == fused
        results.append(loss_and_grads(trainer, model, batch, 17.0))
    assert_same_loss_and_grads(*results)


def test_fused_loss_is_skipped_for_a_wrapped_head(tmp_path, tiny_tokenizer_dir):
    from peft import LoraConfig, get_peft_model

    built = build_model_and_tokenizer(
        ModelArguments(preset="tiny", tokenizer_path=str(tiny_tokenizer_dir), grad_checkpoint=False),
        DataTrainingArguments(meta_path="unused.json"))
    built.model.language_model = get_peft_model(built.model.language_model,
                                                LoraConfig(r=2, target_modules=["lm_head"]))
    trainer = MedRegTrainer(model=built.model, fused_lm_loss=True,
                            args=MedRegTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    assert trainer._fused_head() is None


def test_a_zero3_partitioned_head_is_used_unless_deepcompile_removed_its_hooks(tmp_path, tiny_tokenizer_dir):
    """A ZeRO-3-partitioned head (weight with `ds_id`) is used through its own forward (its hooks gather it); under
    DeepCompile the hooks are gone (gathers live inside the compiled model only), so the logits path is taken."""
    built = build_model_and_tokenizer(
        ModelArguments(preset="tiny", tokenizer_path=str(tiny_tokenizer_dir), grad_checkpoint=False),
        DataTrainingArguments(meta_path="unused.json"))
    head = built.model.language_model.get_output_embeddings()
    head.weight.ds_id = 7  # what DeepSpeed's partitioning marks
    trainer = MedRegTrainer(model=built.model, fused_lm_loss=True,
                            args=MedRegTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    assert trainer._fused_head() is head

    class Engine:  # the DeepSpeed engine's public query
        def is_deepcompile_active(self) -> bool:
            return True

    trainer.model_wrapped = Engine()
    assert trainer._fused_head() is None


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-mixed"])
def test_fused_head_runs_under_the_accelerators_autocast(tmp_path, tiny_tokenizer_dir, monkeypatch, bf16):
    """The fused head runs outside the model's autocast-wrapped forward; under bf16 mixed precision (fp32 weights,
    no DeepSpeed) it must still autocast, or its matmuls run in fp32 (measured: half the step on a Yi-34B head)."""
    import torch

    from internvl.ops import train_speedups

    built, items, _ = tiny_square_setup(tmp_path, tiny_tokenizer_dir, seed=5, grad_checkpoint=False)
    args = MedRegTrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", bf16=bf16)
    seen: list[bool] = []
    original = train_speedups.causal_lm_loss

    def recording(*a, **kw):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return original(*a, **kw)

    monkeypatch.setattr(train_speedups, "causal_lm_loss", recording)
    model = built.model.train()
    trainer = MedRegTrainer(model=model, args=args, fused_lm_loss=True)
    loss = trainer.compute_loss(trainer.accelerator.prepare_model(model), pad_collate(items), num_items_in_batch=17.0)
    assert seen == [bf16] and torch.isfinite(loss)
