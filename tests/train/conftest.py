"""Fixtures for the training tests: a collator for text-only samples."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from internvl.data.collate import bookkeeping


@pytest.fixture(scope="session")
def pad_text_batch() -> Callable[..., dict[str, torch.Tensor]]:
    """Collator of text-only samples for the trainer tests: see ``pad`` below."""

    def pad(batch: list[dict]) -> dict[str, torch.Tensor]:
        """Right-pad text-only samples (``input_ids``, ``labels`` lists) into a batch with an attention mask; labels
        pad with -100; the trainer's bookkeeping keys (``sample_index``) as the product's collators add them."""
        ids = pad_sequence([torch.tensor(b["input_ids"]) for b in batch], batch_first=True)
        labels = pad_sequence([torch.tensor(b["labels"]) for b in batch], batch_first=True, padding_value=-100)
        mask = pad_sequence([torch.ones(len(b["input_ids"]), dtype=torch.long) for b in batch], batch_first=True)
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        out.update(bookkeeping(batch))
        return out

    return pad
