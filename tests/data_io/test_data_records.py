"""Record checks: every bad-input kind gets its reason and FILE:LINE; strict raises, lenient counts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from internvl.data.records import (
    REASONS,
    BadRecordError,
    ProblemTally,
    RecordChecker,
    iter_records,
    read_jsonl,
    resolve_image,
)

# The 11 published demo records (a copy of shared/reference/medrega-demo-samples.jsonl kept with the data tests).
DEMO = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "medrega_demo.jsonl"
DEMO_LINES = [
    '{"id": 0, "image": "a.png", "conversations": [{"from": "human", "value": "You are a helpful medical assistant. '
    'You are required to answer the question based on the medical image. <image>\\nWhat does this image show? Answer '
    'the question using a single word or phrase."}, {"from": "gpt", "value": "heart"}]}',
    '{"id": 8, "image": "a.png", "width": 432, "height": 432, "conversations": [{"from": "human", "value": "You are a '
    'helpful medical assistant. Your task is object detection. For each object, please utilize this format to '
    'represent the region with its bounding box: \\"<ref>object</ref><box>[[x1, y1, x2, y2]]</box>\\". There might be '
    'multiple boxes for one object, in which case the format is like \\"<ref>object</ref><box>[[x1, y1, x2, y2], '
    '[x3, y3, x4, y4]]</box>\\". <image>\\nPlease locate <ref>carotid vessel wall</ref> in this MRI scan."}, '
    '{"from": "gpt", "value": "<ref>carotid vessel wall</ref><box>[[365, 293, 416, 598], [596, 316, 635, 464]]</box>"}]}',
]


def rec(human="<image>\nWhat is this?", answer="heart", image="a.png", **extra):
    r = {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}], **extra}
    if image is not None:
        r["image"] = image
    return r


@pytest.fixture
def root(tmp_path: Path) -> Path:
    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "a.png")
    return tmp_path


def reasons(problems) -> list[str]:
    return [p.reason for p in problems]


def test_good_records_have_no_problems(root):
    checker = RecordChecker(image_root=root, image_check="decode")
    for line in DEMO_LINES:
        assert checker.check(json.loads(line), file="x.jsonl", line=1) == []
    assert checker.check(rec(image=None, human="What is the normal heart rate?"), file="x", line=1) == []
    assert checker.check(rec(image=["a.png", "a.png"], human="<image>\n<image>\nCompare."), file="x", line=1) == []
    notation = "Use <ref>object</ref><box>[[x1, y1, x2, y2], [x3, y3, x4, y4]]</box>, or plain [[x1, y1, x2, y2]]."
    assert checker.check(rec(human="<image>\n" + notation), file="x", line=1) == []
    assert checker.check(rec(human="<image>\nFormat [[x1, y1, x2]]."), file="x", line=1)[0].reason == "bad-box"
    # one image without a placeholder: the encoder inserts it (original behaviour)
    assert checker.check(rec(human="What is this?"), file="x", line=1) == []
    assert reasons(checker.check(rec(human="<image><image>\nWhat is this?"), file="x", line=1)) == ["image-count-mismatch"]


def test_shared_demo_samples_pass_structure_checks():
    tally = ProblemTally()
    kept = list(iter_records(DEMO, RecordChecker(image_check="none"), strict=False, tally=tally))
    assert len(kept) == 11 and tally.skipped == 0


@pytest.mark.parametrize(
    "record, reason, fragment",
    [
        (rec(image=None, human="<image>\nWhat?"), "image-count-mismatch", "1 '<image>' placeholder(s) for 0 image(s)"),
        (rec(human="<image><image>\nWhat?"), "image-count-mismatch", "2 '<image>' placeholder(s) for 1 image(s)"),
        (rec(image=["a.png", "a.png"], human="<image>\nWhat?"), "image-count-mismatch", "for 2 image(s)"),
        (rec(answer="<image> heart"), "image-count-mismatch", "answer turn(s) [2]"),
        (rec(image="../outside.png"), "image-outside-root", "outside the image root"),
        (rec(image="/etc/passwd"), "image-outside-root", "outside the image root"),
        (rec(image="missing.png"), "missing-image", "not found"),
        (rec(image=""), "bad-field", "empty string"),
        (rec(image=3), "bad-field", "string or a list"),
        (rec(width=-3), "bad-field", "'width' must be a positive integer"),
        ({"image": "a.png"}, "bad-turns", "'conversations' is missing"),
        ({"image": "a.png", "conversations": []}, "bad-turns", "not a non-empty list"),
        ({"image": "a.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
         "bad-turns", "turn 1 is from 'gpt', expected 'human'"),
        ({"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nx"}]}, "bad-turns", "no answer"),
        ({"image": "a.png", "conversations": [{"from": "human"}, {"from": "gpt", "value": "y"}]},
         "bad-turns", "turn 1 must be an object"),
        (rec(answer="   "), "empty-turn", "turn 2 (gpt) has an empty value"),
        (rec(answer="<ref>liver</ref><box>[[10, 20, 5, 40]]</box>"), "bad-box", "x1=10 > x2=5"),
        (rec(answer="<ref>liver</ref><box>[[10, 20, 30, 1000]]</box>"), "bad-box", "outside 0..999"),
        (rec(answer="<ref>liver</ref><box>[[10, 20, 30]]</box>"), "bad-box", "exactly 4 values"),
        (rec(answer="<ref>liver</ref><box>[[10, 20, 30, 40]]"), "bad-box", "unbalanced"),
        (rec(human="<image>\nWhat is <box>[[1, 2, 3, 4.5]]</box>?"), "bad-box", "not an integer"),
    ],
)
def test_each_bad_record_kind(root, record, reason, fragment):
    problems = RecordChecker(image_root=root).check(record, file="data.jsonl", line=7)
    assert reason in reasons(problems), problems
    p = next(p for p in problems if p.reason == reason)
    assert fragment in p.message
    assert str(p).startswith(f"data.jsonl:7: {reason}: ")
    assert reason in REASONS


def test_every_reason_has_a_row_in_the_docs_table():
    table = (Path(__file__).resolve().parents[2] / "docs" / "data-io.md").read_text(encoding="utf-8")
    assert [r for r in sorted(REASONS) if f"| `{r}` |" not in table] == []


def test_a_bad_size_field_does_not_hide_image_problems(root):
    problems = RecordChecker(image_root=root).check(rec(image="missing.png", width=0), file="f", line=1)
    assert sorted(reasons(problems)) == ["bad-field", "missing-image"]


def test_unreadable_and_corrupt_images(root):
    (root / "dir.png").mkdir()
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    good = (root / "a.png").read_bytes()
    (root / "cut.png").write_bytes(good[:40])
    checker = RecordChecker(image_root=root, image_check="decode")
    assert reasons(checker.check(rec(image="dir.png"), file="f", line=1)) == ["unreadable-image"]
    assert reasons(checker.check(rec(image="corrupt.png"), file="f", line=2)) == ["corrupt-image"]
    assert reasons(checker.check(rec(image="cut.png"), file="f", line=3)) == ["corrupt-image"]
    header_only = RecordChecker(image_root=root, image_check="header")
    assert reasons(header_only.check(rec(image="corrupt.png"), file="f", line=2)) == ["corrupt-image"]
    exists_only = RecordChecker(image_root=root, image_check="exists")
    assert exists_only.check(rec(image="corrupt.png"), file="f", line=2) == []


def test_image_results_are_cached_per_path(root, monkeypatch):
    checker = RecordChecker(image_root=root, image_check="decode")
    calls = []
    import internvl.data.records as records

    real = records.load_image
    monkeypatch.setattr(records, "load_image", lambda p: calls.append(p) or real(p))
    for line in range(5):
        assert checker.check(rec(), file="f", line=line) == []
    assert len(calls) == 1


def test_sequence_length_check():
    checker = RecordChecker(image_check="none", max_length=10, token_length=lambda r: len(r["conversations"][0]["value"]))
    assert checker.check(rec(human="<image>\nab"), file="f", line=1) == []
    problems = checker.check(rec(human="<image>\n" + "x" * 20), file="f", line=2)
    assert reasons(problems) == ["too-long"] and "28 tokens > max_length 10" in problems[0].message

    def broken(_):
        raise KeyError("nope")

    failing = RecordChecker(image_check="none", max_length=10, token_length=broken)
    assert reasons(failing.check(rec(), file="f", line=1)) == ["encode-error"]
    with pytest.raises(ValueError, match="token_length"):
        RecordChecker(max_length=5)


def test_read_jsonl_reports_line_level_problems(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps(rec())
    path.write_bytes(
        "\ufeff".encode() + good.encode() + b"\n"  # BOM on the first line is fine
        + b'{"image": "a.png", "conversations": [\n'  # invalid JSON
        + b"\n"  # blank line
        + b'{"caf\xe9": 1}\n'  # latin-1 byte: not UTF-8
        + b"[1, 2]\n"  # not an object
        + good.encode() + b"\n"
    )
    items = list(read_jsonl(path))
    kinds = [(n, getattr(x, "reason", "ok")) for n, x in items]
    assert kinds == [(1, "ok"), (2, "invalid-json"), (3, "blank-line"), (4, "not-utf8"), (5, "not-an-object"), (6, "ok")]
    assert str(items[3][1]).startswith(f"{path}:4: not-utf8: byte 5")
    missing = list(read_jsonl(tmp_path / "absent.jsonl"))
    assert len(missing) == 1 and missing[0][1].reason == "unreadable-file" and missing[0][0] == 0


def test_strict_raises_on_first_bad_record_and_lenient_counts(tmp_path, root):
    path = root / "train.jsonl"
    lines = [json.dumps(rec()), json.dumps(rec(image="missing.png")), "not json", json.dumps(rec(answer=""))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    checker = RecordChecker(image_root=root)
    seen = []
    with pytest.raises(BadRecordError) as err:
        for line, _ in iter_records(path, checker, strict=True):
            seen.append(line)
    assert seen == [1]
    assert str(err.value).startswith(f"{path}:2: missing-image:")

    tally = ProblemTally()
    printed = []
    kept = [line for line, _ in iter_records(path, checker, strict=False, tally=tally, on_problem=printed.append)]
    assert kept == [1]
    assert (tally.seen, tally.kept, tally.skipped) == (4, 1, 3)
    assert dict(tally.by_reason) == {"missing-image": 1, "invalid-json": 1, "empty-turn": 1}
    assert [p.line for p in printed] == [2, 3, 4]
    summary = tally.summary()
    assert summary.startswith("kept 1 of 4 records; skipped 3: empty-turn 1, invalid-json 1, missing-image 1")
    with pytest.raises(ValueError, match="ProblemTally"):
        list(iter_records(path, checker, strict=False))


def test_default_root_is_the_jsonl_directory(tmp_path):
    sub = tmp_path / "ds"
    sub.mkdir()
    Image.new("L", (4, 4)).save(sub / "img.png")
    (sub / "a.jsonl").write_text(json.dumps(rec(image="img.png")) + "\n", encoding="utf-8")
    tally = ProblemTally()
    assert len(list(iter_records(sub / "a.jsonl", RecordChecker(), strict=False, tally=tally))) == 1


def test_resolve_image_refuses_links_out_of_the_root_unless_allowed(tmp_path, monkeypatch):
    outside = tmp_path / "store"
    outside.mkdir()
    Image.new("L", (4, 4)).save(outside / "x.png")
    root = tmp_path / "root"
    root.mkdir()
    (root / "images").symlink_to(outside, target_is_directory=True)
    (root / "inside.png").symlink_to(root / "images" / "x.png")
    monkeypatch.delenv("MEDREGA_ALLOW_LINKS_OUTSIDE_ROOT", raising=False)
    for linked in ("images/x.png", "images/../images/x.png", "inside.png"):
        with pytest.raises(ValueError, match="symbolic link"):
            resolve_image(linked, root)
    monkeypatch.setenv("MEDREGA_ALLOW_LINKS_OUTSIDE_ROOT", "1")
    assert resolve_image("images/x.png", root) == root / "images" / "x.png"
    assert resolve_image("images/../images/x.png", root) == root / "images" / "x.png"
    for bad in ("../store/x.png", "images/../../store/x.png", str(outside / "x.png"), "s3://bucket/x.png"):
        with pytest.raises(ValueError):
            resolve_image(bad, root)
    shutil.rmtree(outside)
