"""The demo page's words in English and Chinese: one table, ``strings.json`` (``{key: {"en": ..., "zh": ...}}``).
Messages of the file and box checks (``internvl.demo.uploads``) stay English: they name files, types and values."""
from __future__ import annotations

import json
from importlib import resources

from internvl.data.prompts import LANGS  # the page's languages are the prompt registry's

__all__ = ["LANGS", "STRINGS", "text"]


#: key -> {"en": English, "zh": Chinese}
STRINGS: dict[str, dict[str, str]] = json.loads(
    resources.files(__package__).joinpath("strings.json").read_text(encoding="utf-8"))


def text(key: str, lang: str, **fields: object) -> str:
    """The page string ``key`` in ``lang`` with ``{fields}`` filled in; ``KeyError`` for an unknown key or language
    (a missing translation fails the unit test rather than showing a raw key)."""
    template = STRINGS[key][lang]
    return template.format(**fields) if fields else template
