"""The prompt registry: loads ``internvl/data/prompts/*.yaml`` (every task's wording in English and Chinese) into
:class:`TaskPrompt` entries keyed by ``(task, lang)``. The shipped files are the only ones read; their shape (both
languages, known ``{placeholders}``, no task defined twice) is checked by tests/data_io/test_data_prompts.py. The
builders live in :mod:`internvl.data.prompts`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

__all__ = ["LANGS", "PROMPT_DIR", "PromptError", "TaskPrompt", "get_prompt", "list_tasks", "load_prompts"]

PROMPT_DIR = Path(__file__).with_name("prompts")
LANGS = ("en", "zh")

# Keys of a task's language entry with a field of their own; the others (this_word, object_joiner ...) are `strings`.
_MAIN_KEYS = ("base_prompt", "questions", "answer", "source", "base_prompt_variants")


class PromptError(ValueError):
    """An unknown task or language, or fields given to a builder that do not fit the task."""


@dataclass(frozen=True)
class TaskPrompt:
    """The prompt data of one task in one language (one ``tasks.<task>.<lang>`` entry of a YAML file)."""

    task: str
    family: str
    lang: str
    description: str
    source: str
    required: tuple[str, ...]
    base_prompt: str | dict[str, str]
    questions: list[str] | dict[str, list[str]]
    answer: str
    strings: dict[str, Any] = field(default_factory=dict)
    base_prompt_variants: dict[str, str] = field(default_factory=dict)
    subtype: str | None = None
    targets: dict[str, dict[str, str]] = field(default_factory=dict)  # classification wording per target
    file: str = ""

    def base_template(self, key: str | None = None, variant: str = "default") -> str:
        """The base prompt template, for a keyed task (``target``) and an optional named variant (``"demo"``)."""
        if variant != "default":
            if variant not in self.base_prompt_variants:
                raise PromptError(f"{self.task} ({self.lang}) has no base prompt variant {variant!r}; "
                                  f"available: default, {', '.join(self.base_prompt_variants) or '-'}")
            return self.base_prompt_variants[variant]
        return _pick(self.base_prompt, key, f"{self.task} ({self.lang}) base_prompt")

    def question_templates(self, key: str | None = None) -> list[str]:
        """Question templates; the first is the canonical (original) wording."""
        return _pick(self.questions, key, f"{self.task} ({self.lang}) questions")


def _pick(value: Any, key: str | None, what: str) -> Any:
    if isinstance(value, dict):
        if key not in value:
            raise PromptError(f"{what}: no entry for {key!r}; choose one of {', '.join(value)}")
        return value[key]
    return value


def _load_file(path: Path) -> list[TaskPrompt]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    targets = data.get("targets", {})
    out = []
    for task, spec in data["tasks"].items():
        for lang in LANGS:
            entry = spec[lang]
            questions = entry["questions"]
            common = dict(family=str(data["family"]), lang=lang, description=str(spec.get("description", "")),
                          source=str(entry["source"]), required=tuple(spec.get("required") or []),
                          base_prompt=entry["base_prompt"], answer=entry["answer"],
                          questions=[questions] if isinstance(questions, str) else questions,
                          strings={k: v for k, v in entry.items() if k not in _MAIN_KEYS},
                          base_prompt_variants=dict(entry.get("base_prompt_variants") or {}),
                          targets={name: t[lang] for name, t in targets.items()}, file=str(path))
            out.append(TaskPrompt(task=task, **common))
            for sub in spec.get("subtypes") or {}:
                out.append(TaskPrompt(task=f"{task}_{sub}", subtype=sub, **common))
    return out


@lru_cache(maxsize=1)
def _registry() -> dict[tuple[str, str], TaskPrompt]:
    return {(tp.task, tp.lang): tp for path in sorted(PROMPT_DIR.glob("*.yaml")) for tp in _load_file(path)}


def load_prompts() -> dict[tuple[str, str], TaskPrompt]:
    """Every shipped task prompt; keys are ``(task, lang)`` (loaded once)."""
    return dict(_registry())


def list_tasks() -> list[str]:
    """All task ids, e.g. ``vqa_open``, ``text_to_region_mm``, ``grounded_whole``."""
    return sorted({task for task, _ in _registry()})


def get_prompt(task: str, lang: str = "en") -> TaskPrompt:
    """The :class:`TaskPrompt` of ``task`` in ``lang`` (``"en"`` or ``"zh"``)."""
    registry = _registry()
    if (task, lang) not in registry:
        if lang not in LANGS:
            raise PromptError(f"unknown language {lang!r}; use one of {', '.join(LANGS)}")
        raise PromptError(f"unknown task {task!r}; known tasks: {', '.join(list_tasks())}")
    return registry[(task, lang)]
