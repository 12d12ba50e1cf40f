"""The one box grammar of the toolkit: parse, format, validate and convert MedRegA region text.

Regions are text: ``<ref>name</ref><box>[[x1, y1, x2, y2], ...]</box>``, integers ``0..999`` (x by the width, y by the
height), objects joined by ``", "``. A ``<box>`` may stand alone or follow its ``<ref>`` after some words (it belongs to
the nearest earlier ``<ref>`` still without a box). The released model's answers lack the tags (*tag-stripped* form
``name[[..]]``, see :func:`remove_region_tags`): the name is the text since the previous delimiter (start, newline,
``, ; : .``, their full-width forms, or the previous box list), so that form is lossy. Box values are ASCII digits and
every parser is linear in the text length. :func:`scan_box_lists`, :func:`parse_original_references` and
:func:`remove_box_text_original` also read the original MedRegA scorers' grammar (``--compat medrega``).
Pixel conversion round-trips: ``pixels_to_box(box_to_pixels(b)) == b`` for every box and image size. Details:
docs/foundations.md.
"""
from __future__ import annotations

import ast
import bisect
import math
import numbers
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from internvl.constants import BOX_END, BOX_SCALE, BOX_START, REF_END, REF_START

__all__ = ["Box", "Region", "RegionError", "validate_box", "parse_box_list", "parse_regions", "format_boxes",
           "format_region", "format_regions", "pixels_to_box", "box_to_pixels", "strip_regions", "has_regions",
           "map_boxes", "box_iou", "BoxListSpan", "GRAMMARS", "scan_box_lists", "remove_region_tags",
           "parse_original_references", "remove_box_text_original"]


class RegionError(ValueError):
    """Malformed region text or an invalid box (wrong arity, non-integer, outside 0..999, x1 > x2 or y1 > y2)."""


@dataclass(frozen=True)
class Box:
    """One box ``[x1, y1, x2, y2]`` in MedRegA's 0..999 grid; construction validates (raises :class:`RegionError`)."""

    x1: int
    y1: int
    x2: int
    y2: int

    def __post_init__(self) -> None:
        _check_values((self.x1, self.y1, self.x2, self.y2))

    def as_list(self) -> list[int]:
        """The box as ``[x1, y1, x2, y2]``."""
        return [self.x1, self.y1, self.x2, self.y2]

    def __iter__(self):
        return iter((self.x1, self.y1, self.x2, self.y2))

    def __str__(self) -> str:
        return f"[{self.x1}, {self.y1}, {self.x2}, {self.y2}]"


@dataclass(frozen=True)
class Region:
    """A named object with zero or more boxes; ``name`` is None for a bare ``<box>`` and ``boxes`` is empty for a
    ``<ref>`` that has no box (e.g. the object named in a Text-to-Region question)."""

    name: str | None
    boxes: list[Box] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """``{"name", "boxes": [[x1, y1, x2, y2], ...]}``, JSON-ready (prediction files, CoT records)."""
        return {"name": self.name, "boxes": [b.as_list() for b in self.boxes]}


def _check_values(values: Sequence[object]) -> None:
    if type(values) in (tuple, list) and len(values) == 4 and all(type(v) is int for v in values):
        x1, y1, x2, y2 = values  # fast path (parsing long texts); the general checks below give the messages
        if 0 <= x1 <= x2 <= BOX_SCALE and 0 <= y1 <= y2 <= BOX_SCALE:
            return
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RegionError(f"a box must be a sequence of 4 integers, got {values!r}")
    if len(values) != 4:
        raise RegionError(f"a box needs exactly 4 values [x1, y1, x2, y2], got {len(values)}: {list(values)!r}")
    for name, v in zip(("x1", "y1", "x2", "y2"), values):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise RegionError(f"box value {name}={v!r} is not an integer (boxes are integers 0..{BOX_SCALE})")
        if not 0 <= int(v) <= BOX_SCALE:
            raise RegionError(f"box value {name}={v} is outside 0..{BOX_SCALE}")
    x1, y1, x2, y2 = (int(v) for v in values)
    if x1 > x2:
        raise RegionError(f"box {list(values)!r} has x1={x1} > x2={x2}")
    if y1 > y2:
        raise RegionError(f"box {list(values)!r} has y1={y1} > y2={y2}")


