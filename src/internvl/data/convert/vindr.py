"""VinDr-CXR-style CSV (one row per radiologist finding) -> region or multi-label classification records.

Input columns: ``image_id, rad_id, class_name, x_min, y_min, x_max, y_max`` (pixel corners; empty for
``No finding`` rows). VinDr images are read by three radiologists, so one lesion usually has several boxes.
``--merge`` decides what to keep, per image and class:

* ``none``: every radiologist's box (identical boxes collapsed);
* ``union``: boxes that overlap (IoU >= ``--iou``, transitively) form a cluster, replaced by its enclosing box;
* ``fusion``: same clusters, replaced by the coordinate-wise mean (weighted box fusion with equal weights).

``--min-votes k`` keeps only clusters marked by at least ``k`` different radiologists. Image sizes come from a
``--sizes`` CSV (``image_id,width,height``) or from the image headers under ``--image-root`` (DICOM header only).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from internvl.data.convert import Conversion, ConverterCLI, ConvertError, ConvertReport, check_task, read_csv
from internvl.data.images import ImageLoadError, probe_image
from internvl.regions import box_iou

TASKS = ("text_to_region", "region_to_text", "classify_multi")
MERGES = ("none", "union", "fusion")
REQUIRED_COLUMNS = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")
NO_FINDING = "No finding"  # VinDr's class for a normal image


def cluster_boxes(boxes: list[np.ndarray], threshold: float) -> list[list[int]]:
    """Group box indices whose IoU >= threshold, transitively (connected components); stable order."""
    from scipy.sparse.csgraph import connected_components  # here: scipy is slow to import, `medrega-data` starts fast

    if not boxes:
        return []
    _, labels = connected_components(box_iou(boxes, boxes) >= threshold, directed=False)
    return sorted(([int(i) for i in np.flatnonzero(labels == k)] for k in np.unique(labels)), key=lambda g: g[0])


def _check_merge(merge: str) -> None:
    if merge not in MERGES:
        raise ConvertError(f"merge must be one of {MERGES}, got {merge!r}")


def merge_boxes(boxes: list[np.ndarray], raters: list[str], *, merge: str, threshold: float, min_votes: int
                ) -> tuple[list[np.ndarray], int]:
    """Merge one image+class's boxes (``merge``: one of :data:`MERGES`); returns ``(kept boxes, clusters dropped for
    too few votes)``."""
    _check_merge(merge)
    if merge == "none":
        clusters = [[i] for i in range(len(boxes))] if min_votes <= 1 else cluster_boxes(boxes, threshold)
    else:
        clusters = cluster_boxes(boxes, threshold)
    kept, dropped = [], 0
    for group in clusters:
        if len({raters[i] for i in group}) < min_votes:
            dropped += 1
            continue
        stack = np.stack([boxes[i] for i in group])
        if merge == "union":
            kept.append(np.array([stack[:, 0].min(), stack[:, 1].min(), stack[:, 2].max(), stack[:, 3].max()]))
        elif merge == "fusion":
            kept.append(stack.mean(axis=0))
        else:
            kept.extend(boxes[i] for i in group)
    return list({tuple(b): b for b in kept}.values()), dropped  # identical boxes once, in order


def _read_sizes(path: Path) -> dict[str, tuple[int, int]]:
    sizes = {}
    with read_csv(path, ("image_id", "width", "height")) as reader:
        for row in reader:
            try:
                w, h = int(row["width"]), int(row["height"])
            except (TypeError, ValueError):
                raise ConvertError(f"{path}:{reader.line_num}: width/height must be integers") from None
            if w <= 0 or h <= 0:
                raise ConvertError(f"{path}:{reader.line_num}: width/height must be positive")
            sizes[row["image_id"]] = (w, h)
    return sizes


#: image id -> class name -> [(pixel box, rater, CSV line)]
RaterBoxes = dict[str, dict[str, list[tuple[np.ndarray, str, int]]]]


def convert_vindr(path: str | Path, *, task: str = "text_to_region", merge: str = "fusion", iou_threshold: float = 0.4,
                  min_votes: int = 1, sizes: str | Path | None = None, image_ext: str = ".dicom",
                  modality: str = "chest x-ray", **options: Any
                  ) -> tuple[list[dict], ConvertReport]:
    """Convert a VinDr-style CSV; returns ``(records, report)``. ``options``: :class:`Conversion` keywords.
    Raises :class:`ConvertError` if unusable."""
    check_task(task, TASKS)
    _check_merge(merge)  # before the CSV is read
    if not math.isfinite(iou_threshold) or not 0 < iou_threshold <= 1:
        raise ConvertError(f"iou_threshold (--iou) must be in (0, 1], got {iou_threshold}")
    conv = Conversion(f"vindr {path}", **options)
    needs_size = task != "classify_multi"
    if needs_size and sizes is None and conv.image_root is None:
        raise ConvertError("region tasks need image sizes: pass a sizes CSV or the image root to read headers from")
    file = str(path)
    size_table = _read_sizes(Path(sizes)) if sizes is not None else {}
    per_image, first_line, classes = _read_rows(Path(path), conv.report)
    options_list = sorted(classes) + [NO_FINDING]
    for image_id, by_class in per_image.items():
        line = first_line[image_id]
        image = image_id + image_ext
        size, problem = _image_size(image_id, image, size_table, conv.image_root, needs_size)
        if problem is not None:
            conv.report.skip(file, line, "unknown-size", problem)
            continue
        merged = {}
        for name, entries in by_class.items():
            boxes = _merge_class(image_id, name, entries, size, merge, iou_threshold, min_votes, file, conv.report)
            if boxes:
                merged[name] = boxes
        if task != "classify_multi" and not merged:
            conv.report.skip(file, line, "no-finding", f"image {image_id} has no boxes")
            continue
        width, height = size if size is not None else (None, None)
        conv.add(file, line, _builds(task, image_id, merged, options_list), context=f"image {image_id}: ",
                 image=image, width=width, height=height, modality=modality)
    return conv.finish()


def _read_rows(path: Path, report: ConvertReport) -> tuple[RaterBoxes, dict[str, int], list[str]]:
    """The CSV's valid boxes per image and class, each image's first line, and the classes in order of appearance.
    An image whose only rows are "No finding" is kept (with no boxes)."""
    file = str(path)
    per_image: RaterBoxes = {}
    first_line: dict[str, int] = {}
    classes: list[str] = []
    with read_csv(path, REQUIRED_COLUMNS) as reader:
        for row in reader:
            line = reader.line_num
            image_id, name = (row["image_id"] or "").strip(), (row["class_name"] or "").strip()
            if not image_id or not name:
                report.skip(file, line, "missing-field", "empty image_id or class_name")
                continue
            first_line.setdefault(image_id, line)
            boxes = per_image.setdefault(image_id, {})
            if name == NO_FINDING:
                continue
            if name not in classes:
                classes.append(name)
            try:
                xyxy = np.array([float(row[c]) for c in ("x_min", "y_min", "x_max", "y_max")])
            except (TypeError, ValueError):
                report.skip(file, line, "bad-bbox", f"{name}: coordinates must be numbers")
                continue
            if not np.isfinite(xyxy).all() or xyxy[2] <= xyxy[0] or xyxy[3] <= xyxy[1]:
                report.skip(file, line, "bad-bbox", f"{name}: box {xyxy.tolist()} is empty or inverted")
                continue
            boxes.setdefault(name, []).append((xyxy, (row.get("rad_id") or "").strip() or f"row{line}", line))
    return per_image, first_line, classes


def _image_size(image_id: str, image: str, size_table: dict[str, tuple[int, int]], image_root: str | Path | None,
                needs_size: bool) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height) or None, problem): the size from the sizes CSV or the image header; the problem (why the
    image must be skipped) when the size is needed and cannot be found."""
    if image_id in size_table:
        return size_table[image_id], None
    if image_root is not None:
        try:
            info = probe_image(Path(image_root) / image)
        except ImageLoadError as exc:
            return None, f"image {image_id}: {exc.reason}"
        return (info.width, info.height), None
    return None, (f"image {image_id} is not in the sizes CSV" if needs_size else None)


