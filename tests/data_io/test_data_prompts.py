"""Prompt registry: every shipped file loads, every task x language builds a valid record, demo records reproduce."""
from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import yaml

from internvl.data.prompts import (
    LANGS,
    PROMPT_DIR,
    PromptError,
    ANSWER_FIELDS,
    build_question,
    build_record,
    get_prompt,
    list_tasks,
    load_prompts,
    render_base_prompt,
    with_article,
)
from internvl.data.records import RecordChecker
from internvl.regions import Box, Region, parse_regions

# The 11 published demo records (a copy of shared/reference/medrega-demo-samples.jsonl kept with the data tests).
SHARED_DEMO = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "medrega_demo.jsonl"

# Structured fields for every task: the test builds each one in both languages.
R1 = [("liver", [[100, 120, 300, 340]])]
R_MULTI_BOX = [("kidney", [[100, 500, 200, 600], [700, 500, 800, 600]])]
R_MULTI_OBJ = [("liver", [[100, 120, 300, 340]]), ("spleen", [[600, 100, 700, 300]])]
R_MM = [("liver", [[100, 120, 300, 340]]), ("kidney", [[100, 500, 200, 600], [700, 500, 800, 600]])]
FIELDS: dict[str, dict] = {
    "vqa_open": dict(question="What organ is shown?", answer="heart"),
    "vqa_closed": dict(question="Is there a fracture?", answer="no"),
    "vqa_choice": dict(question="Which modality is this?", options=["CT", "MRI", "X-ray"], answer="B"),
    "report_iuxray": dict(findings="The lungs are clear.", impression="No acute disease."),
    "report_mimiccxr": dict(findings="Heart size is normal."),
    "report_general": dict(text="Findings: normal. Impression: normal."),
    "classify_single": dict(modality="OCT", options=["normal", "drusen"], label="drusen"),
    "classify_multi": dict(modality="chest x-ray", options=["effusion", "nodule", "No finding"],
                           labels=["nodule", "effusion"], notes=['"No finding" means no diseases are detected.']),
    "region_to_text": dict(modality="CT", regions=R1),
    "text_to_region": dict(modality="MRI", regions=R_MM),
    "text_to_region_ss": dict(modality="CT", regions=R1),
    "text_to_region_sm": dict(modality="CT", regions=R_MULTI_BOX),
    "text_to_region_ms": dict(modality="CT", regions=R_MULTI_OBJ),
    "text_to_region_mm": dict(modality="CT", regions=R_MM),
    "grounded_organ": dict(regions=R_MULTI_OBJ, text="Normal size and density."),
    "grounded_lesion": dict(regions=R1, text="Low-density mass, likely carcinoma."),
    "grounded_whole": dict(modality="CT", findings=[(R1, "Normal liver."), (R_MULTI_BOX, "Normal kidneys.")]),
    "regional_cot_locate": dict(question="Is the liver enlarged?", regions=R1),
    "regional_cot_answer": dict(question="Is the liver enlarged?", regions=R1, answer="yes"),
}
EXPECTED_ANSWER_REGIONS = {
    "regional_cot_locate": R1,
    "text_to_region": R_MM, "text_to_region_ss": R1, "text_to_region_sm": R_MULTI_BOX, "text_to_region_ms": R_MULTI_OBJ,
    "text_to_region_mm": R_MM, "grounded_organ": R_MULTI_OBJ, "grounded_lesion": R1, "grounded_whole": R1 + R_MULTI_BOX,
}


def as_regions(pairs) -> list[Region]:
    return [Region(name, [Box(*b) for b in boxes]) for name, boxes in pairs]


