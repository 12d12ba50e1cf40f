"""The prompt registry and its builders: ``prompts/*.yaml`` (every task's wording in English and Chinese) loaded into
:class:`TaskPrompt` entries keyed by ``(task, lang)``, and builders that fill them into MedRegInstruct records, so
converters, the demo and the MedReg-mini builder produce identical records (fields per task: docs/data-io.md). The
shipped files are the only ones read; their shape (both languages, known ``{placeholders}``, no task defined twice)
is checked by tests/data_io/test_data_prompts.py.

The first human turn is ``base_prompt + " " + "<image>\\n" * n_images + question`` (no space after a newline or
Chinese punctuation), the demo form; with ``include_base_prompt=False`` the ``meta_file.json`` ``base_prompt``
(:func:`render_base_prompt`) supplies the task description instead, as in the original training data.
"""
from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

import yaml

from internvl.constants import IMAGE_PLACEHOLDER, REF_END, REF_START
from internvl.regions import Box, Region, RegionError, format_region, format_regions, pixels_to_box, validate_box

__all__ = ["LANGS", "PROMPT_DIR", "PromptError", "RegionsInput", "TaskPrompt", "build_question", "build_record",
           "get_prompt", "join_prompt", "list_tasks", "load_prompts", "normalize_regions", "render_base_prompt",
           "text_to_region_subtype", "with_article"]

PROMPT_DIR = Path(__file__).with_name("prompts")
LANGS = ("en", "zh")

#: A list of regions: ``Region`` objects, ``(name, boxes)`` pairs, or a ``{name: boxes}`` mapping.
RegionsInput = Union[Sequence[Union[Region, tuple[str, Sequence[Any]]]], Mapping[str, Sequence[Any]]]

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


def with_article(word: str) -> str:
    """``"an OCT"``, ``"a CT"``, ``"an X-ray"``, ``"a chest x-ray"``: acronyms (all capitals, or a capital and '-')
    take "an" when their first letter is spoken with a vowel sound; other words before a vowel letter."""
    word = word.strip()
    if not word:
        raise PromptError("modality must not be empty")
    first = word.split()[0]
    letters = first.replace("-", "")
    acronym = (letters.isupper() and len(letters) > 1) or (len(first) > 1 and first[0].isupper() and first[1] == "-")
    if acronym:
        return ("an " if first[0] in "AEFHILMNORSX" else "a ") + word
    return ("an " if first[0].lower() in "aeiou" else "a ") + word


def normalize_regions(regions: RegionsInput, *, box_units: str = "norm", width: int | None = None,
                      height: int | None = None) -> list[Region]:
    """Validated :class:`Region` objects with 0-999 boxes; ``box_units="pixel"`` converts pixel corners of a
    ``width`` x ``height`` image (``internvl.regions.pixels_to_box``). Raises :class:`PromptError`."""
    if box_units not in ("norm", "pixel"):
        raise PromptError(f"box_units must be 'norm' or 'pixel', got {box_units!r}")
    if box_units == "pixel" and not (width and height):
        raise PromptError("box_units='pixel' needs the image width and height")
    items = list(regions.items()) if isinstance(regions, Mapping) else list(regions)
    if not items:
        raise PromptError("regions must not be empty")
    out = []
    for item in items:
        if isinstance(item, Region):
            name, boxes = item.name, item.boxes
        else:
            try:
                name, boxes = item
            except (TypeError, ValueError):
                raise PromptError(f"a region must be a Region or a (name, boxes) pair, got {item!r}") from None
        if not isinstance(name, str) or not name.strip():
            raise PromptError(f"region name must be a non-empty string, got {name!r}")
        boxes = list(boxes)
        if not boxes:
            raise PromptError(f"region {name!r} has no boxes")
        try:
            if box_units == "pixel":
                converted = [b if isinstance(b, Box) else pixels_to_box(b, width, height) for b in boxes]
            else:
                converted = [b if isinstance(b, Box) else validate_box(b) for b in boxes]
            format_region(name.strip(), converted)  # rejects markup inside names
        except RegionError as exc:
            raise PromptError(f"region {name!r}: {exc}") from None
        out.append(Region(name.strip(), converted))
    return out


