"""Converters from common medical dataset formats to MedRegInstruct jsonl.

One module per source format; each exposes ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) ->
ConvertReport`` for the ``medrega-data convert <format>`` CLI, plus a plain Python function that returns
``(records, report)``. All records are made by :func:`internvl.data.prompts.build_record` and then go through the
same :class:`~internvl.data.records.RecordChecker` as training, so a converter cannot write a record that training
would reject. Every input item that is not converted is counted in the :class:`ConvertReport` by reason, with its
``FILE:LINE`` (for JSON documents the "line" is the 1-based index in the named array).

Formats: ``coco`` (detection json), ``vindr`` (per-radiologist box CSV), ``masks`` (segmentation label maps:
PNG, NIfTI, DICOM SEG), ``classification`` (class folders or CSV), ``vqa`` (SLAKE / VQA-RAD json).
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from internvl.data.prompts import LANGS, PromptError, build_record
from internvl.data.records import JSONLimitError, RecordChecker, RecordProblem, loads_limited
from internvl.io_safety import atomic_write_text

__all__ = ["CONVERTERS", "ConvertError", "ConvertOptions", "ConvertReport", "add_common_arguments", "build_or_skip",
           "build_records", "check_task", "common_options", "finish_report", "get_converter", "read_csv",
           "read_json", "write_output"]

#: format name -> module (imported lazily so that the CLI starts fast)
CONVERTERS: dict[str, str] = {"coco": "internvl.data.convert.coco", "vindr": "internvl.data.convert.vindr",
                              "masks": "internvl.data.convert.masks",
                              "classification": "internvl.data.convert.classification",
                              "vqa": "internvl.data.convert.vqa"}

#: How many individual problems a report keeps for printing (all are counted).
MAX_KEPT_PROBLEMS = 1000


class ConvertError(ValueError):
    """The input as a whole cannot be converted (unreadable file, wrong structure, missing columns)."""


@dataclass
class ConvertReport:
    """What a conversion wrote and what it skipped, by reason."""

    source: str
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    problems: list[RecordProblem] = field(default_factory=list)
    output: str | None = None

    def skip(self, file: str | Path, line: int, reason: str, message: str) -> None:
        """Count one skipped input item and keep its problem line (up to MAX_KEPT_PROBLEMS)."""
        self.skipped[reason] += 1
        if len(self.problems) < MAX_KEPT_PROBLEMS:
            self.problems.append(RecordProblem(str(file), line, reason, message))

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """``"coco: wrote 12 records to out.jsonl; skipped 3: bad-bbox 2, unknown-image 1"``."""
        where = f" to {self.output}" if self.output else ""
        reasons = ": " + ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items())) if self.skipped else ""
        return f"{self.source}: wrote {self.written} records{where}; skipped {self.n_skipped}{reasons}"


@dataclass(frozen=True)
class ConvertOptions:
    """The options every ``convert_*`` function takes as keywords (``**options``; :func:`add_common_arguments` on the
    command line): prompt language, the root that record image paths are relative to (``None``: image files are not
    checked) and how much of each image to check, a prefix for record ids, and whether questions carry the task
    prompt (``False``: raw questions, the meta_file.json ``base_prompt`` supplies it)."""

    lang: str = "en"
    image_root: str | Path | None = None
    image_check: str = "exists"
    id_prefix: str = ""
    include_base_prompt: bool = True

    def finish(self, items: Iterable[tuple[str, int, dict]], report: ConvertReport) -> tuple[list[dict], ConvertReport]:
        """:func:`finish_report` with these options' image root and check level."""
        return finish_report(items, report, image_root=self.image_root, image_check=self.image_check)


def finish_report(items: Iterable[tuple[str, int, dict]], report: ConvertReport, *, image_root: str | Path | None,
                  image_check: str = "exists") -> tuple[list[dict], ConvertReport]:
    """Run every built record through the training record checks; bad ones are counted in ``report``. Returns the
    ``(records, report)`` every ``convert_*`` function returns, with ``report.written`` set.

    ``items`` are ``(source_file, source_line, record)``. With ``image_root=None`` image files are not checked
    (paths are still required to be relative and inside the root).
    """
    checker = RecordChecker(image_root=image_root or ".", image_check=image_check if image_root else "none")
    records = []
    for file, line, record in items:
        problems = checker.check(record, file=file, line=line)
        for p in problems:
            report.skip(file, line, p.reason, p.message)
        if not problems:
            records.append(record)
    report.written = len(records)
    return records, report