def validate_box(values: Sequence[object]) -> Box:
    """Check four values and return a :class:`Box`; raise :class:`RegionError` naming the first problem."""
    _check_values(values)
    return Box(*(int(v) for v in values))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------- parsing
# Linear patterns only: no unbounded leading class retried at each start, and "up to the closing tag" is a bisect over
# tag positions (a lazy `.*?` is quadratic on a long line of "<ref>"). ASCII digits: `\d` accepts full-width ones.
_NUMBER_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_DIGITS_RE = re.compile(r"[0-9]+")
_CANONICAL_BOX = r"\[[0-9]{1,3}, ?[0-9]{1,3}, ?[0-9]{1,3}, ?[0-9]{1,3}\]"
_CANONICAL_LIST_RE = re.compile(r"\[" + _CANONICAL_BOX + r"(?:, ?" + _CANONICAL_BOX + r")*\]")
_MAX_DIGITS = 9  # a box value is 0..999; longer digit strings are rejected before int() (no 4300-digit int parsing)
# One box list "[[...], [...]]": tolerant about spacing and arity so that bad boxes give a clear error, not a non-match.
_BOX_LIST_RE = re.compile(r"\[\s*\[[^\[\]]*\](?:\s*,\s*\[[^\[\]]*\])*\s*\]")
_INNER_BOX_RE = re.compile(r"\[([^\[\]]*)\]")
_ANY_TAG_RE = re.compile(re.escape(REF_START) + "|" + re.escape(BOX_START))
# Delimiters ending the name in the tag-stripped form (searched backwards from "[[").
_NAME_DELIMS = "\n,;:.，；：。、"
# The original scorers' grammar (src/eval/regt2r/evaluator_reg.py): its Unicode `\d`/`\s` are kept on purpose, since
# the original's `ast.literal_eval` then fails on full-width digits or leading zeros, which compat must reproduce.
_ORIGINAL_BOX = r"\[\d+,\s*\d+,\s*\d+,\s*\d+\]"
_ORIGINAL_BOX_LIST_RE = re.compile(r"\[" + _ORIGINAL_BOX + r"(?:,\s*" + _ORIGINAL_BOX + r")*\]")
GRAMMARS = ("tolerant", "original")


def parse_box_list(text: str) -> list[Box]:
    """Parse ``"[[x1, y1, x2, y2], ...]"`` (the inside of ``<box>..</box>``) into validated boxes, or raise
    :class:`RegionError` naming the problem (arity, range, corner order, not a number)."""
    stripped = text.strip()
    if _CANONICAL_LIST_RE.fullmatch(stripped):  # fast path: "[[1, 2, 3, 4], ...]" as the model writes it
        nums = [int(v) for v in _DIGITS_RE.findall(stripped)]
        return [Box(*nums[k:k + 4]) for k in range(0, len(nums), 4)]
    if not _BOX_LIST_RE.fullmatch(stripped):
        raise RegionError(f"not a box list '[[x1, y1, x2, y2], ...]': {_short(text)!r}")
    boxes = []
    for inner in _INNER_BOX_RE.findall(stripped):
        parts = [p.strip() for p in inner.split(",")] if inner.strip() else []
        values: list[object] = []
        for p in parts:
            if not _NUMBER_RE.fullmatch(p):
                raise RegionError(f"box value {_short(p)!r} in [{_short(inner)}] is not a number (ASCII digits)")
            if len(p.lstrip("-").split(".")[0]) > _MAX_DIGITS:
                raise RegionError(f"box value {_short(p)!r} is outside 0..{BOX_SCALE}")
            values.append(float(p) if "." in p else int(p))
        boxes.append(validate_box(values))
    return boxes


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


def _positions(text: str, tag: str) -> list[int]:
    return [m.start() for m in re.finditer(re.escape(tag), text)]


def _next_at_or_after(positions: list[int], pos: int) -> int | None:
    k = bisect.bisect_left(positions, pos)
    return positions[k] if k < len(positions) else None


