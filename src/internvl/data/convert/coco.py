"""COCO-style detection json -> Text-to-Region or Region-to-Text records.

Input: ``{"images": [{"id", "file_name", "width", "height"}], "categories": [{"id", "name"}],
"annotations": [{"id", "image_id", "category_id", "bbox": [x, y, w, h]}]}`` with pixel boxes (COCO convention:
top-left corner plus width and height). ``text_to_region`` writes one record per image with every category
present (boxes of one category grouped under one ``<ref>``); ``region_to_text`` writes one record per box.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from internvl.data.convert import Conversion, ConverterCLI, ConvertError, ConvertReport, check_task, read_json
from internvl.regions import pixels_to_box

TASKS = ("text_to_region", "region_to_text")

# Boxes may overshoot the image by rounding; more than this many pixels is an annotation error.
EDGE_TOLERANCE = 1.0


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def convert_coco(path: str | Path, *, task: str = "text_to_region", modality: str = "medical", image_prefix: str = "",
                 **options: Any) -> tuple[list[dict], ConvertReport]:
    """Convert a COCO detection file; returns ``(records, report)``. ``options``: :class:`Conversion` keywords.
    Raises :class:`ConvertError` if unusable."""
    check_task(task, TASKS)
    file = str(path)
    data = read_json(Path(path), "COCO json")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise ConvertError(f"{file}:0: expected an object with 'images', 'annotations' and 'categories' lists")
    conv = Conversion(f"coco {file}", **options)
    categories = _read_categories(data["categories"], file)
    images = _read_images(data["images"], file, conv.report)
    boxes = _read_boxes(data["annotations"], images, categories, file, conv.report)
    for img_id, (line, img) in images.items():
        found = boxes.get(img_id, [])
        if not found:
            conv.report.skip(file, line, "no-annotations", f"image {img['file_name']!r} has no usable boxes")
            continue
        common = dict(image=image_prefix + img["file_name"], width=img["width"], height=img["height"],
                      modality=modality)
        if task == "text_to_region":
            regions = _group_boxes(found, img, common["image"], file, line, conv.report)
            conv.add(file, line, [{"task": task, "id": img_id, "regions": regions}], **common)
        else:
            for box_line, name, xyxy in found:
                conv.add(file, box_line, [{"task": task, "id": f"{img_id}-{box_line}", "regions": [(name, [xyxy])],
                                           "box_units": "pixel"}], **common)
    return conv.finish()


def _read_categories(entries: list, file: str) -> dict[Any, str]:
    """Category id -> name; a category without an id or a name makes the file unusable."""
    categories: dict[Any, str] = {}
    for i, cat in enumerate(entries, start=1):
        name = cat.get("name") if isinstance(cat, dict) else None
        if not isinstance(cat, dict) or not _is_id(cat.get("id")) or not isinstance(name, str) or not name.strip():
            raise ConvertError(f"{file}:{i}: categories[{i - 1}] needs an integer or string 'id' and a non-empty "
                               "'name'")
        categories[cat["id"]] = cat["name"].strip()
    return categories


def _read_images(entries: list, file: str, report: ConvertReport) -> dict[Any, tuple[int, dict]]:
    """Image id -> (line, image entry) of the entries with an id, a file name and a positive integer size (others
    skipped)."""
    images: dict[Any, tuple[int, dict]] = {}
    for i, img in enumerate(entries, start=1):
        where = f"images[{i - 1}]"
        if not isinstance(img, dict) or not _is_id(img.get("id")) or not isinstance(img.get("file_name"), str):
            report.skip(file, i, "bad-image-entry", f"{where} needs an integer or string 'id' and a 'file_name'")
            continue
        if not (_positive_int(img.get("width")) and _positive_int(img.get("height"))):
            report.skip(file, i, "bad-image-entry", f"{where} ({img['file_name']}) needs positive integer width/height")
            continue
        if img["id"] in images:
            report.skip(file, i, "duplicate-image-id", f"{where}: image id {img['id']!r} already used")
            continue
        images[img["id"]] = (i, img)
    return images


def _read_boxes(entries: list, images: dict[Any, tuple[int, dict]], categories: dict[Any, str], file: str,
                report: ConvertReport) -> dict[Any, list[tuple[int, str, list[float]]]]:
    """Image id -> [(annotation line, category name, pixel [x1, y1, x2, y2])] of the valid annotations."""
    boxes: dict[Any, list[tuple[int, str, list[float]]]] = defaultdict(list)
    for i, ann in enumerate(entries, start=1):
        where = f"annotations[{i - 1}]" + (f" (id {ann.get('id')})" if isinstance(ann, dict) and "id" in ann else "")
        if not isinstance(ann, dict):
            report.skip(file, i, "bad-annotation", f"{where} is not an object")
            continue
        if not _is_id(ann.get("image_id")) or ann["image_id"] not in images:
            report.skip(file, i, "unknown-image", f"{where}: image_id {ann.get('image_id')!r} is not a valid image")
            continue
        _, img = images[ann["image_id"]]
        name = categories.get(ann.get("category_id")) if _is_id(ann.get("category_id")) else None
        if name is None:
            report.skip(file, i, "unknown-category", f"{where}: category_id {ann.get('category_id')!r} is not defined")
            continue
        problem = _bbox_problem(ann.get("bbox"), img["width"], img["height"])
        if problem is not None:
            report.skip(file, i, problem[0], f"{where}: {problem[1]}")
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes[img["id"]].append((i, name, [x, y, x + w, y + h]))
    return boxes


def _is_id(value: Any) -> bool:
    """COCO ids are integers or strings; anything else (a list, an object, a bool) cannot name an image or category."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _bbox_problem(bbox: Any, width: int, height: int) -> tuple[str, str] | None:
    """(reason, message) when a COCO ``[x, y, w, h]`` box is malformed, empty or outside the image, else None."""
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
        return "bad-bbox", f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return "bad-bbox", f"bbox has non-positive width/height {bbox!r}"
    if x < -EDGE_TOLERANCE or y < -EDGE_TOLERANCE or x + w > width + EDGE_TOLERANCE or y + h > height + EDGE_TOLERANCE:
        return "bbox-outside-image", f"bbox {bbox!r} exceeds the {width}x{height} image"
    return None


def _group_boxes(found: list[tuple[int, str, list[float]]], img: dict, image: str, file: str, line: int,
                 report: ConvertReport) -> dict[str, list]:
    """Category name -> its boxes (0-999) in one image, a repeated box skipped."""
    grouped: dict[str, list] = {}
    for _, name, xyxy in found:
        box = pixels_to_box(xyxy, img["width"], img["height"])
        if box in grouped.setdefault(name, []):
            report.skip(file, line, "duplicate-box", f"{name} box {box} repeated in {image!r}")
            continue
        grouped[name].append(box)
    return grouped


CLI = ConverterCLI(
    help="COCO-style detection json -> text_to_region / region_to_text records", tasks=TASKS, convert=convert_coco,
    arguments=((("path",), dict(metavar="annotation", help="COCO detection json")),
               (("--modality",), dict(default="medical", help="modality word used in the question (CT, MRI, ...)")),
               (("--image-prefix",), dict(default="", help="prefix joined to each file_name (e.g. 'train2017/')"))))
