"""Prediction files: formats, FILE:LINE problems, duplicates, empty predictions, crash-safe appends."""
import json

import pytest

from internvl.io_safety import append_jsonl
from medrega_eval.io import read_predictions


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_json_list_in_original_formats_keeps_line_numbers(tmp_path):
    p = _write(tmp_path / "slake_test_1.json", json.dumps([
        {"question_id": 7, "question": "q", "pred_answer": "yes", "gt_answer": "Yes"},
        {"question_id": 8, "pred_answer": None, "gt_answer": "lung"},
        {"answer": "liver[[1, 2, 3, 4]]", "gt": "<ref>liver</ref><box>[[1, 2, 3, 4]]</box>", "hw": [100, 200]},
    ], indent=2))
    recs, problems = read_predictions(p)
    assert problems == []
    assert [r.id for r in recs[:2]] == ["7", "8"]
    assert recs[1].prediction == ""  # null answer = empty prediction, scored, not dropped
    assert recs[2].hw == [100.0, 200.0] and recs[2].id.endswith(":13")  # no id -> FILE:LINE
    assert recs[0].source.endswith(":2")


def test_jsonl_problems_are_named_and_counted(tmp_path):
    lines = [
        json.dumps({"id": 1, "prediction": "a", "reference": "a"}),
        "{not json",
        json.dumps({"id": 2, "reference": "a"}),
        json.dumps({"id": 1, "prediction": "b", "reference": "b"}),
        json.dumps({"id": 3, "prediction": "c", "reference": ""}),
        json.dumps({"id": 4, "prediction": "c", "reference": "c", "hw": [0, 5]}),
        json.dumps(["not", "an", "object"]),
        "",
        json.dumps({"id": 5, "prediction": "d", "reference": "d", "lang": "fr"}),
    ]
    p = _write(tmp_path / "pred.jsonl", "\n".join(lines) + "\n")
    recs, problems = read_predictions(p)
    assert [r.id for r in recs] == ["1"]
    got = {(pr.line, pr.reason) for pr in problems}
    assert got == {(2, "invalid-json"), (3, "missing-field"), (4, "duplicate-id"), (5, "bad-field"),
                   (6, "bad-field"), (7, "not-an-object"), (9, "bad-field")}
    assert all(str(pr).startswith(f"{p}:") for pr in problems)
    assert "already used at" in next(str(pr) for pr in problems if pr.reason == "duplicate-id")


def test_truncated_json_list_keeps_what_decoded(tmp_path):
    p = _write(tmp_path / "p.json", '[{"id": 1, "prediction": "a", "reference": "a"},\n{"id": 2, "predic')
    recs, problems = read_predictions(p)
    assert [r.id for r in recs] == ["1"] and problems[0].reason == "invalid-json" and problems[0].line == 2


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="prediction file not found"):
        read_predictions(tmp_path / "none.jsonl")


def test_append_jsonl_appends_whole_lines(tmp_path):
    p = tmp_path / "rank0.jsonl"
    append_jsonl(p, [{"id": 1, "prediction": "胸腔"}])
    append_jsonl(p, [{"id": 2, "prediction": "x"}])
    assert [json.loads(line)["id"] for line in p.read_text(encoding="utf-8").splitlines()] == [1, 2]
    assert "胸腔" in p.read_text(encoding="utf-8")


def test_json_list_line_numbers_take_one_pass_over_the_text():
    """Line numbers of a JSON-list file are counted incrementally: the newline counting scans the text once in all,
    not from the start for every item (quadratic on a large prediction file)."""
    from medrega_eval.io import _json_list_items

    class CountingText(str):
        scanned = 0

        def count(self, sub, start=0, end=None):
            CountingText.scanned += (len(self) if end is None else end) - start
            return super().count(sub, start, end)

    items = [{"question_id": i, "pred_answer": "x" * 20} for i in range(300)]
    text = CountingText(json.dumps(items, indent=1))
    lines = [line for line, _ in _json_list_items(text)]
    assert lines[:2] == [2, 6] and lines[-1] == 2 + 4 * 299  # indent=1: four lines per item
    assert CountingText.scanned <= len(text)
