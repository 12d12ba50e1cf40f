"""The one box grammar of the toolkit: parse, format, validate and convert MedRegA region text.

MedRegA writes regions as text inside ordinary sentences::

    <ref>carotid vessel wall</ref><box>[[365, 293, 416, 598], [596, 316, 635, 464]]</box>

* A box is ``[x1, y1, x2, y2]``: top-left then bottom-right corner, four integers in ``0..999`` where x is normalised by
  the image width and y by the image height (``BOX_SCALE = 999``).
* Several objects are joined by ``", "``: ``<ref>a</ref><box>[[..]]</box>, <ref>b</ref><box>[[..]]</box>``.
* A ``<box>`` may stand without a ``<ref>`` (Region-to-Text questions: ``What is <box>[[..]]</box>?``), and a ``<ref>``
  may be separated from its ``<box>`` by words (``<ref>brain tumor</ref> is located in <box>[[..]]</box>``): a box
  belongs to the nearest ``<ref>`` before it that has no box yet and no other ``<ref>`` after it.
* The released MedRegA decodes with ``skip_special_tokens=True``, which removes the four tags (special tokens in its
  tokenizer), so its output looks like ``carotid vessel wall[[365, 293, 416, 598], [596, 316, 635, 464]]``; the
  toolkit's answers keep the tags (``internvl.tokenization.decode_answer``). In this *tag-stripped* form the name is the
  text between the previous delimiter (start, newline, ``,`` ``;`` ``:`` ``.`` or their full-width forms, or the end of
  a previous box list) and ``[[``. That form is lossy: ``What is this[[..]]`` gives the name ``What is this``.

Coordinate conversion (documented choice, matches the original evaluators in the backward direction):

* backward ``box_to_pixels``: ``v / 999 * W`` for x and ``v / 999 * H`` for y (floats, no rounding);
* forward ``pixels_to_box``: ``round_half_up(p / W * 999)`` clamped to ``0..999``. Half-up (not Python's banker's
  rounding) keeps the mapping monotone and platform independent; with it ``pixels_to_box(box_to_pixels(b)) == b`` for
  every valid box and any image size >= 1, and a pixel coordinate moves by at most ``W / 999 / 2`` on the round trip.
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from internvl.constants import BOX_END, BOX_SCALE, BOX_START, REF_END, REF_START

__all__ = [
    "Box",
    "Region",
    "RegionError",
    "validate_box",
    "parse_box_list",
    "parse_regions",
    "format_boxes",
    "format_region",
    "format_regions",
    "pixels_to_box",
    "box_to_pixels",
    "strip_regions",
    "has_regions",
    "map_boxes",
]


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
_NUMBER = r"-?\d+(?:\.\d+)?"
# One box list "[[...], [...]]": tolerant about spacing and arity so that bad boxes give a clear error, not a non-match.
_BOX_LIST_RE = re.compile(r"\[\s*\[[^\[\]]*\](?:\s*,\s*\[[^\[\]]*\])*\s*\]")
_INNER_BOX_RE = re.compile(r"\[([^\[\]]*)\]")
_TAG_RE = re.compile(
    re.escape(REF_START) + r"(?P<ref>.*?)" + re.escape(REF_END)
    + "|" + re.escape(BOX_START) + r"(?P<box>.*?)" + re.escape(BOX_END),
    re.DOTALL,
)
# Delimiters ending the name in the tag-stripped form (searched backwards from "[[").
_NAME_DELIMS = "\n,;:.，；：。、"


def parse_box_list(text: str) -> list[Box]:
    """Parse ``"[[x1, y1, x2, y2], ...]"`` (the inside of ``<box>..</box>``) into validated boxes.

    Raises :class:`RegionError` for anything else, e.g. ``"[[1, 2, 3]]"`` (arity) or ``"[[5, 0, 1, 9]]"`` (x1 > x2).
    """
    stripped = text.strip()
    if not _BOX_LIST_RE.fullmatch(stripped):
        raise RegionError(f"not a box list '[[x1, y1, x2, y2], ...]': {text!r}")
    boxes = []
    for inner in _INNER_BOX_RE.findall(stripped):
        parts = [p.strip() for p in inner.split(",")] if inner.strip() else []
        values: list[object] = []
        for p in parts:
            if not re.fullmatch(_NUMBER, p):
                raise RegionError(f"box value {p!r} in [{inner}] is not a number")
            values.append(int(p) if re.fullmatch(r"-?\d+", p) else float(p))
        boxes.append(validate_box(values))
    return boxes


def _parse_tagged(text: str, strict: bool, errors: list[str] | None) -> list[Region]:
    regions: list[Region] = []
    open_ref: int | None = None  # index in `regions` of the last <ref> still waiting for its box
    for m in _TAG_RE.finditer(text):
        if m.group("ref") is not None:
            name = m.group("ref").strip()
            regions.append(Region(name, []))
            open_ref = len(regions) - 1
            continue
        try:
            boxes = parse_box_list(m.group("box"))
        except RegionError as exc:
            if strict:
                raise RegionError(f"at character {m.start()}: {exc}") from None
            if errors is not None:
                errors.append(f"at character {m.start()}: {exc}")
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


def _parse_stripped(text: str, strict: bool, errors: list[str] | None) -> list[Region]:
    regions: list[Region] = []
    prev_end = 0
    for m in _BOX_LIST_RE.finditer(text):
        before = text[prev_end:m.start()]
        cut = max(before.rfind(d) for d in _NAME_DELIMS)
        name = before[cut + 1:].strip() if cut >= 0 else before.strip()
        prev_end = m.end()
        try:
            boxes = parse_box_list(m.group(0))
        except RegionError as exc:
            if strict:
                raise RegionError(f"at character {m.start()}: {exc}") from None
            if errors is not None:
                errors.append(f"at character {m.start()}: {exc}")
            continue
        regions.append(Region(name or None, boxes))
    return regions


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


_NUMERIC_BOX_LIST_RE = re.compile(r"\[\s*\[\s*-?\d+(?:\s*,\s*-?\d+)*\s*\](?:\s*,\s*\[\s*-?\d+(?:\s*,\s*-?\d+)*\s*\])*\s*\]")


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
_ONE_TAGGED = (
    r"(?:" + re.escape(REF_START) + r"[^<]*?" + re.escape(REF_END) + r"[ \t]*)?"
    + re.escape(BOX_START) + r".*?" + re.escape(BOX_END)
)
_ONE_STRIPPED = r"[^\n,;:.，；：。、\[\]<>]*" + _BOX_LIST_RE.pattern
_SEP = r"[ \t]*[,，][ \t]*"
# A chain of regions joined by ", " plus the ":"/"：" that introduces the text after it.
_REGION_CHAIN_RE = re.compile(
    rf"(?:{_ONE_TAGGED}|{_ONE_STRIPPED})(?:{_SEP}(?:{_ONE_TAGGED}|{_ONE_STRIPPED}))*[ \t]*[:：]?[ \t]*", re.DOTALL
)


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

    out = _REGION_CHAIN_RE.sub(join, text)
    out = out.replace(REF_START, "").replace(REF_END, "")
    lines = [line.strip() for line in out.split("\n")]
    return "\n".join(line for line in lines if line)