def _problem(message: str, strict: bool, errors: list[str] | None) -> None:
    """A malformed piece of region text: raised when ``strict``, else recorded in ``errors`` (when given)."""
    if strict:
        raise RegionError(message) from None
    if errors is not None:
        errors.append(message)


def _parse_tagged(text: str, strict: bool, errors: list[str] | None) -> list[Region]:
    """Each ``<ref>``/``<box>`` reads up to its next closing tag (as a lazy ``.*?``, in linear-log time)."""
    closing = {REF_START: (REF_END, _positions(text, REF_END)), BOX_START: (BOX_END, _positions(text, BOX_END))}
    regions: list[Region] = []
    open_ref: int | None = None  # index in `regions` of the last <ref> still waiting for its box
    pos = 0
    for m in _ANY_TAG_RE.finditer(text):
        end_tag, ends = closing[m.group(0)]
        close = _next_at_or_after(ends, m.end())
        if m.start() < pos or close is None:
            continue
        content, pos = text[m.end():close], close + len(end_tag)
        if m.group(0) == REF_START:
            regions.append(Region(content.strip(), []))
            open_ref = len(regions) - 1
            continue
        try:
            boxes = parse_box_list(content)
        except RegionError as exc:
            _problem(f"at character {m.start()}: {exc}", strict, errors)
            open_ref = None
            continue
        if open_ref is not None:
            regions[open_ref] = Region(regions[open_ref].name, boxes)
            open_ref = None
        else:
            regions.append(Region(None, boxes))
    for tag, closing in ((REF_START, REF_END), (BOX_START, BOX_END)):  # an unmatched tag is malformed, not ignored
        if text.count(tag) != text.count(closing):
            _problem(f"unbalanced {tag}{closing}: {text.count(tag)} opening vs {text.count(closing)} closing tags",
                     strict, errors)
    return regions


@dataclass(frozen=True)
class BoxListSpan:
    """One box list of :func:`scan_box_lists`: the name its grammar assigns, its span, the boxes as written (integer
    4-tuples; the original grammar checks no range), or None with ``error`` when the list cannot be read."""

    name: str
    start: int
    end: int
    values: tuple[tuple[int, ...], ...] | None
    error: str | None = None


def _last_of(text: str, chars: str, lo: int, hi: int) -> int:
    """Index of the last character of ``chars`` in ``text[lo:hi]``, or ``lo - 1``."""
    return max(lo - 1, *(text.rfind(c, lo, hi) for c in chars))


_PLAIN_ORIGINAL_RE = re.compile(r"[\[\], 0-9]*")
_LEADING_ZERO_RE = re.compile(r"(?<![0-9])0[0-9]")


def _read_original(match: str) -> tuple[tuple[tuple[int, ...], ...] | None, str | None]:
    limit = sys.get_int_max_str_digits()
    if (_PLAIN_ORIGINAL_RE.fullmatch(match) and not _LEADING_ZERO_RE.search(match)
            and (limit == 0 or max(len(v) for v in _DIGITS_RE.findall(match)) <= limit)):
        # fast path, same result as literal_eval: ASCII digits, spaces, no leading zero, no number over the limit
        nums = [int(v) for v in _DIGITS_RE.findall(match)]
        return tuple(tuple(nums[k:k + 4]) for k in range(0, len(nums), 4)), None
    try:  # the original's reader; the pattern admits only a two-level list of numbers
        value = ast.literal_eval(match)
    except (SyntaxError, ValueError, MemoryError) as exc:
        return None, f"the original's literal_eval fails on {_short(match)!r}: {type(exc).__name__}: {exc}"
    return tuple(tuple(int(v) for v in box) for box in value), None


def scan_box_lists(text: str, grammar: str = "tolerant") -> list[BoxListSpan]:
    """Every box list of tag-stripped ``name[[..]]`` text, in order. ``"tolerant"`` (the toolkit's): any spacing, the
    name stripped, boxes validated. ``"original"`` (``--compat medrega``): the original scorers' pattern; the name is
    the raw text since the previous ``[``/``]`` (``", kidney"`` in ``a[[..]], kidney[[..]]``); no range check."""
    if grammar not in GRAMMARS:
        raise ValueError(f"unknown box grammar {grammar!r}; choose one of {', '.join(GRAMMARS)}")
    return [BoxListSpan(name, start, end, None if parsed is None else tuple(tuple(b) for b in parsed), error)
            for name, start, end, parsed, error in _scan(text, grammar)]


