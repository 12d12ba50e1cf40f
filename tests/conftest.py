"""Shared pytest configuration: the tiny tokenizer/model fixtures come from `internvl.testing.fixtures`, and every
test starts from the same process-global state, so outcomes do not depend on test order: :func:`restore_global_state`
restores the environment, torch's defaults and transformers' DeepSpeed config reference (a registered
``HfDeepSpeedConfig``, even a half-built one, makes every later ``from_pretrained`` build under ZeRO-3).

Random order (pytest-randomly; off by default through ``-p no:randomly`` in pytest.ini so CI's order is stable):
add ``-p randomly``, and ``--randomly-seed=N`` to replay an order (``MEDREGA_RANDOM_ORDER=N bash scripts/test.sh``).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from internvl.testing.fixtures import tiny_config, tiny_model, tiny_tokenizer, tiny_tokenizer_dir  # noqa: E402,F401


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


@pytest.fixture(autouse=True)
def restore_global_state() -> Iterator[None]:
    """Environment variables, torch defaults and transformers' DeepSpeed config reference are restored after every
    test (:func:`global_state_restored`)."""
    with global_state_restored():
        yield


@pytest.fixture(name="global_state_restored")
def global_state_restored_fixture() -> Callable[[], contextlib.AbstractContextManager[None]]:
    """:func:`global_state_restored` itself, for the tests of the restore (tests/test_global_state.py)."""
    return global_state_restored


@pytest.fixture(name="deepspeed_config_registered")
def deepspeed_config_registered_fixture() -> Callable[[], bool]:
    """:func:`deepspeed_config_registered` itself, for the tests of the restore (tests/test_global_state.py)."""
    return deepspeed_config_registered


@pytest.fixture(scope="session")
def write_eval_benchmark() -> Callable[..., tuple[Path, Path, Path, Path]]:
    """Factory of a `medrega-eval run` setup (the eval and robust-io tests): see ``write`` below."""

    def write(tmp_path: Path, model: Any, tokenizer: Any, rows: Sequence[dict], *, name: str, task: str,
              pixels: Callable[[int], np.ndarray], extra_yaml: str = "") -> tuple[Path, Path, Path, Path]:
        """The model saved to ``tmp_path/model/``, one image ``imgs/{i}.png`` per row (``pixels(i)``, HxWx3 uint8),
        the rows as ``data/{name}.jsonl`` and a benchmark file registering ``name``.
        Returns (model dir, data dir, benchmark yaml, output dir)."""
        model_dir = tmp_path / "model"
        model.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        data = tmp_path / "data"
        (data / "imgs").mkdir(parents=True)
        for i in range(len(rows)):
            Image.fromarray(pixels(i)).save(data / "imgs" / f"{i}.png")
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        yml = tmp_path / "bench.yaml"
        yml.write_text(f"benchmarks:\n  {name}:\n    task: {task}\n    annotation: {name}.jsonl\n    image_root: imgs\n"
                       + extra_yaml)
        return model_dir, data, yml, tmp_path / "out"

    return write
