"""MedReg-mini's compositional phrasing grammar (issue #17): hundreds of training question templates per family and
language from ``data/medreg_mini/phrasing_grammar.yaml``, none of them a held-out template.

A 15M model does not generalise from 8 "locate" phrasings; it needs many openers, verbs, object forms and tails. Each
frame of the grammar (``"<open><verb> <obj><where>."``) expands to every combination of its slot values; the result
is cleaned (spaces, English capitalisation), de-duplicated, and every template that equals a held-out template after
:func:`normalise` (case, whitespace, final punctuation) or that a held-out template's pattern (fields read as "any
text") matches is dropped (:func:`exclude_heldout`), so the frozen ``paraphrase_heldout.yaml`` stays unseen.
Imported by ``scripts/medreg_mini_userturns.py`` and its tests; it has no CLI.
"""
from __future__ import annotations

import itertools
import re
import string
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

FAMILIES = ("locate", "choice", "vqa.modality", "vqa.body_part", "vqa.plane")
# fill-time fields each family may use (VQA templates are sent as they are)
FIELDS = {"locate": {"name", "ref", "modality"}, "choice": {"options"}, "vqa.modality": set(),
          "vqa.body_part": set(), "vqa.plane": set()}
_SLOT = re.compile(r"<([a-z_0-9]+)>")
_FINAL_PUNCT = ".?!。？！:：,，;；…"


class GrammarError(ValueError):
    """The grammar file is malformed; the message names the file and the frame or slot."""


def normalise(template: str) -> str:
    """The comparison form of a template: case-folded, runs of whitespace made one space, no final punctuation."""
    return " ".join(template.casefold().split()).rstrip(_FINAL_PUNCT).strip()


def heldout_pattern(template: str) -> re.Pattern[str]:
    """A held-out template's normalised form as a regex over normalised questions: each ``{field}`` matches any
    text (so ``"mark {ref} on this image"`` also catches ``"mark the {name} on this image"``). It is searched
    anywhere in a question, so a training template that only adds words around a held-out one (``"请把{name}框出来"``
    around ``"把{name}框出来"``) is a look-alike too."""
    parts = re.split(r"\{[a-z_]+\}", normalise(template))
    return re.compile(".+".join(re.escape(p) for p in parts), re.DOTALL)


def heldout_matcher(heldout: Iterable[str]) -> Callable[[str], bool]:
    """A test ``template -> bool``: True when the template equals a held-out template after :func:`normalise` or
    contains a match of its pattern (:func:`heldout_pattern`)."""
    held = list(heldout)
    norms = {normalise(h) for h in held}
    patterns = [heldout_pattern(h) for h in held]

    def matches(template: str) -> bool:
        norm = normalise(template)
        return norm in norms or any(p.search(norm) for p in patterns)
    return matches


def exclude_heldout(templates: list[str], heldout: Iterable[str]) -> list[str]:
    """``templates`` without those :func:`heldout_matcher` finds (order kept)."""
    matches = heldout_matcher(heldout)
    return [t for t in templates if not matches(t)]


def _clean(text: str, lang: str) -> str:
    text = re.sub(r" +", " ", text).strip().replace(" ?", "?").replace(" .", ".")
    if lang == "en" and text[:1].islower():
        text = text[0].upper() + text[1:]
    return text


def _check_fields(template: str, family: str, where: str) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise GrammarError(f"{where}: bad template {template!r} ({exc})") from None
    if fields - FIELDS[family]:
        raise GrammarError(f"{where}: template {template!r} uses {sorted(fields - FIELDS[family])}, "
                           f"allowed in {family}: {sorted(FIELDS[family])}")
    if family == "locate" and not fields & {"name", "ref"}:
        raise GrammarError(f"{where}: locate template {template!r} names no object ({{ref}} or {{name}})")
    if family == "choice" and "options" not in fields:
        raise GrammarError(f"{where}: choice template {template!r} has no {{options}}")


def expand_frame(frame: str, slots: dict[str, list[str]], lang: str, family: str, where: str) -> list[str]:
    """Every template of one frame (all slot combinations), cleaned and de-duplicated in a fixed order."""
    names = _SLOT.findall(frame)
    missing = [n for n in names if n not in slots]
    if missing:
        raise GrammarError(f"{where}: frame {frame!r} uses undefined slot(s) {missing}")
    out: dict[str, None] = {}
    for values in itertools.product(*(slots[n] for n in names)):
        it = iter(values)
        text = _clean(_SLOT.sub(lambda _m: next(it), frame), lang)
        _check_fields(text, family, where)
        out[text] = None
    return list(out)


def _slots(raw: object, where: str) -> dict[str, list[str]]:
    if not isinstance(raw, dict):
        raise GrammarError(f"{where}: slots must map names to lists of text")
    for name, values in raw.items():
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise GrammarError(f"{where}.slots.{name}: needs a non-empty list of text")
    return {str(k): list(v) for k, v in raw.items()}


def load_grammar(path: Path, heldout: Iterable[str]) -> dict[str, dict[str, list[list[str]]]]:
    """FAMILY -> LANG -> one template list per frame (held-out look-alikes removed; frames left empty are dropped).
    A malformed file raises :class:`GrammarError` naming ``path``."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise GrammarError(f"{path}: cannot read ({exc})") from None
    if not isinstance(raw, dict) or set(raw) != set(FAMILIES):
        raise GrammarError(f"{path}: expected exactly the families {list(FAMILIES)}")
    held = list(heldout)
    out: dict[str, dict[str, list[list[str]]]] = {}
    for family in FAMILIES:
        out[family] = {}
        for lang in ("en", "zh"):
            where = f"{path}: {family}.{lang}"
            spec = raw[family].get(lang) if isinstance(raw[family], dict) else None
            if not isinstance(spec, dict) or not isinstance(spec.get("frames"), list) or not spec["frames"]:
                raise GrammarError(f"{where}: needs 'slots' and a non-empty 'frames' list")
            slots = _slots(spec.get("slots") or {}, where)
            groups = [exclude_heldout(expand_frame(str(f), slots, lang, family, where), held) for f in spec["frames"]]
            out[family][lang] = [g for g in groups if g]
    return out
