"""Checkpoint manifests: the size and SHA-256 of every file a checkpoint holds, written by us, checked on resume.

Each rank hashes the files it wrote (`rank_of`: `rng_state_3.pth` and DeepSpeed's `*zero_pp_rank_3_*` belong to rank
3, everything else to rank 0) into a part, so no rank reads the others' (possibly huge) files; rank 0 joins the parts
into `manifest.json` (`merge_manifests`). `verify_manifest` checks the files back, split by rank the same way. Pickled
states (optimizer, scheduler, RNG, DeepSpeed) are only loaded from a checkpoint that verified.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from internvl.io_safety import atomic_write_text

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# not listed: the manifest, its per-rank parts (and their temporary files while a rank writes one), the COMPLETE marker
_PART_RE = re.compile(r"^\.?manifest\.rank(\d+)\.json(\.tmp.*)?$")
_UNLISTED = re.compile(r"^(\.?manifest\.json(\.tmp.*)?|COMPLETE)$")
# files written by one data-parallel rank: HF's rng_state_<rank>.pth, DeepSpeed's *zero_pp_rank_<rank>_mp_rank_*
RANK_FILE_RE = re.compile(r"(?:^rng_state_(\d+)\.pth$|pp_rank_(\d+)_)")


class ManifestError(ValueError):
    """A checkpoint does not match (or has no valid) manifest; the message names the file and the reason."""


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest entry of one file: {"size": bytes, "sha256": hex}, streamed by `hashlib.file_digest`."""
    with open(path, "rb") as fh:
        return {"size": os.fstat(fh.fileno()).st_size, "sha256": hashlib.file_digest(fh, "sha256").hexdigest()}


def rank_of(relpath: str) -> int:
    """The data-parallel rank that writes (and verifies) a checkpoint file: rank-tagged names, else rank 0."""
    match = RANK_FILE_RE.search(Path(relpath).name)
    return 0 if match is None else int(match.group(1) or match.group(2))


def _listed_files(root: Path, rank: int | None = None, world_size: int = 1) -> list[str]:
    """Relative POSIX paths of the files under `root` that a manifest lists (those of `rank`, if given)."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if not (_UNLISTED.match(rel) or _PART_RE.match(rel)) and _mine(rel, rank, world_size):
                found.append(rel)
    return sorted(found)


def _mine(relpath: str, rank: int | None, world_size: int) -> bool:
    """Whether `rank` writes and checks `relpath` (every file when rank is None)."""
    return rank is None or rank_of(relpath) % max(world_size, 1) == rank


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def write_rank_manifest(checkpoint_dir: str | os.PathLike, rank: int = 0, world_size: int = 1) -> Path:
    """Hash the files of `checkpoint_dir` that belong to `rank` into `manifest.rank<rank>.json`; returns its path."""
    root = Path(checkpoint_dir)
    path = root / f"manifest.rank{rank}.json"
    _write_json(path, {rel: file_digest(root / rel) for rel in _listed_files(root, rank, world_size)})
    return path


def merge_manifests(checkpoint_dir: str | os.PathLike) -> Path:
    """Join the per-rank parts into `manifest.json` (rank 0, after every rank wrote its part), hash any file that no
    part covers, and remove the parts. Returns the manifest path."""
    root = Path(checkpoint_dir)
    files: dict[str, dict[str, Any]] = {}
    parts = sorted(p for p in root.iterdir() if _PART_RE.match(p.name) and p.suffix == ".json")
    for part in parts:
        files.update(json.loads(part.read_text(encoding="utf-8")))
    files.update({rel: file_digest(root / rel) for rel in _listed_files(root) if rel not in files})
    path = root / MANIFEST_NAME
    _write_json(path, {"version": MANIFEST_VERSION, "algorithm": "sha256", "files": files})
    for part in parts:
        part.unlink()
    return path


def read_manifest(checkpoint_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The `files` table of a checkpoint's manifest; `ManifestError` if missing or malformed."""
    path = Path(checkpoint_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (not written by medrega-train, or by a version before manifests); "
                            "refusing to load its pickled states")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if data.get("version") != MANIFEST_VERSION or data.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError("unknown version or layout")
        for rel, entry in files.items():
            if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                    and isinstance(entry.get("sha256"), str)):
                raise ValueError(f"bad entry for {rel!r}")
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise ValueError(f"path {rel!r} outside the checkpoint")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    return files


def verify_manifest(checkpoint_dir: str | os.PathLike, rank: int | None = None, world_size: int = 1) -> list[str]:
    """Problems of a checkpoint against its manifest, one `FILE: reason` each (empty = verified). `rank=None` checks
    every file; with a rank, only the files that rank writes (`rank_of`), so several ranks share the work."""
    root = Path(checkpoint_dir)
    try:
        files = read_manifest(root)
    except ManifestError as exc:
        return [str(exc)]
    if not files:
        return [f"{root / MANIFEST_NAME}: the manifest lists no files"]
    problems = []
    for rel, entry in sorted(files.items()):
        path = root / rel
        if not _mine(rel, rank, world_size):
            continue
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['size']} "
                            "(truncated or replaced)")
        elif file_digest(path)["sha256"] != entry["sha256"]:
            problems.append(f"{path}: SHA-256 differs from the manifest (corrupted)")
    return problems
