"""`medrega-eval score` end to end on small files: summary names, counts, compat switches, bad input, outputs."""
import json
from pathlib import Path

import pytest
from PIL import Image

from medrega_eval import cli
from medrega_eval.metrics import text as T

TOP_NAMES = {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougeL", "cider", "closed_accuracy", "open_recall",
             "open_accuracy", "token_f1", "exact_match", "accuracy", "macro_f1", "recall", "iou", "acc25", "acc50",
             "acc75", "precision", "f1", "map50"}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _score(tmp_path, name, rows, *args, expect=0):
    pred = _jsonl(tmp_path / f"{name}.jsonl", rows)
    out = tmp_path / f"out_{name}"
    assert cli.main(["score", "--pred", str(pred), "--out", str(out), *args]) == expect
    return json.loads((out / "summary.json").read_text(encoding="utf-8")) if expect == 0 else None


def test_vqa_summary_and_outputs(tmp_path):
    rows = [{"id": 1, "prediction": "Yes.", "reference": "yes"},
            {"id": 2, "prediction": "left lung", "reference": "left lung"},
            {"id": 3, "prediction": "", "reference": "heart"},
            {"id": 3, "prediction": "dup", "reference": "heart"}]
    s = _score(tmp_path, "vqa", rows, "--task", "vqa")
    assert s["closed_accuracy"] == 1.0 and s["open_accuracy"] == 0.5 and s["exact_match"] == pytest.approx(2 / 3)
    assert set(k for k in s if k in TOP_NAMES) == {"bleu1", "closed_accuracy", "open_recall", "open_accuracy",
                                                   "token_f1", "exact_match", "recall"}
    assert s["counts"]["empty_predictions"] == 1 and s["counts"]["problem:duplicate-id"] == 1
    assert s["protocol"]["packages"]["pycocoevalcap"] and len(s["protocol"]["prediction_sha256"]) == 64
    out = tmp_path / "out_vqa"
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3
    assert "| closed_accuracy | 1.0000 |" in (out / "summary.md").read_text()
    assert "<table>" in (out / "report.html").read_text()
    # compat: the original cleanStr keeps "yes," -> closed question missed
    c = _score(tmp_path, "vqa_c", rows, "--task", "vqa", "--compat", "medrega")
    assert c["closed_accuracy"] == 0.0 and c["compat"] == "medrega"


def test_report_zh_uses_segments_and_compat_swaps_rouge(tmp_path):
    rows = [{"id": 1, "prediction": "影像诊断：右侧基底节区见一肿块，边界不清。", "reference": "影像诊断：右侧基底节区见肿块，边界不清。"},
            {"id": 2, "prediction": "双肺未见异常。", "reference": "双肺纹理清晰，未见异常。"}]
    s = _score(tmp_path, "zh", rows, "--task", "report", "--lang", "zh", "--metrics", "bleu1,bleu4,rougeL,cider")
    assert 0.4 < s["rougeL"] < 1 and 0 < s["bleu1"] < 1 and s["cider"] > 0 and "meteor" not in s
    c = _score(tmp_path, "zh_c", rows, "--task", "report", "--lang", "zh", "--compat", "medrega",
               "--metrics", "bleu1,bleu4,rougeL")
    # rouge-score's tokenizer deletes every CJK character: the original's Chinese ROUGE is 0
    assert c["rougeL"] == 0.0 and c["rouge1"] == 0.0 and c["bleu1"] > 0


def test_report_en_default_equals_direct_metrics(tmp_path):
    rows = [{"id": i, "prediction": p, "reference": r} for i, (p, r) in enumerate([
        ("The heart is normal. No effusion.", "Heart size normal. No pleural effusion."),
        ("Left basilar atelectasis ___.", "Mild left basilar atelectasis.")])]
    s = _score(tmp_path, "en", rows, "--task", "report", "--metrics", "bleu1,bleu2,bleu3,bleu4,rougeL,cider")
    cands = [T.tokenize_en(r["prediction"].replace("___", " ")) for r in rows]
    refs = [[T.tokenize_en(r["reference"])] for r in rows]
    bleu, _ = T.coco_bleu(cands, refs)
    assert [s[f"bleu{k}"] for k in range(1, 5)] == pytest.approx(bleu)
    assert s["rougeL"] == pytest.approx(T.corpus_rouge_l(cands, refs)[0])
    assert s["cider"] == pytest.approx(T.coco_cider(cands, refs)[0])


