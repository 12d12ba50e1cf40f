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

Phrasings come from ``data/medreg_mini/user_phrasings.yaml`` (training and the test split's user-style files) or from
the frozen ``data/medreg_mini/paraphrase_heldout.yaml`` (``paraphrase_*`` test files only). The module is imported by
``scripts/build_medreg_mini.py`` and its tests; it has no CLI.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from internvl.data.prompts import build_record
from scripts import medreg_mini_sources as src

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "medreg_mini"
TRAIN_PHRASINGS = DATA_DIR / "user_phrasings.yaml"
HELDOUT_PHRASINGS = DATA_DIR / "paraphrase_heldout.yaml"
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
    """Question templates per kind and language; ``absent_answer`` and ``foreign_names`` come from the training file."""

    path: Path
    locate: dict[str, list[str]]
    vqa: dict[str, dict[str, list[str]]]
    choice: dict[str, list[str]]

    def all_templates(self) -> set[str]:
        """Every question template of the file (for the held-out disjointness check)."""
        out = {t for ln in LANGS for t in self.locate[ln] + self.choice[ln]}
        return out | {t for fact in FACTS for ln in LANGS for t in self.vqa[fact][ln]}


def _per_lang(value: object, where: str) -> dict[str, list[str]]:
    if not isinstance(value, dict) or any(not isinstance(value.get(ln), list) or not value[ln] for ln in LANGS):
        raise PhrasingError(f"{where}: needs non-empty 'en' and 'zh' lists of templates")
    for ln in LANGS:
        for t in value[ln]:
            if not isinstance(t, str) or not t.strip():
                raise PhrasingError(f"{where}.{ln}: empty or non-text template {t!r}")
    return {ln: list(value[ln]) for ln in LANGS}


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

    def _fill(self, template: str, ln: str, name: str = "", modality: str = "", options: list[str] | None = None) -> str:
        joiner = "、" if ln == "zh" else ", "
        return template.format(ref=f"<ref>{name}</ref>", name=name, modality=modality,
                               options=joiner.join(options or []))

    def locate(self, ln: str, regions: list[src.RegionAnn], modality: str, rel: str, w: int, h: int) -> tuple[str, str]:
        """Free-form Text-to-Region for one present structure (answer: its boxes, canonical region form)."""
        r = self.rng.choice(regions)
        name = r.name_zh if ln == "zh" else r.name_en
        rec = build_record("text_to_region", ln, image=rel, width=w, height=h, modality=modality,
                           regions=[(name, [list(b) for b in r.boxes])], box_units="pixel", include_base_prompt=False)
        return self._fill(self.rng.choice(self.phr.locate[ln]), ln, name, modality), rec["conversations"][1]["value"]

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
        q = self._fill(self.rng.choice(self.phr.locate[ln]), ln, name, modality)
        answer = self.absent_answer[ln].format(name=name)
        return q, answer[:1].upper() + answer[1:]

    def vqa(self, ln: str, item: src.Item, fact: str) -> tuple[str, str]:
        """A fact question (modality, body part, plane) in user wording."""
        return self.rng.choice(self.phr.vqa[fact][ln]), fact_answer(item, fact, ln)

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
        return self._fill(self.rng.choice(self.phr.choice[ln]), ln, options=options), right


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


def user_records(item: src.Item, regions: list[src.RegionAnn], rel: str, w: int, h: int, maker: Maker,
                 zh_fraction: float, modality_keep: float, multi_turn: bool) -> Iterator[tuple[str, str, dict]]:
    """(file, language, record) of the user-style kinds for one saved image. ``regions`` are in saved-image pixels;
    ``modality_keep`` sub-samples modality questions as the registry records do; ``multi_turn`` adds a 2-3 turn
    record (training)."""
    rng = maker.rng

    def lang() -> str:
        return "zh" if rng.random() < zh_fraction else "en"

    mods = {"en": src.MODALITIES[item.modality][0], "zh": src.MODALITIES[item.modality][1]}
    facts = [f for f in FACTS if (f != "plane" or item.plane) and (f != "modality" or rng.random() < modality_keep)]
    if regions:
        ln = lang()
        yield "user_text_to_region", ln, _record(rel, w, h, [maker.locate(ln, regions, mods[ln], rel, w, h)])
    absent = maker.absent(ln := lang(), item, mods[ln]) if rng.random() < 0.6 else None
    if absent is not None:
        yield "absent", ln, _record(rel, w, h, [absent])
    if facts and rng.random() < 0.6:
        ln, fact = lang(), rng.choice(facts)
        yield "user_vqa", ln, {**_record(rel, w, h, [maker.vqa(ln, item, fact)]), "question_type": fact}
    if rng.random() < 0.6:
        ln = lang()
        yield "diagnosis", ln, _record(rel, w, h, [maker.choice(ln, item)])
    if multi_turn and rng.random() < 0.35:
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
    for file, ln, rec in user_records(item, regions, rel, w, h, maker, zh_fraction, modality_keep, multi_turn=False):
        yield {"user_text_to_region": "paraphrase_text2region", "absent": "paraphrase_absent",
               "user_vqa": "paraphrase_vqa", "diagnosis": "paraphrase_diagnosis"}[file], ln, rec


def make_maker(path: Path, rng: random.Random, train_raw: dict) -> Maker:
    """A :class:`Maker` over the phrasing file ``path``; answers and foreign names from the training file's mapping."""
    phr, _ = load_phrasings(path)
    absent = train_raw.get("absent_answer") or {}
    if any("{name}" not in str(absent.get(ln, "")) for ln in LANGS):
        raise PhrasingError(f"{TRAIN_PHRASINGS}: absent_answer needs en and zh templates with {{name}}")
    foreign = [tuple(p) for p in train_raw.get("foreign_names") or []]
    if not foreign or any(len(p) != 2 for p in foreign):
        raise PhrasingError(f"{TRAIN_PHRASINGS}: foreign_names needs [EN, ZH] pairs")
    return Maker(phr, {ln: absent[ln] for ln in LANGS}, foreign, rng)  # type: ignore[arg-type]
