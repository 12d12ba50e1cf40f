"""The one box grammar of the toolkit: parse, format, validate and convert MedRegA region text.

MedRegA writes regions as text inside ordinary sentences::

    <ref>carotid vessel wall</ref><box>[[365, 293, 416, 598], [596, 316, 635, 464]]</box>

* A box is ``[x1, y1, x2, y2]``: top-left then bottom-right corner, four integers in ``0..999`` where x is normalised by
  the image width and y by the image height (``BOX_SCALE = 999``).
* Several objects are joined by ``", "``: ``<ref>a</ref><box>[[..]]</box>, <ref>b</ref><box>[[..]]</box>``.
* A ``<box>`` may stand without a ``<ref>`` (Region-to-Text questions: ``What is <box>[[..]]</box>?``), and a ``<ref>``
  may be separated from its ``<box>`` by words (``<ref>brain tumor</ref> is located in <box>[[..]]</box>``): a box
  belongs to the nearest ``<ref>`` before it that has no box yet and no other ``<ref>`` after it.
* The released model's answers were decoded with ``skip_special_tokens=True``, which removes the four tags, so they
  look like ``carotid vessel wall[[365, 293, 416, 598], [596, 316, 635, 464]]`` (:func:`remove_region_tags` gives this
  form; the toolkit's own answers keep the tags, see ``internvl.tokenization.decode_answer``). In this *tag-stripped*
  form the name is the text between the previous delimiter (start, newline, ``,`` ``;`` ``:`` ``.`` or their full-width
  forms, or the end of a previous box list) and ``[[``. That form is lossy: ``What is this[[..]]`` gives the name
  ``What is this``.
* Box values are ASCII digits. Every parser here is linear in the text length.
* :func:`scan_box_lists` has a second grammar, ``"original"``: the original MedRegA scorers' stricter box pattern and
  their name rule, for ``medrega-eval score --compat medrega`` (with :func:`parse_original_references` and
  :func:`remove_box_text_original`). It is a mode of this module, not a second parser.

Coordinate conversion (documented choice, matches the original evaluators in the backward direction):

* backward ``box_to_pixels``: ``v / 999 * W`` for x and ``v / 999 * H`` for y (floats, no rounding);
* forward ``pixels_to_box``: ``round_half_up(p / W * 999)`` clamped to ``0..999``. Half-up (not Python's banker's
  rounding) keeps the mapping monotone and platform independent; with it ``pixels_to_box(box_to_pixels(b)) == b`` for
  every valid box and any image size >= 1, and a pixel coordinate moves by at most ``W / 999 / 2`` on the round trip.
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
        if type(v) is int and 0 <= v <= BOX_SCALE:  # fast path (parsing long texts)
            continue
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
# Every pattern below is linear in the text length: no leading unbounded class is retried at each start position, and
# every "up to the closing tag" search is a bisect over precomputed tag positions (a lazy `.*?` is quadratic on a long
# line of "<ref>"). Box values are ASCII digits only ("[[５,10,100,200]]" is not a box: `\d` accepts full-width ones).
_NUMBER = r"-?[0-9]+(?:\.[0-9]+)?"
_NUMBER_RE = re.compile(_NUMBER)
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
# The original MedRegA scorers' prediction grammar (src/eval/regt2r/evaluator_reg.py, written from its documented
# rule): "[[" directly followed by digits, "," directly after each number, optional whitespace after each ",", no
# whitespace before "]". Its `\d`/`\s` are Python's Unicode classes on purpose: the original then reads the match with
# `ast.literal_eval`, which rejects full-width digits, leading zeros and non-ASCII spaces, and that failure is part of
# what compat must reproduce (see BoxListSpan.error).
_ORIGINAL_BOX = r"\[\d+,\s*\d+,\s*\d+,\s*\d+\]"
_ORIGINAL_BOX_LIST_RE = re.compile(r"\[" + _ORIGINAL_BOX + r"(?:,\s*" + _ORIGINAL_BOX + r")*\]")
GRAMMARS = ("tolerant", "original")


def parse_box_list(text: str) -> list[Box]:
    """Parse ``"[[x1, y1, x2, y2], ...]"`` (the inside of ``<box>..</box>``) into validated boxes.

    Raises :class:`RegionError` for anything else, e.g. ``"[[1, 2, 3]]"`` (arity) or ``"[[5, 0, 1, 9]]"`` (x1 > x2).
    """
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
        boxes.append(Box(*values) if len(values) == 4 else validate_box(values))  # type: ignore[arg-type]
    return boxes


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


def _positions(text: str, tag: str) -> list[int]:
    return [m.start() for m in re.finditer(re.escape(tag), text)]


def _next_at_or_after(positions: list[int], pos: int) -> int | None:
    k = bisect.bisect_left(positions, pos)
    return positions[k] if k < len(positions) else None


def _iter_tags(text: str):
    """(kind, content, start) for each ``<ref>content</ref>`` / ``<box>content</box>`` in order, leftmost first, the
    content ending at the first closing tag after the opening one (as a lazy ``.*?``), in linear-log time."""
    closing = {REF_START: _positions(text, REF_END), BOX_START: _positions(text, BOX_END)}
    pos = 0
    for m in _ANY_TAG_RE.finditer(text):
        if m.start() < pos:
            continue
        tag = m.group(0)
        end_tag = REF_END if tag == REF_START else BOX_END
        close = _next_at_or_after(closing[tag], m.end())
        if close is None:
            continue
        yield ("ref" if tag == REF_START else "box"), text[m.end():close], m.start()
        pos = close + len(end_tag)


def _parse_tagged(text: str, strict: bool, errors: list[str] | None) -> list[Region]:
    regions: list[Region] = []
    open_ref: int | None = None  # index in `regions` of the last <ref> still waiting for its box
    for kind, content, start in _iter_tags(text):
        if kind == "ref":
            regions.append(Region(content.strip(), []))
            open_ref = len(regions) - 1
            continue
        try:
            boxes = parse_box_list(content)
        except RegionError as exc:
            if strict:
                raise RegionError(f"at character {start}: {exc}") from None
            if errors is not None:
                errors.append(f"at character {start}: {exc}")
            open_ref = None
            continue
        if open_ref is not None:
            regions[open_ref] = Region(regions[open_ref].name, boxes)
            open_ref = None
        else:
            regions.append(Region(None, boxes))
    # An unmatched tag is malformed text; say so rather than silently ignoring it.
    for tag, closing in ((REF_START, REF_END), (BOX_START, BOX_END)):
        if text.count(tag) != text.count(closing):
            msg = f"unbalanced {tag}{closing}: {text.count(tag)} opening vs {text.count(closing)} closing tags"
            if strict:
                raise RegionError(msg)
            if errors is not None:
                errors.append(msg)
    return regions


@dataclass(frozen=True)
class BoxListSpan:
    """One box list found in tag-stripped text by :func:`scan_box_lists`.

    ``name`` is the raw text the grammar assigns to the list (not stripped); ``values`` the boxes as integer 4-tuples
    exactly as written (the original grammar does not check 0..999 or corner order), or None with ``error`` when the
    list cannot be read (tolerant: not a valid box; original: the original's ``ast.literal_eval`` would raise).
    """

    name: str
    start: int
    end: int
    values: tuple[tuple[int, ...], ...] | None
    error: str | None = None


def _last_of(text: str, chars: str, lo: int, hi: int) -> int:
    """Index of the last character of ``chars`` in ``text[lo:hi]``, or ``lo - 1``; C-speed rfind, linear."""
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
    # ast.literal_eval is the reader the original applies; the pattern guarantees a two-level list of numbers, so
    # nothing but numbers can be evaluated (no deep nesting, no names).
    try:
        value = ast.literal_eval(match)
    except (SyntaxError, ValueError, MemoryError) as exc:
        return None, f"the original's literal_eval fails on {_short(match)!r}: {type(exc).__name__}: {exc}"
    return tuple(tuple(int(v) for v in box) for box in value), None


def scan_box_lists(text: str, grammar: str = "tolerant") -> list[BoxListSpan]:
    """Every box list of tag-stripped ``name[[..]]`` text, in order, under ``grammar``:

    * ``"tolerant"`` (the toolkit's): any spacing inside the list; the name is the text after the previous delimiter
      (start, newline, ``, ; : .`` or their full-width forms, or the previous list) stripped of spaces; each box is
      validated (0..999, ASCII digits, x1 <= x2, y1 <= y2) and a bad list gets ``error``.
    * ``"original"`` (``--compat medrega``): the original scorers' grammar (see ``_ORIGINAL_BOX_LIST_RE``); the name is
      the whole text between the previous ``[`` / ``]`` (or the previous list, or the start) and ``[[``, unstripped
      (e.g. ``", kidney"`` for the second object of ``a[[..]], kidney[[..]]``); values are not range-checked.

    Linear in ``len(text)``.
    """
    if grammar not in GRAMMARS:
        raise ValueError(f"unknown box grammar {grammar!r}; choose one of {', '.join(GRAMMARS)}")
    spans = []
    for name, start, end, parsed, error in _scan(text, grammar):
        values = None if parsed is None else tuple(tuple(b) for b in parsed)
        spans.append(BoxListSpan(name, start, end, values, error))
    return spans


def _scan(text: str, grammar: str):
    """(name, start, end, boxes or None, error) per box list: the one scanner behind both grammars."""
    prev_end = 0
    original = grammar == "original"
    pattern = _ORIGINAL_BOX_LIST_RE if original else _BOX_LIST_RE
    for m in pattern.finditer(text):
        if original:
            cut = max(text.rfind("[", prev_end, m.start()), text.rfind("]", prev_end, m.start()), prev_end - 1)
            name = text[cut + 1:m.start()]
            parsed, error = _read_original(m.group(0))
        else:
            cut = _last_of(text, _NAME_DELIMS, prev_end, m.start())
            name = text[cut + 1:m.start()].strip()
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
            if strict:
                raise RegionError(error)
            if errors is not None:
                errors.append(error or "")
            continue
        regions.append(Region(name or None, boxes))
    return regions


def remove_region_tags(text: str) -> str:
    """Delete the four region tags and nothing else: ``<ref>a</ref><box>[[..]]</box>`` -> ``a[[..]]``.

    This is what decoding with ``skip_special_tokens=True`` gave the original MedRegA scorers (the released model's
    answers); ``--compat medrega`` applies it to predictions before the original's rules.
    """
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
    """``(name, box text)`` of every ``<ref>name</ref><box>boxes</box>`` as the original scorers find references
    (a non-greedy ``<ref>(.*?)</ref><box>(.*?)</box>`` that does not cross a newline: a ``<ref>`` whose ``</ref>`` is
    not directly followed by ``<box>`` extends to the next ``</ref><box>``; bare ``<box>`` tags are ignored).
    Linear-log time; the box text is returned raw (the original reads it with ``ast.literal_eval``)."""
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
    """All regions of ``text`` in order of appearance.

    Text with any ``<ref>``/``<box>`` tag is parsed in the tagged form, otherwise in the tag-stripped ``name[[..]]``
    form (see the module docstring). ``strict=True`` raises :class:`RegionError` on the first malformed box or
    unbalanced tag; ``strict=False`` (for scoring model output) leaves malformed box lists out and appends one message
    per problem to ``errors`` when given, so the caller can count them.
    """
    if REF_START in text or BOX_START in text or REF_END in text or BOX_END in text:
        return _parse_tagged(text, strict, errors)
    return _parse_stripped(text, strict, errors)


_NUMERIC_BOX_LIST_RE = re.compile(r"\[\s*\[\s*-?[0-9]+(?:\s*,\s*-?[0-9]+)*\s*\](?:\s*,\s*\[\s*-?[0-9]+(?:\s*,\s*-?[0-9]+)*\s*\])*\s*\]")


def map_boxes(text: str, fn: Callable[[Box], Box]) -> str:
    """Rewrite every numeric box list ``[[..], ..]`` in ``text`` (tagged or tag-stripped) with ``fn`` applied to each
    box, leaving all other characters untouched. Notation such as ``[[x1, y1, x2, y2]]`` in task prompts is not a box
    and is kept. Raises :class:`RegionError` for a malformed numeric box (e.g. three values)."""

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
def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def pixels_to_box(xyxy: Sequence[float], width: float, height: float) -> Box:
    """Pixel corners ``(x1, y1, x2, y2)`` of a ``width`` x ``height`` image -> :class:`Box` on the 0..999 grid.

    ``v = round_half_up(p / size * 999)`` clamped to 0..999 (coordinates outside the image are clamped, not rejected,
    because crops and rounding legitimately overshoot by a pixel). Raises :class:`RegionError` for a non-positive image
    size, non-finite values, wrong arity or inverted corners.
    """
    if not (width > 0 and height > 0):
        raise RegionError(f"image size must be positive, got width={width}, height={height}")
    if len(xyxy) != 4:
        raise RegionError(f"pixel box needs 4 values, got {len(xyxy)}: {list(xyxy)!r}")
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise RegionError(f"pixel box {list(xyxy)!r} has a non-finite value")
    if x1 > x2 or y1 > y2:
        raise RegionError(f"pixel box {list(xyxy)!r} has x1 > x2 or y1 > y2")

    def conv(p: float, size: float) -> int:
        return min(BOX_SCALE, max(0, _round_half_up(p / size * BOX_SCALE)))

    return Box(conv(x1, width), conv(y1, height), conv(x2, width), conv(y2, height))


def box_to_pixels(box: Box | Sequence[int], width: float, height: float) -> tuple[float, float, float, float]:
    """:class:`Box` -> pixel corners ``(v / 999 * W, v / 999 * H, ...)`` as floats, as the original evaluators do."""
    if not (width > 0 and height > 0):
        raise RegionError(f"image size must be positive, got width={width}, height={height}")
    b = box if isinstance(box, Box) else validate_box(box)
    return (b.x1 / BOX_SCALE * width, b.y1 / BOX_SCALE * height, b.x2 / BOX_SCALE * width, b.y2 / BOX_SCALE * height)


# --------------------------------------------------------------------------------------------------------- stripping
# A box content may not contain another <box> tag: an unclosed "<box>" then fails at the next "<box>" instead of
# scanning to the end of the text (which would make the pattern quadratic).
_ONE_TAGGED = (
    r"(?:" + re.escape(REF_START) + r"[^<]*" + re.escape(REF_END) + r"[ \t]*)?"
    + re.escape(BOX_START) + r"(?:(?!" + re.escape(BOX_START) + "|" + re.escape(BOX_END) + r").)*" + re.escape(BOX_END)
)
_NAME_CHARS = "\n,;:.，；：。、[]<>"  # characters a tag-stripped name (in a region chain) cannot contain
_ONE_STRIPPED = r"[^\n,;:.，；：。、\[\]<>]*" + _BOX_LIST_RE.pattern
_SEP = r"[ \t]*[,，][ \t]*"
# A chain of regions joined by ", " plus the ":"/"：" that introduces the text after it. Only ever *matched* at the
# candidate starts computed by `_chain_starts` (never searched), which keeps stripping linear.
_REGION_CHAIN_RE = re.compile(
    rf"(?:{_ONE_TAGGED}|{_ONE_STRIPPED})(?:{_SEP}(?:{_ONE_TAGGED}|{_ONE_STRIPPED}))*[ \t]*[:：]?[ \t]*", re.DOTALL
)


def _chain_matches(text: str) -> list[re.Match[str]]:
    """The matches ``_REGION_CHAIN_RE.finditer(text)`` would give, found in linear time: a chain can only start at a
    ``<ref>``/``<box>`` tag or at the first name character before a box list, so only those starts are tried."""
    tags = [m.start() for m in _ANY_TAG_RE.finditer(text)]
    lists = [m.start() for m in _BOX_LIST_RE.finditer(text)]
    out: list[re.Match[str]] = []
    pos = ti = li = 0
    while True:
        while ti < len(tags) and tags[ti] < pos:
            ti += 1
        while li < len(lists) and lists[li] < pos:
            li += 1
        cands = []
        if ti < len(tags):
            cands.append((tags[ti], "tag"))
        if li < len(lists):
            b = lists[li]
            cands.append((_last_of(text, _NAME_CHARS, pos, b) + 1, "list"))
        if not cands:
            return out
        start, kind = min(cands)
        m = _REGION_CHAIN_RE.match(text, start)
        if m is None or m.end() == start:
            if kind == "tag":
                ti += 1
            else:
                li += 1
            continue
        out.append(m)
        pos = m.end()


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
    """Remove every region (tagged ``<ref>..</ref><box>..</box>``, bare ``<box>..</box>`` and tag-stripped
    ``name[[..]]``) plus the ``", "`` and ``": "`` that joined them to the text, for text metrics on grounded reports.

    ``"<ref>right lung</ref><box>[[1, 2, 3, 4]]</box>, <ref>left lung</ref><box>[[5, 6, 7, 8]]</box>: No effusion."``
    -> ``"No effusion."``. A ``<ref>`` without a box keeps its name and loses only the tags. Lines stay lines; other
    whitespace is kept.
    """

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
