"""Prediction files: our records and the original MedRegA formats, every problem named FILE:LINE.

A JSON list (the original scorers' input) or JSON lines (what `medrega-eval run` writes); the accepted fields are
tabled in docs/evaluation.md ("Prediction files"). Nothing is dropped silently: malformed lines, missing fields,
duplicate ids and bad sizes become `RecordProblem`s that the summary counts and lists.
"""
from __future__ import annotations

import json
import reprlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from internvl.data.records import LimitedJSONDecoder, RecordProblem, read_jsonl

__all__ = ["PredictionRecord", "read_predictions", "parse_prediction", "problem_at", "ScoreInputError"]


class ScoreInputError(ValueError):
    """The records cannot be scored as asked (e.g. a compat split whose language is ambiguous): a user error."""


#: the languages records and benchmarks may name (the bilingual scorers' two rule sets)
LANGS = ("en", "zh")
ID_KEYS = ("id", "question_id")
PRED_KEYS = ("prediction", "pred_answer", "answer")
REF_KEYS = ("reference", "gt_answer", "gt")


@dataclass
class PredictionRecord:
    """One prediction to score. `source` is "FILE:LINE" of the record; `hw` is [height, width] in pixels."""

    id: str
    prediction: str
    reference: str
    source: str
    question: str | None = None
    image: str | None = None
    image_root: str | None = None
    hw: list[float] | None = None
    lang: str | None = None
    answer_type: str | None = None
    options: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # the file loader reports this as a FILE:LINE problem before building one
        if self.lang not in (None, *LANGS):
            raise ScoreInputError(f"{self.source}: lang must be 'en' or 'zh', got {self.lang!r}")


# optional record fields: (check, what the error message says they must be)
_OPTIONAL_FIELDS = {
    "question": (lambda v: isinstance(v, str), "a string"),
    "answer_type": (lambda v: isinstance(v, str), "a string"),
    "image_root": (lambda v: isinstance(v, str), "a string"),
    "image": (lambda v: isinstance(v, str), "a path or a list of paths"),
    "hw": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2
           and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v),
           "[height, width] with positive numbers"),
    "lang": (lambda v: v in LANGS, "'en' or 'zh'"),
    "options": (lambda v: isinstance(v, list) and v and all(isinstance(o, str) for o in v),
                "a non-empty list of strings"),
}


def _first(record: dict, keys: Sequence[str]) -> tuple[str | None, Any]:
    for k in keys:
        if k in record:
            return k, record[k]
    return None, None


def problem_at(source: str, reason: str, message: str) -> RecordProblem:
    """A problem at a record's ``source`` ("FILE:LINE"; line 0 when the source has no line number)."""
    file, _, line = source.rpartition(":")
    if not line.isdigit():
        return RecordProblem(source, 0, reason, message)
    return RecordProblem(file, int(line), reason, message)


def parse_prediction(record: dict, file: str, line: int) -> PredictionRecord | RecordProblem:
    """Validate one decoded record; return a PredictionRecord or the first problem found."""
    pk, pred = _first(record, PRED_KEYS)
    rk, ref = _first(record, REF_KEYS)
    if pk is None:
        return RecordProblem(file, line, "missing-field", f"no prediction field (one of {', '.join(PRED_KEYS)})")
    if rk is None:
        return RecordProblem(file, line, "missing-field", f"no reference field (one of {', '.join(REF_KEYS)})")
    if pred is None:
        pred = ""  # a null answer is an empty prediction: scored (as wrong) and counted, never dropped
    if not isinstance(pred, str):
        return RecordProblem(file, line, "bad-field", f"{pk} must be a string, got {type(pred).__name__}")
    if isinstance(ref, list) and all(isinstance(r, str) for r in ref):
        ref = ", ".join(ref)
    if not isinstance(ref, str) or not ref.strip():
        return RecordProblem(file, line, "bad-field", f"{rk} must be a non-empty string, got {ref!r}")
    _, rid = _first(record, ID_KEYS)
    rid = f"{file}:{line}" if rid is None else str(rid)
    optional = {k: record.get(k) for k in _OPTIONAL_FIELDS}
    if isinstance(optional["image"], list):
        optional["image"] = optional["image"][0] if optional["image"] else None
    if optional["hw"] is None and "height" in record and "width" in record:
        optional["hw"] = [record["height"], record["width"]]
    for key, value in optional.items():
        ok, rule = _OPTIONAL_FIELDS[key]
        if value is not None and not ok(value):
            return RecordProblem(file, line, "bad-field", f"{key} must be {rule}, got {reprlib.repr(value)}")
    if optional["hw"] is not None:
        optional["hw"] = [float(v) for v in optional["hw"]]
    known = {*ID_KEYS, *PRED_KEYS, *REF_KEYS, *_OPTIONAL_FIELDS, "height", "width"}
    return PredictionRecord(id=rid, prediction=pred, reference=ref, source=f"{file}:{line}", **optional,
                            extra={k: v for k, v in record.items() if k not in known})


