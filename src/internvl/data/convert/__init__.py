"""Converters from common medical dataset formats to MedRegInstruct jsonl (``medrega-data convert <format>``).

One module per format (``coco``, ``vindr``, ``masks``, ``classification``, ``vqa``), each with a Python function
returning ``(records, report)`` and a :class:`ConverterCLI` (its options as a table). Every converter fills one
:class:`Conversion`: records come from :func:`internvl.data.prompts.build_record` and pass the training
:class:`~internvl.data.records.RecordChecker`; every item not converted is counted by reason at ``FILE:LINE`` (for JSON
documents the "line" is the 1-based index in the named array).
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from internvl.data.prompts import LANGS, PromptError, build_record
from internvl.data.records import JSONLimitError, RecordChecker, RecordProblem, loads_limited
from internvl.io_safety import atomic_write_text

__all__ = ["COMMON_ARGUMENTS", "CONVERTERS", "Conversion", "ConvertError", "ConvertReport", "ConverterCLI",
           "check_task", "get_converter", "read_csv", "read_json", "write_output"]

#: format name -> module (imported on demand)
CONVERTERS: dict[str, str] = {name: f"internvl.data.convert.{name}"
                              for name in ("coco", "vindr", "masks", "classification", "vqa")}

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


@dataclass
class Conversion:
    """One conversion under way. Its keywords are those of every ``convert_*`` function (:data:`COMMON_ARGUMENTS`):
    prompt language; the root record image paths are relative to (``None``: image files not checked) and how much of
    each image to check; a record id prefix; ``include_base_prompt=False`` for raw questions (the meta_file.json
    ``base_prompt`` supplies the task prompt)."""

    source: str
    lang: str = "en"
    image_root: str | Path | None = None
    image_check: str = "exists"
    id_prefix: str = ""
    include_base_prompt: bool = True
    records: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.report = ConvertReport(source=self.source)
        # the training record checks; without an image root paths must still be relative and inside the root
        root, check = (self.image_root, self.image_check) if self.image_root else (".", "none")
        self.checker = RecordChecker(image_root=root, image_check=check)

    def add(self, file: str | Path, line: int, builds: Iterable[dict[str, Any]], *, context: str = "",
            **common: Any) -> None:
        """Build and check the records of one input item: each of ``builds`` is ``task=``, ``id=`` (prefixed here) and
        fields, merged with ``common``. A record the checks reject is skipped and counted; the first
        :class:`~internvl.data.prompts.PromptError` ends the item: one ``bad-record`` skip at ``file:line`` (message
        ``context`` + the error)."""
        for fields in builds:
            fields = {**fields, **common, "id": f"{self.id_prefix}{fields['id']}"}
            try:
                record = build_record(fields.pop("task"), self.lang, include_base_prompt=self.include_base_prompt,
                                      **fields)
            except PromptError as exc:
                self.report.skip(file, line, "bad-record", f"{context}{exc}")
                return
            problems = self.checker.check(record, file=file, line=line)
            for p in problems:
                self.report.skip(file, line, p.reason, p.message)
            if not problems:
                self.records.append(record)

    def finish(self) -> tuple[list[dict], ConvertReport]:
        """``(records, report)``, with ``report.written`` set: what every ``convert_*`` function returns."""
        self.report.written = len(self.records)
        return self.records, self.report


def write_output(records: list[dict], report: ConvertReport, out: str | Path) -> ConvertReport:
    """Write the records to ``out`` as UTF-8 jsonl (non-ASCII kept readable, parent folders created; atomically, so a
    crash never leaves a half-written file) and note it in the report."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    report.output = out
    return report


def check_task(task: str, tasks: Sequence[str]) -> None:
    """Raise :class:`ConvertError` unless ``task`` is one of the converter's ``tasks``."""
    if task not in tasks:
        raise ConvertError(f"task must be one of {list(tasks)}, got {task!r}")


