"""Divergence guard: a non-finite loss or gradient never passes silently, and a non-finite model is never saved.

The check reuses the gradient norm the trainer's clipping already computes and the loss it already accumulates on the
device: one tiny tensor read once per optimizer step (`StepGuard.check_step`), nothing per micro-batch.
`--on_nonfinite stop` raises `NonFiniteError` naming the step and the batch's records (`FILE:LINE`); `skip` drops the
step's update and its loss from the logged average, up to `--max_nonfinite_steps` (not with DeepSpeed, whose engine
steps inside `backward`). `assert_finite_model` checks every parameter (this rank's shard) before anything is saved.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

logger = logging.getLogger("internvl.train")


class NonFiniteError(RuntimeError):
    """Training diverged: a non-finite loss or gradient norm, or a non-finite parameter before a save."""


class StepGuard:
    """Per-optimizer-step finiteness check of the loss and the (already computed) gradient norm.

    `policy` and `max_skipped` are `--on_nonfinite` / `--max_nonfinite_steps` (checked by the argument parser).
    `describe` turns a dataset index into a record name (`FILE:LINE id=...`). Call `note_batch` per micro-batch,
    `check_step` once per optimizer step. `check_grad_norm=False` (fp16: the loss scaler skips overflowing steps
    itself) checks the loss only.
    """

    def __init__(self, policy: str = "stop", max_skipped: int = 10,
                 describe: Callable[[int], str] | None = None, check_grad_norm: bool = True) -> None:
        self.policy = policy
        self.max_skipped = max_skipped
        self.check_grad_norm = check_grad_norm
        self.describe = describe or (lambda index: f"sample #{index}")
        self.skipped_steps: list[int] = []
        self.skip_next_step = False
        self._indices: list[torch.Tensor] = []
        self._loss_before: torch.Tensor | None = None

    def note_batch(self, sample_index: torch.Tensor | None, tr_loss: torch.Tensor | None) -> None:
        """Remember the samples of a micro-batch; at the first micro-batch of a step, snapshot the running loss so a
        skipped step can be taken out of the logged average."""
        if not self._indices and tr_loss is not None and self.policy == "skip":
            self._loss_before = tr_loss.detach().clone()
        if sample_index is not None:
            self._indices.append(sample_index.detach().reshape(-1).cpu())

    def batch_records(self, limit: int = 20) -> str:
        """Readable names of the records in the current optimizer step (all micro-batches of this rank)."""
        if not self._indices:
            return "unknown (the batches carry no sample index)"
        indices = torch.cat(self._indices).tolist()
        names = [self.describe(int(i)) for i in indices[:limit]]
        more = f" and {len(indices) - limit} more" if len(indices) > limit else ""
        return ", ".join(names) + more

    def check_step(self, step: int, grad_norm: Any, tr_loss: torch.Tensor | None, world_size: int = 1) -> bool:
        """One host read of [loss finite, grad norm finite] (all ranks). Returns True if the step may go on; False if
        it must be skipped (skip policy); raises `NonFiniteError` otherwise. `step` is the 1-based optimizer step."""
        flags = self._flags(grad_norm if self.check_grad_norm else None, tr_loss)
        if world_size > 1 and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        loss_ok, grad_ok = (bool(x) for x in flags.tolist())
        if loss_ok and grad_ok:
            self._reset()
            return True
        what = " and ".join(n for n, ok in (("loss", loss_ok), ("gradient norm", grad_ok)) if not ok)
        records = self.batch_records()
        if self.policy == "skip" and len(self.skipped_steps) < self.max_skipped:
            self.skipped_steps.append(step)
            logger.warning("optimizer step %d: non-finite %s; step skipped (%d of at most %d). "
                           "Records of this rank: %s", step, what, len(self.skipped_steps), self.max_skipped, records)
            if tr_loss is not None and self._loss_before is not None:
                tr_loss.copy_(self._loss_before)  # leave the NaN out of the logged loss
            self._reset()
            return False
        limit = (f" after {len(self.skipped_steps)} skipped steps (limit --max_nonfinite_steps {self.max_skipped})"
                 if self.policy == "skip" else "")
        raise NonFiniteError(
            f"optimizer step {step}: non-finite {what}{limit}; training stopped before this step's update, and no "
            f"checkpoint or model was saved from it. Records in this step's batch (this rank): {records}. Lower the "
            "learning rate, check these records, or pass --on_nonfinite skip")

    def window_loss(self, loss: float, step: int, previous_log_step: int) -> float:
        """The logged mean loss of steps (previous_log_step, step] without the skipped steps, whose loss was taken out
        of the running sum: the mean over the steps that trained, or NaN if every step of the window was skipped."""
        skipped = sum(previous_log_step < s <= step for s in self.skipped_steps)
        steps = step - previous_log_step
        if not skipped or steps <= 0:
            return loss
        return loss * steps / (steps - skipped) if steps > skipped else float("nan")

    @staticmethod
    def _flags(grad_norm: Any, tr_loss: torch.Tensor | None) -> torch.Tensor:
        """[loss finite, grad norm finite] as int32 on the loss's device; None counts as finite."""
        if isinstance(grad_norm, DTensor):  # FSDP2's clipping returns the norm as a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        device = tr_loss.device if tr_loss is not None else torch.device("cpu")
        values = [0.0 if v is None else v for v in (tr_loss, grad_norm)]
        return torch.stack([torch.isfinite(torch.as_tensor(v)).all().to(device) for v in values]).to(torch.int32)

    def _reset(self) -> None:
        self._indices = []
        self._loss_before = None


def guard_optimizer_step(optimizer: Any, guard: StepGuard) -> None:
    """Make `optimizer.step()` a no-op while `guard.skip_next_step` is set (the skip policy); idempotent."""
    if getattr(optimizer, "_medrega_guarded", False):
        return
    inner = optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        if guard.skip_next_step:
            guard.skip_next_step = False
            return None
        return inner(*args, **kwargs)

    optimizer.step = step
    optimizer._medrega_guarded = True


def _finite(param: torch.Tensor) -> torch.Tensor:
    """Whether this rank's data of `param` (its ZeRO-3 partition `ds_tensor`, its FSDP2 shard, or itself) is finite."""
    data = getattr(param, "ds_tensor", param)
    data = data.to_local() if isinstance(data, DTensor) else data
    if not (data.numel() and data.is_floating_point()):
        return torch.tensor(True, device=data.device)
    return torch.isfinite(data.detach()).all()


def assert_finite_model(model: nn.Module, what: str, world_size: int = 1) -> None:
    """Raise `NonFiniteError` naming up to 5 parameters if any holds NaN/inf (checked over all ranks)."""
    named = list(model.named_parameters())
    if not named:
        return
    flags = [_finite(param) for _, param in named]
    ok = torch.stack([f.to(flags[0].device) for f in flags])
    all_ok = ok.all().to(torch.int32).reshape(1)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(all_ok, op=dist.ReduceOp.MIN)
    if bool(all_ok.item()):
        return
    bad = [named[i][0] for i in torch.nonzero(~ok).flatten().tolist()[:5]]
    raise NonFiniteError(f"refusing to save {what}: non-finite parameters "
                         f"({', '.join(bad) if bad else 'on another rank'})")
