"""The demo page's words in English and Chinese (labels, task names, help texts, status messages): one table,
``strings.json`` (``{key: {"en": ..., "zh": ...}}``; the unit test checks every entry has both). Messages of the
file and box checks (``internvl.demo.uploads``) stay English: they name files, types and values."""
from __future__ import annotations

import json
from importlib import resources

__all__ = ["LANGS", "STRINGS", "text"]

LANGS: tuple[str, ...] = ("en", "zh")


#: key -> {"en": English, "zh": Chinese}
STRINGS: dict[str, dict[str, str]] = json.loads(
    resources.files(__package__).joinpath("strings.json").read_text(encoding="utf-8"))


def text(key: str, lang: str, **fields: object) -> str:
    """The page string ``key`` in ``lang`` ("en" or "zh"), with ``{fields}`` filled in; an unknown key or language
    is a ``KeyError`` (a missing translation fails the unit test rather than showing a raw key in the page)."""
    template = STRINGS[key][lang]
    return template.format(**fields) if fields else template
