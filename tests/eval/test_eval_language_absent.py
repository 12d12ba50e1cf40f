"""Issue #17 measures: answer language (CJK-share rule), free-form Text-to-Region box rate, absent-name accuracy."""
import pytest

from medrega_eval.io import PredictionRecord
from medrega_eval.metrics.text import text_language
from medrega_eval.metrics.vqa import says_not_visible
from medrega_eval.score import ScoreConfig, score_records


@pytest.mark.parametrize("text, lang", [
    ("<ref>左侧额叶</ref><box>[[1, 2, 3, 4]]</box>", "zh"),
    ("<ref>left frontal lobe</ref><box>[[1, 2, 3, 4]]</box>", "en"),
    ("CT冠状面头部图像", "zh"),           # 7 CJK characters vs 1 Latin word
    ("<ref>: visible in this slice", "en"),
    ("The 额叶 is here", "en"),             # 2 CJK characters vs 3 words
    ("[[1, 2, 3, 4]]", None),
    ("", None),
    ("<image>\n请在这张CT图像中定位<ref>骨骼</ref>。", "zh"),
])
def test_text_language_cjk_share_rule(text, lang):
    assert text_language(text) == lang


def test_not_visible_phrases_both_languages():
    assert says_not_visible("Liver is not visible in this image.")
    assert says_not_visible("The lesion cannot be seen.")
    assert says_not_visible("这张图像中未见右侧颞叶。") and says_not_visible("看不到肝脏")
    assert not says_not_visible("脑部未见异常（健康志愿者）。")  # "no abnormality seen" is not an absent-name answer
    assert not says_not_visible("<ref>bone</ref><box>[[1, 2, 3, 4]]</box>: visible in this slice")


def _rec(i, pred, ref, question):
    return PredictionRecord(id=str(i), prediction=pred, reference=ref, source=f"f.jsonl:{i + 1}", question=question)


def test_vqa_absent_accuracy_and_language_match():
    recs = [
        _rec(0, "Liver is not visible in this image.", "Liver is not visible in this image.", "<image>\nFind the liver."),
        _rec(1, "这张图像中未见肝脏。", "这张图像中未见肝脏。", "<image>\n肝脏在哪里？"),
        # says "not visible" but draws a box: wrong
        _rec(2, "<ref>liver</ref><box>[[1, 2, 3, 4]]</box> not visible", "Liver is not visible in this image.",
             "<image>\nWhere is the liver?"),
        _rec(3, "头部", "Lung is not visible in this image.", "<image>\nWhere is the lung?"),  # wrong, and in Chinese
        _rec(4, "CT", "CT", "<image>\n这是什么类型的检查？"),  # reference not in the question's language: left out
    ]
    r = score_records(recs, ScoreConfig(task="vqa"))
    assert r.metrics["absent_accuracy"] == pytest.approx(2 / 4)
    assert r.counts["absent_questions"] == 4
    assert r.counts["lang_match_records"] == 4
    assert r.metrics["lang_match"] == pytest.approx(3 / 4)
    assert r.details["lang_match_zh"] == 1.0 and r.details["lang_match_en"] == pytest.approx(2 / 3)


def test_text2region_box_rate():
    ref = "<ref>bone</ref><box>[[100, 100, 500, 500]]</box>"
    recs = [_rec(0, ref, ref, "<image>\nFind <ref>bone</ref>."), _rec(1, "眼", ref, "<image>\nFind <ref>bone</ref>."),
            _rec(2, "<ref>bone</ref><box>[[0, 0, 10, 10]]</box>", ref, "<image>\nLocate <ref>bone</ref>.")]
    r = score_records(recs, ScoreConfig(task="text2region"))
    assert r.metrics["box_rate"] == pytest.approx(2 / 3)
    assert r.metrics["acc50"] == pytest.approx(1 / 3)
    assert r.metrics["lang_match"] == pytest.approx(2 / 3)
