"""Fixtures for the evaluation tests: a tiny random BERT for BERTScore (built from code in well under a second)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer


@pytest.fixture(scope="session")
def build_tiny_bert_dir() -> Callable[[Path, Sequence[str], int], Path]:
    """Factory of a BERTScore model directory: see ``build`` below."""

    def build(directory: Path, words: Sequence[str], num_layers: int) -> Path:
        """A random BERT (hidden 16) with a word-level vocabulary of ``words`` saved as safetensors in
        ``directory``: what `--bertscore-model DIR` reads."""
        vocab = directory / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
        BertTokenizer(str(vocab)).save_pretrained(directory)
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=num_layers,
                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
        BertModel(cfg).save_pretrained(directory, safe_serialization=True)
        return directory

    return build