def _scan(text: str, grammar: str):
    """(name, start, end, boxes or None, error) per box list: the one scanner behind both grammars (the tolerant
    parser takes its :class:`Box` lists as they are)."""
    prev_end = 0
    original = grammar == "original"
    for m in (_ORIGINAL_BOX_LIST_RE if original else _BOX_LIST_RE).finditer(text):
        if original:
            name = text[_last_of(text, "[]", prev_end, m.start()) + 1:m.start()]
            parsed, error = _read_original(m.group(0))
        else:
            name = text[_last_of(text, _NAME_DELIMS, prev_end, m.start()) + 1:m.start()].strip()
            try:
                parsed, error = parse_box_list(m.group(0)), None
            except RegionError as exc:
                parsed, error = None, f"at character {m.start()}: {exc}"
        yield name, m.start(), m.end(), parsed, error
        prev_end = m.end()


def _parse_stripped(text: str, strict: bool, errors: list[str] | None) -> list[Region]:
    regions: list[Region] = []
    for name, _, _, boxes, error in _scan(text, "tolerant"):
        if boxes is None:
            _problem(error or "", strict, errors)
        else:
            regions.append(Region(name or None, boxes))
    return regions


def remove_region_tags(text: str) -> str:
    """Delete the four region tags: ``<ref>a</ref><box>[[..]]</box>`` -> ``a[[..]]``, the released model's answer form
    (``skip_special_tokens=True``) that ``--compat medrega`` scores."""
    return _TAG_STRIP_RE.sub("", text)


_TAG_STRIP_RE = re.compile("|".join(re.escape(t) for t in (REF_START, REF_END, BOX_START, BOX_END)))


def remove_box_text_original(text: str) -> str:
    """``re.sub(r"\\[\\[.*?\\]\\]", "", text)`` (the original Region-to-Text scorer's box removal: from each ``[[``
    to the first ``]]`` on the same line), in linear-log time instead of that pattern's quadratic worst case."""
    closes, newlines = _positions(text, "]]"), _positions(text, "\n")
    pieces, last, pos = [], 0, 0
    while True:
        p = text.find("[[", pos)
        if p < 0:
            break
        c = _next_at_or_after(closes, p + 2)
        nl = _next_at_or_after(newlines, p)
        if c is None or (nl is not None and nl < c):
            pos = p + 1  # the pattern fails here; it is tried again one character later
            continue
        pieces.append(text[last:p])
        last = pos = c + 2
    return "".join(pieces) + text[last:]


def parse_original_references(text: str) -> list[tuple[str, str]]:
    """``(name, raw box text)`` per match of the original scorers' ``<ref>(.*?)</ref><box>(.*?)</box>`` (not crossing a
    newline; bare ``<box>`` ignored), in linear-log time."""
    out: list[tuple[str, str]] = []
    joint = REF_END + BOX_START
    joints, box_ends = _positions(text, joint), _positions(text, BOX_END)
    newlines = _positions(text, "\n")
    pos = 0
    for m in re.finditer(re.escape(REF_START), text):
        if m.start() < pos:
            continue
        line_end = _next_at_or_after(newlines, m.end())
        line_end = len(text) if line_end is None else line_end
        j = _next_at_or_after(joints, m.end())
        if j is None or j > line_end:
            continue
        e = _next_at_or_after(box_ends, j + len(joint))
        if e is None or e > line_end:
            continue
        out.append((text[m.end():j], text[j + len(joint):e]))
        pos = e + len(BOX_END)
    return out


def has_regions(text: str) -> bool:
    """True when ``text`` contains a region tag or a ``[[..]]`` box list."""
    return REF_START in text or BOX_START in text or _BOX_LIST_RE.search(text) is not None


