"""``medrega-data`` end to end: every bad-input kind is reported as FILE:LINE: reason, plus convert and prompts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from internvl.data.cli import main



def conv(human: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]


def good(image: str = "ok.png", answer: str = "heart") -> str:
    return json.dumps({"image": image, "conversations": conv("<image>\nWhat is shown?", answer)})


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "ok.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (root / "folder.png").mkdir()
    (tmp_path / "secret.png").write_bytes((root / "ok.png").read_bytes())
    return root


# (line content, reason) - one bad-input kind per line; line numbers follow this order.
BAD_LINES: list[tuple[bytes, str]] = [
    (good().encode(), ""),
    (b'{"image": "ok.png", "conversations": [', "invalid-json"),
    (b'{"image": "ok.png", "caf\xe9": 1}', "not-utf8"),
    (b"", "blank-line"),
    (b"[1, 2, 3]", "not-an-object"),
    (good("missing.png").encode(), "missing-image"),
    (good("folder.png").encode(), "unreadable-image"),
    (good("corrupt.png").encode(), "corrupt-image"),
    (good("../secret.png").encode(), "image-outside-root"),
    (json.dumps({"image": "ok.png", "conversations": conv("<image>\n<image>\nTwo?", "x")}).encode(), "image-count-mismatch"),
    (json.dumps({"image": "ok.png", "conversations": [conv("<image>\nq", "a")[1], conv("q", "a")[0]]}).encode(), "bad-turns"),
    (json.dumps({"image": "ok.png", "conversations": conv("<image>\nq", " ")}).encode(), "empty-turn"),
    (good(answer="<ref>liver</ref><box>[[500, 10, 100, 20]]</box>").encode(), "bad-box"),
    (good(answer="<ref>liver</ref><box>[[5, 10, 100, 1200]]</box>").encode(), "bad-box"),
    (good(answer="<ref>liver</ref><box>[[5, 10, 100]]</box>").encode(), "bad-box"),
    (json.dumps({"image": 5, "conversations": conv("q", "a")}).encode(), "bad-field"),
]


def write_bad_jsonl(root: Path) -> Path:
    path = root.parent / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    return path


def test_check_reports_every_bad_input_kind(dataset, capsys):
    path = write_bad_jsonl(dataset)
    assert main(["check", str(path), "--image-root", str(dataset)]) == 1
    out = capsys.readouterr().out.splitlines()
    for number, (_, reason) in enumerate(BAD_LINES, start=1):
        matching = [line for line in out if line.startswith(f"{path}:{number}: ")]
        if reason:
            assert any(line.startswith(f"{path}:{number}: {reason}: ") for line in matching), (number, reason, matching)
        else:
            assert matching == []
    summary = out[-1]
    n_bad = sum(1 for _, r in BAD_LINES if r)
    # the gpt-first record has two turn problems
    assert summary.startswith(f"{n_bad} of {len(BAD_LINES)} record(s) bad, {n_bad + 1} problem(s): ")
    assert "bad-box 3" in summary and "missing-image 1" in summary and "not-utf8 1" in summary


def test_check_missing_annotation_file(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["check", str(missing)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{missing}:0: unreadable-file: cannot open annotation file")
    assert out[-1] == "0 of 0 record(s) bad, 1 problem(s): unreadable-file 1"


def test_check_good_file_and_strict_mode(dataset, capsys):
    path = dataset.parent / "good.jsonl"
    path.write_text(good() + "\n" + good() + "\n", encoding="utf-8")
    assert main(["check", str(path), "--image-root", str(dataset)]) == 0
    assert capsys.readouterr().out.strip() == "ok: 2 record(s), no problems"

    bad = write_bad_jsonl(dataset)
    assert main(["check", str(bad), "--image-root", str(dataset), "--strict"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{bad}:2: invalid-json: ") and len(out) == 2 and "--strict" in out[-1]


def test_check_too_long_with_a_real_tokenizer(dataset, tiny_tokenizer_dir, capsys):
    path = dataset.parent / "long.jsonl"
    path.write_text(good() + "\n" + good(answer="the heart is enlarged " * 60) + "\n", encoding="utf-8")
    args = ["check", str(path), "--image-root", str(dataset), "--tokenizer", str(tiny_tokenizer_dir)]
    assert main([*args, "--max-length", "320"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}:2: too-long: ") and "> max_length 320" in out[0]
    assert main([*args, "--max-length", "100000"]) == 0
    assert main(["check", str(path), "--max-length", "10"]) == 2  # no tokenizer: a one-line usage error
    assert main(args) == 2  # a tokenizer without --max-length would be unused: a usage error, not silence
    assert "--tokenizer is only used with --max-length" in capsys.readouterr().err


def test_check_meta_file_with_two_datasets(dataset, tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text(good() + "\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(good() + "\n" + good("missing.png") + "\n", encoding="utf-8")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({
        "ds_a": {"root": str(dataset), "annotation": str(tmp_path / "a.jsonl"), "repeat_time": 1},
        "ds_b": {"root": str(dataset), "annotation": str(tmp_path / "b.jsonl"), "repeat_time": 1},
    }, indent=2))
    assert main(["check", str(meta)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# ds_a: 1 of 1 records ok"
    assert out[1].startswith(f"{tmp_path / 'b.jsonl'}:2: missing-image: ")
    assert out[2] == "# ds_b: 1 of 2 records ok" and out[3].startswith("1 of 3 record(s) bad, 1 problem(s): missing-image 1")
    meta.write_text('{"ds_a": {"root": "x",\n "annotation": 3}}')
    assert main(["check", str(meta)]) == 1
    assert capsys.readouterr().out.startswith(f"{meta}:1: dataset 'ds_a': 'annotation' must be a non-empty string")


def test_convert_commands(tmp_path, capsys):
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}],
        "categories": [{"id": 1, "name": "lesion"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]},
                        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 1, 4, 4]}],
    }))
    out_path = tmp_path / "out" / "coco.jsonl"
    assert main(["convert", "coco", str(coco), "--out", str(out_path), "--modality", "MRI"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{coco}:2: unknown-image: ")
    assert lines[-1] == f"coco {coco}: wrote 1 records to {out_path}; skipped 1: unknown-image 1"
    assert main(["convert", "coco", str(coco), "--out", str(out_path), "--strict"]) == 1
    capsys.readouterr()
    assert main(["check", str(out_path), "--images", "none"]) == 0

    vqa = tmp_path / "vqa.json"
    vqa.write_text(json.dumps([{"image_name": "x.jpg", "question": "Is it normal?", "answer": "yes"}]))
    assert main(["convert", "vqa", str(vqa), "--out", str(tmp_path / "vqa.jsonl")]) == 0
    record = json.loads((tmp_path / "vqa.jsonl").read_text())
    assert record["conversations"][1]["value"] == "yes"

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert main(["convert", "vqa", str(empty), "--out", str(tmp_path / "e.jsonl")]) == 1  # nothing written
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert main(["convert", "vqa", str(broken), "--out", str(tmp_path / "b.jsonl")]) == 2  # a failure: one line, 2
    assert "cannot read VQA json" in capsys.readouterr().err

    csv_path = tmp_path / "cls.csv"
    csv_path.write_text("image,label\na.png,normal\nb.png,drusen\n")
    assert main(["convert", "classification", str(csv_path), "--modality", "OCT", "--out", str(tmp_path / "c.jsonl"),
                 "--lang", "zh", "--no-base-prompt"]) == 0
    first = json.loads((tmp_path / "c.jsonl").read_text().splitlines()[0])
    assert first["conversations"][0]["value"] == "<image>\n请诊断这张OCT图像中的疾病。"

    vindr = tmp_path / "vindr.csv"
    vindr.write_text("image_id,rad_id,class_name,x_min,y_min,x_max,y_max\nA,R1,Nodule,1,1,5,5\n")
    sizes = tmp_path / "sizes.csv"
    sizes.write_text("image_id,width,height\nA,10,10\n")
    assert main(["convert", "vindr", str(vindr), "--sizes", str(sizes), "--out", str(tmp_path / "v.jsonl"),
                 "--merge", "union"]) == 0

    images, masks = tmp_path / "mimg", tmp_path / "mmask"
    images.mkdir(), masks.mkdir()
    Image.new("L", (10, 10)).save(images / "c1.png")
    Image.new("L", (10, 10), 1).save(masks / "c1.png")
    names = tmp_path / "names.json"
    names.write_text('{"1": "liver"}')
    assert main(["convert", "masks", "--images-dir", str(images), "--masks", str(masks), "--names", str(names),
                 "--out", str(tmp_path / "m.jsonl"), "--modality", "CT"]) == 0
    assert "<ref>liver</ref><box>[[0, 0, 999, 999]]</box>" in (tmp_path / "m.jsonl").read_text()


def test_module_entry_point_and_prompts():
    done = subprocess.run([sys.executable, "-m", "internvl.data", "prompts", "text_to_region_mm", "--lang", "zh"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "task: text_to_region_mm (zh)" in done.stdout and "multi_object" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "internvl.data", "check"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