def text_to_region_subtype(regions: Sequence[Region]) -> str:
    """``"ss"``, ``"sm"``, ``"ms"`` or ``"mm"``: single/multiple objects x single/multiple regions."""
    objects = "s" if len(regions) == 1 else "m"
    boxes = "m" if any(len(r.boxes) > 1 for r in regions) else "s"
    return objects + boxes


def _fill(template: str, where: str, **values: Any) -> str:
    try:
        return template.format_map(values)
    except KeyError as exc:
        raise PromptError(f"{where}: template needs field {exc.args[0]!r}: {template!r}") from None


def join_prompt(head: str, body: str) -> str:
    """`head` and `body` of one turn joined by a space, none after a newline or a CJK character/mark."""
    return head + ("" if not head or head[-1].isspace() or ord(head[-1]) >= 0x2E80 else " ") + body


def _join_turn(base: str, question: str, n_images: int, where: str) -> str:
    """The first human turn (see the module docstring); :class:`PromptError` when it has no text."""
    body = (IMAGE_PLACEHOLDER + "\n") * n_images + question
    if not (base + body).strip():
        raise PromptError(f"{where}: the question is empty")
    return join_prompt(base, body)


def _options_text(options: Sequence[str] | None, what: str) -> list[str]:
    if not options or isinstance(options, str):
        raise PromptError(f"{what}: 'options' must be a list of at least 2 strings")
    opts = [str(o).strip() for o in options]
    if len(opts) < 2 or any(not o for o in opts) or len(set(opts)) != len(opts):
        raise PromptError(f"{what}: options must be at least 2 distinct non-empty strings, got {list(options)!r}")
    return opts


def render_base_prompt(task: str, lang: str = "en", *, modality: str | None = None,
                       options: Sequence[str] | None = None, notes: Sequence[str] | None = None,
                       target: str | None = None, variant: str = "default") -> str:
    """The concrete base prompt of a task (e.g. for a ``meta_file.json`` entry's ``base_prompt``).

    Classification needs ``modality`` and ``options`` (and ``notes``/``target``); grounded_whole takes ``target``.
    """
    tp = get_prompt(task, lang)
    key = _template_key(tp, target)
    template = tp.base_template(key, variant)
    values: dict[str, Any] = {}
    if tp.family == "classification":
        where = f"{task} ({lang})"
        opts = _options_text(options, where)
        if not modality:
            raise PromptError(f"{where}: needs 'modality'")
        wording = tp.targets.get(key or "disease")
        if wording is None:
            raise PromptError(f"{where}: unknown target {key!r}; choose one of {', '.join(tp.targets)}")
        values = dict(task_name=wording["task_name"], option_noun=wording["option_noun"], modality=modality,
                      a_modality=with_article(modality), options="\n".join([*opts, *(notes or [])]))
    return _fill(template, f"{task} ({lang}) base_prompt", **values)


def _template_key(tp: TaskPrompt, target: str | None) -> str | None:
    if tp.family == "classification":
        return target or "disease"
    if tp.task == "grounded_whole":
        return target or "organ"
    return target


#: Fields that only the answer uses: build_question does not need them.
ANSWER_FIELDS = frozenset({"answer", "label", "labels", "text", "findings", "impression"})


@dataclass
class _Build:
    """Everything one build needs, validated once (internal)."""

    tp: TaskPrompt
    where: str
    key: str | None
    images: list[str]
    template: int
    rng: random.Random | None

    def pick(self, templates: list[str]) -> str:
        if self.rng is not None:
            return self.rng.choice(templates)
        if not 0 <= self.template < len(templates):
            raise PromptError(f"{self.where}: template {self.template} out of range (0..{len(templates) - 1})")
        return templates[self.template]


