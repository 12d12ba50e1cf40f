"""Shared pytest configuration: fixtures live in tests/fixtures/ and are registered here, and every test starts from
the same process-global state (see :func:`restore_global_state`), so outcomes do not depend on test order.

Random order (pytest-randomly, off by default through ``-p no:randomly`` in pytest.ini): ``-p randomly``, optionally
``--randomly-seed=N`` to replay an order; ``bash scripts/test.sh`` does this when ``MEDREGA_RANDOM_ORDER=N`` is set.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["fixtures.tokenizer", "fixtures.model"]


def _torch_state() -> dict[str, Any]:
    """The torch defaults that tests (or the code under test) may switch process-wide."""
    return {
        "default_dtype": torch.get_default_dtype(),
        "grad_enabled": torch.is_grad_enabled(),
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "num_threads": torch.get_num_threads(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn": (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
    }


def _restore_torch(state: dict[str, Any]) -> None:
    now = _torch_state()
    if now["default_dtype"] != state["default_dtype"]:
        torch.set_default_dtype(state["default_dtype"])
    if now["grad_enabled"] != state["grad_enabled"]:
        torch.set_grad_enabled(state["grad_enabled"])
    if now["deterministic"] != state["deterministic"]:
        enabled, warn_only = state["deterministic"]
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    if now["num_threads"] != state["num_threads"]:
        torch.set_num_threads(state["num_threads"])
    if now["matmul_precision"] != state["matmul_precision"]:
        torch.set_float32_matmul_precision(state["matmul_precision"])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state["cudnn"]


def _deepspeed_config_active() -> bool:
    """Whether transformers holds a DeepSpeed config (public API; only looked up when a test imported it)."""
    module = sys.modules.get("transformers.integrations.deepspeed")
    if module is None:
        return False
    try:
        return module.deepspeed_config() is not None
    except AttributeError:  # a half-built HfDeepSpeedConfig: its __init__ registers itself before checking deepspeed
        return True


@pytest.fixture(autouse=True)
def restore_global_state() -> Iterator[None]:
    """Snapshot and restore, around every test: environment variables, torch defaults (default dtype, grad mode,
    deterministic algorithms, thread count, matmul precision, cuDNN flags) and transformers' process-global DeepSpeed
    config reference (set by ``HfDeepSpeedConfig``/``TrainingArguments(deepspeed=...)``: left behind, it makes a later
    ``from_pretrained`` build under ZeRO-3)."""
    environ = dict(os.environ)
    torch_state = _torch_state()
    deepspeed_before = _deepspeed_config_active()
    yield
    if dict(os.environ) != environ:
        os.environ.clear()
        os.environ.update(environ)
    _restore_torch(torch_state)
    if not deepspeed_before and _deepspeed_config_active():
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
