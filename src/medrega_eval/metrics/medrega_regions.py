"""`--compat medrega` Text-to-Region scoring: the original `src/eval/regt2r/evaluator_reg.py` rules, reproduced
from its documented behaviour (docs/evaluation.md, "--compat medrega"), not copied.

Predictions are read with the original grammar (`scan_box_lists(..., "original")`, names = the raw text before
"[["); a box list its `literal_eval` cannot read ends the answer with one [0, 0, 0, 0] box. Boxes and IoU are
float32 (torchvision's formula), matching is scipy's Hungarian solver on 1 - IoU. Where the original raises or
divides by zero, the metric is None and `unavailable` says why.
"""
from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from internvl.regions import parse_original_references, remove_region_tags, scan_box_lists

__all__ = ["OriginalCrash", "OriginalBoxes", "parse_prediction", "parse_reference", "iou_f32", "sample_values",
           "aggregate", "TOP", "THRESHOLDS"]

BOX_SCALE = 999
THRESHOLDS = {"sm": 0.75, "ms": 0.5, "mm": 0.5}


class OriginalCrash(Exception):
    """The original scorer raises on this input (the reason is the message); compat reports None, not a number."""


@dataclass
class OriginalBoxes:
    """Boxes of one text as the original reads them: float32 pixel boxes and the names it keys by index."""

    boxes: np.ndarray  # [N, 4] float32
    region_names: list[str] = field(default_factory=list)  # one per region (ms keys names by region index)
    box_names: list[str] = field(default_factory=list)  # one per box, the [0,0,0,0] failure box has none (mm)
    failure: str | None = None  # why the original's try/except fired (prediction only)


def _f32(v: object) -> np.float32:
    try:
        x = float(v)  # type: ignore[arg-type]
    except OverflowError:
        x = math.copysign(math.inf, v)  # type: ignore[arg-type]
    with np.errstate(over="ignore"):
        return np.float32(x)


def _to_pixels(values: Sequence[object], width: float, height: float) -> np.ndarray:
    """The original's process_box: float32 values / 999, x times the width and y times the height (float32)."""
    flat = np.array([_f32(v) for v in values], dtype=np.float32).reshape(-1, 4)[0] / np.float32(BOX_SCALE)
    flat[0::2] *= _f32(width)
    flat[1::2] *= _f32(height)
    return flat


def _collect(regions: list[tuple[str, list[np.ndarray]]], failure: str | None = None) -> OriginalBoxes:
    """OriginalBoxes of (name, pixel boxes) regions; a failure adds the original's one [0, 0, 0, 0] box, unnamed."""
    boxes = [b for _, region in regions for b in region] + ([np.zeros(4, np.float32)] if failure else [])
    return OriginalBoxes(np.array(boxes, dtype=np.float32).reshape(-1, 4), [name for name, _ in regions],
                         [name for name, region in regions for _ in region], failure)


def parse_prediction(answer: str, hw: Sequence[float]) -> OriginalBoxes:
    """Boxes and names of a prediction under the original's rules (tags removed first)."""
    height, width = hw
    regions = []
    for span in scan_box_lists(remove_region_tags(answer), "original"):
        if span.values is None:
            return _collect(regions, span.error)
        regions.append((span.name.lower(), [_to_pixels(v, width, height) for v in span.values]))
    return _collect(regions)


def parse_reference(gt: str, hw: Sequence[float]) -> OriginalBoxes:
    """Boxes and names of a reference under the original's rules; raises OriginalCrash where the original would."""
    height, width = hw
    regions = []
    for name, box_text in parse_original_references(gt):
        try:
            value = ast.literal_eval(box_text)
            regions.append((name.lower(), [_to_pixels(np.asarray(b, dtype=object).ravel().tolist(), width, height)
                                           for b in value]))
        except Exception as exc:  # noqa: BLE001 - any failure here is a crash of the original
            raise OriginalCrash(f"the original cannot read the reference boxes {box_text[:80]!r}: "
                                f"{type(exc).__name__}: {exc}") from None
    return _collect(regions)


