"""The prompt registry: loads ``internvl/data/prompts/*.yaml`` (every task's wording in English and Chinese) into
:class:`TaskPrompt` entries keyed by ``(task, lang)``. A malformed file (a missing language or key, an unknown
``{placeholder}``, a task defined twice) is a :class:`PromptError` naming the file and task. The builders live in
:mod:`internvl.data.prompts`.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

__all__ = ["LANGS", "PROMPT_DIR", "PromptError", "TaskPrompt", "get_prompt", "list_tasks", "load_prompts"]

PROMPT_DIR = Path(__file__).with_name("prompts")
LANGS = ("en", "zh")

# Placeholders a template may use; anything else in a YAML file is a typo and fails at load time.
_KNOWN_FIELDS = {
    "question", "options", "option", "letter", "answer", "label", "labels", "modality", "a_modality", "task_name",
    "option_noun", "region", "box", "name", "objects", "regions", "text", "lines",
}
_TEMPLATE_KEYS = ("base_prompt", "questions", "answer", "option_line", "line")


class PromptError(ValueError):
    """A prompt file is malformed, or the fields given to a builder do not fit the task."""


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


def _walk_templates(value: Any, where: str) -> None:
    """Check every template string in ``value`` (text, list or mapping) for syntax and unknown placeholders."""
    if isinstance(value, str):
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as exc:
            raise PromptError(f"{where}: bad template {value!r}: {exc}") from None
        unknown = names - _KNOWN_FIELDS
        if unknown:
            raise PromptError(f"{where}: unknown placeholder(s) {sorted(unknown)} in {value!r}")
    elif isinstance(value, list):
        if not value:
            raise PromptError(f"{where}: empty template list")
        for i, v in enumerate(value):
            _walk_templates(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _walk_templates(v, f"{where}.{k}")
    else:
        raise PromptError(f"{where}: expected text, a list or a mapping, got {type(value).__name__}")


def _load_file(path: Path) -> list[TaskPrompt]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PromptError(f"{path}: cannot read prompt file: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict) or "family" not in data:
        raise PromptError(f"{path}: a prompt file needs 'family' and a 'tasks' mapping")
    family = str(data["family"])
    targets = data.get("targets", {})
    out = []
    for task, spec in data["tasks"].items():
        where = f"{path}: task {task!r}"
        if not isinstance(spec, dict):
            raise PromptError(f"{where}: expected a mapping")
        for lang in LANGS:
            entry = spec.get(lang)
            if not isinstance(entry, dict):
                raise PromptError(f"{where}: missing language {lang!r}")
            for key in ("base_prompt", "questions", "source", "answer"):
                if key not in entry:
                    raise PromptError(f"{where} ({lang}): missing {key!r}")
            for key in _TEMPLATE_KEYS:
                if key in entry:
                    _walk_templates(entry[key], f"{where} ({lang}).{key}")
            variants = entry.get("base_prompt_variants", {}) or {}
            _walk_templates(variants or {"-": ""}, f"{where} ({lang}).base_prompt_variants")
            questions = entry["questions"]
            if isinstance(questions, str):
                questions = [questions]
            strings = {k: v for k, v in entry.items()  # this_word, object_joiner, option_line, line, ...
                       if k not in ("base_prompt", "questions", "answer", "source", "base_prompt_variants")}
            common = dict(family=family, lang=lang, description=str(spec.get("description", "")),
                          source=str(entry["source"]), required=tuple(spec.get("required", []) or []),
                          base_prompt=entry["base_prompt"], questions=questions, answer=entry["answer"],
                          strings=strings, base_prompt_variants=dict(variants),
                          targets={name: t[lang] for name, t in targets.items()}, file=str(path))
            out.append(TaskPrompt(task=task, **common))
            for sub in spec.get("subtypes") or {}:
                out.append(TaskPrompt(task=f"{task}_{sub}", subtype=sub, **common))
    return out


@lru_cache(maxsize=8)
def _load_dir(directory: str) -> dict[tuple[str, str], TaskPrompt]:
    files = sorted(Path(directory).glob("*.yaml"))
    if not files:
        raise PromptError(f"{directory}: no prompt files (*.yaml)")
    registry: dict[tuple[str, str], TaskPrompt] = {}
    for path in files:
        for tp in _load_file(path):
            key = (tp.task, tp.lang)
            if key in registry:
                raise PromptError(f"{path}: task {tp.task!r} already defined in {registry[key].file}")
            registry[key] = tp
    return registry


def _registry(directory: str | Path | None) -> dict[tuple[str, str], TaskPrompt]:
    # The shipped directory is the hot path (build_record per converted item): no path resolution, no copy.
    return _load_dir(str(PROMPT_DIR) if directory is None else str(Path(directory).resolve()))


def load_prompts(directory: str | Path | None = None) -> dict[tuple[str, str], TaskPrompt]:
    """Load and validate every ``*.yaml`` prompt file; keys are ``(task, lang)``. Cached per directory."""
    return dict(_registry(directory))


def list_tasks(directory: str | Path | None = None) -> list[str]:
    """All task ids, e.g. ``vqa_open``, ``text_to_region_mm``, ``grounded_whole``."""
    return sorted({task for task, _ in _registry(directory)})


def get_prompt(task: str, lang: str = "en", directory: str | Path | None = None) -> TaskPrompt:
    """The :class:`TaskPrompt` of ``task`` in ``lang`` (``"en"`` or ``"zh"``)."""
    registry = _registry(directory)
    if (task, lang) not in registry:
        if lang not in LANGS:
            raise PromptError(f"unknown language {lang!r}; use one of {', '.join(LANGS)}")
        raise PromptError(f"unknown task {task!r}; known tasks: {', '.join(list_tasks(directory))}")
    return registry[(task, lang)]
