"""Shared check of the training tests: the tiny model on the square task, one trainer loss step's loss and parameter
gradients, and their comparison between a plain and a fast path (same tolerances everywhere)."""
from __future__ import annotations

from pathlib import Path

import torch

from internvl.data.dataset import build_training_dataset
from internvl.train.arguments import (
    DataTrainingArguments,
    MedRegTrainingArguments,
    ModelArguments,
)
from internvl.train.build import build_model_and_tokenizer

from internvl.testing.square_task import write_square_dataset


def tiny_square_setup(tmp_path: Path, tokenizer_dir: Path, *, seed: int, grad_checkpoint: bool):
    """The tiny preset (torch seed 0) with 4 square-task items (dataset seed `seed`) and CPU training arguments;
    returns (built model and tokenizer, the 4 encoded items, MedRegTrainingArguments)."""
    meta = write_square_dataset(tmp_path / "data", n=4, seed=seed)
    torch.manual_seed(0)
    built = build_model_and_tokenizer(
        ModelArguments(preset="tiny", tokenizer_path=str(tokenizer_dir), grad_checkpoint=grad_checkpoint),
        DataTrainingArguments(meta_path=str(meta)))
    dataset = build_training_dataset(meta, tokenizer=built.tokenizer, config=built.model.config)
    args = MedRegTrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none")
    return built, [dataset[i] for i in range(4)], args


def loss_and_grads(trainer, model, batch: dict, num_items: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`trainer.compute_loss` on `batch`, backward; returns (loss, {parameter name: gradient})."""
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(num_items))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(plain: tuple, fast: tuple) -> None:
    """Loss within 1e-5 relative and every gradient within 1e-4 relative of the plain path's, same parameter set."""
    (plain_loss, plain_grads), (fast_loss, fast_grads) = plain, fast
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == fast_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