def test_every_shipped_prompt_file_loads_with_both_languages():
    files = sorted(PROMPT_DIR.glob("*.yaml"))
    assert {f.stem for f in files} >= {"vqa", "report", "classification", "region", "grounded"}
    registry = load_prompts()
    tasks = list_tasks()
    assert set(tasks) == set(FIELDS), "a task was added or removed: give it fields in this test"
    for task in tasks:
        for lang in LANGS:
            tp = registry[(task, lang)]
            assert tp.source and tp.question_templates is not None
            assert Path(tp.file).parent == PROMPT_DIR


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("task", sorted(FIELDS))
def test_every_task_and_language_builds_a_valid_record(task, lang):
    record = build_record(task, lang, image="img/x.png", id=f"{task}-{lang}", **FIELDS[task])
    assert RecordChecker(image_check="none").check(record, file="built", line=1) == []
    human, gpt = (t["value"] for t in record["conversations"])
    assert human.count("<image>") == 1
    base = render_base_prompt(task, lang, **{k: FIELDS[task][k] for k in ("modality", "options", "notes")
                                             if k in FIELDS[task] and get_prompt(task, lang).family == "classification"})
    assert human.startswith(base)
    parsed = parse_regions(gpt)  # answers' boxes parse with THE region parser
    if task in EXPECTED_ANSWER_REGIONS:
        assert parsed == as_regions(EXPECTED_ANSWER_REGIONS[task])
    else:
        assert parsed == []
    if task == "region_to_text":
        assert gpt == "liver" and parse_regions(human)[-1].boxes == [Box(100, 120, 300, 340)]
    if lang == "zh":
        assert any("\u4e00" <= ch <= "\u9fff" for ch in human), "Chinese prompt expected"
    # every question template of the task also builds
    tp = get_prompt(task, lang)
    templates = tp.questions if isinstance(tp.questions, list) else next(iter(tp.questions.values()))
    for i in range(len(templates)):
        build_record(task, lang, image="img/x.png", template=i, **FIELDS[task])


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("task", sorted(FIELDS))
def test_build_question_matches_the_record_without_answer_fields(task, lang):
    fields = {k: v for k, v in FIELDS[task].items() if k not in ANSWER_FIELDS}
    if task.startswith("text_to_region") or task in ("grounded_organ", "grounded_lesion"):
        fields["objects"] = [name for name, _ in fields.pop("regions")]  # names only, no boxes
    record = build_record(task, lang, image="x.png", **FIELDS[task])
    assert build_question(task, lang, **fields) == record["conversations"][0]["value"]
    if task.startswith("report"):  # the question is the image alone: nothing left without it and the task prompt
        with pytest.raises(PromptError, match="the question is empty"):
            build_question(task, lang, n_images=0, include_base_prompt=False, **fields)
    else:
        assert build_question(task, lang, n_images=0, include_base_prompt=False, **fields).count("<image>") == 0


def test_shared_demo_records_are_reproduced_from_structured_fields():
    demo = [json.loads(line) for line in SHARED_DEMO.read_text(encoding="utf-8").splitlines()]
    img = [d["image"] for d in demo]
    built = [
        build_record("vqa_open", "en", id=0, image=img[0], question="What does this image show?", answer="heart"),
        build_record("vqa_open", "en", id=1, image=img[1], question="What is present?", answer="cardiovascular"),
        build_record("vqa_open", "zh", id=2, image=img[2], question="图像里包含的区域属于身体哪个部分?", answer="胸腔"),
        build_record("vqa_open", "zh", id=3, image=img[3], question="这张图片的成像方式是什么?", answer="CT"),
        build_record("report_mimiccxr", "en", id=4, image=img[4], prompt_variant="demo",
                     findings=demo[4]["conversations"][1]["value"].removeprefix("Findings: ")),
        build_record("report_general", "zh", id=5, image=img[5], text=demo[5]["conversations"][1]["value"]),
        build_record("classify_single", "en", id=6, image=img[6], modality="OCT", label="choroidal neovascularization",
                     options=["normal", "drusen", "diabetic macular edema", "choroidal neovascularization"]),
        build_record("region_to_text", "en", id=7, image=img[7], width=512, height=512, modality="CT",
                     regions=[("right mandible", [[421, 351, 505, 470]])]),
        build_record("text_to_region_sm", "en", id=8, image=img[8], width=432, height=432, modality="MRI",
                     prompt_variant="demo", regions={"carotid vessel wall": [[365, 293, 416, 598], [596, 316, 635, 464]]}),
        build_record("grounded_organ", "en", id=9, image=img[9],
                     regions=[("right lung", [[102, 106, 481, 910]]), ("left lung", [[535, 128, 923, 889]])],
                     text=demo[9]["conversations"][1]["value"].split(": ", 1)[1]),
        build_record("grounded_lesion", "zh", id=10, image=img[10], width=512, height=512,
                     regions=[("胰腺癌", [[661, 528, 743, 599]])], text=demo[10]["conversations"][1]["value"].split("：", 1)[1]),
    ]
    for want, got in zip(demo, built, strict=True):
        assert got == want, want["id"]


def test_pixel_boxes_are_normalised_with_the_region_module():
    record = build_record("text_to_region", "en", image="a.png", modality="CT", box_units="pixel", width=512,
                          height=256, regions=[("liver", [(0, 0, 256, 128)])])
    assert record["width"] == 512 and record["height"] == 256
    assert record["conversations"][1]["value"] == "<ref>liver</ref><box>[[0, 0, 500, 500]]</box>"
    with pytest.raises(PromptError, match="needs the image width and height"):
        build_record("text_to_region", "en", image="a.png", modality="CT", box_units="pixel", regions=R1)