def _prepare(task: str, lang: str, given: dict[str, Any], image: Any, target: str | None, template: int,
             rng: random.Random | None, question_only: bool) -> _Build:
    tp = get_prompt(task, lang)
    where = f"{task} ({lang})"
    required = [f for f in tp.required if not (question_only and f in ANSWER_FIELDS)]
    if question_only and tp.family in ("region", "grounded", "regional_cot") and tp.task != "region_to_text":
        required = [f for f in required if f != "regions"]  # object names may come from `objects`
    missing = [name for name in required if given.get(name) in (None, "", [], ())]
    if missing:
        raise PromptError(f"{where}: missing required field(s) {', '.join(missing)}")
    images = [] if image is None else ([image] if isinstance(image, str) else list(image))
    if any(not isinstance(p, str) or not p for p in images):
        raise PromptError(f"{where}: image must be a non-empty path or a list of them, got {image!r}")
    return _Build(tp, where, _template_key(tp, target), images, template, rng)


def _choice_options(b: _Build, options: Sequence[str] | None) -> tuple[list[str], str]:
    opts = _options_text(options, b.where)
    if len(opts) > len(string.ascii_uppercase):
        raise PromptError(f"{b.where}: at most 26 options")
    block = "\n".join(_fill(b.tp.strings["option_line"], b.where, letter=letter, option=o)
                      for letter, o in zip(string.ascii_uppercase, opts))
    return opts, block


def _object_names(b: _Build, regs: list[Region] | None, objects: Sequence[str] | None) -> list[str]:
    if objects is not None:
        names = [str(o).strip() for o in ([objects] if isinstance(objects, str) else objects)]
        if not names or any(not n for n in names):
            raise PromptError(f"{b.where}: 'objects' must be non-empty names")
        return names
    if not regs:
        raise PromptError(f"{b.where}: needs 'regions' (or 'objects' for a question only)")
    return [r.name or "" for r in regs]


def _render_question(b: _Build, *, question: Any, options: Any, modality: str | None, regs: list[Region] | None,
                     objects: Sequence[str] | None) -> str:
    tp, s = b.tp, b.tp.strings
    if tp.family in ("vqa", "regional_cot") and (question is None or not str(question).strip()):
        raise PromptError(f"{b.where}: needs a non-empty 'question'")
    if tp.family == "vqa":
        values: dict[str, Any] = {"question": str(question).strip()}
        if tp.task == "vqa_choice":
            values["options"] = _choice_options(b, options)[1]
        return _fill(b.pick(tp.question_templates()), b.where, **values)
    if tp.family == "report":
        return b.pick(tp.question_templates())
    if tp.family == "classification":
        return _fill(b.pick(tp.question_templates(b.key)), b.where, modality=modality)
    if tp.family == "regional_cot":  # step one: {question}; step two: {regions} then {question}
        hint = format_regions(regs) if regs else ""
        return _fill(b.pick(tp.question_templates()), b.where, question=str(question).strip(), regions=hint)
    if tp.task == "region_to_text":
        if not regs or len(regs) != 1:
            raise PromptError(f"{b.where}: needs exactly one region (the object to name), got {len(regs or [])}")
        boxes = regs[0].boxes
        return _fill(b.pick(tp.question_templates()), b.where, modality=modality,
                     region=format_region(s["this_word"], boxes), box=format_region(None, boxes))
    if tp.task == "grounded_whole":
        return _fill(b.pick(tp.question_templates(b.key)), b.where, modality=modality)
    names = _object_names(b, regs, objects)
    refs = s["object_joiner"].join(f"{REF_START}{n}{REF_END}" for n in names)
    if tp.family == "region":  # text_to_region[_xx]
        qkey = "single_object" if len(names) == 1 else "multi_object"
        return _fill(b.pick(tp.question_templates(qkey)), b.where, modality=modality, objects=refs)
    return _fill(b.pick(tp.question_templates()), b.where, objects=refs)  # grounded organ / lesion


