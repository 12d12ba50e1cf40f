"""Fixtures for the fast-path guards: FSDP2 sharding laid out as accelerate lays it out.

:func:`shard_like_accelerate` is a plain function too, because the two-rank worker `fsdp2_head_cases.py` (run by
torchrun, which puts the script's folder first on its path) imports it from here: a subprocess sees no fixtures."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def shard_like_accelerate(model: Any, head_unit: str = "tail") -> None:
    """FSDP2 (`fully_shard`, a process group must exist) as accelerate's `fsdp2_prepare_model` builds it for
    `ENGINE=fsdp2` (accelerate 1.16): each checkpointing layer, the input embedding, the [final norm, LM head] tail as
    one unit with `reshard_after_forward=False`, then the root. `head_unit="reshards"`: the LM head alone in a unit
    that reshards after its forward (another config's choice)."""
    from torch.distributed.fsdp import fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:
        fully_shard(layer)
    llm = model.language_model
    fully_shard(llm.get_input_embeddings())
    if head_unit == "tail":
        fully_shard([llm.get_decoder().norm, llm.get_output_embeddings()], reshard_after_forward=False)
    else:
        fully_shard(llm.get_output_embeddings(), reshard_after_forward=True)
    fully_shard(model)


@pytest.fixture(name="shard_like_accelerate")
def shard_like_accelerate_fixture() -> Callable[[Any, str], None]:
    """:func:`shard_like_accelerate` for the in-process tests."""
    return shard_like_accelerate
