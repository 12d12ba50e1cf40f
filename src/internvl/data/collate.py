"""Batching: dynamic padding (:func:`pad_collate`) and sequence packing (:class:`PackedCollator`); docs/data.md.

Both concatenate ``pixel_values``/``image_flags`` in token order, the order the model fills ``<IMG_CONTEXT>`` in.
Padding takes ``attention_mask`` from the lengths (the original's ``ids != 0`` masked real id-0 tokens). Packing
restarts ``position_ids`` at 0 for every sample and gives no ``attention_mask``: transformers 5.x turns that into a
block-diagonal mask (eager / SDPA / flex) or ``cu_seqlens`` (flash-attention-2), so each sample attends only to
itself with no model patch. Loss weights per supervised token of a sample with ``n`` of them (architecture §5.7):
``token`` 1, ``sample`` 1/n, ``square`` 1/sqrt(n); the loss is ``sum(ce * w) / sum(w)``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from internvl.constants import IGNORE_INDEX

__all__ = ["SAMPLE_INDEX_KEY", "SKIPPED_KEY", "bookkeeping", "pad_collate", "PackedCollator", "LOSS_REDUCTIONS",
           "token_loss_weights"]

LOSS_REDUCTIONS = ("token", "sample", "square")


# Bookkeeping keys of items and batches: the index of the record actually served, and the records skipped at build
# time in lenient mode. The trainer takes them off the batch before the model sees it.
SAMPLE_INDEX_KEY = "sample_index"
SKIPPED_KEY = "skipped_records"


def bookkeeping(features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The trainer's bookkeeping keys of a batch: ``sample_index`` ``[B]`` (when every item has one) and the
    build-time skips of its items as one list (when there are any). The trainer takes both off before the model."""
    out: dict[str, Any] = {}
    if features and all(SAMPLE_INDEX_KEY in f for f in features):
        out[SAMPLE_INDEX_KEY] = torch.stack([torch.as_tensor(f[SAMPLE_INDEX_KEY]).reshape(()) for f in features])
    skipped = [entry for f in features for entry in f.get(SKIPPED_KEY, ())]
    if skipped:
        out[SKIPPED_KEY] = skipped
    return out


def pad_collate(features: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into ``input_ids``/``labels``/``attention_mask`` ``[B, L_max]`` plus concatenated
    ``pixel_values`` ``[sum T, 3, S, S]`` and ``image_flags`` ``[sum T]``."""
    if not features:
        raise ValueError("cannot collate an empty batch")
    longest = max(int(f["input_ids"].shape[0]) for f in features)
    batch = len(features)
    input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    for row, f in enumerate(features):
        n = int(f["input_ids"].shape[0])
        input_ids[row, :n] = f["input_ids"]
        labels[row, :n] = f["labels"]
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": torch.cat([f["pixel_values"] for f in features]),
            "image_flags": torch.cat([f["image_flags"] for f in features]), **bookkeeping(features)}


def token_loss_weights(labels: torch.Tensor, loss_reduction: str) -> torch.Tensor:
    """Per-position weights of one sample's ``labels`` ``[L]`` (0 where ignored; see module docstring)."""
    mask = labels != IGNORE_INDEX
    n = int(mask.sum())
    if n == 0:
        return torch.zeros(labels.shape, dtype=torch.float32)
    value = {"token": 1.0, "sample": 1.0 / n, "square": 1.0 / math.sqrt(n)}[loss_reduction]
    return mask.to(torch.float32) * value


class PackedCollator:
    """Pack samples first-fit into rows of ``max_packed_tokens`` tokens and ``num_images_expected`` tiles: ``input_ids``
    / ``labels`` / ``position_ids`` / ``loss_weight`` ``[R, L_max]``, ``pixel_values``/``image_flags`` in packed order,
    ``num_samples`` (for throughput logs) and no ``attention_mask``. A sample whose first label is supervised is
    refused (its target would be predicted from the previous sample's last token).
    """

    def __init__(self, max_packed_tokens: int = 8192, num_images_expected: int | None = None,
                 loss_reduction: str = "token", pad_token_id: int = 0) -> None:
        if max_packed_tokens < 1:
            raise ValueError(f"max_packed_tokens must be positive, got {max_packed_tokens}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        self.max_packed_tokens = int(max_packed_tokens)
        self.num_images_expected = num_images_expected
        self.loss_reduction = loss_reduction
        self.pad_token_id = int(pad_token_id)

    def plan(self, features: Sequence[Mapping[str, Any]]) -> list[list[int]]:
        """Rows as lists of sample indices (first-fit in order)."""
        rows: list[list[int]] = []
        used_tokens: list[int] = []  # per row
        used_tiles: list[int] = []
        for i, f in enumerate(features):
            n, t = int(f["input_ids"].shape[0]), int(f["pixel_values"].shape[0])
            if n > self.max_packed_tokens:
                raise ValueError(f"batch item {i} has {n} tokens > max_packed_tokens {self.max_packed_tokens}")
            if self.num_images_expected is not None and t > self.num_images_expected:
                raise ValueError(f"batch item {i} has {t} tiles > num_images_expected {self.num_images_expected}")
            for r in range(len(rows)):
                fits_tiles = self.num_images_expected is None or used_tiles[r] + t <= self.num_images_expected
                if used_tokens[r] + n <= self.max_packed_tokens and fits_tiles:
                    rows[r].append(i)
                    used_tokens[r] += n
                    used_tiles[r] += t
                    break
            else:
                rows.append([i])
                used_tokens.append(n)
                used_tiles.append(t)
        return rows

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        for i, f in enumerate(features):
            if f["labels"].numel() and int(f["labels"][0]) != IGNORE_INDEX:
                raise ValueError(f"batch item {i}: the first label is supervised; packed samples must start with "
                                 "unsupervised (prompt) tokens")
        rows = self.plan(features)
        lengths = [sum(int(features[i]["input_ids"].shape[0]) for i in row) for row in rows]
        width = max(lengths)
        n_rows = len(rows)
        input_ids = torch.full((n_rows, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((n_rows, width), dtype=torch.long)
        loss_weight = torch.zeros((n_rows, width), dtype=torch.float32)
        pixel_values, image_flags = [], []
        for r, row in enumerate(rows):
            pos = 0
            for i in row:
                f = features[i]
                n = int(f["input_ids"].shape[0])
                input_ids[r, pos:pos + n] = f["input_ids"]
                labels[r, pos:pos + n] = f["labels"]
                position_ids[r, pos:pos + n] = torch.arange(n)
                loss_weight[r, pos:pos + n] = token_loss_weights(f["labels"], self.loss_reduction)
                pixel_values.append(f["pixel_values"])
                image_flags.append(f["image_flags"])
                pos += n
            position_ids[r, pos:] = torch.arange(width - pos)  # the padding is a separate "sample"
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "loss_weight": loss_weight,
                "pixel_values": torch.cat(pixel_values), "image_flags": torch.cat(image_flags),
                "num_samples": torch.tensor(len(features), dtype=torch.long), **bookkeeping(features)}
