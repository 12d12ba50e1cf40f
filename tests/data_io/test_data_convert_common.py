"""What every converter shares (internvl.data.convert): task check, JSON/CSV input, record building and checking
(`Conversion`), output, and the command-line skeleton (`ConverterCLI`)."""
from __future__ import annotations

import argparse
import gzip
import json

import pytest

from internvl.data.convert import (
    Conversion,
    ConverterCLI,
    ConvertError,
    check_task,
    get_converter,
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
    with read_csv(packed, ["image"]) as reader:
        assert [row["image"] for row in reader] == ["y.png"]


def test_conversion_add_prefixes_ids_and_counts_a_prompt_error_once():
    conv = Conversion("t", id_prefix="p-", include_base_prompt=False)
    conv.add("f.json", 3, [{"task": "vqa_open", "id": "q1", "question": "q?", "answer": "a"}], image="a.png")
    (record,) = conv.records
    assert (record["id"], record["conversations"][1]["value"]) == ("p-q1", "a")
    with_prompt = Conversion("t")
    with_prompt.add("f.json", 3, [{"task": "vqa_open", "id": "q1", "question": "q?", "answer": "a"}], image="a.png")
    assert len(with_prompt.records[0]["conversations"][0]["value"]) > len(record["conversations"][0]["value"])
    q = {"task": "vqa_open", "question": "q?", "answer": "a"}
    builds = [{**q, "id": "1"}, {**q, "id": "2"}, {"task": "vqa_open", "id": "3", "question": "q?"}, {**q, "id": "4"}]
    conv.add("f.json", 7, builds, image="a.png", context="x: ")  # the first error ends the item
    assert [r["id"] for r in conv.records] == ["p-q1", "p-1", "p-2"]
    assert dict(conv.report.skipped) == {"bad-record": 1}
    (problem,) = conv.report.problems
    assert (problem.file, problem.line, problem.reason) == ("f.json", 7, "bad-record")
    assert problem.message.startswith("x: ") and "answer" in problem.message


def test_conversion_checks_records_and_write_output(tmp_path):
    q = {"task": "vqa_open", "question": "q?", "answer": "a"}
    conv = Conversion("t")
    conv.add("f", 1, [{**q, "id": "1"}], image="a.png")
    conv.add("f", 2, [{**q, "id": "2"}], image="../outside.png")  # rejected by the training record checks
    records, report = conv.finish()
    assert report is conv.report and [r["id"] for r in records] == ["1"] and report.written == 1
    assert report.n_skipped >= 1 and {p.line for p in report.problems} == {2}
    out = tmp_path / "sub" / "out.jsonl"
    assert write_output(records, report, out) is report and report.output == out
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    with_root = Conversion("t", image_root=tmp_path)  # with an image root every image must exist
    with_root.add("f", 1, [{**q, "id": "1"}], image="a.png")
    assert with_root.finish()[0] == [] and "missing-image" in with_root.report.skipped


def test_common_arguments_are_conversion_keywords():
    cli = ConverterCLI(help="h", tasks=("t", "u"), arguments=(), convert=lambda **kw: kw)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--out", "o.jsonl", "--lang", "zh", "--image-root", "r", "--images", "header",
                              "--id-prefix", "p-", "--no-base-prompt"])
    options = {dest: getattr(args, dest) for dest in args.converter_options}
    assert options == {"lang": "zh", "image_root": "r", "image_check": "header", "id_prefix": "p-",
                       "include_base_prompt": False}
    Conversion("t", **options)  # every common option is a Conversion keyword
    assert args.task == "t" and not args.strict  # the first task is the default
    assert parser.parse_args(["--out", "o.jsonl"]).include_base_prompt is True


def test_converter_cli_feeds_its_options_to_the_function_and_writes(tmp_path):
    calls = []

    def convert(source, *, task, threshold, mode, **options):
        calls.append((source, task, threshold, mode, options))
        conv = Conversion("t", **options)
        conv.add(source, 1, [{"task": "vqa_open", "id": "1", "question": "q?", "answer": "a"}], image="a.png")
        return conv.finish()

    cli = ConverterCLI(help="h", tasks=("vqa_open",), convert=convert,
                       arguments=((("source",), {}), (("--threshold",), dict(type=float, default=0.5)),
                                  (("--regions",), dict(dest="mode", default="label"))))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "o.jsonl"
    report = cli.run(parser.parse_args(["s.json", "--threshold", "0.7", "--out", str(out), "--id-prefix", "x"]))
    assert calls[0][:4] == ("s.json", "vqa_open", 0.7, "label") and calls[0][4]["id_prefix"] == "x"
    assert report.written == 1 and json.loads(out.read_text())["id"] == "x1"
    assert cli.doc == __doc__
    assert get_converter("coco").doc.startswith("COCO-style")
    with pytest.raises(ConvertError, match="unknown format 'nope'"):
        get_converter("nope")
