"""Synthetic batches for the benchmark (random token ids, real MedRegA-like structure and lengths).

Every sample is `[prompt tokens][<img>][num_image_token x IMG_CONTEXT][</img>][question][answer][<|im_end|>]`
with labels -100 on everything before the answer. Random ids avoid the special ids (0..9 and the image token).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..constants import IGNORE_INDEX
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


def padded_batches(samples: list[SampleLength], batch: int, *, vocab: int, image_token_id: int,
                   num_image_token: int, image_size: int, seed: int = 0, pad_to: int | None = None) -> list[Batch]:
    """Consecutive groups of `batch` samples, right-padded (pad id 0) to the longest in the group or to `pad_to`."""
    gen = torch.Generator().manual_seed(seed)
    out: list[Batch] = []
    for i in range(0, len(samples) - batch + 1, batch):
        group = samples[i : i + batch]
        pairs = [sample_tokens(s, vocab=vocab, image_token_id=image_token_id, num_image_token=num_image_token,
                               gen=gen) for s in group]
        width = pad_to or max(s.total for s in group)
        ids = torch.zeros(batch, width, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for row, (x, y) in enumerate(pairs):
            ids[row, : x.numel()] = x
            labels[row, : y.numel()] = y
            mask[row, : x.numel()] = 1
        lengths = [s.total for s in group]
        out.append(Batch(ids, labels, _pixels(batch, image_size, gen), mask, None, lengths, sum(lengths),
                         int((labels[:, 1:] != IGNORE_INDEX).sum())))
    return out


def pack_rows(samples: list[SampleLength], row_len: int) -> list[list[int]]:
    """First-fit-decreasing assignment of sample indices to rows of at most `row_len` tokens."""
    order = sorted(range(len(samples)), key=lambda i: -samples[i].total)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        need = samples[i].total
        if need > row_len:
            raise ValueError(f"sample {i} has {need} tokens > row length {row_len}")
        for r, free in enumerate(room):
            if free >= need:
                rows[r].append(i)
                room[r] -= need
                break
        else:
            rows.append([i])
            room.append(row_len - need)
    return rows


def packed_batches(samples: list[SampleLength], rows_per_batch: int, row_len: int, *, vocab: int,
                   image_token_id: int, num_image_token: int, image_size: int, seed: int = 0) -> list[Batch]:
    """Samples packed into rows of `row_len` (padded at the end), position ids restarting at 0 per sample.

    attention_mask is None: transformers derives the block-diagonal causal (document) mask from the position ids.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = pack_rows(samples, row_len)
    out: list[Batch] = []
    for b in range(0, len(rows), rows_per_batch):
        chunk = rows[b : b + rows_per_batch]
        ids = torch.zeros(len(chunk), row_len, dtype=torch.long)
        labels = torch.full((len(chunk), row_len), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros(len(chunk), row_len, dtype=torch.long)
        lengths: list[int] = []
        n_img = 0
        for r, members in enumerate(chunk):
            at = 0
            for i in members:
                x, y = sample_tokens(samples[i], vocab=vocab, image_token_id=image_token_id,
                                     num_image_token=num_image_token, gen=gen)
                n = x.numel()
                ids[r, at : at + n] = x
                labels[r, at : at + n] = y
                labels[r, at] = IGNORE_INDEX  # never predict across a sample boundary
                pos[r, at : at + n] = torch.arange(n)
                at += n
                lengths.append(n)
                n_img += 1
            # the padding tail continues counting so it forms its own (unsupervised) document
            pos[r, at:] = torch.arange(row_len - at)
        out.append(Batch(ids, labels, _pixels(n_img, image_size, gen), None, pos, lengths, sum(lengths),
                         int((labels[:, 1:] != IGNORE_INDEX).sum())))
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
