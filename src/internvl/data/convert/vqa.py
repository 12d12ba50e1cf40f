"""SLAKE / VQA-RAD-style VQA json -> vqa_open / vqa_closed / vqa_choice records.

Input: a JSON list of question objects. Recognised keys (first match wins):

* image: ``img_name`` (SLAKE), ``image_name`` (VQA-RAD), ``image``
* ``question``, ``answer`` (numbers are written as text), optional ``answer_type`` (``OPEN``/``CLOSED``)
* language: ``q_lang`` (SLAKE ``en``/``zh``); items in another language than ``--lang`` are skipped and counted
* multiple choice: ``options`` or ``choices`` as a list or a ``{"A": text, ...}`` mapping -> ``vqa_choice``

Without ``answer_type`` a yes/no (是/否) answer counts as closed. The "line" of a problem is the 1-based item index.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from internvl.data.convert import Conversion, ConverterCLI, ConvertError, ConvertReport, check_task, read_json

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


def convert_vqa(path: str | Path, *, task: str = "auto", image_prefix: str = "", **options: Any
                ) -> tuple[list[dict], ConvertReport]:
    """Convert a VQA json list; returns ``(records, report)``. ``task``: only ``"auto"`` (the task follows each item,
    see the module docstring). ``options``: :class:`Conversion` keywords. Raises :class:`ConvertError` if unusable."""
    check_task(task, ["auto"])
    file = str(path)
    data = read_json(Path(path), "VQA json")
    if not isinstance(data, list):
        raise ConvertError(f"{file}:0: expected a JSON list of question objects, got {type(data).__name__}")
    conv = Conversion(f"vqa {file}", **options)
    lang, skip = conv.lang, conv.report.skip
    for number, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            skip(file, number, "bad-item", f"item {number} is not an object")
            continue
        item_lang = str(item.get("q_lang", lang)).strip().lower()
        if item_lang != lang:
            skip(file, number, "other-language", f"q_lang {item_lang!r} (converting {lang!r})")
            continue
        image = _first(item, IMAGE_KEYS)
        question, answer = item.get("question"), item.get("answer")
        missing = [k for k, v in (("image", image), ("question", question), ("answer", answer)) if v in (None, "")]
        if missing:
            skip(file, number, "missing-field", f"missing {', '.join(missing)}")
            continue
        if not isinstance(image, str) or not isinstance(question, str) or isinstance(answer, (dict, list, bool)):
            skip(file, number, "bad-field", "image and question must be text, answer text or a number")
            continue
        answer = str(answer).strip()
        if not answer or not question.strip():
            skip(file, number, "missing-field", "empty question or answer")
            continue
        try:
            choices = _choices(item)
        except ValueError as exc:
            skip(file, number, "bad-field", str(exc))
            continue
        answer_type = str(item.get("answer_type", "")).strip().upper()
        if answer_type not in ("", "OPEN", "CLOSED"):
            skip(file, number, "unknown-answer-type", f"answer_type {answer_type!r} is not OPEN or CLOSED")
            continue
        if choices:
            build = {"task": "vqa_choice", "options": choices}
        elif answer_type == "CLOSED" or (not answer_type and answer.lower() in YES_NO):
            build = {"task": "vqa_closed"}
        else:
            build = {"task": "vqa_open"}
        conv.add(file, number, [{**build, "id": item.get("qid", number)}], image=image_prefix + image,
                 question=question, answer=answer)
    return conv.finish()


CLI = ConverterCLI(
    help="SLAKE / VQA-RAD-style VQA json -> vqa_open / vqa_closed / vqa_choice records", tasks=("auto",),
    convert=convert_vqa,
    arguments=((("path",), dict(metavar="annotation", help="VQA json list (SLAKE train.json, VQA-RAD json, ...)")),
               (("--image-prefix",), dict(default="", help="prefix joined to each image name (e.g. 'imgs/')"))))