def _merge_class(image_id: str, name: str, entries: list[tuple[np.ndarray, str, int]], size: tuple[int, int] | None,
                 merge: str, iou_threshold: float, min_votes: int, file: str, report: ConvertReport) -> list[list]:
    """One image+class's raters' boxes merged (`merge_boxes`), those outside the image skipped and the rest clipped
    to it (when its size is known); pixel ``[x1, y1, x2, y2]`` lists."""
    boxes, dropped = merge_boxes([e[0] for e in entries], [e[1] for e in entries], merge=merge,
                                 threshold=iou_threshold, min_votes=min_votes)
    for _ in range(dropped):
        report.skip(file, entries[0][2], "too-few-votes", f"{image_id} {name}: cluster below {min_votes} votes")
    if size is None:
        return [b.tolist() for b in boxes]
    width, height = size
    inside = []
    for b in boxes:
        if b[0] >= -1 and b[1] >= -1 and b[2] <= width + 1 and b[3] <= height + 1:
            inside.append(np.clip(b, 0, [width, height, width, height]).tolist())
        else:
            report.skip(file, entries[0][2], "bbox-outside-image",
                        f"{image_id} {name}: {b.tolist()} outside {width}x{height}")
    return inside


def _builds(task: str, record_id: str, merged: dict[str, list[list]], options: list[str]) -> list[dict]:
    """The `Conversion.add` builds of one image for `task` (region_to_text: one per box)."""
    if task == "classify_multi":
        return [{"task": "classify_multi", "id": record_id, "options": options,
                 "labels": sorted(merged) or [NO_FINDING], "notes": [f'"{NO_FINDING}" means no diseases are detected.']}]
    if task == "text_to_region":
        return [{"task": "text_to_region", "id": record_id, "box_units": "pixel",
                 "regions": [(name, merged[name]) for name in sorted(merged)]}]
    return [{"task": "region_to_text", "id": f"{record_id}-{name}-{k}", "box_units": "pixel", "regions": [(name, [box])]}
            for name in sorted(merged) for k, box in enumerate(merged[name])]


CLI = ConverterCLI(
    help="VinDr-CXR-style per-radiologist box CSV -> text_to_region / region_to_text / classify_multi records",
    tasks=TASKS, convert=convert_vindr,
    arguments=((("path",), dict(metavar="csv", help="annotation CSV (image_id, rad_id, class_name, x_min, y_min, "
                                "x_max, y_max)")),
               (("--merge",), dict(choices=MERGES, default="fusion", help="how radiologists' boxes combine")),
               (("--iou",), dict(dest="iou_threshold", type=float, default=0.4,
                                 help="IoU that puts two boxes in one cluster (default 0.4)")),
               (("--min-votes",), dict(type=int, default=1, help="radiologists needed per cluster (default 1)")),
               (("--sizes",), dict(help="CSV with image_id,width,height (else read from image headers)")),
               (("--image-ext",), dict(default=".dicom", help="file extension appended to image_id (default .dicom)")),
               (("--modality",), dict(default="chest x-ray", help="modality words for the prompt"))))
