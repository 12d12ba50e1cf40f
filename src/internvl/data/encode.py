"""One function from a record's conversation to model inputs: :func:`encode_conversation` (steps in docs/data.md).

The whole string is tokenised once with character offsets, so tokens are exactly what ``chat()`` sees, and a token
is supervised when its characters lie in an answer. Labels are verified by decoding them back (the original silently
zeroed a sample on a "tokenization mismatch"). Every error is an :class:`EncodeError` naming ``FILE:LINE``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import torch

from internvl.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN
from internvl.data.records import image_paths
from internvl.image_processing import expand_image_placeholders
from internvl.templates import ChatTemplate, get_template
from internvl.tokenization import token_id
from internvl.user_text import neutralize_control_tokens

__all__ = ["EncodeError", "EncodedSample", "apply_prompt_order", "encode_conversation", "make_token_length"]


class EncodeError(ValueError):
    """A record that cannot be turned into model inputs; the message names the record (``FILE:LINE: ...``), `reason`
    is its problem name ("too-long" or "encode-error")."""

    def __init__(self, message: str, reason: str = "encode-error") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class EncodedSample:
    """Model inputs of one sample: ``input_ids``/``labels`` ``[L]`` (``IGNORE_INDEX`` outside the answers), tiles
    per image, the rendered image-expanded ``text`` and the ``supervised_text`` the labels encode."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    num_patches_list: list[int]
    text: str
    supervised_text: str

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _strip_placeholders(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()


def _join(base_prompt: str, text: str) -> str:
    return f"{base_prompt} {text}" if base_prompt else text


def apply_prompt_order(conversations: Sequence[Mapping[str, Any]], num_images: int, base_prompt: str = "",
                       where: str = "<record>") -> list[dict[str, str]]:
    """Copies of the turns in the original trainer's order (docs/data.md): a single image's ``<image>`` moves to the
    front of the first human turn (``<image>\\n{base_prompt} {question}``); other records keep their placeholders
    (exactly one per image) after ``base_prompt``. :class:`EncodeError` when the placeholders cannot match."""
    turns = [{"from": str(t.get("from")), "value": str(t.get("value"))} for t in conversations]
    human = [i for i, t in enumerate(turns) if t["from"] == "human"]
    if not human:
        raise EncodeError(f"{where}: no human turn")
    first = human[0]
    count = sum(turns[i]["value"].count(IMAGE_PLACEHOLDER) for i in human)
    if num_images == 1 and count in (0, 1):
        for i in human:
            if IMAGE_PLACEHOLDER in turns[i]["value"]:
                turns[i]["value"] = _strip_placeholders(turns[i]["value"])
        turns[first]["value"] = IMAGE_PLACEHOLDER + "\n" + _join(base_prompt, turns[first]["value"])
        return turns
    if count != num_images:
        raise EncodeError(f"{where}: {count} {IMAGE_PLACEHOLDER} placeholder(s) for {num_images} image(s)")
    turns[first]["value"] = _join(base_prompt, turns[first]["value"])
    return turns


def _token_ids(tokenizer: Any, token: str) -> int:
    tid = token_id(tokenizer, token)
    if tid is None:
        raise EncodeError(f"tokenizer does not have {token!r} as a single token; call internvl.tokenization.add_special_tokens")
    return tid


def encode_conversation(conversations: Sequence[Mapping[str, Any]], tokenizer: Any, *,
                        template: str | ChatTemplate = "Hermes-2", num_patches_list: Sequence[int] = (),
                        num_image_token: int = 256, base_prompt: str = "", system_message: str | None = None,
                        max_length: int | None = None, where: str = "<record>") -> EncodedSample:
    """One conversation (alternating ``human``/``gpt`` turns) as an :class:`EncodedSample`; ``num_patches_list`` has
    the tiles of each image (empty: text-only). A sample over ``max_length`` tokens is an error, never cut (a cut
    could split the image tokens or drop the answer). Raises :class:`EncodeError` naming ``where``."""
    tpl = get_template(template) if isinstance(template, str) else template
    turns = apply_prompt_order(conversations, len(num_patches_list), base_prompt, where)  # 1
    for turn in turns:  # record text never yields template or image tokens (internvl.user_text)
        turn["value"] = neutralize_control_tokens(turn["value"])
    segments = tpl.segments(turns, system_message)  # 2 (turns alternate: checked by RecordChecker)
    full, spans = _expand_images(segments, num_patches_list, num_image_token, where)  # 3
    ids, offsets = _tokenize(tokenizer, full, where)  # 4
    labels = _label_tokens(ids, offsets, spans, full, where)
    if num_patches_list:
        want = num_image_token * sum(num_patches_list)
        got = ids.count(_token_ids(tokenizer, IMG_CONTEXT_TOKEN))
        if got != want:
            raise EncodeError(f"{where}: {got} {IMG_CONTEXT_TOKEN} tokens after tokenisation, expected {want}")
    if max_length is not None and len(ids) > max_length:
        raise EncodeError(f"{where}: {len(ids)} tokens > max_length {max_length}", reason="too-long")
    supervised_text = _verify_labels(tokenizer, ids, labels, [full[s:e] for s, e in spans], where)
    return EncodedSample(input_ids=torch.tensor(ids, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long),
                         num_patches_list=list(num_patches_list), text=full, supervised_text=supervised_text)


def _expand_images(segments: list[tuple[str, bool]], num_patches_list: Sequence[int], num_image_token: int,
                   where: str) -> tuple[str, list[tuple[int, int]]]:
    """Step 3: each ``<image>`` of the (unsupervised) segments becomes its image tokens, images taken in order.
    Returns the joined string and the character spans ``[start, end)`` of its supervised segments."""
    full, spans = "", []
    remaining = list(num_patches_list)
    for text, supervised in segments:
        n = text.count(IMAGE_PLACEHOLDER)
        if n:
            if supervised:
                raise EncodeError(f"{where}: {IMAGE_PLACEHOLDER} inside supervised text")
            text = expand_image_placeholders(text, remaining[:n], num_image_token)
            remaining = remaining[n:]
        if supervised:
            spans.append((len(full), len(full) + len(text)))
        full += text
    return full, spans


def _tokenize(tokenizer: Any, full: str, where: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids of the whole string, tokenised once, with each token's character offsets (fast tokenizers only)."""
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as exc:
        raise EncodeError(f"{where}: the tokenizer must be a fast tokenizer with offsets ({exc})") from None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _label_tokens(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], full: str,
                  where: str) -> list[int]:
    """Step 4: a token's label is its id when its characters lie inside a supervised span, else ``IGNORE_INDEX``; a
    token that straddles a span boundary is an error."""
    labels = [IGNORE_INDEX] * len(ids)
    span_i = 0
    for k, (start, end) in enumerate(offsets):
        if end <= start:  # zero-width token (e.g. a dummy-prefix piece): belongs to what follows
            end = start + 1 if start < len(full) else start
        while span_i < len(spans) and spans[span_i][1] <= start:
            span_i += 1
        if span_i < len(spans):
            s, e = spans[span_i]
            if s <= start and end <= e:
                labels[k] = ids[k]
            elif start < e and end > s:
                raise EncodeError(f"{where}: token {full[start:end]!r} crosses the boundary of the supervised answer "
                                  "text; the tokenizer merges prompt and answer characters")
    return labels


def _verify_labels(tokenizer: Any, ids: list[int], labels: list[int], texts: list[str], where: str) -> str:
    """Decode each run of supervised tokens and compare it with its supervised text; returns the supervised text."""
    decoded = _decode_runs(tokenizer, ids, labels)
    for k, (got, want) in enumerate(zip(decoded, texts)):
        if got != want and got.lstrip() != want.lstrip():  # decoders drop a run's leading space
            raise EncodeError(f"{where}: supervised tokens of answer {k + 1} decode to {got!r}, expected {want!r}")
    if len(decoded) != len(texts):
        raise EncodeError(f"{where}: {len(decoded)} supervised token runs for {len(texts)} answers")
    return "".join(texts)


def _decode_runs(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    """Decode each maximal run of supervised positions separately."""
    runs = groupby(zip(ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX)
    return [tokenizer.decode([tok for tok, _ in run], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for supervised, run in runs if supervised]


def make_token_length(tokenizer: Any, *, base_prompt: str = "") -> Callable[[dict], int]:
    """A ``record -> token length`` function for ``RecordChecker(token_length=...)``: MedRegA's Hermes-2 template and
    one 448 tile (256 tokens) per image, as V1.2 trains."""

    def token_length(record: dict) -> int:
        n_images = len(image_paths(record))
        return len(encode_conversation(record["conversations"], tokenizer, num_patches_list=[1] * n_images,
                                       base_prompt=base_prompt))

    return token_length
