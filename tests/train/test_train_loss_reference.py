"""The one training loss (`internvl.ops.cross_entropy.causal_lm_loss`) against a plain reference written here from
`F.cross_entropy`: over an optimizer step of two gradient-accumulation micro-batches, with and without per-token loss
weights (packing's "square" averaging), the trainer's plain and fused paths and the model's own `forward(labels=...)`
give the reference's loss (the sum of the micro-batch losses) and the reference's parameter gradients."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from internvl.data.collate import PackedCollator, pad_collate
from internvl.train.trainer import TRAINER_ONLY_KEYS, MedRegTrainer

from .loss_grads import tiny_square_setup


def reference_step_loss(model, micro_batches: list[dict]) -> torch.Tensor:
    """sum over the step of w * CE(next token) / sum over the step of w (w = 1 without loss weights), from full logits."""
    total = torch.zeros(())
    weight_sum = torch.zeros(())
    for batch in micro_batches:
        logits = model(**{k: v for k, v in batch.items() if k not in TRAINER_ONLY_KEYS}).logits
        labels = batch["labels"][:, 1:]
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             ignore_index=-100, reduction="none")
        supervised = (labels.reshape(-1) != -100).float()
        weights = supervised if "loss_weight" not in batch else batch["loss_weight"][:, 1:].reshape(-1) * supervised
        total = total + (ce * weights).sum()
        weight_sum = weight_sum + weights.sum()
    return total / weight_sum


def step_loss_and_grads(model, loss_of_micro_batch, micro_batches) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulate the micro-batch losses' gradients as the Trainer does; returns (summed loss, gradients)."""
    model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for batch in micro_batches:
        loss = loss_of_micro_batch(model, batch)
        loss.backward()
        total = total + loss.detach()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def divisor(micro_batches: list[dict]) -> float:
    """The step's divisor computed here: supervised next-token positions, or their summed weights."""
    out = 0.0
    for batch in micro_batches:
        supervised = (batch["labels"][:, 1:] != -100).float()
        out += float((supervised * batch["loss_weight"][:, 1:]).sum() if "loss_weight" in batch else supervised.sum())
    return out


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed-square"])
def test_trainer_and_model_losses_equal_the_plain_reference_over_accumulation(tmp_path, tiny_tokenizer_dir, packed):
    built, items, args = tiny_square_setup(tmp_path, tiny_tokenizer_dir, seed=3, grad_checkpoint=False)
    collate = PackedCollator(max_packed_tokens=512, loss_reduction="square") if packed else pad_collate
    micro_batches = [collate(items[:1]), collate(items[1:])]  # unequal micro-batches: token counts differ
    num_items = divisor(micro_batches)
    base = built.model.train()

    ref_model = copy.deepcopy(base)
    ref_model.zero_grad(set_to_none=True)
    ref_loss = reference_step_loss(ref_model, micro_batches)
    ref_loss.backward()
    reference = (ref_loss.detach(), {n: p.grad.clone() for n, p in ref_model.named_parameters() if p.grad is not None})
    assert trainer_divisor(args, base, micro_batches) == pytest.approx(num_items)

    candidates = {}
    for fused in (False, True):
        trainer = MedRegTrainer(model=copy.deepcopy(base), args=args, fused_lm_loss=fused)
        assert (trainer._fused_head() is not None) == fused
        candidates[f"trainer fused={fused}"] = step_loss_and_grads(
            trainer.model, lambda m, b, t=trainer: t.compute_loss(m, dict(b), num_items_in_batch=num_items),
            micro_batches)

    def model_loss(m, b):
        inputs = {k: v for k, v in b.items() if k != "num_samples"}
        return m(**inputs, num_items_in_batch=torch.tensor(num_items)).loss

    candidates["model.forward"] = step_loss_and_grads(copy.deepcopy(base), model_loss, micro_batches)
    ref_loss, ref_grads = reference
    for name, (loss, grads) in candidates.items():
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=name)
        assert grads.keys() == ref_grads.keys(), name
        for param in ref_grads:
            torch.testing.assert_close(grads[param], ref_grads[param], rtol=1e-4, atol=1e-6, msg=f"{name}: {param}")


def trainer_divisor(args, model, micro_batches) -> float:
    """What the trainer counts for the step (its `step_loss_items` hook)."""
    trainer = MedRegTrainer(model=model, args=args)
    return float(trainer.step_loss_items(micro_batches, torch.device("cpu")))
