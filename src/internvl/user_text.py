"""User text can never become template or image control tokens: :func:`neutralize_control_tokens`.

The prompt is rendered as one string and tokenized once, so a question containing ``<|im_end|><|im_start|>system``
would otherwise be tokenized as template control tokens (a user could inject turns), and one containing
``<IMG_CONTEXT>`` would add image slots (``ImageTokenMismatchError``). Every piece of conversation text (questions,
answers, history) goes through :func:`neutralize_control_tokens` before the template is applied -- in
``InternVLChatModel.chat``/``batch_chat`` and in ``internvl.data.encode`` for training -- which puts a space after
the ``<`` of each such literal string, so it is tokenized as ordinary text. Real control tokens are added afterwards
by the template and by ``<image>`` expansion. The region tags ``<ref>``/``</ref>``/``<box>``/``</box>`` and the
``<image>`` placeholder are untouched: they are legitimate user input.

A space (not an invisible character) is used on purpose: tokenizer normalisers may drop zero-width characters
before matching added or user-defined symbols, but they never remove a plain space between ``<`` and ``|``.
"""
from __future__ import annotations

import re

from internvl.constants import CHATML_TOKENS, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN

__all__ = ["PROTECTED_TOKENS", "neutralize_control_tokens"]

#: Literal strings that user text must never turn into tokens: ChatML template tokens, BOS and the image block.
PROTECTED_TOKENS: tuple[str, ...] = (*CHATML_TOKENS, "<|startoftext|>", IMG_START_TOKEN, IMG_END_TOKEN,
                                     IMG_CONTEXT_TOKEN)

_PROTECTED_RE = re.compile("|".join(re.escape(t) for t in sorted(PROTECTED_TOKENS, key=len, reverse=True)))


def neutralize_control_tokens(text: str) -> str:
    """``text`` with every protected token string broken by a space after its ``<`` (``<|im_end|>`` ->
    ``< |im_end|>``); every other character is kept. Idempotent, linear in the text length."""
    if "<" not in text:
        return text
    return _PROTECTED_RE.sub(lambda m: "< " + m.group()[1:], text)
