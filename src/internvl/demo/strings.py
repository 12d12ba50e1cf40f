"""The demo page's words in English and Chinese (labels, task names, help texts, status messages): one table,
``strings.json`` (``{key: {"en": ..., "zh": ...}}``; an entry without both languages fails at import). Messages of the
file and box checks (``internvl.demo.uploads``) stay English: they name files, types and values."""
from __future__ import annotations

import json
from importlib import resources

__all__ = ["LANGS", "STRINGS", "text"]

LANGS: tuple[str, ...] = ("en", "zh")


def _load() -> dict[str, tuple[str, str]]:
    table = json.loads(resources.files(__package__).joinpath("strings.json").read_text(encoding="utf-8"))
    return {key: (entry["en"], entry["zh"]) for key, entry in table.items()}


#: key -> (English, Chinese)
STRINGS: dict[str, tuple[str, str]] = _load()


def text(key: str, lang: str, **fields: object) -> str:
    """The page string ``key`` in ``lang`` ("en" or "zh"), with ``{fields}`` filled in; an unknown key or language
    is a ``KeyError`` (a missing translation fails the unit test rather than showing a raw key in the page)."""
    en, zh = STRINGS[key]
    template = {"en": en, "zh": zh}[lang]
    return template.format(**fields) if fields else template
