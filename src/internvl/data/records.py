"""Record checks in one place: reading annotation jsonl and validating MedRegInstruct records.

Training, evaluation, the demo and ``medrega-data check`` all validate records here, so a bad record gets the same
``FILE:LINE: reason: message`` everywhere (the record format and every reason: docs/data-io.md). Strict use
(:func:`iter_records`, training's default) raises :class:`BadRecordError` at the first bad record; lenient use skips
bad records and counts them by reason in a :class:`ProblemTally`, so nothing is dropped silently.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from internvl.constants import IMAGE_PLACEHOLDER
from internvl.data.bounded_json import (MAX_LINE_BYTES, MAX_NAME_BYTES, MAX_PATH_BYTES, JSONLimitError,
                                        LimitedJSONDecoder, has_lone_surrogate, loads_limited)
from internvl.data.images import ImageLoadError, load_image, probe_image
from internvl.regions import RegionError, parse_regions

__all__ = ["ALLOW_LINKS_ENV", "BadRecordError", "IMAGE_CHECKS", "ImagePathError", "check_path_length",
           "JSONLimitError", "LimitedJSONDecoder", "loads_limited", "parse_record_line", "REASONS",
           "ProblemTally", "RecordChecker", "RecordProblem", "image_paths", "iter_records", "read_jsonl",
           "resolve_image"]

#: Every reason a record can be rejected for; the table in docs/data-io.md says what each means (a test keeps it whole).
REASONS = frozenset({
    "unreadable-file", "not-utf8", "line-too-long", "too-deep", "number-too-large", "bad-text", "bad-path",
    "bad-record", "invalid-json", "blank-line", "not-an-object", "bad-field", "bad-turns", "empty-turn",
    "image-count-mismatch", "image-outside-root", "missing-image", "unreadable-image", "corrupt-image", "bad-box",
    "too-long", "encode-error",
})

#: How much of each image to check: existence only, header, or a full decode through load_image.
IMAGE_CHECKS = ("none", "exists", "header", "decode")

# Format examples in task prompts ("<box>[[x1, y1, x2, y2]]</box>", also without tags) are notation, not boxes.
_PLACEHOLDER_ONE = r"\[\s*[a-z]\d*\s*(?:,\s*[a-z]\d*\s*){3}\]"
_PLACEHOLDER_LIST = rf"\[\s*{_PLACEHOLDER_ONE}(?:\s*,\s*{_PLACEHOLDER_ONE})*\s*\]"
_PLACEHOLDER_BOX_RE = re.compile(rf"<box>\s*{_PLACEHOLDER_LIST}\s*</box>|{_PLACEHOLDER_LIST}")


@dataclass(frozen=True)
class RecordProblem:
    """One problem: ``file`` and 1-based ``line`` (0 = the whole file), a ``reason`` key from :data:`REASONS`,
    and a human ``message``. ``str()`` gives ``FILE:LINE: reason: message``."""

    file: str
    line: int
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}: {self.message}"


class BadRecordError(ValueError):
    """Raised in strict mode on the first bad record; ``.problems`` holds every problem of that record."""

    def __init__(self, problems: list[RecordProblem]) -> None:
        if not problems:
            raise ValueError("BadRecordError needs at least one problem")
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def parse_record_line(raw: bytes, file: str, line: int) -> Any:
    """Decode one jsonl line under the input limits: the JSON value, or a :class:`RecordProblem` naming ``FILE:LINE``.
    The one place where record text becomes values, so every reader gets the same limits and reasons."""
    def problem(reason: str, message: str) -> RecordProblem:
        return RecordProblem(file, line, reason, message)

    if len(raw) > MAX_LINE_BYTES:
        return problem("line-too-long", f"{len(raw)} bytes; the limit is {MAX_LINE_BYTES}")
    if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return problem("not-utf8", f"byte {exc.start} is not valid UTF-8 ({raw[exc.start:exc.start + 4]!r})")
    if not text.strip():
        return problem("blank-line", "empty line (remove it)")
    try:
        return loads_limited(text)
    except JSONLimitError as exc:
        return problem(exc.reason, str(exc))
    except json.JSONDecodeError as exc:
        return problem("invalid-json", f"{exc.msg} at column {exc.colno}")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict | RecordProblem]]:
    """Yield ``(line_number, record)`` for each line, or ``(line_number, RecordProblem)`` for a bad one (an
    unreadable file: one problem at line 0). A line over ``MAX_LINE_BYTES`` is skipped in bounded chunks."""
    file = str(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        yield 0, RecordProblem(file, 0, "unreadable-file", f"cannot open annotation file ({exc.strerror or exc})")
        return
    with fh:
        number = 0
        while True:
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                size = len(raw)
                while raw and not raw.endswith(b"\n"):  # skip the rest of the long line in bounded chunks
                    raw = fh.readline(1 << 20)
                    size += len(raw)
                yield number, RecordProblem(file, number, "line-too-long",
                                            f"{size} bytes; the limit is {MAX_LINE_BYTES}")
                continue
            record = parse_record_line(raw, file, number)
            if not isinstance(record, (dict, RecordProblem)):
                record = RecordProblem(file, number, "not-an-object",
                                       f"expected a JSON object, got {type(record).__name__}")
            yield number, record


def image_paths(record: dict) -> list[str]:
    """The record's image paths as a list (``[]`` for text-only); the field must have passed the checks."""
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


