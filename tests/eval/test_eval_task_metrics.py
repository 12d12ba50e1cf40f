"""VQA, classification and region metrics on hand-worked cases (default rules and --compat medrega)."""
import numpy as np
import pytest

from medrega_eval.metrics import classification as C
from medrega_eval.metrics import regions as R
from medrega_eval.metrics import vqa as V


# ------------------------------------------------------------------------------------------------------ VQA
def test_vqa_default_closed_and_open_rules():
    s = V.score_vqa_sample("Yes.", "yes", "en")
    assert s.closed and s.correct and s.exact_match
    s = V.score_vqa_sample("No, there is none", "yes", "en")
    assert s.closed and not s.correct
    s = V.score_vqa_sample("the left lung", "Left Lung", "en")
    assert not s.closed and s.recall == 1.0 and s.correct and not s.exact_match
    s = V.score_vqa_sample("lung", "left lung lobe", "en")  # recall 1/3 < 0.75
    assert not s.correct and s.recall == pytest.approx(1 / 3)
    assert V.score_vqa_sample("PA", "posterior anterior", "en").exact_match  # medical contraction
    # answer_type from the record wins over the yes/no heuristic
    assert V.score_vqa_sample("yes", "yes", "en", answer_type="OPEN").closed is False


def test_vqa_compat_en_keeps_attached_punctuation():
    # cleanStr("Yes.") -> "yes," : the original scorer misses it
    assert V.medrega_clean_en("Yes.") == "yes,"
    assert V.medrega_clean_en("PA, x-ray: Both") == "posterior anterior, x ray, bilateral"  # contractions per part
    s = V.score_vqa_sample("yes.", "yes", "en", compat="medrega")
    assert s.closed and not s.correct
    assert V.score_vqa_sample("yes", "yes", "en", compat="medrega").correct


def test_vqa_zh_default_and_compat():
    s = V.score_vqa_sample("否", "否", "zh")
    assert s.closed and s.correct
    s = V.score_vqa_sample("胸腔", "胸腔", "zh")
    assert not s.closed and s.correct and s.exact_match
    # compat: closed is keyed on the *prediction*; {"no"} reference also accepts "not"; threshold 0.4
    s = V.score_vqa_sample("yes", "是", "zh", compat="medrega")
    assert s.closed and not s.correct
    s = V.score_vqa_sample("no", "no", "zh", compat="medrega")
    assert s.closed and s.correct  # recall 1/2 over {"no", "not"} >= 0.4
    s = V.score_vqa_sample("是", "是", "zh", compat="medrega")
    assert not s.closed  # prediction is not literally yes/no, so it is scored as open


def test_vqa_aggregate_reports_none_for_empty_groups():
    agg = V.aggregate_vqa([V.score_vqa_sample("heart", "heart", "en"), V.score_vqa_sample("lung", "heart", "en")])
    assert agg["closed_accuracy"] is None and agg["num_closed"] == 0
    assert agg["open_accuracy"] == 0.5 and agg["exact_match"] == 0.5


# -------------------------------------------------------------------------------------------- classification
OPTIONS = ["normal", "choroidal neovascularization", "diabetic macular edema", "drusen"]


def test_map_to_option_default_rules():
    assert C.map_to_option("Drusen.", OPTIONS) == "drusen"
    assert C.map_to_option("The image shows choroidal neovascularization in the retina", OPTIONS) == \
        "choroidal neovascularization"
    assert C.map_to_option("macular edema", OPTIONS) == "diabetic macular edema"  # best token F1
    assert C.map_to_option("glaucoma", OPTIONS) is None  # unmapped, never guessed


def test_map_to_option_compat_bleu1_argmax_first_wins():
    assert C.map_to_option("glaucoma", OPTIONS, compat="medrega") == "normal"  # all zero -> first option
    assert C.map_to_option("drusen.", OPTIONS, compat="medrega") == "normal"  # "drusen." != "drusen"
    # map_answer first strips trailing ASCII punctuation, as the original does; single-label keeps the first part
    assert C.map_answer("Drusen.", OPTIONS, False, compat="medrega") == (["drusen"], [])
    assert C.map_answer("drusen, normal", OPTIONS, False, compat="medrega") == (["drusen"], [])
    assert C.map_answer("Drusen, Normal.", OPTIONS, True, compat="medrega")[0] == ["drusen", "normal"]


def test_classification_metrics_single_and_multilabel():
    y_true = [["normal"], ["drusen"], ["drusen"]]
    y_pred = [["normal"], ["drusen"], []]  # last one unmapped
    m = C.classification_metrics(y_true, y_pred, OPTIONS, multilabel=False)
    assert m["accuracy"] == pytest.approx(2 / 3)
    # normal F1 = 1, drusen: tp1 fn1 -> 2/3 ; averaged over the 2 labels seen
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)
    opts = ["a", "b", "c", "d"]
    mt = C.classification_metrics([["a", "b"], ["c"]], [["a"], ["c", "b"]], opts, multilabel=True)
    assert mt["accuracy"] == 0.0
    # a: 1, b: tp0 fp1 fn1 -> 0, c: 1 ; micro tp2 fp1 fn1 -> 2/3
    assert mt["macro_f1"] == pytest.approx(2 / 3) and mt["f1"] == pytest.approx(2 / 3)
    mc = C.classification_metrics([["a", "b"], ["c"]], [["a"], ["c", "b"]], opts, multilabel=True, compat="medrega")
    assert mc["macro_f1"] == pytest.approx(2 / 4)  # the unseen label d counts 0


