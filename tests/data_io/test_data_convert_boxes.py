"""Box converters: COCO detection json and VinDr-style per-radiologist CSV."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from internvl.data.convert import ConvertError
from internvl.data.convert.coco import convert_coco
from internvl.data.convert.vindr import cluster_boxes, convert_vindr, merge_boxes
from internvl.data.records import RecordChecker
from internvl.regions import Box, Region, parse_regions, pixels_to_box


def answer_regions(record: dict) -> list[Region]:
    return parse_regions(record["conversations"][1]["value"])


# --------------------------------------------------------------------------------------------- COCO


def coco_doc() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 200, "height": 100},
            {"id": 2, "file_name": "b.png", "width": 50, "height": 50},
            {"id": 3, "file_name": "c.png", "width": 0, "height": 50},  # bad size
            {"id": 1, "file_name": "dup.png", "width": 10, "height": 10},  # duplicate id
        ],
        "categories": [{"id": 7, "name": "liver"}, {"id": 8, "name": "kidney"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 20, 50, 40]},
            {"id": 2, "image_id": 1, "category_id": 8, "bbox": [100, 10, 20, 20]},
            {"id": 3, "image_id": 1, "category_id": 8, "bbox": [150, 10, 20, 20]},
            {"id": 4, "image_id": 1, "category_id": 8, "bbox": [150, 10, 20, 20]},  # duplicate box
            {"id": 5, "image_id": 9, "category_id": 7, "bbox": [1, 1, 2, 2]},  # unknown image
            {"id": 6, "image_id": 1, "category_id": 99, "bbox": [1, 1, 2, 2]},  # unknown category
            {"id": 7, "image_id": 1, "category_id": 7, "bbox": [1, 1, 0, 2]},  # zero width
            {"id": 8, "image_id": 1, "category_id": 7, "bbox": [190, 1, 30, 2]},  # outside the image
            {"id": 9, "image_id": 1, "category_id": 7, "bbox": [1, 1, "x", 2]},  # not a number
        ],
    }


def test_coco_text_to_region_groups_boxes_per_category(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco_doc()))
    records, report = convert_coco(path, modality="CT")
    assert report.written == 1 and len(records) == 1
    assert dict(report.skipped) == {"bad-image-entry": 1, "duplicate-image-id": 1, "duplicate-box": 1,
                                    "unknown-image": 1, "unknown-category": 1, "bad-bbox": 2,
                                    "bbox-outside-image": 1, "no-annotations": 1}
    problem = next(p for p in report.problems if p.reason == "unknown-image")
    assert str(problem).startswith(f"{path}:5: unknown-image: annotations[4] (id 5)")
    # problems of an image are at its first entry's line, not at a later entry reusing its id
    assert next(p for p in report.problems if p.reason == "duplicate-box").line == 1
    rec = records[0]
    assert (rec["image"], rec["width"], rec["height"]) == ("a.png", 200, 100)
    assert "Please locate <ref>liver</ref>, <ref>kidney</ref> in this CT scan." in rec["conversations"][0]["value"]
    assert answer_regions(rec) == [
        Region("liver", [pixels_to_box([10, 20, 60, 60], 200, 100)]),
        Region("kidney", [pixels_to_box([100, 10, 120, 30], 200, 100), pixels_to_box([150, 10, 170, 30], 200, 100)]),
    ]
    assert answer_regions(rec)[0].boxes == [Box(50, 200, 300, 599)]


def test_coco_region_to_text_and_image_checks(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco_doc()))
    records, report = convert_coco(path, task="region_to_text", lang="zh", modality="CT")
    assert [r["conversations"][1]["value"] for r in records] == ["liver", "kidney", "kidney", "kidney"]
    assert "这张CT图像中的<ref>这个</ref><box>" in records[0]["conversations"][0]["value"]
    # with an image root every image must exist: a.png is missing
    records, report = convert_coco(path, image_root=tmp_path)
    assert records == [] and report.skipped["missing-image"] == 1
    Image.new("L", (200, 100)).save(tmp_path / "a.png")
    records, _ = convert_coco(path, image_root=tmp_path, image_check="decode")
    assert len(records) == 1


def test_coco_ids_that_are_not_ints_or_strings_are_skipped_with_their_line(tmp_path):
    """A list, object or bool id cannot name an image or category: a FILE:LINE skip, never a TypeError."""
    doc = coco_doc()
    doc["images"].append({"id": [5], "file_name": "e.png", "width": 10, "height": 10})
    doc["annotations"] += [{"id": 10, "image_id": [1], "category_id": 7, "bbox": [1, 1, 2, 2]},
                           {"id": 11, "image_id": 1, "category_id": {"a": 1}, "bbox": [1, 1, 2, 2]}]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc))
    records, report = convert_coco(path)
    assert len(records) == 1
    found = {(p.line, p.reason) for p in report.problems}  # lines count entries of each list from 1
    assert {(5, "bad-image-entry"), (10, "unknown-image"), (11, "unknown-category")} <= found
    doc["categories"].append({"id": True, "name": "spleen"})
    path.write_text(json.dumps(doc))
    with pytest.raises(ConvertError, match=r":3: categories\[2\] needs an integer or string 'id'"):
        convert_coco(path)


def test_coco_structure_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"images": []}')
    with pytest.raises(ConvertError, match="'images', 'annotations' and 'categories'"):
        convert_coco(path)
    path.write_text("{not json")
    with pytest.raises(ConvertError, match="cannot read COCO json"):
        convert_coco(path)


# --------------------------------------------------------------------------------------------- VinDr


VINDR_CSV = """image_id,rad_id,class_name,x_min,y_min,x_max,y_max
A,R8,Nodule/Mass,100,100,200,200
A,R9,Nodule/Mass,110,90,210,190
A,R10,Nodule/Mass,90,110,190,210
A,R9,Nodule/Mass,700,700,720,720
A,R8,Aortic enlargement,400,300,500,420
B,R8,No finding,,,,
B,R9,No finding,,,,
C,R8,Cardiomegaly,10,10,5,20
D,R8,Cardiomegaly,10,10,50,20
"""


@pytest.fixture
def vindr(tmp_path) -> tuple[Path, Path]:
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(VINDR_CSV)
    sizes = tmp_path / "sizes.csv"
    sizes.write_text("image_id,width,height\nA,1000,800\nB,1000,1000\nC,100,100\n")
    return csv_path, sizes


def test_cluster_and_merge_arithmetic():
    boxes = [np.array(b, float) for b in ([0, 0, 10, 10], [1, 0, 11, 10], [2, 0, 12, 10], [50, 50, 60, 60])]
    assert cluster_boxes(boxes, 0.5) == [[0, 1, 2], [3]]
    raters = ["a", "b", "c", "a"]
    union, _ = merge_boxes(boxes, raters, merge="union", threshold=0.5, min_votes=1)
    with pytest.raises(ConvertError, match="merge must be one of"):  # a typo never keeps every box silently
        merge_boxes(boxes, raters, merge="fusoin", threshold=0.5, min_votes=1)
    assert [b.tolist() for b in union] == [[0, 0, 12, 10], [50, 50, 60, 60]]
    fused, dropped = merge_boxes(boxes, raters, merge="fusion", threshold=0.5, min_votes=2)
    assert [b.tolist() for b in fused] == [[1, 0, 11, 10]] and dropped == 1
    kept, _ = merge_boxes(boxes + [boxes[0].copy()], raters + ["b"], merge="none", threshold=0.5, min_votes=1)
    assert len(kept) == 4  # identical boxes collapse


def test_vindr_merge_modes_and_votes(vindr):
    csv_path, sizes = vindr
    fused, report = convert_vindr(csv_path, sizes=sizes, merge="fusion", min_votes=2)
    assert [r["id"] for r in fused] == ["A"]
    regions = {r.name: r.boxes for r in answer_regions(fused[0])}
    # Aortic enlargement has one vote -> dropped with min_votes=2; the nodule cluster (3 votes) is the mean box
    assert list(regions) == ["Nodule/Mass"]
    assert regions["Nodule/Mass"] == [pixels_to_box([100, 100, 200, 200], 1000, 800)]
    assert report.skipped["too-few-votes"] == 2  # the lone nodule and the aortic box
    assert report.skipped["bad-bbox"] == 1 and report.skipped["unknown-size"] == 1  # C's inverted box; D has no size
    assert report.skipped["no-finding"] == 2  # B (normal) and C (its only box was bad)
    assert str(next(p for p in report.problems if p.reason == "bad-bbox")).startswith(f"{csv_path}:9: bad-bbox")

    union, _ = convert_vindr(csv_path, sizes=sizes, merge="union")
    regions = {r.name: r.boxes for r in answer_regions(union[0])}
    assert regions["Nodule/Mass"] == [pixels_to_box([90, 90, 210, 210], 1000, 800),
                                      pixels_to_box([700, 700, 720, 720], 1000, 800)]
    none, _ = convert_vindr(csv_path, sizes=sizes, merge="none")
    assert len({r.name: r.boxes for r in answer_regions(none[0])}["Nodule/Mass"]) == 4


def test_vindr_classification_and_region_to_text(vindr):
    csv_path, sizes = vindr
    cls, _ = convert_vindr(csv_path, sizes=sizes, task="classify_multi")
    answers = {r["id"]: r["conversations"][1]["value"] for r in cls}
    # classification needs no image size, so D (absent from the sizes table) is converted too
    assert answers == {"A": "Aortic enlargement, Nodule/Mass", "B": "No finding", "C": "No finding", "D": "Cardiomegaly"}
    assert "width" not in next(r for r in cls if r["id"] == "D")
    assert '"No finding" means no diseases are detected.' in cls[0]["conversations"][0]["value"]
    r2t, _ = convert_vindr(csv_path, sizes=sizes, task="region_to_text", merge="union")
    assert sorted(r["conversations"][1]["value"] for r in r2t) == ["Aortic enlargement", "Nodule/Mass", "Nodule/Mass"]


def test_vindr_sizes_from_dicom_headers(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("image_id,rad_id,class_name,x_min,y_min,x_max,y_max\nct,R1,Nodule,32,32,64,96\n")
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), tmp_path / "ct.dicom")
    records, report = convert_vindr(csv_path, image_root=tmp_path)
    assert report.written == 1 and (records[0]["width"], records[0]["height"]) == (128, 128)
    assert answer_regions(records[0])[0].boxes == [pixels_to_box([32, 32, 64, 96], 128, 128)]
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,label\nx,y\n")
    with pytest.raises(ConvertError, match="missing column"):
        convert_vindr(bad, image_root=tmp_path)
    assert RecordChecker(image_root=tmp_path, image_check="decode").check(records[0], file="x", line=1) == []
