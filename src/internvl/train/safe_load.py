"""DeepSpeed resume without arbitrary unpickling.

DeepSpeed's `TorchCheckpointEngine.load` calls `torch.load(..., weights_only=False)`, which runs any code a pickle
names. `deepspeed_safe_loads()` (around `Trainer.train`) makes it load with `weights_only=True` and an allowlist of
the plain data classes DeepSpeed's ZeRO-1/2/3 states hold; anything else is refused (`UnsafeCheckpointError`). A
manifest cannot vouch for a pickle: whoever can write the file can write the manifest.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
from collections.abc import Iterator

import torch

# plain data classes in DeepSpeed 0.19 states: the first, third and fourth found in ZeRO-2 and ZeRO-3 checkpoints of
# CPU fp32 runs (tests/train/test_train_safe_load.py); DynamicLossScaler is what fp16 runs with dynamic scaling save
SAFE_DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointError(RuntimeError):
    """A DeepSpeed state names a class outside the allowlist."""


def _safe_globals() -> list:
    """The classes of `SAFE_DEEPSPEED_GLOBALS` (all present in every supported DeepSpeed, >= 0.15)."""
    names = [name.rpartition(".") for name in SAFE_DEEPSPEED_GLOBALS]
    return [getattr(importlib.import_module(module), attr) for module, _, attr in names]


def safe_torch_load(path: str | os.PathLike, map_location=None):
    """`torch.load` with `weights_only=True` and the DeepSpeed allowlist; `UnsafeCheckpointError` naming the file and
    the class if the state needs anything else."""
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"{path}: refusing to unpickle: {str(exc).splitlines()[0]} (only tensors, plain containers and "
                f"the DeepSpeed classes in internvl.train.safe_load.SAFE_DEEPSPEED_GLOBALS are loaded)") from None


@contextlib.contextmanager
def deepspeed_safe_loads() -> Iterator[None]:
    """While active, DeepSpeed's torch checkpoint engine loads through `safe_torch_load`."""
    try:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    except ImportError:  # no DeepSpeed: nothing to guard
        yield
        return
    original = TorchCheckpointEngine.load

    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location=map_location)

    TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original
