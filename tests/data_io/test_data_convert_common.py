"""Helpers every converter shares (internvl.data.convert): task check, JSON/CSV input, record building, output."""
from __future__ import annotations

import argparse
import gzip
import json

import pytest

from internvl.data.convert import (
    ConvertError,
    ConvertReport,
    add_common_arguments,
    build_or_skip,
    build_records,
    check_task,
    common_options,
    finish_report,
    read_csv,
    read_json,
    write_output,
)


def test_check_task():
    check_task("a", ["a", "b"])
    with pytest.raises(ConvertError, match=r"task must be one of \['a', 'b'\], got 'c'"):
        check_task("c", ["a", "b"])


def test_read_json(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"x": ["é"]}', encoding="utf-8")
    assert read_json(good, "thing json") == {"x": ["é"]}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConvertError, match=rf"^{bad}:0: cannot read thing json: "):
        read_json(bad, "thing json")
    with pytest.raises(ConvertError, match=r":0: cannot read thing json: "):
        read_json(tmp_path / "missing.json", "thing json")


def test_read_csv_columns_and_gzip(tmp_path):
    plain = tmp_path / "a.csv"
    plain.write_text("image,label\nx.png,1\n")
    with read_csv(plain, ["image", "label"]) as reader:
        assert [(reader.line_num, row["image"]) for row in reader] == [(2, "x.png")]
    with pytest.raises(ConvertError, match=rf"^{plain}:1: missing column\(s\) \['other'\]; found \['image', 'label'\]"):
        with read_csv(plain, ["image", "other"]):
            pass
    with pytest.raises(ConvertError, match=r":0: cannot open CSV: "):
        with read_csv(tmp_path / "missing.csv", ["image"]):
            pass
    packed = tmp_path / "b.csv.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as fh:
        fh.write("image\ny.png\n")
    with read_csv(packed, ["image"], gunzip=True) as reader:
        assert [row["image"] for row in reader] == ["y.png"]


def test_build_or_skip_counts_prompt_errors():
    report = ConvertReport(source="t")
    record = build_or_skip(report, "f.json", 3, "vqa_open", "en", id="q1", image="a.png", question="q?", answer="a")
    assert record is not None and record["id"] == "q1" and record["conversations"][1]["value"] == "a"
    assert build_or_skip(report, "f.json", 4, "vqa_open", "en", context="item 4: ", id="q2", image="a.png",
                         question="q?") is None
    assert dict(report.skipped) == {"bad-record": 1}
    (problem,) = report.problems
    assert (problem.file, problem.line, problem.reason) == ("f.json", 4, "bad-record")
    assert problem.message.startswith("item 4: ") and "answer" in problem.message


def test_build_records_stops_at_the_first_prompt_error():
    report = ConvertReport(source="t")
    q = {"task": "vqa_open", "question": "q?", "answer": "a"}
    builds = [{**q, "id": "1"}, {**q, "id": "2"}, {"task": "vqa_open", "id": "3", "question": "q?"}, {**q, "id": "4"}]
    records = build_records(report, "f.json", 7, "en", builds, image="a.png", context="x: ")
    assert [r["id"] for r in records] == ["1", "2"] and all(r["image"] == "a.png" for r in records)
    assert dict(report.skipped) == {"bad-record": 1} and report.problems[0].line == 7
    assert report.problems[0].message.startswith("x: ")
    assert build_records(report, "f.json", 8, "en", []) == []


def test_finish_report_and_write_output(tmp_path):
    report = ConvertReport(source="t")
    good = {"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                           {"from": "gpt", "value": "a"}]}
    bad = {"id": "2", "conversations": []}
    records, same = finish_report([("f", 1, good), ("f", 2, bad)], report, image_root=None)
    assert same is report and records == [good] and report.written == 1 and report.n_skipped >= 1
    assert {p.line for p in report.problems} == {2}
    out = tmp_path / "sub" / "out.jsonl"
    assert write_output(records, report, out) is report and report.output == out
    assert [json.loads(line) for line in out.read_text().splitlines()] == [good]


def test_common_options_from_common_arguments():
    parser = argparse.ArgumentParser()
    add_common_arguments(parser, tasks=["t"], default_task="t")
    args = parser.parse_args(["--out", "o.jsonl", "--lang", "zh", "--image-root", "r", "--images", "header",
                              "--id-prefix", "p-", "--no-base-prompt"])
    assert common_options(args) == {"lang": "zh", "image_root": "r", "image_check": "header", "id_prefix": "p-",
                                    "include_base_prompt": False}
    assert common_options(parser.parse_args(["--out", "o.jsonl"]))["include_base_prompt"] is True
