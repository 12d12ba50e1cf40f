"""Process-global state a test may change and must not pass on: :func:`global_state_restored` (around every test,
from tests/conftest.py) restores the environment, torch's defaults and transformers' DeepSpeed config reference (a
registered ``HfDeepSpeedConfig``, even a half-built one, makes every later ``from_pretrained`` build under ZeRO-3).
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch


def torch_state() -> dict[str, Any]:
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


def restore_torch_state(state: dict[str, Any]) -> None:
    """Put back what :func:`torch_state` returned (only the values that changed: setting threads is not free)."""
    now = torch_state()
    setters = {"default_dtype": torch.set_default_dtype, "grad_enabled": torch.set_grad_enabled,
               "num_threads": torch.set_num_threads, "matmul_precision": torch.set_float32_matmul_precision,
               "deterministic": lambda value: torch.use_deterministic_algorithms(value[0], warn_only=value[1])}
    for key, set_value in setters.items():
        if now[key] != state[key]:
            set_value(state[key])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state["cudnn"]


def deepspeed_config_registered() -> bool:
    """Whether transformers holds a DeepSpeed config object (looked up only once something imported the module)."""
    module = sys.modules.get("transformers.integrations.deepspeed")
    if module is None:
        return False
    try:
        return module.deepspeed_config() is not None
    except AttributeError:  # a half-built HfDeepSpeedConfig (registered, then its __init__ failed)
        return True


@contextlib.contextmanager
def global_state_restored() -> Iterator[None]:
    """Run the body, then restore the environment, torch's defaults and (when none was registered before) drop
    transformers' DeepSpeed config reference, whatever the body did or raised."""
    environ = dict(os.environ)
    torch_before = torch_state()
    deepspeed_before = deepspeed_config_registered()
    try:
        yield
    finally:
        if dict(os.environ) != environ:
            os.environ.clear()
            os.environ.update(environ)
        restore_torch_state(torch_before)
        if not deepspeed_before and deepspeed_config_registered():
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # imported already (see above)

            unset_hf_deepspeed_config()
