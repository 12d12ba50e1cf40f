"""User text can never become template or image control tokens: the prompt is tokenized as one string, so a question
containing ``<|im_end|><|im_start|>system`` would inject turns. All conversation text (chat, batch_chat, training
encode) passes through :func:`neutralize_control_tokens` first; region tags and ``<image>`` are legitimate and stay.
The break is a plain space, which tokenizer normalisers never drop (they may drop zero-width characters).
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
