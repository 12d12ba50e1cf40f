"""User-style records of MedReg-mini: the questions users type, not only the registry's preamble + question.

Kinds (issue #17), all without the task preamble, the answer always in the question's language:

* ``user_text_to_region``: "locate X" written freely (``{ref}`` tagged or the bare name) -> the boxes.
* ``absent``: "locate X" for a name that is not in the image (another structure of the dataset, or an organ MedReg-mini
  never shows: liver, lesion, ...) -> "X is not visible in this image." / "这张图像中未见X。" (no box).
* ``user_vqa``: modality / body part / plane questions in user wording.
* ``diagnosis``: a diagnosis-style question with a candidate list (MedReg-mini has no disease labels: the candidates
  are modality, body-part, plane or structure names; exactly one candidate is right).
* ``multi_turn`` (training only): 2-3 turns about one image mixing the kinds above and languages; only the first
  human turn carries ``<image>``.

Phrasings come from ``data/medreg_mini/user_phrasings.yaml`` plus the compositional grammar
``data/medreg_mini/phrasing_grammar.yaml`` (hundreds of templates per family and language, held-out look-alikes
removed: ``scripts/medreg_mini_grammar.py``) for training and the test split's user-style files, or from the frozen
``data/medreg_mini/paraphrase_heldout.yaml`` (``paraphrase_*`` test files only). The module is imported by
``scripts/build_medreg_mini.py`` and its tests; it has no CLI.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from internvl.data.prompts import build_record
from scripts import medreg_mini_grammar as grammar
from scripts import medreg_mini_sources as src

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "medreg_mini"
TRAIN_PHRASINGS = DATA_DIR / "user_phrasings.yaml"
HELDOUT_PHRASINGS = DATA_DIR / "paraphrase_heldout.yaml"
GRAMMAR = DATA_DIR / "phrasing_grammar.yaml"
FACTS = ("modality", "body_part", "plane")
LANGS = ("en", "zh")
BODY_PARTS = (("brain", "脑"), ("head", "头部"), ("spine", "脊柱"), ("abdomen", "腹部"), ("neck", "颈部"),
              ("whole body", "全身"), ("eye", "眼"), ("colon", "结肠"), ("skin", "皮肤"))
# every structure name of the dataset (EN, ZH): candidates for absent names and structure choices
STRUCTURES: tuple[tuple[str, str], ...] = tuple(sorted(
    {(f"{side_en} {en}", f"{side_zh}{zh}") for en, zh in set(src.AAL_GROUPS.values()) if en != "cerebellar vermis"
     for side_en, side_zh in src.SIDES.values()} | {("cerebellar vermis", "小脑蚓部")} | set(src.HEAD_NAMES.values())))


HEAD_SET = tuple(src.HEAD_NAMES.values())
HEALTH_CLAIMS = ("lesion", "tumor")  # absent only where the image is known to be healthy


class PhrasingError(ValueError):
    """A phrasing file is missing a section or has a bad template; the message names the file."""


@dataclass(frozen=True)
class Phrasings:
    """Question templates per kind and language, in groups (a hand-written list, or one grammar frame's expansion):
    a record's template is a group drawn uniformly, then a template of it (:meth:`Maker.pick`). ``absent_answer`` and
    ``foreign_names`` come from the training file."""

    path: Path
    locate: dict[str, list[list[str]]]
    vqa: dict[str, dict[str, list[list[str]]]]
    choice: dict[str, list[list[str]]]

    def all_templates(self) -> set[str]:
        """Every question template (for the held-out disjointness check)."""
        groups = [g for ln in LANGS for g in self.locate[ln] + self.choice[ln]]
        groups += [g for fact in FACTS for ln in LANGS for g in self.vqa[fact][ln]]
        return {t for g in groups for t in g}

    def templates(self, family: str, ln: str) -> set[str]:
        """The distinct templates of one family (``locate``, ``choice``, ``vqa.<fact>``) and language."""
        groups = self.vqa[family.split(".", 1)[1]][ln] if family.startswith("vqa.") else getattr(self, family)[ln]
        return {t for g in groups for t in g}


def _per_lang(value: object, where: str) -> dict[str, list[str]]:
    if not isinstance(value, dict) or any(not isinstance(value.get(ln), list) or not value[ln] for ln in LANGS):
        raise PhrasingError(f"{where}: needs non-empty 'en' and 'zh' lists of templates")
    for ln in LANGS:
        for t in value[ln]:
            if not isinstance(t, str) or not t.strip():
                raise PhrasingError(f"{where}.{ln}: empty or non-text template {t!r}")
    return {ln: [list(value[ln])] for ln in LANGS}


def load_phrasings(path: Path) -> tuple[Phrasings, dict]:
    """(templates, the whole YAML mapping) of a phrasing file; a bad file raises :class:`PhrasingError`."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PhrasingError(f"{path}: cannot read ({exc})") from None
    if not isinstance(raw, dict):
        raise PhrasingError(f"{path}: expected a mapping")
    for key in ("locate", "vqa", "choice"):
        if key not in raw:
            raise PhrasingError(f"{path}: missing section {key!r}")
    for t in (*raw["locate"].get("en", []), *raw["locate"].get("zh", [])):
        if "{ref}" not in t and "{name}" not in t:
            raise PhrasingError(f"{path}: locate template {t!r} names no object ({{ref}} or {{name}})")
    for t in (*raw["choice"].get("en", []), *raw["choice"].get("zh", [])):
        if "{options}" not in t:
            raise PhrasingError(f"{path}: choice template {t!r} has no {{options}}")
    if not isinstance(raw["vqa"], dict):
        raise PhrasingError(f"{path}: vqa must map modality/body_part/plane to templates")
    vqa = {fact: _per_lang(raw["vqa"].get(fact), f"{path}: vqa.{fact}") for fact in FACTS}
    return Phrasings(path, _per_lang(raw["locate"], f"{path}: locate"), vqa,
                     _per_lang(raw["choice"], f"{path}: choice")), raw


@dataclass
class Maker:
    """Builds the user-style (question, answer) turns of one saved image. ``rng`` is the builder's user-record stream
    (separate from the registry records' stream, so those stay as they were)."""

    phr: Phrasings
    absent_answer: dict[str, str]
    foreign: list[tuple[str, str]]
    rng: random.Random

    def pick(self, groups: list[list[str]]) -> str:
        """A group uniformly, then one of its templates (one group: a template directly, as before the grammar, so
        the held-out stream draws the same numbers)."""
        return self.rng.choice(groups[0] if len(groups) == 1 else self.rng.choice(groups))

    def _fill(self, template: str, ln: str, name: str = "", modality: str = "", options: list[str] | None = None) -> str:
        joiner = "、" if ln == "zh" else ", "
        return template.format(ref=f"<ref>{name}</ref>", name=name, modality=modality,
                               options=joiner.join(options or []))

    def locate(self, ln: str, regions: list[src.RegionAnn], modality: str, rel: str, w: int, h: int,
               region: src.RegionAnn | None = None) -> tuple[str, str]:
        """Free-form Text-to-Region for one present structure (``region``, else a random one of ``regions``; answer:
        its boxes, canonical region form)."""
        r = region if region is not None else self.rng.choice(regions)
        name = r.name_zh if ln == "zh" else r.name_en
        rec = build_record("text_to_region", ln, image=rel, width=w, height=h, modality=modality,
                           regions=[(name, [list(b) for b in r.boxes])], box_units="pixel", include_base_prompt=False)
        return self._fill(self.pick(self.phr.locate[ln]), ln, name, modality), rec["conversations"][1]["value"]

    def absent_pools(self, item: src.Item) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(dataset names, foreign names) that are surely not in ``item``'s image. Brain-MRI slices: the atlas
        structures not labelled in this slice (the skull is visible but unlabelled, so not "head"/"bone"); head CT:
        its own regions that are missing (the brain is visible but not parcelled, so no atlas names); photos: every
        dataset name; DICOM: only foreign organs, and only on head images (an abdomen or whole-body image may show the
        liver). "lesion"/"tumor" only on the healthy-volunteer brain MRI."""
        present = {(r.name_en, r.name_zh) for r in item.regions}
        organs = [f for f in self.foreign if f[0] not in HEALTH_CLAIMS]
        if item.source == "brain_mri":
            return [s for s in STRUCTURES if s not in present and s not in HEAD_SET], list(self.foreign)
        if item.source == "head_ct":
            return [s for s in HEAD_SET if s not in present], organs
        if item.source in ("fundus", "pathology"):
            return list(STRUCTURES), organs
        return [], (organs if item.body_part[0] in ("head", "brain") else [])

    def absent(self, ln: str, item: src.Item, modality: str) -> tuple[str, str] | None:
        """"Locate X" for an X not in the image -> the "not visible" answer (no box); None when nothing is surely
        absent."""
        own, foreign = self.absent_pools(item)
        pool = own if own and (not foreign or self.rng.random() < 0.6) else foreign
        if not pool:
            return None
        en, zh = self.rng.choice(pool)
        name = zh if ln == "zh" else en
        q = self._fill(self.pick(self.phr.locate[ln]), ln, name, modality)
        answer = self.absent_answer[ln].format(name=name)
        return q, answer[:1].upper() + answer[1:]

    def vqa(self, ln: str, item: src.Item, fact: str) -> tuple[str, str]:
        """A fact question (modality, body part, plane) in user wording."""
        return self.pick(self.phr.vqa[fact][ln]), fact_answer(item, fact, ln)

    def choice(self, ln: str, item: src.Item) -> tuple[str, str]:
        """Diagnosis-style question with 3-4 candidates of one kind (modality, body part, plane, or structure names
        where one is in the image and the others surely are not), exactly one right."""
        i = 0 if ln == "en" else 1
        absent_own = self.absent_pools(item)[0] if item.regions else []
        kinds = ["modality", "body_part"] + (["plane"] if item.plane else []) + (["structure"] if absent_own else [])
        kind = self.rng.choice(kinds)
        if kind == "structure":
            right = self.rng.choice(sorted((r.name_en, r.name_zh) for r in item.regions))[i]
            wrong = [s[i] for s in self.rng.sample(absent_own, min(len(absent_own), self.rng.randint(2, 3)))]
        else:
            right = fact_answer(item, kind, ln)
            pool = {"modality": list(src.MODALITIES.values()), "body_part": list(BODY_PARTS),
                    "plane": list(src.PLANES.values())}[kind]
            others = [p[i] for p in pool if p[i] != right]
            wrong = self.rng.sample(others, min(len(others), self.rng.randint(2, 3)))
        options = wrong + [right]
        self.rng.shuffle(options)
        return self._fill(self.pick(self.phr.choice[ln]), ln, options=options), right


def fact_answer(item: src.Item, fact: str, ln: str) -> str:
    """The answer to a fact question in ``ln`` (the registry records' answers: MODALITIES / body part / PLANES)."""
    i = 0 if ln == "en" else 1
    if fact == "modality":
        return src.MODALITIES[item.modality][i]
    if fact == "body_part":
        return item.body_part[i]
    if item.plane is None:
        raise ValueError(f"{item.name}: no plane")
    return src.PLANES[item.plane][i]


def _record(rel: str, w: int, h: int, turns: list[tuple[str, str]]) -> dict:
    conv = []
    for k, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"image": rel, "width": w, "height": h, "conversations": conv}


# training only (``train=True``): free-form "locate" records per image (distinct structures), the chance of a first and
# of a second absent-name question, and of a user VQA question; the test split keeps one locate, 0.6 and 0.6 (so the
# held-out stream, which shares this code, draws exactly as before)
TRAIN_LOCATES, TRAIN_ABSENT, TRAIN_ABSENT_2ND, TRAIN_VQA = 4, 0.9, 0.5, 0.8


def user_records(item: src.Item, regions: list[src.RegionAnn], rel: str, w: int, h: int, maker: Maker,
                 zh_fraction: float, modality_keep: float, train: bool) -> Iterator[tuple[str, str, dict]]:
    """(file, language, record) of the user-style kinds for one saved image. ``regions`` are in saved-image pixels;
    ``modality_keep`` sub-samples modality questions as the registry records do; ``train`` adds more locate / absent
    / VQA records (see ``TRAIN_LOCATES``) and a 2-3 turn record."""
    rng = maker.rng

    def lang() -> str:
        return "zh" if rng.random() < zh_fraction else "en"

    mods = {"en": src.MODALITIES[item.modality][0], "zh": src.MODALITIES[item.modality][1]}
    facts = [f for f in FACTS if (f != "plane" or item.plane) and (f != "modality" or rng.random() < modality_keep)]
    if regions and not train:
        ln = lang()
        yield "user_text_to_region", ln, _record(rel, w, h, [maker.locate(ln, regions, mods[ln], rel, w, h)])
    for r in rng.sample(regions, min(len(regions), TRAIN_LOCATES)) if train else []:
        ln = lang()
        yield "user_text_to_region", ln, _record(rel, w, h, [maker.locate(ln, regions, mods[ln], rel, w, h, r)])
    absent = maker.absent(ln := lang(), item, mods[ln]) if rng.random() < (TRAIN_ABSENT if train else 0.6) else None
    if absent is not None:
        yield "absent", ln, _record(rel, w, h, [absent])
    if train and absent is not None and rng.random() < TRAIN_ABSENT_2ND:
        second = maker.absent(ln := lang(), item, mods[ln])
        if second is not None and second[0] != absent[0]:
            yield "absent", ln, _record(rel, w, h, [second])
    if facts and rng.random() < (TRAIN_VQA if train else 0.6):
        ln, fact = lang(), rng.choice(facts)
        yield "user_vqa", ln, {**_record(rel, w, h, [maker.vqa(ln, item, fact)]), "question_type": fact}
    if rng.random() < 0.6:
        ln = lang()
        yield "diagnosis", ln, _record(rel, w, h, [maker.choice(ln, item)])
    if train and rng.random() < 0.35:
        turns, langs = [], []
        for _ in range(rng.randint(2, 3)):
            ln = lang()
            kind = rng.choice((["locate"] if regions else []) + ["absent", "choice"] + (["vqa"] if facts else []))
            turn = {"locate": lambda: maker.locate(ln, regions, mods[ln], rel, w, h),
                    "absent": lambda: maker.absent(ln, item, mods[ln]),
                    "vqa": lambda: maker.vqa(ln, item, rng.choice(facts)),
                    "choice": lambda: maker.choice(ln, item)}[kind]()
            if turn is not None:
                turns.append(turn)
                langs.append(ln)
        if len(turns) >= 2:
            yield "multi_turn", "zh" if langs.count("zh") > len(langs) / 2 else "en", _record(rel, w, h, turns)


def heldout_records(item: src.Item, regions: list[src.RegionAnn], rel: str, w: int, h: int, maker: Maker,
                    zh_fraction: float, modality_keep: float) -> Iterator[tuple[str, str, dict]]:
    """The held-out paraphrase records of one TEST image: ``maker`` must hold the held-out phrasings."""
    for file, ln, rec in user_records(item, regions, rel, w, h, maker, zh_fraction, modality_keep, train=False):
        yield {"user_text_to_region": "paraphrase_text2region", "absent": "paraphrase_absent",
               "user_vqa": "paraphrase_vqa", "diagnosis": "paraphrase_diagnosis"}[file], ln, rec


@functools.lru_cache(maxsize=1)
def load_training_phrasings() -> tuple[Phrasings, dict]:
    """The training phrasings: ``user_phrasings.yaml``'s lists plus every frame of ``phrasing_grammar.yaml``, each
    without the templates that equal or match a held-out one (:func:`scripts.medreg_mini_grammar.exclude_heldout`)."""
    hand, raw = load_phrasings(TRAIN_PHRASINGS)
    held = load_phrasings(HELDOUT_PHRASINGS)[0].all_templates()
    try:
        gram = grammar.load_grammar(GRAMMAR, held)
    except grammar.GrammarError as exc:
        raise PhrasingError(str(exc)) from None

    def merged(own: list[list[str]], family: str, ln: str) -> list[list[str]]:
        groups = [grammar.exclude_heldout(g, held) for g in own] + gram[family][ln]
        return [g for g in groups if g]

    phr = Phrasings(TRAIN_PHRASINGS, {ln: merged(hand.locate[ln], "locate", ln) for ln in LANGS},
                    {f: {ln: merged(hand.vqa[f][ln], f"vqa.{f}", ln) for ln in LANGS} for f in FACTS},
                    {ln: merged(hand.choice[ln], "choice", ln) for ln in LANGS})
    return phr, raw


def make_maker(path: Path, rng: random.Random, train_raw: dict) -> Maker:
    """A :class:`Maker` over the phrasing file ``path`` (the training file: with the grammar, see
    :func:`load_training_phrasings`); answers and foreign names from the training file's mapping."""
    phr = load_training_phrasings()[0] if path == TRAIN_PHRASINGS else load_phrasings(path)[0]
    absent = train_raw.get("absent_answer") or {}
    if any("{name}" not in str(absent.get(ln, "")) for ln in LANGS):
        raise PhrasingError(f"{TRAIN_PHRASINGS}: absent_answer needs en and zh templates with {{name}}")
    foreign = [tuple(p) for p in train_raw.get("foreign_names") or []]
    if not foreign or any(len(p) != 2 for p in foreign):
        raise PhrasingError(f"{TRAIN_PHRASINGS}: foreign_names needs [EN, ZH] pairs")
    return Maker(phr, {ln: absent[ln] for ln in LANGS}, foreign, rng)  # type: ignore[arg-type]