def _render_answer(b: _Build, *, answer: Any, options: Any, label: Any, labels: Any,
                   regs: list[Region] | None, findings: Any, impression: Any, text: Any, box_units: str,
                   width: int | None, height: int | None) -> str:
    tp, s, where = b.tp, b.tp.strings, b.where
    if tp.family == "vqa":
        ans = str(answer).strip()
        if tp.task != "vqa_choice":
            return _fill(tp.answer, where, answer=ans)
        opts, _ = _choice_options(b, options)
        letters = string.ascii_uppercase[: len(opts)]
        if ans in opts:
            idx = opts.index(ans)
        elif len(ans) == 1 and ans.upper() in letters:
            idx = letters.index(ans.upper())
        else:
            raise PromptError(f"{where}: answer {ans!r} is neither an option nor an option letter")
        return _fill(tp.answer, where, option=opts[idx], letter=letters[idx])
    if tp.family == "report":
        if text:
            body = str(text).strip()
        elif findings:
            body = s["findings_label"] + str(findings).strip()
            if impression:
                body += s["joiner"] + s["impression_label"] + str(impression).strip()
        else:
            raise PromptError(f"{where}: needs 'findings' (and optionally 'impression') or 'text'")
        return _fill(tp.answer, where, text=body)
    if tp.family == "classification":
        opts = _options_text(options, where)
        if tp.task == "classify_single":
            if str(label).strip() not in opts:
                raise PromptError(f"{where}: label {label!r} is not one of the options {opts}")
            return _fill(tp.answer, where, label=str(label).strip())
        chosen = [str(x).strip() for x in (labels or [])]
        if isinstance(labels, str) or not chosen:
            raise PromptError(f"{where}: 'labels' must be a non-empty list")
        unknown = [x for x in chosen if x not in opts]
        if unknown:
            raise PromptError(f"{where}: labels {unknown} are not among the options {opts}")
        ordered = [o for o in opts if o in set(chosen)]  # option order, duplicates removed
        return _fill(tp.answer, where, labels=s["label_joiner"].join(ordered))
    if tp.family == "regional_cot":
        return _fill(tp.answer, where, answer=str(answer).strip(), regions=format_regions(regs or []))
    if tp.task == "region_to_text":
        return _fill(tp.answer, where, name=regs[0].name)  # type: ignore[index]
    if tp.family == "region":
        sub = text_to_region_subtype(regs)  # type: ignore[arg-type]
        if tp.subtype is not None and tp.subtype != sub:
            raise PromptError(f"{where}: the regions form subtype {sub!r} "
                              f"({len(regs)} object(s), max {max(len(r.boxes) for r in regs)} box(es) each)")  # type: ignore[arg-type]
        return _fill(tp.answer, where, regions=format_regions(regs))  # type: ignore[arg-type]
    if tp.task == "grounded_whole":
        if isinstance(findings, (str, bytes)) or not findings:
            raise PromptError(f"{where}: 'findings' must be a non-empty list of (regions, text) pairs")
        lines = []
        for i, item in enumerate(findings):
            try:
                f_regions, f_text = item
            except (TypeError, ValueError):
                raise PromptError(f"{where}: finding {i} must be a (regions, text) pair") from None
            if not str(f_text).strip():
                raise PromptError(f"{where}: finding {i} has empty text")
            f_regs = normalize_regions(f_regions, box_units=box_units, width=width, height=height)
            lines.append(_fill(s["line"], where, regions=format_regions(f_regs), text=str(f_text).strip()))
        return _fill(tp.answer, where, lines=s["line_joiner"].join(lines))
    return _fill(tp.answer, where, regions=format_regions(regs), text=str(text).strip())  # type: ignore[arg-type]