def parse_regions(text: str, *, strict: bool = True, errors: list[str] | None = None) -> list[Region]:
    """All regions of ``text`` in order, tagged form when any tag is present, else tag-stripped ``name[[..]]``.

    ``strict`` raises :class:`RegionError` on a malformed box or unbalanced tag; ``strict=False`` (scoring model
    output) leaves malformed box lists out and appends one message per problem to ``errors`` when given.
    """
    if REF_START in text or BOX_START in text or REF_END in text or BOX_END in text:
        return _parse_tagged(text, strict, errors)
    return _parse_stripped(text, strict, errors)


_NUMERIC_BOX_LIST_RE = re.compile(r"\[\s*\[\s*-?[0-9]+(?:\s*,\s*-?[0-9]+)*\s*\](?:\s*,\s*\[\s*-?[0-9]+(?:\s*,\s*-?[0-9]+)*\s*\])*\s*\]")


def map_boxes(text: str, fn: Callable[[Box], Box]) -> str:
    """Apply ``fn`` to each box of every numeric box list in ``text``, nothing else changed (prompt notation
    ``[[x1, y1, x2, y2]]`` is kept); :class:`RegionError` for a malformed numeric box."""

    def repl(m: re.Match[str]) -> str:
        return format_boxes([fn(b) for b in parse_box_list(m.group(0))])

    return _NUMERIC_BOX_LIST_RE.sub(repl, text)


# -------------------------------------------------------------------------------------------------------- formatting
def format_boxes(boxes: Iterable[Box | Sequence[int]]) -> str:
    """``"[[x1, y1, x2, y2], [..]]"`` exactly as MedRegA writes it (", " separators); validates every box."""
    items = [b if isinstance(b, Box) else validate_box(b) for b in boxes]
    if not items:
        raise RegionError("cannot format an empty box list")
    return "[" + ", ".join(str(b) for b in items) + "]"


def format_region(name: str | None, boxes: Iterable[Box | Sequence[int]]) -> str:
    """``<ref>name</ref><box>[[..]]</box>``; without a name just ``<box>[[..]]</box>``; without boxes ``<ref>name</ref>``."""
    box_list = list(boxes)
    if name is not None and (REF_START in name or REF_END in name or BOX_START in name or "[[" in name):
        raise RegionError(f"region name {name!r} contains region markup")
    ref = f"{REF_START}{name}{REF_END}" if name is not None else ""
    if not box_list:
        if name is None:
            raise RegionError("a region needs a name or at least one box")
        return ref
    return f"{ref}{BOX_START}{format_boxes(box_list)}{BOX_END}"


def format_regions(regions: Iterable[Region]) -> str:
    """Several regions joined by ``", "`` (the multi-object answer form)."""
    return ", ".join(format_region(r.name, r.boxes) for r in regions)


# -------------------------------------------------------------------------------------------------------- conversion
def pixels_to_box(xyxy: Sequence[float], width: float, height: float) -> Box:
    """Pixel corners of a ``width`` x ``height`` image -> :class:`Box`: ``round_half_up(p / size * 999)``, clamped
    (crops and rounding overshoot by a pixel). :class:`RegionError` for a bad size, arity, value or corner order."""
    if not (width > 0 and height > 0):
        raise RegionError(f"image size must be positive, got width={width}, height={height}")
    if len(xyxy) != 4:
        raise RegionError(f"pixel box needs 4 values, got {len(xyxy)}: {list(xyxy)!r}")
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise RegionError(f"pixel box {list(xyxy)!r} has a non-finite value")
    if x1 > x2 or y1 > y2:
        raise RegionError(f"pixel box {list(xyxy)!r} has x1 > x2 or y1 > y2")

    def conv(p: float, size: float) -> int:  # round half up: monotone, platform independent
        return min(BOX_SCALE, max(0, math.floor(p / size * BOX_SCALE + 0.5)))

    return Box(conv(x1, width), conv(y1, height), conv(x2, width), conv(y2, height))


