"""COCO-style detection json -> Text-to-Region or Region-to-Text records.

Input: ``{"images": [{"id", "file_name", "width", "height"}], "categories": [{"id", "name"}],
"annotations": [{"id", "image_id", "category_id", "bbox": [x, y, w, h]}]}`` with pixel boxes (COCO convention:
top-left corner plus width and height). ``text_to_region`` writes one record per image with every category
present (boxes of one category grouped under one ``<ref>``); ``region_to_text`` writes one record per box.
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from internvl.data.convert import (
    ConvertError,
    ConvertReport,
    add_common_arguments,
    build_or_skip,
    build_records,
    check_task,
    common_options,
    finish_report,
    read_json,
    write_output,
)
from internvl.regions import pixels_to_box

NAME = "coco"
HELP = "COCO-style detection json -> text_to_region / region_to_text records"
TASKS = ["text_to_region", "region_to_text"]

# Boxes may overshoot the image by rounding; more than this many pixels is an annotation error.
EDGE_TOLERANCE = 1.0


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def convert_coco(
    path: str | Path,
    *,
    task: str = "text_to_region",
    lang: str = "en",
    modality: str = "medical",
    image_prefix: str = "",
    image_root: str | Path | None = None,
    image_check: str = "exists",
    id_prefix: str = "",
    include_base_prompt: bool = True,
) -> tuple[list[dict], ConvertReport]:
    """Convert a COCO detection file; returns ``(records, report)``. Raises :class:`ConvertError` if unusable."""
    check_task(task, TASKS)
    path = Path(path)
    file = str(path)
    data = read_json(path, "COCO json")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise ConvertError(f"{file}:0: expected an object with 'images', 'annotations' and 'categories' lists")
    report = ConvertReport(source=f"coco {file}")

    categories: dict[Any, str] = {}
    for i, cat in enumerate(data["categories"], start=1):
        if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str) or not cat["name"].strip():
            raise ConvertError(f"{file}:{i}: categories[{i - 1}] needs an 'id' and a non-empty 'name'")
        categories[cat["id"]] = cat["name"].strip()

    images: dict[Any, dict] = {}
    for i, img in enumerate(data["images"], start=1):
        where = f"images[{i - 1}]"
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            report.skip(file, i, "bad-image-entry", f"{where} needs 'id' and 'file_name'")
            continue
        if not (_positive_int(img.get("width")) and _positive_int(img.get("height"))):
            report.skip(file, i, "bad-image-entry", f"{where} ({img['file_name']}) needs positive integer width/height")
            continue
        if img["id"] in images:
            report.skip(file, i, "duplicate-image-id", f"{where}: image id {img['id']!r} already used")
            continue
        images[img["id"]] = img

    boxes: dict[Any, list[tuple[int, str, list[float]]]] = defaultdict(list)  # image id -> (line, name, xyxy)
    for i, ann in enumerate(data["annotations"], start=1):
        where = f"annotations[{i - 1}]" + (f" (id {ann.get('id')})" if isinstance(ann, dict) and "id" in ann else "")
        if not isinstance(ann, dict):
            report.skip(file, i, "bad-annotation", f"{where} is not an object")
            continue
        img = images.get(ann.get("image_id"))
        if img is None:
            report.skip(file, i, "unknown-image", f"{where}: image_id {ann.get('image_id')!r} is not a valid image")
            continue
        name = categories.get(ann.get("category_id"))
        if name is None:
            report.skip(file, i, "unknown-category", f"{where}: category_id {ann.get('category_id')!r} is not defined")
            continue
        bbox = ann.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
            report.skip(file, i, "bad-bbox", f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            report.skip(file, i, "bad-bbox", f"{where}: bbox has non-positive width/height {bbox!r}")
            continue
        W, H = img["width"], img["height"]
        if x < -EDGE_TOLERANCE or y < -EDGE_TOLERANCE or x + w > W + EDGE_TOLERANCE or y + h > H + EDGE_TOLERANCE:
            report.skip(file, i, "bbox-outside-image", f"{where}: bbox {bbox!r} exceeds the {W}x{H} image")
            continue
        boxes[img["id"]].append((i, name, [x, y, x + w, y + h]))

    items: list[tuple[str, int, dict]] = []
    image_line = {img_id: n for n, img in enumerate(data["images"], start=1)
                  if isinstance(img, dict) and (img_id := img.get("id")) in images}
    for img_id, img in images.items():
        found = boxes.get(img_id, [])
        if not found:
            report.skip(file, image_line[img_id], "no-annotations", f"image {img['file_name']!r} has no usable boxes")
            continue
        W, H = img["width"], img["height"]
        image = image_prefix + img["file_name"]
        common = dict(image=image, width=W, height=H, modality=modality, include_base_prompt=include_base_prompt)
        if task == "text_to_region":
            grouped: dict[str, list] = {}
            for _, name, xyxy in found:
                box = pixels_to_box(xyxy, W, H)
                if box in grouped.setdefault(name, []):
                    report.skip(file, image_line[img_id], "duplicate-box", f"{name} box {box} repeated in {image!r}")
                    continue
                grouped[name].append(box)
            record = build_or_skip(report, file, image_line[img_id], "text_to_region", lang,
                                   id=f"{id_prefix}{img_id}", regions=grouped, **common)
            if record is not None:
                items.append((file, image_line[img_id], record))
        else:
            builds = [{"task": "region_to_text", "id": f"{id_prefix}{img_id}-{line}", "regions": [(name, [xyxy])],
                       "box_units": "pixel"} for line, name, xyxy in found]
            records = build_records(report, file, image_line[img_id], lang, builds, **common)
            items += [(file, line, record) for (line, _, _), record in zip(found, records)]
    return finish_report(items, report, image_root=image_root, image_check=image_check)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("annotation", help="COCO detection json")
    parser.add_argument("--modality", default="medical", help="modality word used in the question (CT, MRI, ...)")
    parser.add_argument("--image-prefix", default="", help="prefix joined to each file_name (e.g. 'train2017/')")
    add_common_arguments(parser, tasks=TASKS, default_task="text_to_region")


def run(args: argparse.Namespace) -> ConvertReport:
    records, report = convert_coco(args.annotation, task=args.task, modality=args.modality,
                                   image_prefix=args.image_prefix, **common_options(args))
    return write_output(records, report, args.out)
