"""``src/demo.py --batch FILE.jsonl --out DIR``: the original MedRegA demo's job, sharded over torchrun ranks.

Asks each MedRegInstruct record's first human turn verbatim (rank ``r`` answers records ``r::world_size``); rank 0
writes ``DIR/demo_<yymmddHHMMSS>.json``, each rank streams its answers to ``DIR/demo_<time>.rank<R>.jsonl`` as they
come. Bad records and unreadable images stop the run before generation with ``FILE:LINE: reason`` (docs/demo.md).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from internvl.data.images import AXES, ImageLoadError, load_image
from internvl.data.records import RecordChecker, RecordProblem, read_jsonl
from internvl.inference import GenerationRequest
from internvl.io_safety import append_jsonl, atomic_write_text, unique_file
from internvl.regions import parse_regions

__all__ = ["BatchError", "BatchItem", "read_batch_file", "regions_json", "run_batch", "stream_path",
           "write_results"]

IMAGE_KEYS = ("axis", "slice_index", "frame", "window")


class BatchError(ValueError):
    """A bad batch file: ``str()`` is ``FILE:LINE: reason``."""


@dataclass(frozen=True)
class BatchItem:
    """One question of a batch file: its position, the image path and options, question and reference."""

    index: int
    question_id: Any
    image: Path | None
    image_kwargs: dict[str, Any]
    question: str
    gt_answer: str


def read_batch_file(path: str | Path, rank: int = 0, world_size: int = 1) -> list[BatchItem]:
    """Parse and check a MedRegInstruct jsonl for the batch demo before any generation: every line's structure, and
    the images of this rank's share (``items[rank::world_size]``, the ones it will answer) decoded up front (a corrupt
    DICOM on line 900 fails first); :class:`BatchError` at the first problem, on every rank alike (the ranks share
    theirs with ``all_gather_object``). Image paths are absolute or relative to the file's folder; record keys
    :data:`IMAGE_KEYS` pick the NIfTI slice / DICOM frame / window."""
    try:
        items, error = _read_batch_file(Path(path), rank, world_size), None
    except BatchError as exc:
        items, error = [], str(exc)
    if world_size > 1:
        errors: list[Any] = [None] * world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise BatchError(error)
    return items


def _read_batch_file(path: Path, rank: int, world_size: int) -> list[BatchItem]:
    if not path.is_file():
        raise BatchError(f"{path}: batch file not found")
    # Structure checks only: this file's images may be absolute or relative to its folder (resolved below), so the
    # checker's root-containment test gets the filesystem root and existence is checked by decoding.
    checker = RecordChecker(image_root=Path(path.anchor or "/"), image_check="none", require_answer=False)
    items: list[BatchItem] = []
    for line, rec in read_jsonl(path):
        problems = [rec] if isinstance(rec, RecordProblem) else checker.check(rec, file=path, line=line)
        if problems:
            raise BatchError("; ".join(str(p) for p in problems))
        turns = rec["conversations"]  # checked: human first, no empty turn
        human = turns[0]["value"]
        gt = turns[1]["value"] if len(turns) > 1 else ""
        image = rec.get("image")
        if isinstance(image, list):
            if len(image) != 1:
                raise BatchError(f"{path}:{line}: the batch demo takes one image per record, got {len(image)}")
            image = image[0]
        img_path = None
        if image is not None:
            img_path = Path(image) if Path(image).is_absolute() else path.parent / image
        kwargs = _image_kwargs(rec, path, line)
        if img_path is not None and len(items) % world_size == rank:
            try:
                load_image(img_path, **kwargs)
            except (ImageLoadError, ValueError, TypeError, OSError) as exc:
                raise BatchError(f"{path}:{line}: {exc}") from exc
        items.append(BatchItem(len(items), rec.get("id", len(items)), img_path, kwargs, str(human), str(gt)))
    if not items:
        raise BatchError(f"{path}: no records")
    return items


def _image_kwargs(rec: dict, path: Path, line: int) -> dict[str, Any]:
    """The record's NIfTI/DICOM options, type-checked (``FILE:LINE`` :class:`BatchError` for a wrong type)."""
    kwargs = {k: rec[k] for k in IMAGE_KEYS if k in rec and rec[k] is not None}
    for key in ("slice_index", "frame"):
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise BatchError(f"{path}:{line}: {key!r} must be a whole number >= 0, got {value!r}")
    if "axis" in kwargs and kwargs["axis"] not in AXES:
        raise BatchError(f"{path}:{line}: 'axis' must be one of {', '.join(AXES)}, got {kwargs['axis']!r}")
    if "window" in kwargs and not isinstance(kwargs["window"], str):  # a named window, or [center, width]
        w = kwargs["window"]
        ok = isinstance(w, list) and len(w) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in w)
        if not ok:
            raise BatchError(f"{path}:{line}: 'window' must be a window name or [center, width], got {w!r}")
        kwargs["window"] = tuple(w)
    return kwargs


def regions_json(text: str) -> list[dict[str, Any]]:
    """Boxes found in ``text`` (tagged or tag-stripped form; malformed parts are ignored) as JSON-able dicts."""
    return [r.as_dict() for r in parse_regions(text, strict=False)]


def stream_path(out_dir: str | Path, stamp: str, rank: int) -> Path:
    """A new, reserved ``demo_<stamp>.rank<R>.jsonl`` in ``out_dir`` for this rank's answers as they come."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return unique_file(out, f"demo_{stamp}.rank{rank}", ".jsonl")


def _result(it: BatchItem, ans: str) -> dict[str, Any]:
    return {"index": it.index, "question": it.question, "question_id": it.question_id, "pred_answer": ans,
            "gt_answer": it.gt_answer, "pred_regions": regions_json(ans), "gt_regions": regions_json(it.gt_answer),
            "image": None if it.image is None else str(it.image)}


def run_batch(generator: Any, items: list[BatchItem], rank: int = 0, world_size: int = 1,
              stream: Path | None = None) -> list[dict[str, Any]]:
    """Answer this rank's share (``items[rank::world_size]``) with an :class:`internvl.inference.Generator`; returns
    result dicts carrying the item index. With ``stream`` each finished batch is appended there at once (fsynced)."""
    mine = items[rank::world_size]
    requests = [GenerationRequest(prompt=it.question, images=[str(it.image)] if it.image else [],
                                  image_kwargs=it.image_kwargs, id=str(it.question_id)) for it in mine]
    by_index: dict[int, dict[str, Any]] = {}
    for batch in generator.iter_generate(requests):
        rows = [_result(mine[i], text) for i, text in batch]
        if stream is not None:
            append_jsonl(stream, rows)
        by_index.update((i, row) for (i, _), row in zip(batch, rows))
    return [by_index[i] for i in sorted(by_index)]


def gather_results(local: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """All ranks' results in item order (``all_gather_object``; a no-op without a process group)."""
    if world_size > 1:
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, local)
        local = [r for part in parts for r in part]
    return sorted(local, key=lambda r: r["index"])


def write_results(results: list[dict[str, Any]], out_dir: str | Path, stamp: str | None = None) -> Path:
    """Write ``demo_<stamp>.json`` (a list, ``index`` dropped) into ``out_dir`` under a name reserved atomically
    (``demo_<stamp>-1.json`` when taken), through a temporary file; return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = unique_file(out, f"demo_{stamp or time.strftime('%y%m%d%H%M%S')}", ".json")
    rows = [{k: v for k, v in r.items() if k != "index"} for r in results]
    atomic_write_text(path, json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
    return path
