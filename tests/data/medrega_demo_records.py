"""The 11 MedRegA demo records (``fixtures/medrega_demo.jsonl``, a verbatim copy of the spec's demo file).

A uniquely named module rather than ``conftest``: several test folders have a ``conftest.py`` and no ``__init__.py``,
so ``from conftest import ...`` would get whichever of them pytest loaded last.
"""
from __future__ import annotations

import json
from pathlib import Path

DEMO_JSONL = Path(__file__).parent / "fixtures" / "medrega_demo.jsonl"


def demo_records() -> list[dict]:
    """The 11 demo records as dicts (image paths as in the original file)."""
    return [json.loads(line) for line in DEMO_JSONL.read_text(encoding="utf-8").splitlines()]