def _json_list_items(text: str) -> Iterable[tuple[int, Any]]:
    """(line number, decoded item) for each element of a top-level JSON list, decoded under the input limits of
    :mod:`internvl.data.records` (a too deep or huge item raises ``json.JSONDecodeError`` at its line)."""
    decoder = LimitedJSONDecoder()
    pos = text.index("[") + 1
    n = len(text)
    line, counted = 1, 0  # line numbers counted incrementally: one pass over the text, not one per item
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n:
            raise json.JSONDecodeError("unterminated list", text, pos)
        if text[pos] == "]":
            return
        line += text.count("\n", counted, pos)
        counted = pos
        item, pos = decoder.decode_at(text, pos)
        yield line, item


def read_predictions(path: str | Path, *, keep_duplicates: bool = False, seen: dict[str, str] | None = None
                     ) -> tuple[list[PredictionRecord], list[RecordProblem]]:
    """All valid predictions of a JSON-list or JSON-lines file plus every problem (duplicates keep the first).

    keep_duplicates=True (``--compat medrega``: the original scorers never look at ids) keeps every record. ``seen``
    ({id: source}, filled here) carries the ids of earlier files, so that several files are pooled without repeats."""
    path = Path(path)
    file = str(path)
    try:
        found = path.is_file()
    except OSError as exc:  # a name longer than the file system allows ...
        raise FileNotFoundError(f"{file[:300]}: prediction file not usable ({exc.strerror or exc})") from None
    if not found:
        raise FileNotFoundError(f"{file}: prediction file not found")
    problems: list[RecordProblem] = []
    decoded: list[tuple[int, Any]] = []  # (line, item)
    head = path.read_bytes()[:4096].decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        text = path.read_text(encoding="utf-8-sig")
        try:
            for item in _json_list_items(text):
                decoded.append(item)  # noqa: PERF402 - a loop keeps the items before a bad one
        except json.JSONDecodeError as exc:  # keep what decoded before the error; the rest is one problem
            problems.append(RecordProblem(file, exc.lineno, "invalid-json",
                                          f"{exc.msg}; items after this are not read"))
    else:
        for line, item in read_jsonl(path):
            if not isinstance(item, RecordProblem):
                decoded.append((line, item))
            elif item.reason != "blank-line":
                problems.append(item)
    records: list[PredictionRecord] = []
    seen = {} if seen is None else seen
    idless_on_line: dict[int, int] = {}
    for line, item in decoded:
        if not isinstance(item, dict):
            problems.append(RecordProblem(file, line, "not-an-object",
                                          f"expected a JSON object, got {type(item).__name__}"))
            continue
        try:
            rec = parse_prediction(item, file, line)
        except Exception as exc:  # noqa: BLE001 - one hostile record is a FILE:LINE problem, never a crash
            rec = RecordProblem(file, line, "bad-record", f"{type(exc).__name__}: {str(exc)[:200]}")
        if isinstance(rec, RecordProblem):
            problems.append(rec)
            continue
        if not any(k in item for k in ID_KEYS):
            # id-less items of a one-line JSON list share a line: FILE:LINE, then FILE:LINE#2, #3, ...
            nth = idless_on_line[line] = idless_on_line.get(line, 0) + 1
            if nth > 1:
                rec.id = f"{rec.id}#{nth}"
        if rec.id in seen and not keep_duplicates:
            problems.append(RecordProblem(file, line, "duplicate-id", f"id {rec.id!r} already used at {seen[rec.id]}; "
                                                                 "this record is not scored"))
            continue
        seen[rec.id] = rec.source
        records.append(rec)
    return records, problems