def write_output(records: list[dict], report: ConvertReport, out: str | Path) -> ConvertReport:
    """Write the records to ``out`` as UTF-8 jsonl (non-ASCII kept readable, parent folders created; atomically, so a
    crash never leaves a half-written file) and note it in the report: the end of every converter's ``run``."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    report.output = out
    return report


def build_or_skip(report: ConvertReport, file: str | Path, line: int, task: str, lang: str, *, context: str = "",
                  **fields: Any) -> dict | None:
    """:func:`~internvl.data.prompts.build_record`, or ``None`` with a ``bad-record`` skip (message ``context + error``)."""
    try:
        return build_record(task, lang, **fields)
    except PromptError as exc:
        report.skip(file, line, "bad-record", f"{context}{exc}")
        return None


def build_records(report: ConvertReport, file: str | Path, line: int, lang: str, builds: Iterable[dict[str, Any]],
                  **common: Any) -> list[dict]:
    """Build the records of one input item (each of ``builds`` is ``task=`` plus fields, merged with ``common``).

    The first :class:`~internvl.data.prompts.PromptError` ends the item: it is counted once, as one ``bad-record``
    at ``file:line`` (see :func:`build_or_skip` for ``context=``), and the records built before it are returned.
    """
    records = []
    for fields in builds:
        record = build_or_skip(report, file, line, lang=lang, **fields, **common)
        if record is None:
            break
        records.append(record)
    return records


def check_task(task: str, tasks: Sequence[str]) -> None:
    """Raise :class:`ConvertError` unless ``task`` is one of the converter's ``tasks``."""
    if task not in tasks:
        raise ConvertError(f"task must be one of {tasks}, got {task!r}")


def read_json(path: Path, what: str) -> Any:
    """The parsed JSON document at ``path``; :class:`ConvertError` ``"FILE:0: cannot read <what>: ..."`` if not."""
    try:
        return loads_limited(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}:0: cannot read {what}: {exc}") from exc
    except JSONLimitError as exc:  # too deep, a number with thousands of digits, a lone surrogate
        raise ConvertError(f"{path}:0: cannot read {what}: {exc.reason}: {exc}") from exc


@contextmanager
def read_csv(path: Path, required: Sequence[str], *, gunzip: bool = False) -> Iterator[csv.DictReader]:
    """A ``csv.DictReader`` over ``path`` (``*.gz`` too with ``gunzip``) whose header has every ``required`` column.

    Raises :class:`ConvertError` ``FILE:0`` if the file cannot be opened, ``FILE:1`` naming missing columns.
    """
    try:
        if gunzip and path.suffix == ".gz":  # e.g. vinbigdata-train.csv.gz
            fh = gzip.open(path, "rt", newline="", encoding="utf-8")
        else:
            fh = open(path, newline="", encoding="utf-8")  # noqa: SIM115 - closed by the with block below
    except OSError as exc:
        raise ConvertError(f"{path}:0: cannot open CSV: {exc}") from exc
    with fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise ConvertError(f"{path}:1: missing column(s) {missing}; found {header}")
        yield reader


def common_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`ConvertOptions` keywords from :func:`add_common_arguments`'s command-line options."""
    return {"lang": args.lang, "image_root": args.image_root, "image_check": args.image_check,
            "id_prefix": args.id_prefix, "include_base_prompt": not args.no_base_prompt}


def add_common_arguments(parser: argparse.ArgumentParser, *, tasks: list[str], default_task: str) -> None:
    """Options every converter shares: output, task, language, image root and check level, id prefix."""
    parser.add_argument("--out", required=True, help="output MedRegInstruct .jsonl")
    parser.add_argument("--task", choices=tasks, default=default_task, help=f"prompt task (default {default_task})")
    parser.add_argument("--lang", choices=LANGS, default="en", help="prompt language (default en)")
    parser.add_argument("--image-root", help="dataset root that record image paths are relative to; "
                        "when given, every image must exist there")
    parser.add_argument("--images", dest="image_check", choices=["exists", "header", "decode"], default="exists",
                        help="how much of each image to check when --image-root is given (default exists)")
    parser.add_argument("--id-prefix", default="", help="prefix for record ids")
    parser.add_argument("--no-base-prompt", action="store_true",
                        help="write raw questions (the meta_file.json base_prompt supplies the task prompt)")
    parser.add_argument("--strict", action="store_true", help="exit non-zero if anything was skipped")


def get_converter(name: str) -> Any:
    """The converter module for a format name."""
    if name not in CONVERTERS:
        raise ConvertError(f"unknown format {name!r}; choose one of {', '.join(CONVERTERS)}")
    return import_module(CONVERTERS[name])
