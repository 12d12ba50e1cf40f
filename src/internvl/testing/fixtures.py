"""pytest fixtures over `internvl.testing` (imported by the conftests of `tests/` and `lab/tests/`): the session's
tiny tokenizer (shared: do not mutate it, load a copy from `tiny_tokenizer_dir`) and a fresh tiny config and model
per test (~0.25M parameters, milliseconds to build)."""
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
