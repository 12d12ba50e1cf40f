"""Region metrics: Text-to-Region detection (IoU, Acc@t, Hungarian region/object/alignment P/R/F1, COCO mAP@0.5)
and the box part of grounded reports; each metric's definition is in docs/evaluation.md ("Metrics (default)").

Boxes are parsed only by `internvl.regions`, matched one-to-one by scipy's Hungarian solver on IoU (torchvision's
formula, pixel boxes). Precision/recall use the conventional naming (the original and the paper swap them).
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment

from internvl.regions import box_iou, box_to_pixels, parse_regions
from medrega_eval.metrics.classification import normalize_label
from medrega_eval.metrics.text import prf

__all__ = ["NamedBox", "ParsedRegions", "parse_for_scoring", "box_iou", "hungarian_match", "RegionSample",
           "score_region_sample", "aggregate_regions", "coco_map50", "IOU_THRESHOLD"]

IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class NamedBox:
    """One box in pixels (x1, y1, x2, y2) with the normalized name of its object (None when unnamed)."""

    name: str | None
    xyxy: tuple[float, float, float, float]
    grid: tuple[int, int, int, int]


@dataclass
class ParsedRegions:
    """Boxes parsed from one text plus the parser's complaints (malformed box lists that were left out)."""

    boxes: list[NamedBox]
    errors: list[str] = field(default_factory=list)


def normalize_name(name: str | None) -> str | None:
    """Object names compare case-, width- and punctuation-insensitively ("Left Lung." == "left lung")."""
    return (normalize_label(name) or None) if name is not None else None


def parse_for_scoring(text: str, hw: Sequence[float] | None = None) -> ParsedRegions:
    """Parse region text (tagged or tag-stripped) into pixel boxes (`hw` = [height, width]; without it the 0..999
    grid); malformed box lists become `errors`, not boxes."""
    errors: list[str] = []
    boxes = []
    for region in parse_regions(text, strict=False, errors=errors):
        for box in region.boxes:
            xyxy = box_to_pixels(box, hw[1], hw[0]) if hw else (box.x1, box.y1, box.x2, box.y2)
            boxes.append(NamedBox(normalize_name(region.name), tuple(float(v) for v in xyxy), tuple(box.as_list())))
    return ParsedRegions(boxes, errors)


def hungarian_match(pred: Sequence[NamedBox], ref: Sequence[NamedBox]) -> list[tuple[int, int, float]]:
    """One-to-one (pred index, ref index, IoU) pairs maximizing the total IoU (scipy linear_sum_assignment)."""
    if not pred or not ref:
        return []
    iou = box_iou(np.array([p.xyxy for p in pred]), np.array([r.xyxy for r in ref]))
    rows, cols = linear_sum_assignment(-iou)
    return [(int(i), int(j), float(iou[i, j])) for i, j in zip(rows, cols)]


@dataclass
class RegionSample:
    """Per-sample region scores (fractions, by name) and the matched pairs, for samples.jsonl and the HTML report."""

    scores: dict[str, float]
    num_pred: int
    num_ref: int
    unparsable: bool
    pairs: list[tuple[int, int, float]]


def _fill_names(pred: list[NamedBox], ref: Sequence[NamedBox]) -> list[NamedBox]:
    """Unnamed predicted boxes take the name of the only reference object, when there is exactly one."""
    names = {r.name for r in ref}
    if len(names) == 1:
        (only,) = names
        return [replace(p, name=only) if p.name is None else p for p in pred]
    return pred


def score_region_sample(pred: Sequence[NamedBox], ref: Sequence[NamedBox], unparsable: bool = False) -> RegionSample:
    """Default per-sample region metrics (see module docstring). `ref` must be non-empty."""
    pred = _fill_names(list(pred), ref)
    pairs = hungarian_match(pred, ref)
    ious = [iou for _, _, iou in pairs]
    n_ref = len(ref)
    tp = sum(iou >= IOU_THRESHOLD for iou in ious)
    pred_names = {p.name for p in pred if p.name}
    ref_names = {r.name for r in ref if r.name}
    aligned = sum(iou >= IOU_THRESHOLD and pred[i].name is not None and pred[i].name == ref[j].name
                  for i, j, iou in pairs)
    scores = {"iou": sum(ious) / n_ref}
    scores.update({f"acc{t}": sum(i >= t / 100 for i in ious) / n_ref for t in (25, 50, 75)})
    # region, object-name (no reference name: all 0.0) and alignment precision / recall / F1
    for prefix, counts in (("", (tp, len(pred), n_ref)),
                           ("object_", (len(pred_names & ref_names), len(pred_names), len(ref_names))),
                           ("alignment_", (aligned, len(pred), n_ref))):
        scores.update(zip((f"{prefix}precision", f"{prefix}recall", f"{prefix}f1"), prf(*counts)))
    return RegionSample(scores, len(pred), n_ref, unparsable, pairs)


def aggregate_regions(samples: Sequence[RegionSample]) -> dict[str, float | int | None]:
    """Mean of every per-sample metric, plus box counts and the number of unparsable predictions."""
    if not samples:
        return {}
    means = {k: float(np.mean([s.scores[k] for s in samples])) for k in samples[0].scores}
    return {**means, "num_pred_boxes": sum(s.num_pred for s in samples),
            "num_ref_boxes": sum(s.num_ref for s in samples), "unparsable": sum(s.unparsable for s in samples)}


def coco_map50(preds: Sequence[Sequence[NamedBox]], refs: Sequence[Sequence[NamedBox]]) -> float | None:
    """COCO-style AP@0.5 averaged over object names (categories), via pycocotools' COCOeval: the k-th box of a
    sample scores 1/(k+1) (no confidences), unnamed boxes form one category, categories without a reference box are
    ignored (COCO convention). None if there is no reference."""
    categories: dict[str, int] = {}  # names are None or non-empty
    for boxes in list(refs) + list(preds):
        for b in boxes:
            categories.setdefault(b.name or "<unnamed>", len(categories) + 1)

    def coco_box(b: NamedBox, image_id: int) -> dict:
        x1, y1, x2, y2 = b.xyxy
        return {"image_id": image_id, "category_id": categories[b.name or "<unnamed>"],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}

    images, annotations, detections = [], [], []
    for img_id, (p_boxes, r_boxes) in enumerate(zip(preds, refs), 1):
        images.append({"id": img_id})
        annotations += [{**coco_box(b, img_id), "id": len(annotations) + k + 1, "iscrowd": 0}
                        for k, b in enumerate(r_boxes)]
        detections += [{**coco_box(b, img_id), "score": 1.0 / (k + 1)} for k, b in enumerate(p_boxes)]
    if not annotations:
        return None
    if not detections:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": i, "name": n} for n, i in categories.items()]}
        gt.createIndex()
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.iouThrs = np.array([0.5])
        ev.params.maxDets = [100]
        ev.params.areaRng = [[0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][0, :, :, 0, 0]  # [recall thresholds, categories]
    per_cat = [np.mean(np.clip(p, 0, None)) for p in precision.T if (p > -1).any()]  # categories with a reference
    return float(np.mean(per_cat)) if per_cat else 0.0
