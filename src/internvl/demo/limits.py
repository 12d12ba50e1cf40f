"""Boundaries of the web demo: a cap on every text field, the prompt in tokens against the model's context, uploads
removed at shutdown, and error messages without server paths.

Each check raises :class:`~internvl.demo.uploads.UserInputError` with a message for the page. The generation lock is
held for one request at a time, so an oversized field would stall every other user: fields are capped in
characters before any work, and the whole prompt (history, image tokens and the answer budget) in tokens before
generation.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from internvl.constants import IMAGE_PLACEHOLDER
from internvl.demo.uploads import MAX_QUESTION_CHARS, UserInputError
from internvl.image_processing import ImageSettings

__all__ = ["FIELD_LIMITS", "UploadFolder", "check_fields", "check_prompt_budget", "public_message",
           "scrub_paths"]

#: Longest accepted value of each demo text field, in characters.
FIELD_LIMITS: dict[str, int] = {"question": MAX_QUESTION_CHARS, "objects": 500, "options": 1000, "modality": 64,
                                "box": 100, "slice": 16}
_LABELS = {"question": "question", "objects": "objects", "options": "candidate diagnoses", "modality": "modality",
           "box": "box", "slice": "NIfTI slice"}


def check_fields(**fields: Any) -> None:
    """Refuse a field that is not text or is longer than :data:`FIELD_LIMITS`; ``<image>`` is refused in free text
    (the image placeholder is put in by the demo itself)."""
    for name, value in fields.items():
        if value is None:
            continue
        label = _LABELS.get(name, name)
        if not isinstance(value, str):
            raise UserInputError(f"The {label} field must be text.")
        limit = FIELD_LIMITS.get(name, MAX_QUESTION_CHARS)
        if len(value) > limit:
            raise UserInputError(f"The {label} field has {len(value)} characters; the limit is {limit}.")
        if IMAGE_PLACEHOLDER in value:
            raise UserInputError(f"The {label} field cannot contain {IMAGE_PLACEHOLDER}; the image is added for you.")


def check_prompt_budget(model: Any, tokenizer: Any, prompt: str, history: list[tuple[str, str]],
                        max_new_tokens: int) -> int:
    """Tokens the turn needs (rendered prompt + image tokens + ``max_new_tokens``); refuse it when that exceeds the
    language model's context (``llm_config.max_position_embeddings``). Returns the count."""
    llm_config = getattr(model.config, "llm_config", None)
    context = getattr(llm_config, "max_position_embeddings", None)
    rendered = model._render(model._chat_template(), list(history), prompt)
    n_images = rendered.count(IMAGE_PLACEHOLDER) or 1
    text_tokens = len(tokenizer(rendered.replace(IMAGE_PLACEHOLDER, ""), add_special_tokens=False)["input_ids"])
    image_tokens = n_images * (int(model.num_image_token) * ImageSettings.from_config(model.config).max_tiles + 2)
    total = text_tokens + image_tokens + int(max_new_tokens)
    if context is not None and total > int(context):
        raise UserInputError(f"The conversation is too long for the model: about {total} tokens including the answer "
                             f"budget, but its context holds {context}. Clear the chat or shorten the text.")
    return total


_PATH_RE = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^\s/\\'\"():,;]+){2,}[/\\]?")


def scrub_paths(text: str) -> str:
    """``text`` with every file-system path cut to its last component (``/srv/models/x/a.png`` -> ``…/a.png``)."""
    return _PATH_RE.sub(lambda m: "…/" + re.split(r"[/\\]", m.group().rstrip("/\\"))[-1], text)


def public_message(exc: BaseException) -> str:
    """An internal error as shown in the page: its type and message without server paths, so the page never shows
    where the server keeps models, uploads or code."""
    return f"{type(exc).__name__}: {scrub_paths(str(exc))[:300]}"


class UploadFolder(tempfile.TemporaryDirectory):
    """A private temporary folder for this server's uploads (given to gradio as ``GRADIO_TEMP_DIR``), removed
    with everything in it by :meth:`cleanup` at shutdown (``with UploadFolder() as folder`` gives the folder)."""

    def __init__(self, prefix: str = "medrega-demo-uploads-") -> None:
        super().__init__(prefix=prefix, ignore_cleanup_errors=True)
        self.path = Path(self.name)
        self._previous = os.environ.get("GRADIO_TEMP_DIR")
        os.environ["GRADIO_TEMP_DIR"] = str(self.path)

    def cleanup(self) -> None:
        """Delete the folder and restore the previous ``GRADIO_TEMP_DIR``."""
        super().cleanup()
        if self._previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = self._previous

    def __enter__(self) -> "UploadFolder":
        return self