def test_meteor_missing_java_is_reported_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setattr(T.shutil, "which", lambda name: None)
    rows = [{"id": 1, "prediction": "no effusion", "reference": "no pleural effusion"}]
    s = _score(tmp_path, "nojava", rows, "--task", "report")
    assert s["meteor"] is None and "Java" in s["unavailable"]["meteor"] and s["bleu1"] > 0


def test_classification_options_and_unknown_labels(tmp_path):
    rows = [{"id": 1, "prediction": "Drusen.", "reference": "drusen"},
            {"id": 2, "prediction": "glaucoma", "reference": "normal"},
            {"id": 3, "prediction": "normal", "reference": "cataract"}]
    s = _score(tmp_path, "cls", rows, "--task", "classification", "--options", "normal,drusen,diabetic macular edema")
    assert s["accuracy"] == 0.5 and s["counts"]["unmapped_answers"] == 1
    assert s["counts"]["problem:unknown-label"] == 1 and "cataract" in s["problems"][0]
    _score(tmp_path, "cls_noopt", rows, "--task", "classification", expect=2)
    ml = [{"id": 1, "prediction": "cardiomegaly, effusion", "reference": "effusion,cardiomegaly",
           "options": ["cardiomegaly", "effusion", "nodule"]}]
    m = _score(tmp_path, "ml", ml, "--task", "classification", "--multilabel")
    assert m["accuracy"] == 1.0 and m["f1"] == 1.0


def test_region2text_strips_boxes(tmp_path):
    rows = [{"id": 1, "prediction": "right mandible[[421, 351, 505, 470]]", "reference": "right mandible"},
            {"id": 2, "prediction": "liver", "reference": "left kidney"}]
    s = _score(tmp_path, "r2t", rows, "--task", "region2text")
    assert s["accuracy"] == 0.5 and s["recall"] == 0.5 and s["token_f1"] == 0.5