def box_to_pixels(box: Box | Sequence[int], width: float, height: float) -> tuple[float, float, float, float]:
    """:class:`Box` -> pixel corners ``(v / 999 * W, v / 999 * H, ...)`` as floats, as the original evaluators do."""
    if not (width > 0 and height > 0):
        raise RegionError(f"image size must be positive, got width={width}, height={height}")
    b = box if isinstance(box, Box) else validate_box(box)
    return (b.x1 / BOX_SCALE * width, b.y1 / BOX_SCALE * height, b.x2 / BOX_SCALE * width, b.y2 / BOX_SCALE * height)


# --------------------------------------------------------------------------------------------------------- stripping
# A box content may not contain another <box> (an unclosed "<box>" stops there: linear, not quadratic).
_ONE_TAGGED = (
    r"(?:" + re.escape(REF_START) + r"[^<]*" + re.escape(REF_END) + r"[ \t]*)?"
    + re.escape(BOX_START) + r"(?:(?!" + re.escape(BOX_START) + "|" + re.escape(BOX_END) + r").)*" + re.escape(BOX_END)
)
_NAME_CHARS = "\n,;:.，；：。、[]<>"  # characters a tag-stripped name (in a region chain) cannot contain
_ONE_STRIPPED = r"[^\n,;:.，；：。、\[\]<>]*" + _BOX_LIST_RE.pattern
_SEP = r"[ \t]*[,，][ \t]*"
# Regions joined by ", " plus the ":" before the text; only matched at `_chain_matches`' starts (linear).
_REGION_CHAIN_RE = re.compile(
    rf"(?:{_ONE_TAGGED}|{_ONE_STRIPPED})(?:{_SEP}(?:{_ONE_TAGGED}|{_ONE_STRIPPED}))*[ \t]*[:：]?[ \t]*", re.DOTALL
)


def _chain_matches(text: str) -> list[re.Match[str]]:
    """``_REGION_CHAIN_RE.finditer(text)`` in linear time: only a tag or a box list's name start is tried."""
    tags = [m.start() for m in _ANY_TAG_RE.finditer(text)]
    lists = [m.start() for m in _BOX_LIST_RE.finditer(text)]
    out: list[re.Match[str]] = []
    pos = ti = li = 0
    while True:
        while ti < len(tags) and tags[ti] < pos:  # the next candidates at or after the end of the last match
            ti += 1
        while li < len(lists) and lists[li] < pos:
            li += 1
        cands = [(tags[ti], "tag")] if ti < len(tags) else []
        if li < len(lists):
            cands.append((_last_of(text, _NAME_CHARS, pos, lists[li]) + 1, "list"))
        if not cands:
            return out
        start, kind = min(cands)
        m = _REGION_CHAIN_RE.match(text, start)
        if m is not None and m.end() > start:
            out.append(m)
            pos = m.end()
        elif kind == "tag":
            ti += 1
        else:
            li += 1


def box_iou(a: Sequence, b: Sequence) -> np.ndarray:
    """Pairwise IoU of [N,4] and [M,4] xyxy boxes -> [N,M] (torchvision.ops.box_iou's formula; empty union -> 0)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    sides = np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2])
    inter = np.clip(sides, 0, None).prod(axis=-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def strip_regions(text: str) -> str:
    """Remove every region (tagged, bare ``<box>`` or tag-stripped) with the ``", "`` / ``": "`` joining them, for text
    metrics on grounded reports: ``"<ref>a</ref><box>[[..]]</box>, <ref>b</ref><box>[[..]]</box>: No effusion."`` ->
    ``"No effusion."``. A ``<ref>`` without a box keeps its name; lines stay lines."""

    def join(m: re.Match[str]) -> str:
        # keep one space only where the removal would glue two words together
        before = text[m.start() - 1] if m.start() > 0 else " "
        after = text[m.end()] if m.end() < len(text) else " "
        return " " if not before.isspace() and not after.isspace() else ""

    pieces, last = [], 0
    for m in _chain_matches(text):
        pieces += [text[last:m.start()], join(m)]
        last = m.end()
    out = "".join(pieces) + text[last:]
    out = out.replace(REF_START, "").replace(REF_END, "")
    lines = [line.strip() for line in out.split("\n")]
    return "\n".join(line for line in lines if line)
