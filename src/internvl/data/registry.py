"""The ``meta_file.json`` dataset registry, read exactly as the original InternVL / MedRegA trainer reads it.

A meta file maps a dataset name to ``{"root", "annotation", "length", "repeat_time", "data_augment", "base_prompt",
"max_dynamic_patch"}`` (table in docs/data.md). Relative paths resolve against ``base_dir`` (default: the working
directory, as the original launcher). Every problem is a :class:`MetaFileError` ``FILE:LINE: dataset 'name': reason``.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from internvl.data.records import JSONLimitError, loads_limited

__all__ = ["DatasetSpec", "MetaFileError", "load_meta", "KNOWN_KEYS"]

#: Largest accepted ``repeat_time`` (more is almost surely a typo; 1e300 would overflow the index list).
MAX_REPEAT_TIME = 10_000

KNOWN_KEYS = ("root", "annotation", "length", "repeat_time", "data_augment", "base_prompt", "max_dynamic_patch")


class MetaFileError(ValueError):
    """A meta file that cannot be used; the message starts with ``FILE:LINE:``."""


@dataclass(frozen=True)
class DatasetSpec:
    """One registry entry with paths resolved; ``name`` is the meta-file key."""

    name: str
    root: Path
    annotation: Path
    length: int | None = None
    repeat_time: float = 1.0
    data_augment: bool = False
    base_prompt: str = ""
    max_dynamic_patch: int | None = None

    def select_lines(self, n_lines: int) -> list[int]:
        """0-based line indices this entry contributes: below 1 the first ``int(n_lines * repeat_time)`` lines (the
        original's prefix, not a random subset), above 1 every line ``repeat_time`` times."""
        if self.repeat_time < 1:
            return list(range(int(n_lines * self.repeat_time)))
        return list(range(n_lines)) * int(self.repeat_time)


def _line_of_key(text: str, key: str) -> int:
    """1-based line where ``"key":`` first appears (best effort for error messages; 1 if not found)."""
    needle = json.dumps(key)
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    return 1


def _resolve(value: str, base_dir: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base_dir / path


def load_meta(path: str | os.PathLike, *, base_dir: str | os.PathLike | None = None) -> dict[str, DatasetSpec]:
    """Read and validate a meta file (types, unknown keys such as a typo ``repeat_times``, that the files exist);
    returns ``{name: DatasetSpec}`` in file order or raises :class:`MetaFileError`."""
    meta_path = Path(path)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    try:
        text = meta_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MetaFileError(f"{meta_path}:0: cannot read meta file: {exc}") from None
    try:
        data = loads_limited(text)
    except json.JSONDecodeError as exc:
        raise MetaFileError(f"{meta_path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except JSONLimitError as exc:  # nesting too deep, a number with thousands of digits, a lone surrogate
        raise MetaFileError(f"{meta_path}:1: {exc.reason}: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise MetaFileError(f"{meta_path}:1: a meta file must be a non-empty JSON object of dataset entries")

    specs: dict[str, DatasetSpec] = {}
    for name, entry in data.items():
        where = f"{meta_path}:{_line_of_key(text, name)}: dataset {name!r}"
        specs[name] = _parse_entry(name, entry, where, base)
    return specs


def _parse_entry(name: str, entry: Any, where: str, base: Path) -> DatasetSpec:
    def fail(reason: str) -> MetaFileError:
        return MetaFileError(f"{where}: {reason}")

    if not isinstance(entry, dict):
        raise fail(f"entry must be an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(KNOWN_KEYS))
    if unknown:
        raise fail(f"unknown key(s) {unknown}; known keys are {list(KNOWN_KEYS)}")
    for key in ("root", "annotation"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise fail(f"'{key}' must be a non-empty string, got {entry.get(key)!r}")
    if not entry["annotation"].endswith(".jsonl"):
        raise fail(f"'annotation' must be a .jsonl file, got {entry['annotation']!r}")

    repeat = entry.get("repeat_time", 1)
    if isinstance(repeat, bool) or not isinstance(repeat, numbers.Real) or not math.isfinite(repeat) or repeat <= 0:
        raise fail(f"'repeat_time' must be a positive number, got {repeat!r}")
    if repeat > MAX_REPEAT_TIME:
        raise fail(f"'repeat_time' {repeat!r} is above the limit of {MAX_REPEAT_TIME} repeats")
    if repeat > 1 and float(repeat) != int(repeat):
        raise fail(f"'repeat_time' above 1 must be an integer (repeats), got {repeat!r}")

    length = entry.get("length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 0):
        raise fail(f"'length' must be a non-negative integer, got {length!r}")
    augment = entry.get("data_augment", False)
    if not isinstance(augment, bool):
        raise fail(f"'data_augment' must be true or false, got {augment!r}")
    base_prompt = entry.get("base_prompt", "")
    if not isinstance(base_prompt, str):
        raise fail(f"'base_prompt' must be a string, got {type(base_prompt).__name__}")
    max_patch = entry.get("max_dynamic_patch")
    if max_patch is not None and (isinstance(max_patch, bool) or not isinstance(max_patch, int) or max_patch < 1):
        raise fail(f"'max_dynamic_patch' must be a positive integer, got {max_patch!r}")

    root = _resolve(entry["root"], base)
    annotation = _resolve(entry["annotation"], base)
    try:
        if not annotation.is_file():
            raise fail(f"annotation file not found: {annotation}")
        if not root.is_dir():
            raise fail(f"image root directory not found: {root}")
    except OSError as exc:  # a path or component longer than the file system allows, a loop of links ...
        raise fail(f"cannot use the path {exc.filename!s:.120}: {exc.strerror or exc}") from None
    return DatasetSpec(name=name, root=root, annotation=annotation, length=length, repeat_time=float(repeat),
                       data_augment=augment, base_prompt=base_prompt, max_dynamic_patch=max_patch)