def test_text2region_and_compat_and_unparsable(tmp_path):
    img = tmp_path / "scan.png"
    Image.new("RGB", (200, 100), "gray").save(img)
    rows = [{"id": 1, "prediction": "liver[[0, 0, 500, 500]]", "reference": "<ref>liver</ref><box>[[0, 0, 500, 500]]</box>",
             "hw": [100, 200], "image": "scan.png"},
            {"id": 2, "prediction": "I cannot find it.", "reference": "<ref>spleen</ref><box>[[600, 600, 700, 700]]</box>",
             "hw": [100, 200], "image": "scan.png"},
            {"id": 3, "prediction": "x[[1, 2, 3]]", "reference": "<ref>kidney</ref><box>[[5, 5, 9]]</box>"}]
    s = _score(tmp_path, "t2r", rows, "--task", "text2region", "--image-root", str(tmp_path))
    assert s["iou"] == 0.5 and s["acc50"] == 0.5 and s["map50"] == pytest.approx(0.5, abs=0.02)
    assert s["counts"]["unparsable_predictions"] == 1 and s["counts"]["problem:bad-reference-boxes"] == 1
    bad = _score(tmp_path, "t2r_bad", [{"id": 9, "prediction": "liver[[0, 0, 1200, 500]]",
                                        "reference": "<ref>liver</ref><box>[[0, 0, 500, 500]]</box>"}],
                 "--task", "text2region")
    assert bad["counts"]["malformed_pred_boxes"] == 1 and bad["counts"]["unparsable_predictions"] == 1
    assert "id 9" in bad["details"]["malformed_pred_box_examples"][0]
    html = (tmp_path / "out_t2r" / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 2 and "IoU distribution" in html
    row = json.loads((tmp_path / "out_t2r" / "samples.jsonl").read_text().splitlines()[0])
    assert row["pred_boxes"] == [{"name": "liver", "box": [0, 0, 500, 500]}] and row["matches"][0]["iou"] == 1.0
    c = _score(tmp_path, "t2r_c", rows[:2], "--task", "text2region", "--subtype", "ss", "--compat", "medrega")
    assert c["acc50"] == 0.5 and c["iou"] == 0.5 and "default_metrics" in c["details"]
    assert c["details"]["medrega"]["acc75"] == "0.5000"  # the ss scorer's printed 4-decimal strings
    cm = _score(tmp_path, "t2r_mm", rows[:2], "--task", "text2region", "--subtype", "mm", "--compat", "medrega")
    assert cm["precision"] == cm["details"]["medrega"]["box_pre"] == 0.5 and "object_box_f1" in cm["details"]["medrega"]
    _score(tmp_path, "t2r_nosub", rows[:2], "--task", "text2region", "--compat", "medrega", expect=2)


def test_grounded_report_scores_text_and_boxes(tmp_path):
    ref = "<ref>right lung</ref><box>[[102, 106, 481, 910]]</box>, <ref>left lung</ref><box>[[535, 128, 923, 889]]</box>: No focal consolidation."
    pred = "right lung[[102, 106, 481, 910]], left lung[[535, 128, 923, 600]]: No focal consolidation."
    s = _score(tmp_path, "gr", [{"id": 1, "prediction": pred, "reference": ref}], "--task", "grounded_report",
               "--metrics", "bleu1,rougeL")
    assert s["bleu1"] == pytest.approx(1.0) and s["rougeL"] == pytest.approx(1.0)
    assert s["precision"] == 1.0 and 0.5 < s["iou"] < 1.0


def test_missing_prediction_file_exit_1(tmp_path, capsys):
    assert cli.main(["score", "--task", "vqa", "--pred", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


def test_medrega_report_cleaners_hand_worked():
    from medrega_eval.score import medrega_clean_report_en, medrega_clean_report_zh

    assert medrega_clean_report_zh("1.右肺[见图]结节-大小2.5cm\n2.考虑良性。\n") == "右肺结节大小5cm，考虑良性。"
    assert medrega_clean_report_zh("影像诊断：\n未见异常。\n") == "影像诊断：未见异常。"
    assert medrega_clean_report_en("Findings: No effusion, ___ stable.\n\nImpression:  Normal.") == \
        "findings.no effusion.impression.normal"


def test_benchmark_gives_the_split_settings_and_flags_override(tmp_path):
    yml = tmp_path / "b.yaml"
    yml.write_text("benchmarks:\n  my_rg:\n    task: report\n    annotation: none.jsonl\n    lang: en\n"
                   "    metrics: [bleu1, rougeL, accuracy]\n    download: nothing\n", encoding="utf-8")
    rows = [{"id": 1, "prediction": "no pleural effusion", "reference": "no effusion"}]
    s = _score(tmp_path, "bench", rows, "--benchmark", "my_rg", "--benchmark-file", str(yml))
    assert s["task"] == "report" and s["lang"] == "en" and {"bleu1", "rougeL"} <= set(s)
    assert "cider" not in s and "meteor" not in s  # only the split's report metrics are computed
    o = _score(tmp_path, "bench_o", rows, "--benchmark", "my_rg", "--benchmark-file", str(yml), "--metrics", "cider")
    assert "cider" in o and "rougeL" not in o


def test_score_config_checks_what_library_callers_pass():
    """`score_records` is public: a mistyped language, subtype or compat mode is an error, not silently ignored."""
    from medrega_eval.score import ScoreConfig, ScoreInputError

    for bad, needle in [({"lang": "EN"}, "unknown language"), ({"subtype": "xx"}, "unknown subtype"),
                        ({"compat": "MedRegA"}, "unknown compat mode")]:
        with pytest.raises(ScoreInputError, match=needle):
            ScoreConfig(task="vqa", **bad).validate()


def test_pred_list_too_long_for_one_file_name_is_split(tmp_path):
    names = [tmp_path / f"pred_slake_en_rank{i:03d}_{'x' * 40}.jsonl" for i in range(12)]
    joined = ",".join(map(str, names))
    assert len(joined) > 255 and cli._pred_files(Path(joined)) == names


def test_command_output_reads_the_stream_asked_for():
    """git's commit id comes from stdout alone (a warning on stderr must not join it); java's version is on stderr."""
    import sys

    from medrega_eval.report import _output

    cmd = (sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)")
    assert _output(*cmd) == "out" and _output(*cmd, stream="stderr") == "err"