#: Set to ``1`` to follow symbolic links that lead outside an image root (off by default; docs/data-io.md).
ALLOW_LINKS_ENV = "MEDREGA_ALLOW_LINKS_OUTSIDE_ROOT"


class ImagePathError(ValueError):
    """An image path that is refused: ``reason`` is ``"image-outside-root"`` or ``"bad-path"`` (see :data:`REASONS`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_path_length(path: str) -> None:
    """Raise :class:`ImagePathError` (``bad-path``) for a path or component the file system cannot hold, or NUL."""
    if "\x00" in path:
        raise ImagePathError("bad-path", "the path contains a NUL character")
    try:
        size = len(os.fsencode(path))
    except UnicodeError:
        raise ImagePathError("bad-path", "the path is not encodable text") from None
    if size > MAX_PATH_BYTES:
        raise ImagePathError("bad-path", f"the path has {size} bytes; the file system allows {MAX_PATH_BYTES}")
    longest = max((len(os.fsencode(part)) for part in path.replace("\\", "/").split("/")), default=0)
    if longest > MAX_NAME_BYTES:
        raise ImagePathError("bad-path", f"a path component has {longest} bytes; the file system allows "
                                         f"{MAX_NAME_BYTES}")


def resolve_image(path: str, root: str | Path) -> Path:
    """Join ``path`` to ``root``; :class:`ImagePathError` when the normalised path, or its real path (links
    resolved), leaves the root. Setting :data:`ALLOW_LINKS_ENV` skips the real-path check (a shared image store)."""
    if not isinstance(path, str):
        raise ImagePathError("bad-path", f"an image path must be a string, got {type(path).__name__}")
    if "://" in path:
        raise ImagePathError("image-outside-root", f"image {path!r} is a URL; only local files are supported")
    check_path_length(path)
    root_abs = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(root_abs, path))
    if os.path.commonpath([root_abs, full]) != root_abs:
        raise ImagePathError("image-outside-root", f"image {path!r} resolves to {full}, outside the image root")
    if os.environ.get(ALLOW_LINKS_ENV, "").strip().lower() not in ("1", "true", "yes"):
        real_root, real = os.path.realpath(root_abs), os.path.realpath(full)
        if os.path.commonpath([real_root, real]) != real_root:
            raise ImagePathError("image-outside-root", f"image {path!r} is (or lies under) a symbolic link that leads "
                                 f"outside the image root (set {ALLOW_LINKS_ENV}=1 to allow such links)")
    return Path(full)


@dataclass
class RecordChecker:
    """Validates records; one instance per annotation file, so image results are cached across records.

    ``image_root``: what image paths are relative to (``None``: the jsonl's directory). ``image_check``: one of
    :data:`IMAGE_CHECKS`. ``max_length`` rejects records whose ``token_length(record)`` is longer.
    ``require_answer``: the last turn must be from ``gpt``. As in the original trainer, a single image needs no
    ``<image>`` placeholder (the encoder puts it first).
    """

    image_root: str | Path | None = None
    image_check: str = "exists"
    max_length: int | None = None
    token_length: Callable[[dict], int] | None = None
    require_answer: bool = True
    _image_cache: dict[Path, tuple[str, str] | None] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.image_check not in IMAGE_CHECKS:
            raise ValueError(f"image_check must be one of {IMAGE_CHECKS}, got {self.image_check!r}")
        if self.max_length is not None and self.token_length is None:
            raise ValueError("max_length needs a token_length callable")

    def check(self, record: Any, *, file: str | Path, line: int) -> list[RecordProblem]:
        """All problems of one record (empty list = good). Any exception raised while checking becomes a
        ``bad-record`` problem of this record, so one hostile record never aborts a whole file."""
        try:
            return self._check(record, file=str(file), line=line)
        except Exception as exc:  # noqa: BLE001 - a record must never crash the reader; named FILE:LINE instead
            return [RecordProblem(str(file), line, "bad-record", f"{type(exc).__name__}: {str(exc)[:200]}")]

    def _check(self, record: Any, *, file: str, line: int) -> list[RecordProblem]:

        def problem(reason: str, message: str) -> RecordProblem:
            return RecordProblem(file, line, reason, message)

        if not isinstance(record, dict):
            return [problem("not-an-object", f"expected a JSON object, got {type(record).__name__}")]
        if has_lone_surrogate(record):
            return [problem("bad-text", "a string holds a lone surrogate (\\ud800-\\udfff without its pair); "
                                        "such text cannot be encoded or tokenized")]
        problems = self._check_fields(record, problem)
        images_ok = not any(p.message.startswith("'image'") for p in problems)
        if self._check_turns(record, problem, problems):
            self._check_placeholders(record, problem, problems, images_ok)
            self._check_boxes(record, problem, problems)
        if images_ok:
            root = self.image_root if self.image_root is not None else Path(file).parent
            for rel in image_paths(record):
                found = self._check_image(rel, root)
                if found is not None:
                    problems.append(problem(*found))
        if not problems and self.max_length is not None and self.token_length is not None:
            try:
                n = int(self.token_length(record))
            except Exception as exc:  # noqa: BLE001 - report any encoder failure against the record
                problems.append(problem("encode-error", f"{type(exc).__name__}: {exc}"))
            else:
                if n > self.max_length:
                    problems.append(problem("too-long", f"{n} tokens > max_length {self.max_length}"))
        return problems

    @staticmethod
    def _check_fields(record: dict, problem: Callable[[str, str], RecordProblem]) -> list[RecordProblem]:
        problems = []
        image = record.get("image")
        if image is not None:
            if isinstance(image, str):
                if not image.strip():
                    problems.append(problem("bad-field", "'image' is an empty string"))
            elif isinstance(image, list):
                if not image:
                    problems.append(problem("bad-field", "'image' is an empty list (omit it for text-only records)"))
                bad = [i for i, p in enumerate(image) if not isinstance(p, str) or not p.strip()]
                if bad:
                    problems.append(problem("bad-field", f"'image' list items {bad} are not non-empty strings"))
            else:
                problems.append(problem("bad-field", f"'image' must be a string or a list, got {type(image).__name__}"))
        for key in ("width", "height"):
            if key in record:
                v = record[key]
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    problems.append(problem("bad-field", f"'{key}' must be a positive integer, got {v!r}"))
        return problems

    def _check_turns(self, record: dict, problem, problems: list[RecordProblem]) -> bool:
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns:
            what = "missing" if turns is None else f"not a non-empty list ({type(turns).__name__})"
            problems.append(problem("bad-turns", f"'conversations' is {what}"))
            return False
        ok = True
        for i, turn in enumerate(turns, start=1):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
                problems.append(problem("bad-turns", f"turn {i} must be an object with 'from' and a string 'value'"))
                ok = False
                continue
            expected = "human" if i % 2 == 1 else "gpt"
            if turn["from"] != expected:
                problems.append(problem("bad-turns", f"turn {i} is from {turn['from']!r}, expected {expected!r} "
                                                     "(turns alternate human/gpt, human first)"))
                ok = False
            if not turn["value"].strip():
                problems.append(problem("empty-turn", f"turn {i} ({turn['from']}) has an empty value"))
        if ok and self.require_answer and len(turns) % 2 == 1:
            problems.append(problem("bad-turns", f"the last turn ({len(turns)}) is from 'human': no answer"))
        return ok

    def _check_placeholders(self, record: dict, problem, problems: list[RecordProblem], images_ok: bool) -> None:
        turns = record["conversations"]
        in_answers = [i for i, t in enumerate(turns, start=1) if t["from"] == "gpt" and IMAGE_PLACEHOLDER in t["value"]]
        if in_answers:
            problems.append(problem("image-count-mismatch", f"'{IMAGE_PLACEHOLDER}' appears in answer turn(s) {in_answers}"))
        n_placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns if t["from"] == "human")
        if not images_ok:
            return
        n_images = len(image_paths(record))
        if n_placeholders != n_images and not (n_images == 1 and n_placeholders == 0):  # one image may be implicit
            problems.append(problem("image-count-mismatch",
                                    f"{n_placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) for {n_images} image(s)"))

    @staticmethod
    def _check_boxes(record: dict, problem, problems: list[RecordProblem]) -> None:
        for i, turn in enumerate(record["conversations"], start=1):
            text = _PLACEHOLDER_BOX_RE.sub("", turn["value"])
            try:
                parse_regions(text, strict=True)
            except (RegionError, ValueError) as exc:  # ValueError: e.g. a coordinate with thousands of digits
                problems.append(problem("bad-box", f"turn {i}: {exc}"))

    def _check_image(self, rel: str, root: str | Path) -> tuple[str, str] | None:
        try:
            path = resolve_image(rel, root)
        except ImagePathError as exc:
            return exc.reason, str(exc)
        if self.image_check != "none" and path not in self._image_cache:
            self._image_cache[path] = self._image_status(rel, path)
        return self._image_cache.get(path)

    def _image_status(self, rel: str, path: Path) -> tuple[str, str] | None:
        try:
            if not path.exists():
                return "missing-image", f"image {rel!r} not found at {path}"
            if path.is_dir():
                return "unreadable-image", f"image {rel!r} is a directory: {path}"
            if not os.access(path, os.R_OK):
                return "unreadable-image", f"image {rel!r} is not readable (permission denied): {path}"
            if self.image_check == "header":
                probe_image(path)
            elif self.image_check == "decode":
                load_image(path)
        except ImageLoadError as exc:
            return "corrupt-image", f"image {rel!r}: {exc.reason}"
        except OSError as exc:  # ENAMETOOLONG, ELOOP, EACCES on a parent ...: the record's path, not a crash
            return "unreadable-image", f"image {rel!r}: {exc.strerror or type(exc).__name__}"
        return None


@dataclass
class ProblemTally:
    """Records seen/kept and problems by reason, for lenient loading; ``summary()`` for the log."""

    seen: int = 0
    kept: int = 0
    by_reason: Counter = field(default_factory=Counter)
    examples: dict[str, RecordProblem] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return self.seen - self.kept

    def add(self, problems: Iterable[RecordProblem]) -> None:
        """Record one rejected record's problems (each reason counted once per problem)."""
        for p in problems:
            self.by_reason[p.reason] += 1
            self.examples.setdefault(p.reason, p)

    def summary(self) -> str:
        """``"kept 9 of 11 records; skipped 2: bad-box 1, missing-image 1"`` plus one example per reason."""
        head = f"kept {self.kept} of {self.seen} records"
        if not self.by_reason:
            return head + "; no problems"
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.by_reason.items()))
        lines = [f"{head}; skipped {self.skipped}: {counts}"]
        lines += [f"  e.g. {self.examples[r]}" for r in sorted(self.examples)]
        return "\n".join(lines)


def iter_records(path: str | Path, checker: RecordChecker | None = None, *, strict: bool = True,
                 tally: ProblemTally | None = None, on_problem: Callable[[RecordProblem], None] | None = None,
                 last_line: int | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line, record)`` for the good records of a jsonl file (up to ``last_line``; later lines are not read).

    Strict: raise :class:`BadRecordError` at the first bad line. Lenient: skip it, count its problems in
    ``tally`` (required, so skips are always reported) and pass each problem to ``on_problem`` if given.
    """
    if not strict and tally is None:
        raise ValueError("lenient mode needs a ProblemTally so that skipped records are reported")
    checker = checker or RecordChecker()
    for line, item in read_jsonl(path):
        if last_line is not None and line > last_line:
            return
        if tally is not None and line > 0:
            tally.seen += 1
        problems = [item] if isinstance(item, RecordProblem) else checker.check(item, file=path, line=line)
        if problems:
            if strict:
                raise BadRecordError(problems)
            tally.add(problems)  # type: ignore[union-attr]
            if on_problem is not None:
                for p in problems:
                    on_problem(p)
            continue
        if tally is not None:
            tally.kept += 1
        yield line, item  # type: ignore[misc]
