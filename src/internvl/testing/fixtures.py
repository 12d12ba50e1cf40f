"""pytest fixtures over `internvl.testing`: the session's tiny tokenizer and a fresh tiny model per test.

`tiny_tokenizer_dir` / `tiny_tokenizer` are shared by the whole session: do not mutate the tokenizer (`add_tokens`
...); load a fresh copy from `tiny_tokenizer_dir` instead. `tiny_config` is a fresh `InternVLChatConfig` per test
(safe to edit); `tiny_model` is a fresh random `InternVLChatModel` in eval mode, seeded, with `img_context_token_id`
set from the tokenizer. Both are cheap (~0.25M parameters, a few milliseconds to build). The conftests of `tests/`
and `lab/tests/` import these names.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ..constants import IMG_CONTEXT_TOKEN
from ..model import InternVLChatModel, load_preset
from ..tokenization import load_tokenizer
from .tokenizer import build_tiny_tokenizer_dir


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of the session's tiny SentencePiece tokenizer (tokenizer.model + configs)."""
    return build_tiny_tokenizer_dir(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path):
    """The tiny tokenizer loaded as a Llama tokenizer (shared; do not mutate)."""
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture
def tiny_config(tiny_tokenizer):
    """`tiny` preset config whose llm vocab_size equals len(tiny_tokenizer)."""
    config = load_preset("tiny")
    config.llm_config.vocab_size = len(tiny_tokenizer)
    return config


@pytest.fixture
def tiny_model(tiny_config, tiny_tokenizer):
    """Random tiny InternVLChatModel (fp32, eval mode, seed 0) ready for forward/chat with `tiny_tokenizer`."""
    torch.manual_seed(0)
    model = InternVLChatModel(tiny_config).eval()
    model.img_context_token_id = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    return model