def read_json(path: Path, what: str) -> Any:
    """The parsed JSON document at ``path``; :class:`ConvertError` ``"FILE:0: cannot read <what>: ..."`` if not."""
    try:
        return loads_limited(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}:0: cannot read {what}: {exc}") from exc
    except JSONLimitError as exc:  # too deep, a number with thousands of digits, a lone surrogate
        raise ConvertError(f"{path}:0: cannot read {what}: {exc.reason}: {exc}") from exc


@contextmanager
def read_csv(path: Path, required: Sequence[str]) -> Iterator[csv.DictReader]:
    """A ``csv.DictReader`` over ``path`` (gzip-compressed when it ends in ``.gz``, e.g. vinbigdata-train.csv.gz)
    whose header has every ``required`` column; :class:`ConvertError` ``FILE:0`` if the file cannot be opened,
    ``FILE:1`` naming missing columns."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        fh = opener(path, "rt", newline="", encoding="utf-8")
    except OSError as exc:
        raise ConvertError(f"{path}:0: cannot open CSV: {exc}") from exc
    with fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise ConvertError(f"{path}:1: missing column(s) {missing}; found {header}")
        yield reader


def comma_list(value: str) -> list[str]:
    """An argparse ``type``: ``"a, b,c"`` -> ``["a", "b", "c"]``."""
    return [v.strip() for v in value.split(",")]


#: one option of a converter: (argparse flags, argparse keywords); its dest is a keyword of the converter function
Argument = tuple[tuple[str, ...], dict[str, Any]]

#: The options every converter takes, fed to its function as the :class:`Conversion` keywords.
COMMON_ARGUMENTS: tuple[Argument, ...] = (
    (("--lang",), dict(choices=LANGS, default="en", help="prompt language (default en)")),
    (("--image-root",), dict(help="dataset root that record image paths are relative to; when given, every image "
                                  "must exist there")),
    (("--images",), dict(dest="image_check", choices=["exists", "header", "decode"], default="exists",
                         help="how much of each image to check when --image-root is given (default exists)")),
    (("--id-prefix",), dict(default="", help="prefix for record ids")),
    (("--no-base-prompt",), dict(dest="include_base_prompt", action="store_false",
                                 help="write raw questions (the meta_file.json base_prompt supplies the task prompt)")),
)


@dataclass(frozen=True)
class ConverterCLI:
    """A converter's ``medrega-data convert`` subcommand: its help line, prompt tasks (the first is the default),
    its own options and the function they feed together with ``--task`` and :data:`COMMON_ARGUMENTS`."""

    help: str
    tasks: tuple[str, ...]
    arguments: tuple[Argument, ...]
    convert: Callable[..., tuple[list[dict], ConvertReport]]

    @property
    def doc(self) -> str | None:
        """The converter module's docstring (the subcommand's ``--help`` description)."""
        return sys.modules[self.convert.__module__].__doc__

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this converter's and the common options (their dests noted for :meth:`run`), ``--task``, ``--out``
        and ``--strict`` to ``parser``."""
        actions = [parser.add_argument(*flags, **kwargs) for flags, kwargs in self.arguments + COMMON_ARGUMENTS]
        parser.set_defaults(converter_options=[action.dest for action in actions])
        parser.add_argument("--task", choices=self.tasks, default=self.tasks[0],
                            help=f"prompt task (default {self.tasks[0]})")
        parser.add_argument("--out", required=True, help="output MedRegInstruct .jsonl")
        parser.add_argument("--strict", action="store_true", help="exit non-zero if anything was skipped")

    def run(self, args: argparse.Namespace) -> ConvertReport:
        """Convert what ``args`` name and write ``args.out``."""
        records, report = self.convert(task=args.task, **{dest: getattr(args, dest) for dest in args.converter_options})
        return write_output(records, report, args.out)


def get_converter(name: str) -> ConverterCLI:
    """The command-line side of the converter for a format name."""
    if name not in CONVERTERS:
        raise ConvertError(f"unknown format {name!r}; choose one of {', '.join(CONVERTERS)}")
    return import_module(CONVERTERS[name]).CLI
