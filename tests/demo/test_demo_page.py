"""The demo page's text: region markers in chat bubbles, the Region-to-Text label, the EN/ZH string table, the status
line without emoji, small images drawn on an upscaled copy, the one default-dtype rule, and a quiet request path."""
from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from internvl.demo.app import DemoEngine, Session, _message, ask, page_labels
from internvl.demo.drawing import PALETTE, answer_html, draw_regions, escape, region_name_label
from internvl.demo.strings import STRINGS, text
from internvl.demo.tasks import TASKS, build_prompt, task_label
from internvl.demo.uploads import UserInputError
from internvl.inference import GenerationSettings, default_dtype
from internvl.regions import Box, Region, parse_regions

ANSWER = "The <ref>left frontal lobe</ref><box>[[120, 80, 480, 400]]</box>, <ref>skull</ref><box>[[0, 0, 999, 999]]</box>."


def _found(answer: str) -> list[Region]:
    return [r for r in parse_regions(answer, strict=False) if r.boxes]


def _visible(html: str) -> str:
    """The bubble's readable part (before the raw answer), tags removed."""
    return re.sub(r"<[^>]+>", "", html.split("<details")[0]).replace("&nbsp;", " ")


def test_bubble_shows_numbered_coloured_markers_and_names_with_raw_answer_behind_a_click() -> None:
    html = answer_html(ANSWER, _found(ANSWER), "en")
    assert _visible(html) == "The 1 left frontal lobe, 2 skull."
    colours = re.findall(r"background:(#[0-9a-f]{6})", html)
    assert colours == ["#{:02x}{:02x}{:02x}".format(*PALETTE[0]), "#{:02x}{:02x}{:02x}".format(*PALETTE[1])]
    raw = re.search(r"<details[^>]*><summary>raw answer</summary><code>(.*)</code></details>", html)
    assert raw is not None and "&#60;ref&#62;left frontal lobe&#60;/ref&#62;" in raw.group(1)
    assert "[[" not in html and "<ref>" not in html  # no raw markup outside the entities
    # Region-to-Text numbers the answer's regions after the query box (region 1)
    assert ">2</span>" in answer_html(ANSWER, _found(ANSWER), "zh", first_number=2)
    assert "原始回答" in answer_html(ANSWER, _found(ANSWER), "zh")


def test_model_and_user_text_cannot_inject_markup() -> None:
    evil = '<ref><img src=x onerror=alert(1)></ref><box>[[1, 2, 3, 4]]</box> **bold** </code></details><script>'
    html = answer_html(evil, _found(evil), "en")
    assert "<img" not in html and "<script" not in html and "**" not in html
    assert html.count("</details>") == 1 and html.count("</code>") == 1
    assert escape("a\n\nb & c") == "a<br><br>b &#38; c"


def test_answer_without_regions_and_empty_answer() -> None:
    assert _visible(answer_html("No finding.", [], "en")) == "No finding."
    assert answer_html("  ", [], "zh") == escape(text("empty_answer", "zh"))


def test_region_to_text_label_is_the_parsed_name() -> None:
    answer = "<ref>bone</ref><box>[[230, 0, 806, 999]]</box>: visible in this slice"
    assert region_name_label(answer, _found(answer)) == "bone"
    assert region_name_label("left kidney.", []) == "left kidney"
    assert region_name_label("", []) == "?"
    assert len(region_name_label("x" * 200, [])) == 60


def test_string_table_is_complete_and_the_page_relabels_in_chinese() -> None:
    for key, entry in STRINGS.items():
        assert sorted(entry) == ["en", "zh"], key
        en, zh = entry["en"], entry["zh"]
        assert en.strip() and zh.strip() and en != zh or key == "units_grid", key
        assert set(re.findall(r"{(\w+)", en)) == set(re.findall(r"{(\w+)", zh)), key  # same fields
    assert [task_label(k, "zh") for k in TASKS] == ["视觉问答", "报告生成", "诊断", "区域识别", "目标定位", "定位报告"]
    updates = page_labels("zh", "MedRegA demo", "tiny")
    labels = [u.get("label") for u in updates if "label" in u]
    assert text("task", "zh") in labels and text("question", "zh") in labels
    assert all(not re.search(r"[A-Za-z]{4,}", lab.replace("NIfTI", "").replace("MRI", "").replace("DICOM", "")
                             .replace("JPEG", "").replace("TIFF", "")) for lab in labels), labels
    task_update = next(u for u in updates if "choices" in u and ("视觉问答", "vqa") in u["choices"])
    assert len(task_update["choices"]) == len(TASKS)
    assert updates[-2]["value"] == "提问"
    with pytest.raises(KeyError):
        text("no such key", "en")
    with pytest.raises(UserInputError, match="目标定位需要"):  # the task's missing-input message follows the language
        build_prompt("text_to_region", "zh", objects="")


def test_status_line_has_no_emoji_and_escapes() -> None:
    for kind in ("error", "ok", "info"):
        for lang in ("en", "zh"):
            line = _message("<b>x</b>", kind, lang)
            assert all(ord(ch) < 0x2000 or 0x3000 <= ord(ch) <= 0x9FFF or 0xFF00 <= ord(ch) <= 0xFFEF
                       for ch in line), line
            assert "<b>" not in line
    assert _message("bad", "error", "zh").startswith("**错误：**")


def test_small_images_are_drawn_on_a_copy_of_at_least_512_px() -> None:
    tiny = Image.fromarray(np.full((64, 64), 90, dtype=np.uint8))
    out, drawn = draw_regions(tiny, [Region("liver", [Box(0, 0, 999, 999)])])
    assert out.size == (512, 512)
    assert drawn[0].xyxy == (0.0, 0.0, 64.0, 64.0)  # the box list stays in original pixels
    arr = np.asarray(out).astype(int)
    # the label (black background, region colour) is drawn and readable: a band of black pixels near the top left
    assert (arr[5:25, 5:60] == 0).all(axis=2).sum() > 100
    wide = Image.fromarray(np.zeros((300, 1000), dtype=np.uint8))
    assert draw_regions(wide, [])[0].size == (1280, 384)  # the shorter-side rule still applies


def test_default_dtype_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_dtype("cpu") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_dtype("cuda:0") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_dtype("cuda") == "float16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_dtype() == "float32"


def test_dtype_rule_is_stated_in_both_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    from demo import parse_args
    from internvl.cli_support import DTYPE_RULE
    from medrega_eval.cli import main as eval_main

    for run in (lambda: parse_args(["--help"]), lambda: eval_main(["run", "--help"])):
        with pytest.raises(SystemExit):
            run()
        assert " ".join(DTYPE_RULE.split()) in " ".join(capsys.readouterr().out.split())


def test_one_request_logs_one_line_and_no_future_warning(tiny_model, tiny_tokenizer, caplog) -> None:
    engine = DemoEngine(tiny_model, tiny_tokenizer, GenerationSettings(max_new_tokens=4))
    session = Session(image=Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)))
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="medrega.demo"):
        warnings.simplefilter("error", FutureWarning)
        _, _, status = ask(engine, session, task="text_to_region", lang="zh", objects="肝脏")
    lines = [r.getMessage() for r in caplog.records if r.name == "medrega.demo"]
    assert len(lines) == 1 and re.fullmatch(r"request: task=text_to_region lang=zh cot=False latency=\d+\.\d\ds boxes=\d+",
                                            lines[0]), lines
    assert status.startswith("**完成：**") and "用时" in status
