"""The per-test restore of process-global state (tests/conftest.py) undoes what tests leave behind."""
from __future__ import annotations

import os

import pytest
import torch
from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled
from transformers.integrations import deepspeed as hf_deepspeed

ZERO3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 1,
         "gradient_accumulation_steps": 1}


def test_environment_and_torch_defaults_are_restored(global_state_restored):
    before_env, threads = dict(os.environ), torch.get_num_threads()
    with global_state_restored():
        os.environ["MEDREGA_STATE_PROBE"] = "1"
        os.environ.pop("HF_HUB_OFFLINE", None)
        torch.set_default_dtype(torch.float64)
        torch.set_grad_enabled(False)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_num_threads(threads + 1)
        torch.set_float32_matmul_precision("medium")
    assert dict(os.environ) == before_env
    assert torch.get_default_dtype() == torch.float32 and torch.is_grad_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads and torch.get_float32_matmul_precision() == "highest"


def test_a_live_deepspeed_config_is_dropped_after_the_test(global_state_restored, deepspeed_config_registered):
    with global_state_restored():
        keep_alive = HfDeepSpeedConfig(dict(ZERO3))  # still referenced after the block, as a leaked one would be
        assert is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled() and not deepspeed_config_registered()
    del keep_alive


def test_a_half_built_deepspeed_config_is_dropped_after_the_test(monkeypatch, global_state_restored,
                                                                 deepspeed_config_registered):
    """What a fresh machine without deepspeed hit: HfDeepSpeedConfig registers itself, then its version check fails;
    the failing test's traceback keeps the object alive and every later ZeRO-3 query raised AttributeError."""
    def missing(name: str, *args, **kwargs) -> None:
        raise ImportError(f"The '{name}' distribution was not found")

    monkeypatch.setattr(hf_deepspeed, "dep_version_check", missing)
    with global_state_restored():
        with pytest.raises(ImportError) as failed:
            HfDeepSpeedConfig(dict(ZERO3))
        assert deepspeed_config_registered()
    assert not deepspeed_config_registered() and not is_deepspeed_zero3_enabled()
    assert failed.value.__traceback__ is not None  # the half-built object is still reachable from here