def build_question(task: str, lang: str = "en", *, n_images: int = 1, question: str | None = None,
                   options: Sequence[str] | None = None, target: str | None = None, notes: Sequence[str] | None = None,
                   modality: str | None = None, regions: RegionsInput | None = None,
                   objects: Sequence[str] | str | None = None, width: int | None = None, height: int | None = None,
                   box_units: str = "norm", include_base_prompt: bool = True, prompt_variant: str = "default",
                   template: int = 0, rng: random.Random | None = None) -> str:
    """Only the first human turn of a task (demo, inference), with :func:`build_record`'s wording and joining.
    Text-to-Region and grounded organ/lesion questions take object names as ``objects`` (no boxes)."""
    given = dict(question=question, options=options, modality=modality, regions=regions or objects)
    b = _prepare(task, lang, given, None, target, template, rng, question_only=True)
    regs = None if regions is None else normalize_regions(regions, box_units=box_units, width=width, height=height)
    q = _render_question(b, question=question, options=options, modality=modality, regs=regs, objects=objects)
    base = render_base_prompt(task, lang, modality=modality, options=options, notes=notes, target=target,
                              variant=prompt_variant) if include_base_prompt else ""
    if n_images < 0:
        raise PromptError(f"{b.where}: n_images must be >= 0")
    return _join_turn(base, q, n_images, b.where)


def build_record(task: str, lang: str = "en", *, image: str | Sequence[str] | None = None,
                 id: Any = None,  # noqa: A002 - the record field is called "id"
                 width: int | None = None, height: int | None = None, question: str | None = None, answer: Any = None,
                 options: Sequence[str] | None = None, label: str | None = None, labels: Sequence[str] | None = None,
                 target: str | None = None, notes: Sequence[str] | None = None, modality: str | None = None,
                 regions: RegionsInput | None = None, findings: Any = None, impression: str | None = None,
                 text: str | None = None, box_units: str = "norm", include_base_prompt: bool = True,
                 prompt_variant: str = "default", template: int = 0, rng: random.Random | None = None) -> dict:
    """One complete MedRegInstruct record for ``task`` in ``lang`` from structured fields (the YAML ``required``
    fields per task; table in docs/data-io.md). ``template`` picks a question template (0 = the original wording)
    unless ``rng`` picks one at random; ``image`` is a path, a list of paths or ``None`` (text-only). Raises
    :class:`PromptError` for missing or bad fields.
    """
    given = dict(question=question, answer=answer, options=options, label=label, labels=labels, modality=modality,
                 regions=regions, findings=findings, text=text, impression=impression)
    b = _prepare(task, lang, given, image, target, template, rng, question_only=False)
    regs = None
    if regions is not None and b.tp.family in ("region", "grounded", "regional_cot"):
        regs = normalize_regions(regions, box_units=box_units, width=width, height=height)
    base = render_base_prompt(task, lang, modality=modality, options=options, notes=notes, target=target,
                              variant=prompt_variant) if include_base_prompt else ""
    q = _render_question(b, question=question, options=options, modality=modality, regs=regs, objects=None)
    ans = _render_answer(b, answer=answer, options=options, label=label, labels=labels, regs=regs,
                         findings=findings, impression=impression, text=text, box_units=box_units, width=width,
                         height=height)
    if b.tp.family == "report" and not b.images:
        raise PromptError(f"{b.where}: report generation needs an image")
    if not ans.strip():
        raise PromptError(f"{b.where}: the answer is empty")

    record: dict[str, Any] = {}
    if id is not None:
        record["id"] = id
    if b.images:
        record["image"] = b.images[0] if isinstance(image, str) else b.images
    for name, value in (("width", width), ("height", height)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise PromptError(f"{b.where}: {name} must be a positive integer, got {value!r}")
            record[name] = value
    human = _join_turn(base, q, len(b.images), b.where)
    record["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": ans}]
    return record
