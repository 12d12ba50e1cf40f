"""Checkpoint manifests: the size and SHA-256 of every file a checkpoint holds, written by us, checked on resume.

Writing is split by rank so no rank reads the others' (possibly huge) files: `write_rank_manifest` hashes the files
this rank wrote, right after they were written (`rank_of` decides: `rng_state_3.pth` and DeepSpeed's
`*zero_pp_rank_3_*` belong to rank 3, everything else to rank 0), and `merge_manifests` (rank 0, after a barrier) joins
the parts into `manifest.json` and hashes anything no part covered. `verify_manifest` checks the files back, again
split by rank when several ranks verify together. A file is only unpickled (optimizer, scheduler, RNG, DeepSpeed
states) after its checkpoint verified against a manifest: the manifest is the record that we wrote those bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# files that are not part of the manifest: the manifest itself, its per-rank parts, the COMPLETE marker
_PART_RE = re.compile(r"^manifest\.rank(\d+)\.json(\.tmp)?$")  # .tmp: another rank's part being written
_UNLISTED = {MANIFEST_NAME, MANIFEST_NAME + ".tmp", "COMPLETE"}
# files written by one data-parallel rank: HF's rng_state_<rank>.pth, DeepSpeed's *zero_pp_rank_<rank>_mp_rank_*
RANK_FILE_RE = re.compile(r"(?:^rng_state_(\d+)\.pth$|pp_rank_(\d+)_)")


class ManifestError(ValueError):
    """A checkpoint does not match (or has no valid) manifest; the message names the file and the reason."""


def file_digest(path: str | os.PathLike) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex) of one file, streamed by `hashlib.file_digest`."""
    with open(path, "rb") as fh:
        return os.fstat(fh.fileno()).st_size, hashlib.file_digest(fh, "sha256").hexdigest()


def _entry(path: Path) -> dict[str, Any]:
    """The manifest entry of one file: {"size": bytes, "sha256": hex}."""
    size, sha = file_digest(path)
    return {"size": size, "sha256": sha}


def rank_of(relpath: str) -> int:
    """The data-parallel rank that writes (and verifies) a checkpoint file: rank-tagged names, else rank 0."""
    match = RANK_FILE_RE.search(Path(relpath).name)
    if match is None:
        return 0
    return int(match.group(1) or match.group(2))


def _listed_files(root: Path) -> list[str]:
    """Relative paths (POSIX) of every regular file under `root` that a manifest lists."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel in _UNLISTED or _PART_RE.match(rel):
                continue
            found.append(rel)
    return sorted(found)


def _atomic_json(path: Path, data: Any) -> None:
    """Write JSON under a temporary name and rename it into place (the checkpoint's publish fsyncs the whole tree)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def write_rank_manifest(checkpoint_dir: str | os.PathLike, rank: int = 0, world_size: int = 1) -> Path:
    """Hash the files of `checkpoint_dir` that belong to `rank` into `manifest.rank<rank>.json`; returns its path."""
    root = Path(checkpoint_dir)
    entries = {rel: _entry(root / rel) for rel in _listed_files(root) if rank_of(rel) % max(world_size, 1) == rank}
    path = root / f"manifest.rank{rank}.json"
    _atomic_json(path, entries)
    return path


def merge_manifests(checkpoint_dir: str | os.PathLike) -> Path:
    """Join the per-rank parts into `manifest.json` (rank 0, after every rank wrote its part), hash any file that no
    part covers, and remove the parts. Returns the manifest path."""
    root = Path(checkpoint_dir)
    files: dict[str, dict[str, Any]] = {}
    parts = sorted(p for p in root.iterdir() if _PART_RE.match(p.name) and p.suffix == ".json")
    for part in parts:
        files.update(json.loads(part.read_text(encoding="utf-8")))
    files.update({rel: _entry(root / rel) for rel in _listed_files(root) if rel not in files})
    path = root / MANIFEST_NAME
    _atomic_json(path, {"version": MANIFEST_VERSION, "algorithm": "sha256", "files": files})
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
    """Problems of a checkpoint against its manifest, one `FILE: reason` each (empty = verified).

    `rank=None` checks every file; with a rank, only the files that rank writes (see `rank_of`), so several ranks can
    share the work. Sizes are compared before any hashing, so a truncated or empty file is reported at once.
    """
    root = Path(checkpoint_dir)
    try:
        files = read_manifest(root)
    except ManifestError as exc:
        return [str(exc)]
    if not files:
        return [f"{root / MANIFEST_NAME}: the manifest lists no files"]
    mine = {rel: e for rel, e in files.items() if rank is None or rank_of(rel) % max(world_size, 1) == rank}
    problems = []
    for rel, entry in sorted(mine.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(f"{path}: {size} bytes, the manifest says {entry['size']} (truncated or replaced)")
    for rel, entry in sorted(mine.items()):
        path = root / rel
        if any(p.startswith(f"{path}:") for p in problems):
            continue
        if file_digest(path)[1] != entry["sha256"]:
            problems.append(f"{path}: SHA-256 differs from the manifest (corrupted)")
    return problems