def test_reference_labels_unknown_raises():
    assert C.reference_labels("Drusen", OPTIONS, False) == ["drusen"]
    with pytest.raises(C.UnknownLabel, match="glaucoma"):
        C.reference_labels("glaucoma", OPTIONS, False)
    with pytest.raises(C.UnknownLabel):
        C.reference_labels("Drusen", OPTIONS, False, compat="medrega")  # case-sensitive in the original


# ------------------------------------------------------------------------------------------------- regions
def _boxes(text, hw=None):
    return R.parse_for_scoring(text, hw).boxes


def test_box_iou_matches_torchvision_or_hand_computed():
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15]], dtype=float)
    b = np.array([[0, 0, 10, 10], [10, 10, 20, 20], [0, 0, 0, 0]], dtype=float)
    got = R.box_iou(a, b)
    try:
        import torch
        from torchvision.ops import box_iou as tv_box_iou
    except ImportError:
        want = np.array([[1.0, 0.0, 0.0], [25 / 175, 25 / 175, 0.0]])
    else:
        want = tv_box_iou(torch.tensor(a), torch.tensor(b)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_region_sample_default_metrics():
    ref = _boxes("<ref>left lung</ref><box>[[0, 0, 100, 100]]</box>, <ref>right lung</ref><box>[[200, 200, 300, 300]]</box>")
    pred = _boxes("left lung[[0, 0, 100, 100]], heart[[200, 200, 300, 250]], liver[[900, 900, 950, 950]]")
    sample = R.score_region_sample(pred, ref)
    assert sample.num_pred == 3 and sample.num_ref == 2
    s = sample.scores
    assert s["iou"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["acc50"] == 1.0 and s["acc75"] == 0.5
    assert (s["precision"], s["recall"]) == (pytest.approx(2 / 3), 1.0)  # conventional naming
    assert s["alignment_precision"] == pytest.approx(1 / 3) and s["alignment_recall"] == 0.5
    assert s["object_precision"] == pytest.approx(1 / 3) and s["object_recall"] == 0.5


def test_unparsable_prediction_is_a_miss():
    ref = _boxes("<ref>liver</ref><box>[[10, 10, 20, 20]]</box>")
    parsed = R.parse_for_scoring("liver[[10, 10, 2000, 20]]")
    assert parsed.boxes == [] and parsed.errors
    s = R.score_region_sample(parsed.boxes, ref, unparsable=True)
    assert s.scores["iou"] == 0.0 and s.scores["recall"] == 0.0 and s.unparsable


def test_pixel_iou_equals_grid_iou():
    text = "<ref>a</ref><box>[[100, 200, 600, 700]]</box>"
    pred = "a[[150, 250, 650, 800]]"
    grid = R.score_region_sample(_boxes(pred), _boxes(text)).scores["iou"]
    pix = R.score_region_sample(_boxes(pred, [480, 640]), _boxes(text, [480, 640])).scores["iou"]
    assert grid == pytest.approx(pix, abs=1e-12)


def test_coco_map50():
    ref = [_boxes("<ref>a</ref><box>[[0, 0, 100, 100]]</box>"), _boxes("<ref>a</ref><box>[[0, 0, 100, 100]]</box>")]
    perfect = R.coco_map50(ref, ref)
    assert perfect == pytest.approx(1.0)
    half = R.coco_map50([ref[0], _boxes("a[[500, 500, 600, 600]]")], ref)
    assert 0.4 < half < 0.6
    assert R.coco_map50([[], []], ref) == 0.0


def test_score_records_refuses_an_unknown_language_naming_the_record():
    """Library callers build PredictionRecords themselves: a language other than en/zh is a ScoreInputError naming
    the record (checked by the record itself), for every task (it was silently the Chinese tokenizer for VQA and a
    KeyError for reports)."""
    from medrega_eval.io import PredictionRecord, ScoreInputError
    from medrega_eval.score import ScoreConfig, score_records

    for task in ("vqa", "report", "region2text"):
        with pytest.raises(ScoreInputError, match=r"f\.jsonl:3: lang must be 'en' or 'zh', got 'fr'"):
            rec = PredictionRecord(id="1", prediction="the liver", reference="liver", source="f.jsonl:3", lang="fr")
            score_records([rec], ScoreConfig(task=task))


def test_cider_without_any_reference_token_is_unavailable_not_a_crash():
    """pycocoevalcap's CIDEr takes max() over the references' document frequencies: with no reference token in the
    file it crashed; the report now scores the rest and says why CIDEr is missing."""
    from medrega_eval.io import PredictionRecord
    from medrega_eval.score import ScoreConfig, score_records

    rec = PredictionRecord(id="1", prediction="a small effusion", reference="...", source="f.jsonl:1", lang="en")
    result = score_records([rec], ScoreConfig(task="report", metrics=("bleu1", "cider")))
    assert result.metrics["cider"] is None and "reference with a token" in result.unavailable["cider"]
    assert result.metrics["bleu1"] is not None
