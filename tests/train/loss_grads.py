"""Shared check of the training tests: one trainer loss step's loss and parameter gradients, and their comparison
between a plain and a fast path (same tolerances everywhere)."""
from __future__ import annotations

import torch


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
