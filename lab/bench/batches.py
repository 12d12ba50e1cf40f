"""Synthetic batches for the benchmark (random token ids, real MedRegA-like structure and lengths).

Every sample is `[prompt tokens][<img>][num_image_token x IMG_CONTEXT][</img>][question][answer][<|im_end|>]`
with labels -100 on everything before the answer. Random ids avoid the special ids (0..9 and the image token).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from internvl.constants import IGNORE_INDEX
from internvl.data.collate import PackedCollator, pad_collate

from .lengths import IMAGE_TOKENS, SampleLength


@dataclass
class Batch:
    """One micro-batch: model inputs plus the counts the FLOPs formula needs."""

    input_ids: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L]
    pixel_values: torch.Tensor  # [T, 3, S, S]
    attention_mask: torch.Tensor | None  # [B, L] or None (no padding / packed)
    position_ids: torch.Tensor | None  # [B, L] (restarting per packed sample) or None
    doc_lengths: list[int]
    real_tokens: int
    supervised: int

    def to(self, device: str | torch.device, dtype: torch.dtype) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.input_ids), move(self.labels), self.pixel_values.to(device, dtype), move(self.attention_mask),
            move(self.position_ids), self.doc_lengths, self.real_tokens, self.supervised,
        )


def sample_tokens(s: SampleLength, *, vocab: int, image_token_id: int, num_image_token: int,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n], labels [n]) of one sample with the image block after the template tokens."""
    n = s.total
    ids = torch.randint(10, vocab - 10, (n,), generator=gen)
    ids[ids == image_token_id] = 11
    start = 20
    ids[start + 1 : start + 1 + num_image_token] = image_token_id
    labels = ids.clone()
    labels[: s.prompt] = IGNORE_INDEX
    return ids, labels


def _pixels(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=gen)


def fixed_batch(batch: int, seq: int, *, vocab: int, image_token_id: int, num_image_token: int, image_size: int,
                answer_from: int, seed: int = 0) -> Batch:
    """`batch` samples of exactly `seq` tokens, one image each, supervised from `answer_from` on."""
    gen = torch.Generator().manual_seed(seed)
    s = SampleLength(task="fixed", prompt=answer_from, answer=seq - answer_from - 1)
    pairs = [sample_tokens(s, vocab=vocab, image_token_id=image_token_id, num_image_token=num_image_token, gen=gen)
             for _ in range(batch)]
    ids = torch.stack([p[0] for p in pairs])
    labels = torch.stack([p[1] for p in pairs])
    return Batch(ids, labels, _pixels(batch, image_size, gen), None, None, [seq] * batch, batch * seq,
                 int((labels[:, 1:] != IGNORE_INDEX).sum()))


def _features(samples: list[SampleLength], *, vocab: int, image_token_id: int, num_image_token: int,
              image_size: int, gen: torch.Generator) -> list[dict]:
    """Samples as the data pipeline's per-sample dicts (input_ids, labels, pixel_values [1,3,S,S], image_flags)."""
    feats = []
    for s in samples:
        ids, labels = sample_tokens(s, vocab=vocab, image_token_id=image_token_id, num_image_token=num_image_token,
                                    gen=gen)
        feats.append({"input_ids": ids, "labels": labels, "pixel_values": _pixels(1, image_size, gen),
                      "image_flags": torch.ones(1, dtype=torch.long)})
    return feats


def _batch_from(collated: dict, lengths: list[int]) -> Batch:
    labels = collated["labels"]
    return Batch(collated["input_ids"], labels, collated["pixel_values"], collated.get("attention_mask"),
                 collated.get("position_ids"), lengths, sum(lengths), int((labels[:, 1:] != IGNORE_INDEX).sum()))


def padded_batches(samples: list[SampleLength], batch: int, *, vocab: int, image_token_id: int,
                   num_image_token: int, image_size: int, seed: int = 0, pad_to: int | None = None) -> list[Batch]:
    """Consecutive groups of `batch` samples through the data pipeline's `pad_collate` (right padding to the
    longest in the group), or padded further to `pad_to` tokens (the original InternVL without group_by_length)."""
    gen = torch.Generator().manual_seed(seed)
    feats = _features(samples, vocab=vocab, image_token_id=image_token_id, num_image_token=num_image_token,
                      image_size=image_size, gen=gen)
    out: list[Batch] = []
    for i in range(0, len(feats) - batch + 1, batch):
        group = feats[i : i + batch]
        collated = pad_collate(group)
        if pad_to is not None and collated["input_ids"].shape[1] < pad_to:
            extra = pad_to - collated["input_ids"].shape[1]
            collated["input_ids"] = torch.nn.functional.pad(collated["input_ids"], (0, extra), value=0)
            collated["labels"] = torch.nn.functional.pad(collated["labels"], (0, extra), value=IGNORE_INDEX)
            collated["attention_mask"] = torch.nn.functional.pad(collated["attention_mask"], (0, extra), value=0)
        out.append(_batch_from(collated, [int(f["input_ids"].numel()) for f in group]))
    return out


def packed_batches(samples: list[SampleLength], rows_per_batch: int, row_len: int, *, vocab: int,
                   image_token_id: int, num_image_token: int, image_size: int, seed: int = 0) -> list[Batch]:
    """Samples through the data pipeline's `PackedCollator` (rows of at most `row_len` tokens, position ids
    restarting per sample, no attention_mask: transformers derives the block-diagonal causal mask from them).

    Samples are taken in order; each micro-batch gets the samples that fill about `rows_per_batch` rows."""
    gen = torch.Generator().manual_seed(seed)
    feats = _features(samples, vocab=vocab, image_token_id=image_token_id, num_image_token=num_image_token,
                      image_size=image_size, gen=gen)
    collator = PackedCollator(max_packed_tokens=row_len)
    out: list[Batch] = []
    group: list[dict] = []
    budget = int(0.97 * rows_per_batch * row_len)
    for f in feats:
        if group and sum(int(g["input_ids"].numel()) for g in group) + int(f["input_ids"].numel()) > budget:
            collated = collator(group)
            collated.pop("loss_weight")  # token averaging: all ones, the plain token mean
            out.append(_batch_from(collated, [int(g["input_ids"].numel()) for g in group]))
            group = []
        group.append(f)
    if group:
        collated = collator(group)
        collated.pop("loss_weight")
        out.append(_batch_from(collated, [int(g["input_ids"].numel()) for g in group]))
    return out


def generation_prompts(batch: int, *, vocab: int, image_token_id: int, num_image_token: int, image_size: int,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`batch` left-padded one-image prompts (question lengths 10-40): (input_ids, attention_mask, pixel_values)."""
    gen = torch.Generator().manual_seed(seed)
    lens = [24 + IMAGE_TOKENS + int(torch.randint(10, 41, (1,), generator=gen)) for _ in range(batch)]
    width = max(lens)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(lens):
        x = torch.randint(10, vocab - 10, (n,), generator=gen)
        x[x == image_token_id] = 11
        x[21 : 21 + num_image_token] = image_token_id
        ids[row, width - n :] = x
        mask[row, width - n :] = 1
    return ids, mask, _pixels(batch, image_size, gen)
