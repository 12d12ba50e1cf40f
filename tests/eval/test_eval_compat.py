"""`--compat medrega` equals the original MedRegA scorers (issue #15): one test per item, on the hand-worked fixtures
of compat_fixtures.py (whitespace, spacing inside boxes, name chunks, exact-threshold boxes, pooled files with
repeated ids, both languages), plus the original's crashes reported as null with a reason."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from compat_fixtures import (
    HW, MM, MM_CRASH, MM_EXPECTED, MS, MS_EXPECTED, POOL_A, POOL_B, SM, SM_EXPECTED, SS, SS_EXPECTED_STRINGS, SS_IOUS,
    VQA_EN, VQA_EN_CLOSED_ONLY, VQA_EN_EXPECTED, VQA_ZH, VQA_ZH_EXPECTED,
)

from medrega_eval import cli
from medrega_eval.metrics import medrega_regions as O


def _write(path, rows):
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")  # the original's JSON list
    return path


def _score(tmp_path, name, rows, *args, expect=0, file_name=None):
    pred = _write(tmp_path / (file_name or f"{name}.json"), rows) if rows is not None else None
    out = tmp_path / f"out_{name}"
    argv = ["score", "--out", str(out), "--compat", "medrega", *args]
    if pred is not None:
        argv += ["--pred", str(pred)]
    assert cli.main(argv) == expect
    return json.loads((out / "summary.json").read_text(encoding="utf-8")) if expect == 0 else None


# ----------------------------------------------------------------------------------- item 1: VQA-EN closed/open
def test_vqa_en_closed_is_decided_on_the_cleaned_reference_string(tmp_path):
    s = _score(tmp_path, "vqa_en", VQA_EN, "--task", "vqa", file_name="slake_test_en.json")
    for k, v in VQA_EN_EXPECTED.items():
        assert s[k] == pytest.approx(v, abs=1e-12), k
    assert s["details"]["num_closed"] == 2 and s["details"]["num_open"] == 4


def test_vqa_no_open_question_is_null_with_the_reason(tmp_path):
    s = _score(tmp_path, "vqa_closed", VQA_EN_CLOSED_ONLY, "--task", "vqa", "--lang", "en")
    assert s["closed_accuracy"] == 0.5
    assert s["open_recall"] is None and s["open_accuracy"] is None
    assert "NameError" in s["unavailable"]["open_recall"]


# ------------------------------------------------------------------------------------------ item 7: VQA language
def test_vqa_zh_split_uses_chinese_rules_for_ascii_answers(tmp_path):
    by_name = _score(tmp_path, "vqa_zh", VQA_ZH, "--task", "vqa", file_name="slake_zh_test.json")
    assert by_name["details"]["compat_lang"] == "zh"
    for k, v in VQA_ZH_EXPECTED.items():
        assert by_name[k] == pytest.approx(v, abs=1e-12), k
    # a Chinese split under a file name without "zh": refused without --lang (the original would use English rules)
    _score(tmp_path, "vqa_amb", VQA_ZH, "--task", "vqa", file_name="answers.json", expect=2)
    explicit = _score(tmp_path, "vqa_lang", VQA_ZH, "--task", "vqa", "--lang", "zh", file_name="answers2.json")
    assert {k: explicit[k] for k in VQA_ZH_EXPECTED} == {k: by_name[k] for k in VQA_ZH_EXPECTED}


# ------------------------------------------------------------------------- items 2-4: Text-to-Region, per subtype
def test_ss_grammar_spacing_unreadable_boxes_and_float32_thresholds(tmp_path):
    s = _score(tmp_path, "ss", SS, "--task", "text2region", "--subtype", "ss")
    assert s["details"]["medrega"] == SS_EXPECTED_STRINGS  # the 4-decimal strings the original prints
    assert s["iou"] == pytest.approx(sum(SS_IOUS) / len(SS_IOUS), abs=1e-12)
    assert s["acc50"] == pytest.approx(2 / 7) and s["acc25"] == pytest.approx(2 / 7)
    rows = [json.loads(x) for x in (tmp_path / "out_ss" / "samples.jsonl").read_text().splitlines()]
    assert [r["medrega"]["iou"] for r in rows] == SS_IOUS  # exact float32 values
    assert rows[4]["medrega"]["unreadable_box_list"] and rows[5]["medrega"]["unreadable_box_list"]
    assert s["counts"]["medrega_unreadable_box_lists"] == 2
    assert s["details"]["default_metrics"]["iou"] > s["iou"]  # the tolerant default reads the spaced boxes


@pytest.mark.parametrize("subtype,rows,expected", [("sm", SM, SM_EXPECTED), ("ms", MS, MS_EXPECTED),
                                                   ("mm", MM, MM_EXPECTED)])
def test_sm_ms_mm_hand_worked(tmp_path, subtype, rows, expected):
    s = _score(tmp_path, subtype, rows, "--task", "text2region", "--subtype", subtype)
    got = s["details"]["medrega"]
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    assert not s["unavailable"]


def test_name_chunks_are_the_text_between_brackets():
    pred = O.parse_prediction("<ref>liver</ref><box>[[1, 2, 3, 4]]</box>, <ref>kidney</ref><box>[[5, 6, 7, 8]]</box>"
                              " and more text [note] here[[1, 1, 2, 2]]", HW)
    assert pred.region_names == ["liver", ", kidney", " here"] and pred.failure is None
    assert pred.box_names == ["liver", ", kidney", " here"]


def test_original_crashes_and_divisions_by_zero_are_null_with_reasons(tmp_path):
    mm = _score(tmp_path, "mm_crash", MM_CRASH, "--task", "text2region", "--subtype", "mm")
    assert mm["precision"] is None and mm["iou"] is None
    assert "KeyError" in mm["unavailable"]["iou"] and "mm_crash.json" in mm["unavailable"]["iou"]
    sm = _score(tmp_path, "sm_empty", [SM[1]], "--task", "text2region", "--subtype", "sm")
    assert sm["precision"] == 0 and sm["iou"] is None and "Hungarian pair" in sm["unavailable"]["iou"]
    ms = _score(tmp_path, "ms_noname", [{**MS[1], "answer": "spleen[[0, 0, 100, 100]]"}], "--task", "text2region",
                "--subtype", "ms")
    assert ms["details"]["medrega"]["object_iou"] is None and ms["details"]["medrega"]["box_acc"] == 1.0
    assert "name-agreeing pair" in ms["unavailable"]["medrega.object_iou"]
    bad_ref = _score(tmp_path, "bad_ref", [{**SS[0], "gt": "<ref>liver</ref><box>[[1, 2, 3]]]</box>"}],
                     "--task", "text2region", "--subtype", "ss")
    assert bad_ref["iou"] is None and "cannot read the reference boxes" in bad_ref["unavailable"]["iou"]


def test_float32_iou_equals_torch_arithmetic():
    """The emulated float32 pipeline (v / 999 * W, torchvision's box_area and IoU formula) equals torch's float32
    arithmetic on random boxes and image sizes, including the threshold fixtures."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 4000, 2))
        a = sorted(rng.integers(0, 1000, 2)) + sorted(rng.integers(0, 1000, 2))
        b = sorted(rng.integers(0, 1000, 2)) + sorted(rng.integers(0, 1000, 2))
        a = [a[0], a[2], a[1], a[3]]
        b = [b[0], b[2], b[1], b[3]]

        def pix(box):
            t = torch.tensor(box, dtype=torch.float32).view(-1, 4) / 999
            t[:, 0::2] *= w
            t[:, 1::2] *= h
            return t

        ta, tb = pix(a), pix(b)
        area = lambda t: (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])  # noqa: E731
        lt, rb = torch.max(ta[:, None, :2], tb[:, :2]), torch.min(ta[:, None, 2:], tb[:, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[:, :, 0] * wh[:, :, 1]
        expected = (inter / (area(ta)[:, None] + area(tb) - inter)).item()
        got = O.iou_f32(O._to_pixels(a, w, h), O._to_pixels(b, w, h))
        assert got == expected or (math.isnan(got) and math.isnan(expected))


# ----------------------------------------------------------------------------------- item 5: several answer files
def test_pooled_files_with_repeated_ids_are_all_scored(tmp_path):
    a, b = _write(tmp_path / "t2r_a.json", POOL_A), _write(tmp_path / "t2r_b.json", POOL_B)
    s = _score(tmp_path, "pool", None, "--task", "text2region", "--subtype", "ss", "--pred", f"{a},{b}")
    assert s["num_samples"] == 4 and s["counts"]["repeated_ids_scored"] == 2
    assert s["details"]["medrega"]["iou"] == "0.7500"  # (1 + 0 + 1 + 1) / 4; dropping repeated ids gave 0.5
    default = tmp_path / "out_pool_default"
    assert cli.main(["score", "--task", "text2region", "--pred", f"{a},{b}", "--out", str(default)]) == 0
    d = json.loads((default / "summary.json").read_text())
    assert d["num_samples"] == 2 and d["counts"]["problem:duplicate-id"] == 2  # the default mode keeps its rule


def test_one_line_json_list_without_ids_keeps_every_record(tmp_path):
    from medrega_eval.io import read_predictions

    path = tmp_path / "rg_test.json"
    path.write_text(json.dumps([{"pred_answer": "a", "gt_answer": "a"}, {"pred_answer": "b", "gt_answer": "b"},
                                {"pred_answer": "c", "gt_answer": "c"}]))  # the original's json.dump: one line
    recs, problems = read_predictions(path)
    assert [r.id.rpartition(":")[2] for r in recs] == ["1", "1#2", "1#3"] and not problems
