"""Shared pytest configuration: the tiny tokenizer/model fixtures come from `internvl.testing.fixtures`, and every
test starts from the same process-global state, so outcomes do not depend on test order.

Random order (pytest-randomly; off by default through ``-p no:randomly`` in pytest.ini so CI's order is stable):
add ``-p randomly``, and ``--randomly-seed=N`` to replay an order (``MEDREGA_RANDOM_ORDER=N bash scripts/test.sh``).
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from internvl.testing.global_state import global_state_restored

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from internvl.testing.fixtures import tiny_config, tiny_model, tiny_tokenizer, tiny_tokenizer_dir  # noqa: E402,F401


@pytest.fixture(autouse=True)
def restore_global_state() -> Iterator[None]:
    """Environment variables, torch defaults and transformers' DeepSpeed config reference are restored after every
    test (see internvl/testing/global_state.py)."""
    with global_state_restored():
        yield
