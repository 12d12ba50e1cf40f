"""SLAKE / VQA-RAD-style VQA json -> vqa_open / vqa_closed / vqa_choice records.

Input: a JSON list of question objects. Recognised keys (first match wins):

* image: ``img_name`` (SLAKE), ``image_name`` (VQA-RAD), ``image``
* ``question``, ``answer`` (numbers are written as text), optional ``answer_type`` (``OPEN``/``CLOSED``)
* language: ``q_lang`` (SLAKE ``en``/``zh``); items in another language than ``--lang`` are skipped and counted
* multiple choice: ``options`` or ``choices`` as a list or a ``{"A": text, ...}`` mapping -> ``vqa_choice``

Without ``answer_type`` a yes/no (是/否) answer counts as closed. The "line" of a problem is the 1-based item index.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from internvl.data.convert import (ConvertError, ConvertOptions, ConvertReport, add_common_arguments, build_or_skip,
                                   common_options, read_json, write_output)

NAME = "vqa"
HELP = "SLAKE / VQA-RAD-style VQA json -> vqa_open / vqa_closed / vqa_choice records"
TASKS = ["auto"]
IMAGE_KEYS = ("img_name", "image_name", "image")
YES_NO = {"yes", "no", "是", "否"}


def _first(item: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in item and item[key] not in (None, ""):
            return item[key]
    return None


def _choices(item: dict) -> list[str] | None:
    raw = _first(item, ("options", "choices"))
    if raw is None:
        return None
    if isinstance(raw, dict):
        return [str(raw[k]).strip() for k in sorted(raw)]
    if isinstance(raw, list):
        return [str(x).strip() for x in raw]
    raise ValueError(f"options must be a list or a mapping, got {type(raw).__name__}")


def convert_vqa(path: str | Path, *, image_prefix: str = "", **options: Any) -> tuple[list[dict], ConvertReport]:
    """Convert a VQA json list; returns ``(records, report)``. ``options``: :class:`ConvertOptions` keywords.
    Raises :class:`ConvertError` if unusable."""
    opts = ConvertOptions(**options)
    lang = opts.lang
    path = Path(path)
    file = str(path)
    data = read_json(path, "VQA json")
    if not isinstance(data, list):
        raise ConvertError(f"{file}:0: expected a JSON list of question objects, got {type(data).__name__}")
    report = ConvertReport(source=f"vqa {file}")
    items = []
    for number, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            report.skip(file, number, "bad-item", f"item {number} is not an object")
            continue
        item_lang = str(item.get("q_lang", lang)).strip().lower()
        if item_lang != lang:
            report.skip(file, number, "other-language", f"q_lang {item_lang!r} (converting {lang!r})")
            continue
        image = _first(item, IMAGE_KEYS)
        question, answer = item.get("question"), item.get("answer")
        missing = [k for k, v in (("image", image), ("question", question), ("answer", answer)) if v in (None, "")]
        if missing:
            report.skip(file, number, "missing-field", f"missing {', '.join(missing)}")
            continue
        if not isinstance(image, str) or not isinstance(question, str) or isinstance(answer, (dict, list, bool)):
            report.skip(file, number, "bad-field", "image and question must be text, answer text or a number")
            continue
        answer = str(answer).strip()
        if not answer or not question.strip():
            report.skip(file, number, "missing-field", "empty question or answer")
            continue
        try:
            options = _choices(item)
        except ValueError as exc:
            report.skip(file, number, "bad-field", str(exc))
            continue
        answer_type = str(item.get("answer_type", "")).strip().upper()
        if answer_type not in ("", "OPEN", "CLOSED"):
            report.skip(file, number, "unknown-answer-type", f"answer_type {answer_type!r} is not OPEN or CLOSED")
            continue
        if options:
            task, extra = "vqa_choice", {"options": options}
        elif answer_type == "CLOSED" or (not answer_type and answer.lower() in YES_NO):
            task, extra = "vqa_closed", {}
        else:
            task, extra = "vqa_open", {}
        qid = item.get("qid", number)
        record = build_or_skip(report, file, number, task, lang, id=f"{opts.id_prefix}{qid}", image=image_prefix + image,
                               question=question, answer=answer, include_base_prompt=opts.include_base_prompt, **extra)
        if record is not None:
            items.append((file, number, record))
    return opts.finish(items, report)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("annotation", help="VQA json list (SLAKE train.json, VQA-RAD json, ...)")
    parser.add_argument("--image-prefix", default="", help="prefix joined to each image name (e.g. 'imgs/')")
    add_common_arguments(parser, tasks=TASKS, default_task="auto")


def run(args: argparse.Namespace) -> ConvertReport:
    records, report = convert_vqa(args.annotation, image_prefix=args.image_prefix, **common_options(args))
    return write_output(records, report, args.out)
