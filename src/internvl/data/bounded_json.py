"""JSON under input limits: nesting depth, number-literal size and lone surrogates are checked before or while a
document is parsed, so a hostile line costs bounded time and memory and becomes a named problem instead of a
``RecursionError`` or a 4300-digit ``ValueError``. ``internvl.data.records`` turns these errors into ``FILE:LINE``
problems; the reasons are keys of ``internvl.data.records.REASONS``.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_LINE_BYTES", "MAX_NAME_BYTES", "MAX_NUMBER_CHARS", "MAX_PATH_BYTES", "JSONLimitError",
           "loads_limited", "LimitedJSONDecoder", "has_lone_surrogate"]

# The input limits checked on every record line: line bytes, ``[``/``{`` nesting, number-literal length (a 64-bit
# id has 20 digits), and image path / path component bytes (Linux ``PATH_MAX``/``NAME_MAX``).
MAX_LINE_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64
MAX_NUMBER_CHARS = 40
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255


class JSONLimitError(ValueError):
    """JSON refused by :func:`loads_limited`; ``reason`` is a :data:`REASONS` key (too-deep, number-too-large ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_JSON_STRING_RE = re.compile(r'"(?:[^"\\]+|\\.)*"')
_BRACKET_RE = re.compile(r"[\[\]{}]")


def _json_depth(text: str, limit: int) -> None:
    """Raise when brackets outside strings nest deeper than ``limit`` (linear, before ``json.loads``; skipped when
    the line has too few brackets to reach the limit)."""
    if text.count("[") + text.count("{") <= limit:
        return
    depth = 0
    for match in _BRACKET_RE.finditer(_JSON_STRING_RE.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            if depth > limit:
                raise JSONLimitError("too-deep", f"JSON nests deeper than {limit} levels")
        else:
            depth -= 1


def _number_hooks(limit: int) -> dict[str, Callable[[str], Any]]:
    def parse_int(s: str) -> int:
        if len(s) > limit:
            raise JSONLimitError("number-too-large", f"an integer with {len(s)} characters (limit {limit})")
        return int(s)

    def parse_float(s: str) -> float:
        if len(s) > limit:
            raise JSONLimitError("number-too-large", f"a number with {len(s)} characters (limit {limit})")
        value = float(s)
        if value != value or value in (float("inf"), float("-inf")):
            raise JSONLimitError("number-too-large", f"the number {s} does not fit a 64-bit float")
        return value

    def parse_constant(s: str) -> float:
        raise JSONLimitError("number-too-large", f"{s} is not a finite number")

    return {"parse_int": parse_int, "parse_float": parse_float, "parse_constant": parse_constant}


def has_lone_surrogate(value: Any) -> bool:
    """True when a string of a decoded JSON value (keys included) holds a lone surrogate (not encodable as UTF-8)."""
    try:
        json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def loads_limited(text: str) -> Any:
    """``json.loads`` under the input limits (nesting, number size, lone surrogates) for whole JSON documents too
    (meta files, converter inputs). Raises ``json.JSONDecodeError`` or :class:`JSONLimitError` (both ``ValueError``)."""
    try:
        _json_depth(text, MAX_DEPTH)
        value = json.loads(text, **_number_hooks(MAX_NUMBER_CHARS))
    except (JSONLimitError, json.JSONDecodeError):
        raise
    except (RecursionError, ValueError, OverflowError, MemoryError) as exc:
        raise JSONLimitError("invalid-json", f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if "\\u" in text and has_lone_surrogate(value):
        raise JSONLimitError("bad-text", "a string holds a lone surrogate escape (\\ud800-\\udfff without its "
                                         "pair); such text cannot be encoded or tokenized")
    return value


class LimitedJSONDecoder:
    """``raw_decode`` under the input limits, for the items of a JSON-list file (prediction files): every error,
    limits included, is a ``json.JSONDecodeError`` at the item's position."""

    def __init__(self) -> None:
        self._decoder = json.JSONDecoder(**_number_hooks(MAX_NUMBER_CHARS))

    def decode_at(self, text: str, pos: int) -> tuple[Any, int]:
        """(item, end position) of the JSON value starting at ``pos``."""
        try:
            item, end = self._decoder.raw_decode(text, pos)
            _json_depth(text[pos:end], MAX_DEPTH)
        except json.JSONDecodeError:
            raise
        except JSONLimitError as exc:
            raise json.JSONDecodeError(f"{exc.reason}: {exc}", text, pos) from None
        except (RecursionError, ValueError, OverflowError) as exc:
            raise json.JSONDecodeError(f"{type(exc).__name__}: {str(exc)[:200]}", text, pos) from None
        if has_lone_surrogate(item):
            raise json.JSONDecodeError("bad-text: a string holds a lone surrogate escape", text, pos)
        return item, end
