"""Divergence guard: a non-finite loss or gradient never passes silently, and a non-finite model is never saved.

The check reuses what each optimizer step already computes: the trainer's gradient clipping returns the global
gradient norm (synchronised over ranks), and the loss of the step is accumulated on the device anyway. Both go into one
tiny tensor that is read once per optimizer step (`StepGuard.check_step`); nothing is read per micro-batch.

- `--on_nonfinite stop` (default): the run stops with `NonFiniteError`, which names the optimizer step and the batch's
  records (`FILE:LINE`, and the record's `id` where it has one). No checkpoint or final model is written after it.
- `--on_nonfinite skip`: the optimizer step is skipped (gradients dropped), the step's loss is left out of the logged
  average, and the skip is counted (`nonfinite_steps_skipped` in the logs); more than `--max_nonfinite_steps` skips
  stop the run as above. Not available with DeepSpeed, whose engine steps inside `backward`, before the check.

`assert_finite_model` is the last line of defence before anything is saved: every parameter (this rank's partition
under ZeRO-3) must be finite.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

logger = logging.getLogger("internvl.train")

NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Training diverged: a non-finite loss or gradient norm, or a non-finite parameter before a save."""


class StepGuard:
    """Per-optimizer-step finiteness check of the loss and the (already computed) gradient norm.

    `describe` turns a global dataset index into a readable record name (`FILE:LINE id=...`); the trainer passes the
    dataset's. Call `note_batch` for each micro-batch (CPU tensor, no sync), `check_step` once per optimizer step.
    `check_grad_norm=False` (fp16 with a loss scaler, which skips overflowing steps itself) checks the loss only.
    """

    def __init__(self, policy: str = "stop", max_skipped: int = 10,
                 describe: Callable[[int], str] | None = None, check_grad_norm: bool = True) -> None:
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, not {policy!r}")
        if max_skipped < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, not {max_skipped}")
        self.policy = policy
        self.max_skipped = max_skipped
        self.check_grad_norm = check_grad_norm
        self.describe = describe or (lambda index: f"sample #{index}")
        self.skipped_steps: list[int] = []
        self.skip_next_step = False
        self._indices: list[torch.Tensor] = []
        self._loss_before: torch.Tensor | None = None

    # ---- per micro-batch (no host sync) -------------------------------------------------------------------
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

    # ---- once per optimizer step ----------------------------------------------------------------------------
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
        device = tr_loss.device if tr_loss is not None else torch.device("cpu")
        loss_ok = torch.isfinite(tr_loss.detach()).all() if tr_loss is not None else torch.tensor(True, device=device)
        if grad_norm is None:
            grad_ok = torch.tensor(True, device=device)
        elif isinstance(grad_norm, torch.Tensor):
            if isinstance(grad_norm, DTensor):  # FSDP2's clipping returns the norm as a replicated DTensor
                grad_norm = grad_norm.full_tensor()
            grad_ok = torch.isfinite(grad_norm.detach()).all().to(device)
        else:
            grad_ok = torch.tensor(bool(torch.isfinite(torch.tensor(float(grad_norm)))), device=device)
        return torch.stack([loss_ok, grad_ok]).to(torch.int32)

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


def local_parameters(model: nn.Module) -> Iterable[torch.Tensor]:
    """This rank's parameter data: the ZeRO-3 partition (`ds_tensor`) where DeepSpeed partitioned it, the local
    shard of an FSDP2 (DTensor) parameter, else the parameter itself."""
    for param in model.parameters():
        data = getattr(param, "ds_tensor", param)
        yield data.to_local() if isinstance(data, DTensor) else data


def assert_finite_model(model: nn.Module, what: str, world_size: int = 1) -> None:
    """Raise `NonFiniteError` naming up to 5 parameters if any holds NaN/inf (checked over all ranks)."""
    names = [name for name, _ in model.named_parameters()]
    flags = [torch.isfinite(data.detach()).all() if data.numel() and data.is_floating_point()
             else torch.tensor(True, device=data.device) for data in local_parameters(model)]
    if not flags:
        return
    device = flags[0].device
    ok = torch.stack([f.to(device) for f in flags])
    all_ok = ok.all().to(torch.int32).reshape(1)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(all_ok, op=dist.ReduceOp.MIN)
    if bool(all_ok.item()):
        return
    bad = [names[i] for i in torch.nonzero(~ok).flatten().tolist()[:5]]
    raise NonFiniteError(f"refusing to save {what}: non-finite parameters "
                         f"({', '.join(bad) if bad else 'on another rank'})")