def iou_f32(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boxes in float32 exactly as torchvision's box_area + the original's box_iou (0/0 -> nan)."""
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    with np.errstate(all="ignore"):
        area1 = (a[2] - a[0]) * (a[3] - a[1])
        area2 = (b[2] - b[0]) * (b[3] - b[1])
        lt = np.maximum(a[:2], b[:2])
        rb = np.minimum(a[2:], b[2:])
        wh = np.clip(rb - lt, np.float32(0), None)
        inter = wh[0] * wh[1]
        union = area1 + area2 - inter
        return float(np.float32(inter / union))


def _hungarian(pred: np.ndarray, ref: np.ndarray, threshold: float):
    """(matches, all pairs, all pair IoUs) as the original: linear_sum_assignment on 1 - IoU (float64 of float32)."""
    iou = np.array([[iou_f32(p, r) for r in ref] for p in pred], dtype=np.float64).reshape(len(pred), len(ref))
    if np.isnan(iou).any():
        raise OriginalCrash("an IoU is 0/0 (two empty boxes); the original's linear_sum_assignment raises")
    rows, cols = linear_sum_assignment(1 - iou)
    pairs = [(int(r), int(c)) for r, c in zip(rows, cols)]
    ious = [iou[r, c] for r, c in pairs]
    matches = [(r, c) for (r, c), v in zip(pairs, ious) if v >= threshold]
    return matches, pairs, ious


def _agree(p: str, t: str) -> bool:
    return p == "" or p in t or t in p


def _div(a: float, b: float) -> float:
    return a / b if b != 0 else 0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if (p + r) != 0 else 0


def _ss(pred: OriginalBoxes, ref: OriginalBoxes) -> dict[str, float]:
    max_iou: float = 0
    n_pred, n_ref = len(pred.boxes), len(ref.boxes)
    if n_pred > 0:
        if n_ref == 0:
            raise OriginalCrash("the reference has no <ref>..</ref><box>..</box> the original can find "
                                "(it indexes the first reference box)")
        if n_pred > n_ref:  # the best IoU with the first reference box (a NaN never wins, as the original's `>`)
            max_iou = max([0, *(iou_f32(p, ref.boxes[0]) for p in pred.boxes)])
        else:
            max_iou = iou_f32(pred.boxes[0], ref.boxes[0])
    return {"iou": max_iou}


def sample_values(pred: OriginalBoxes, ref: OriginalBoxes, subtype: str) -> dict[str, float]:
    """The original's per-sample quantities for `subtype` (ss, sm, ms, mm); raises OriginalCrash where it raises."""
    if subtype == "ss":
        return _ss(pred, ref)
    n_pred, n_ref = len(pred.boxes), len(ref.boxes)
    matches, pairs, ious = _hungarian(pred.boxes, ref.boxes, THRESHOLDS[subtype])
    correct = len(matches)
    v: dict[str, float] = {"n_ref": n_ref, "n_pred": n_pred, "pre": _div(correct, n_ref),
                           "rec": _div(correct, n_pred), "pair_iou": sum(ious), "n_pairs": len(pairs)}
    v["f1"] = _f1(v["pre"], v["rec"])
    if subtype == "sm":
        return v
    if n_ref == 0:
        raise OriginalCrash("the reference has no <ref>..</ref><box>..</box> the original can find "
                            "(it divides by the number of reference boxes)")
    ms = subtype == "ms"
    # ms: names keyed by region index, looked up with box indices, missing keys skipped; mm: names per box, and the
    # [0, 0, 0, 0] failure box has none: the original raises a KeyError on it
    pn, tn = (pred.region_names, ref.region_names) if ms else (pred.box_names, ref.box_names)

    def agree(r: int, c: int) -> bool | None:
        if r < len(pn) and c < len(tn):
            return _agree(pn[r], tn[c])
        if not ms:
            raise OriginalCrash("a matched predicted box has no name (the [0, 0, 0, 0] box of an unreadable "
                                "box list); the original raises KeyError")
        return None

    correct_align = sum(bool(agree(r, c)) for r, c in matches)
    looked_up = [(agree(r, c), iou) for (r, c), iou in zip(pairs, ious)]
    align_all = sum(ok is True for ok, _ in looked_up)
    # ms adds the IoU of every looked-up pair, mm only of agreeing ones
    ob_iou = sum((iou for ok, iou in looked_up if ok or (ms and ok is not None)), 0.0)
    v.update(correct_align=correct_align, align_all=align_all, ob_iou=ob_iou,
             ob_pre=align_all / n_ref, ob_rec=_div(align_all, n_pred),
             al_gt=correct_align / n_ref, al_pred=_div(correct_align, n_pred),
             al_match=_div(correct_align, correct), detect=_div(correct_align, align_all))
    v["ob_f1"] = _f1(v["ob_pre"], v["ob_rec"])
    v["al_f1"] = _f1(v["al_gt"], v["al_pred"])
    return v


_WHAT = {"n_pairs": "Hungarian pair", "n_ref": "reference box", "align_all": "name-agreeing pair"}
# original metric name -> ("mean", per-sample key) | ("ratio", numerator key, denominator key), in the original's order
_NAMES = {
    "sm": {"precision": ("mean", "pre"), "recall": ("mean", "rec"), "f1": ("mean", "f1"),
           "iou": ("ratio", "pair_iou", "n_pairs")},
    "ms": {"box_acc": ("mean", "pre"), "box_iou": ("ratio", "pair_iou", "n_ref"),
           "object_acc": ("mean", "ob_pre"), "object_iou": ("ratio", "ob_iou", "align_all"),
           "object_box_acc": ("mean", "al_gt"), "object_box_alignment": ("mean", "al_match"),
           "object_box_detection": ("mean", "detect")},
    "mm": {"box_pre": ("mean", "pre"), "box_recall": ("mean", "rec"), "box_f1": ("mean", "f1"),
           "box_iou": ("ratio", "pair_iou", "n_ref"), "object_pre": ("mean", "ob_pre"),
           "object_rec": ("mean", "ob_rec"), "object_f1": ("mean", "ob_f1"),
           "object_iou": ("ratio", "ob_iou", "align_all"), "object_box_pre": ("mean", "al_gt"),
           "object_box_recall": ("mean", "al_pred"), "object_box_f1": ("mean", "al_f1"),
           "object_box_alignment": ("mean", "al_match"), "object_box_detection": ("mean", "detect")},
}


def metric_names(subtype: str) -> list[str]:
    """The original scorer's metric names for `subtype`, in its order."""
    return ["acc25", "acc50", "acc75", "iou"] if subtype == "ss" else list(_NAMES[subtype])


def aggregate(values: list[dict[str, float]], subtype: str) -> tuple[dict[str, object], dict[str, str]]:
    """(the original's metrics under its own names, {metric: why it is None}). ss values are the original's printed
    4-decimal strings; None where the original divides by zero."""
    why: dict[str, str] = {}
    n = len(values)
    out: dict[str, object] = {}
    if subtype == "ss":
        if n == 0:
            return {k: None for k in metric_names("ss")}, {
                k: "no sample: the original divides by zero" for k in metric_names("ss")}
        ious = [v["iou"] for v in values]
        out = {f"acc{t}": "{:.4f}".format(sum(i > t / 100 for i in ious) / n) for t in (25, 50, 75)}
        mean = sum(ious) / n
        out["iou"] = None if math.isnan(mean) else "{:.4f}".format(mean)
        if out["iou"] is None:
            why["iou"] = "an IoU is 0/0 (two empty boxes): the original prints nan"
        return out, why
    for name, (kind, key, *den) in _NAMES[subtype].items():
        if kind == "mean":
            out[name] = sum(v[key] for v in values) / n if n else (0 if subtype == "sm" else None)  # sm guards with 0
            if out[name] is None:
                why[name] = "no sample: the original divides by zero"
            continue
        d = sum(v[den[0]] for v in values)
        out[name] = sum(v[key] for v in values) / d if d != 0 else None
        if out[name] is None:
            if subtype == "mm" and name == "object_iou" and n:
                out[name] = 0  # the original guards this one division
            else:
                why[name] = f"the original divides by zero: no {_WHAT[den[0]]} in the whole file"
    return out, why


# top-level summary names for each compat subtype, taken from the original metric names
TOP = {"ss": {"iou": "iou", "acc25": "acc25", "acc50": "acc50", "acc75": "acc75"},
       "sm": {"precision": "precision", "recall": "recall", "f1": "f1", "iou": "iou"},
       "ms": {"precision": "box_acc", "iou": "box_iou"},
       "mm": {"precision": "box_pre", "recall": "box_recall", "f1": "box_f1", "iou": "box_iou"}}