@pytest.mark.parametrize(
    "task, fields, match",
    [
        ("vqa_open", dict(question="q"), "missing required field"),
        ("vqa_choice", dict(question="q", options=["a", "b"], answer="c"), "neither an option"),
        ("classify_single", dict(modality="CT", options=["a", "b"], label="c"), "not one of the options"),
        ("classify_single", dict(modality="CT", options=["a", "a"], label="a"), "distinct"),
        ("classify_multi", dict(modality="CT", options=["a", "b"], labels=["a", "z"]), "not among the options"),
        ("region_to_text", dict(modality="CT", regions=R_MULTI_OBJ), "exactly one region"),
        ("text_to_region_ss", dict(modality="CT", regions=R_MM), "subtype 'mm'"),
        ("text_to_region", dict(modality="CT", regions=[("liver", [[5, 5, 1, 9]])]), "x1=5 > x2=1"),
        ("text_to_region", dict(modality="CT", regions=[("liver", [])]), "has no boxes"),
        ("text_to_region", dict(modality="CT", regions=[("<ref>x", [[1, 2, 3, 4]])]), "markup"),
        ("grounded_whole", dict(modality="CT", findings="text"), "non-empty list"),
        ("classify_single", dict(modality="CT", options=["a", "b"], label="a", target="bones"), "unknown target 'bones'"),
        ("report_iuxray", dict(impression="x"), "needs 'findings'"),
        ("nonexistent_task", dict(), "unknown task"),
        ("vqa_open", dict(question="q?", answer="a", width=0, height=5), "width must be a positive integer"),
        ("vqa_open", dict(question="q?", answer="a", width=5, height=512.5), "height must be a positive integer"),
    ],
)
def test_bad_fields_raise_prompt_errors(task, fields, match):
    with pytest.raises(PromptError, match=match):
        build_record(task, "en", image="a.png", **fields)


def test_training_order_record_without_base_prompt_and_meta_base_prompt():
    r = build_record("classify_single", "en", image="a.png", include_base_prompt=False, modality="OCT",
                     options=["normal", "drusen"], label="normal")
    assert r["conversations"][0]["value"] == "<image>\nPlease diagnose the disease in the OCT image."
    base = render_base_prompt("classify_single", "en", modality="OCT", options=["normal", "drusen"],
                              notes=['"normal" means no diseases are detected.'])
    assert base == ("You are a helpful medical assistant. Your task is disease diagnosis. You are given an OCT image. "
                    'The possible diagnoses are:\nnormal\ndrusen\n"normal" means no diseases are detected.\n')
    organ = render_base_prompt("classify_single", "en", modality="CT", options=["liver", "lung"], target="organ")
    assert "Your task is image classification. You are given a CT image. The possible organs are:" in organ


def test_text_only_multi_image_and_random_templates():
    text_only = build_record("vqa_open", "en", question="What is a normal heart rate?", answer="60-100")
    assert "image" not in text_only and "<image>" not in text_only["conversations"][0]["value"]
    multi = build_record("vqa_open", "zh", image=["a.png", "b.png"], question="两张图像有何不同?", answer="无")
    assert multi["conversations"][0]["value"].count("<image>\n") == 2
    a = [build_record("vqa_closed", "en", image="a", rng=random.Random(s), question="q?", answer="no") for s in range(20)]
    questions = {r["conversations"][0]["value"] for r in a}
    assert len(questions) == 2  # both templates used, deterministically for a seeded rng


def test_with_article():
    cases = {"OCT": "an OCT", "CT": "a CT", "MRI": "an MRI", "X-ray": "an X-ray", "chest x-ray": "a chest x-ray",
             "ultrasound": "an ultrasound", "dermoscopic": "a dermoscopic", "pathology": "a pathology",
             "mammography": "a mammography", "spine x-ray": "a spine x-ray", "fundus": "a fundus"}
    for word, want in cases.items():
        assert with_article(word) == want


# Placeholders the builders fill (internvl.data.prompts); any other name in a shipped template is a typo.
KNOWN_FIELDS = {"question", "options", "option", "letter", "answer", "label", "labels", "modality", "a_modality",
                "task_name", "option_noun", "region", "box", "name", "objects", "regions", "text", "lines"}


def _template_strings(value, where):
    """(where, text) of every string inside a YAML value."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _template_strings(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _template_strings(v, f"{where}.{k}")


def test_shipped_prompt_files_are_well_formed():
    """Every task has both languages and the keys the loader reads, every template parses and names only known
    placeholders, and no task id (subtypes included) is defined twice."""
    seen = []
    for path in sorted(PROMPT_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert isinstance(data["family"], str) and isinstance(data["tasks"], dict), path
        for task, spec in data["tasks"].items():
            seen += [task] + [f"{task}_{sub}" for sub in spec.get("subtypes") or {}]
            for lang in LANGS:
                entry = spec[lang]
                assert {"base_prompt", "questions", "source", "answer"} <= set(entry), (path, task, lang)
                for key in ("base_prompt", "base_prompt_variants", "questions", "answer", "option_line", "line"):
                    for where, text in _template_strings(entry.get(key, ""), f"{path.name}: {task} ({lang}).{key}"):
                        names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
                        assert names <= KNOWN_FIELDS, (where, names - KNOWN_FIELDS)
    assert len(seen) == len(set(seen)), sorted(t for t in seen if seen.count(t) > 1)
    assert len(load_prompts()) == 2 * len(seen)
