"""Classification (folders, CSV single/multi-label) and VQA (SLAKE / VQA-RAD style) converters."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from internvl.data.convert import ConvertError
from internvl.data.convert.classification import convert_classification
from internvl.data.convert.vqa import convert_vqa


def human(record: dict) -> str:
    return record["conversations"][0]["value"]


def gpt(record: dict) -> str:
    return record["conversations"][1]["value"]


def test_class_folders(tmp_path):
    for label, n in (("normal", 2), ("drusen", 1)):
        (tmp_path / label).mkdir()
        for i in range(n):
            Image.new("L", (8, 8)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "drusen" / "notes.txt").write_text("not an image")
    records, report = convert_classification(tmp_path, modality="OCT", options=["normal", "drusen"])
    assert report.written == 3 and dict(report.skipped) == {"not-an-image": 1}
    assert {(r["image"], gpt(r)) for r in records} == {("normal/0.png", "normal"), ("normal/1.png", "normal"),
                                                       ("drusen/0.png", "drusen")}
    assert "You are given an OCT image. The possible diagnoses are:\nnormal\ndrusen\n<image>\n" in human(records[0])
    with pytest.raises(ConvertError, match=r"class folder\(s\) \['normal'\] are not in the option list"):
        convert_classification(tmp_path, modality="OCT", options=["drusen", "cnv"])
    with pytest.raises(ConvertError, match="image_root is not an option here"):  # not silently ignored
        convert_classification(tmp_path, modality="OCT", image_root=tmp_path)
    with pytest.raises(ConvertError, match="use a CSV for classify_multi"):
        convert_classification(tmp_path, modality="OCT", task="classify_multi")


def test_csv_single_and_multi_label(tmp_path):
    single = tmp_path / "single.csv"
    single.write_text("path,label\na.png,melanoma\nb.png,nevus\n,nevus\nc.png,\n")
    records, report = convert_classification(single, modality="dermoscopic", image_column="path")
    assert [gpt(r) for r in records] == ["melanoma", "nevus"]
    assert dict(report.skipped) == {"missing-field": 1, "no-label": 1}
    assert str(report.problems[0]).startswith(f"{single}:4: missing-field")
    assert "You are given a dermoscopic image." in human(records[0])

    onehot = tmp_path / "onehot.csv"
    onehot.write_text("image,Effusion,Nodule,Pneumothorax\nx.png,1,0,1\ny.png,0,0,0\nz.png,1,maybe,0\n")
    records, report = convert_classification(onehot, modality="chest x-ray", task="classify_multi",
                                  label_columns=["Effusion", "Nodule", "Pneumothorax"], empty_label="No finding",
                                  notes=['"No finding" means no diseases are detected.'])
    assert [gpt(r) for r in records] == ["Effusion, Pneumothorax", "No finding"]
    assert dict(report.skipped) == {"bad-label": 1}
    assert "The possible diagnoses are:\nEffusion\nNodule\nPneumothorax\nNo finding\n\"No finding\" means" in human(records[0])

    sep = tmp_path / "sep.csv"
    sep.write_text("image,labels\na.png,Nodule|Mass\nb.png,Nodule\n")
    records, _ = convert_classification(sep, modality="CT", task="classify_multi", label_column="labels", separator="|",
                             options=["Mass", "Nodule", "Other"])
    assert [gpt(r) for r in records] == ["Mass, Nodule", "Nodule"]
    records, report = convert_classification(sep, modality="CT", task="classify_multi", label_column="labels", separator="|",
                                  options=["Nodule", "Other"])
    assert report.skipped["unknown-label"] == 1
    with pytest.raises(ConvertError, match="missing column"):
        convert_classification(sep, modality="CT", label_column="diagnosis")


SLAKE = [
    {"img_name": "xmlab1/source.jpg", "question": "Which organ is abnormal?", "answer": "Lung", "q_lang": "en",
     "answer_type": "OPEN", "qid": 11},
    {"img_name": "xmlab1/source.jpg", "question": "Is the lung healthy?", "answer": "No", "q_lang": "en",
     "answer_type": "CLOSED", "qid": 12},
    {"img_name": "xmlab1/source.jpg", "question": "这张图片的成像方式是什么?", "answer": "CT", "q_lang": "zh",
     "answer_type": "OPEN", "qid": 13},
    {"img_name": "xmlab2/source.jpg", "question": "How many lesions?", "answer": 2, "q_lang": "en", "qid": 14},
    {"img_name": "xmlab2/source.jpg", "question": "", "answer": "x", "q_lang": "en", "qid": 15},
    {"img_name": "xmlab2/source.jpg", "question": "Q?", "answer": "x", "q_lang": "en", "answer_type": "MAYBE"},
    "not an object",
    {"image_name": "synpic1.jpg", "question": "Which modality?", "answer": "MRI", "options": {"A": "CT", "B": "MRI"}},
]


def test_vqa_slake_vqarad_style(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(SLAKE, ensure_ascii=False), encoding="utf-8")
    records, report = convert_vqa(path, image_prefix="imgs/")
    assert [r["id"] for r in records] == ["11", "12", "14", "8"]
    assert gpt(records[2]) == "2" and records[0]["image"] == "imgs/xmlab1/source.jpg"
    assert human(records[0]).endswith("<image>\nWhich organ is abnormal? Answer the question using a single word or phrase.")
    assert human(records[3]).endswith("<image>\nWhich modality?\nA. CT\nB. MRI") and gpt(records[3]) == "MRI"
    assert dict(report.skipped) == {"other-language": 1, "missing-field": 1, "unknown-answer-type": 1, "bad-item": 1}
    zh, report = convert_vqa(path, lang="zh")
    # items without q_lang are taken to be in the language being converted (here the last item)
    assert [r["id"] for r in zh] == ["13", "8"]
    assert human(zh[0]).startswith("你是一个医疗助手，你需要根据医学图像回答问题。<image>\n这张图片")
    assert report.skipped["other-language"] == 5
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(ConvertError, match="expected a JSON list"):
        convert_vqa(tmp_path / "obj.json")
