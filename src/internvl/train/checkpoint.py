"""Atomic checkpoint directories and the rule for finding the newest usable one.

A checkpoint is first written to `<output_dir>/.staging/checkpoint-N/` (model or adapters, optimizer, scheduler, RNG
states, trainer state with the data position). Only when every file is on disk does the main process write a
`COMPLETE` marker and `os.replace` the folder to `<output_dir>/checkpoint-N`. A rename inside one filesystem is atomic,
so a run killed at any moment leaves either a finished `checkpoint-N` or a stale staging folder, which is never taken
as the latest and is removed by the next save.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STAGING_DIRNAME = ".staging"
COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def staging_root(output_dir: str | os.PathLike) -> Path:
    """Folder that holds checkpoints while they are being written."""
    return Path(output_dir) / STAGING_DIRNAME


def is_complete(checkpoint_dir: str | os.PathLike) -> bool:
    """True if `checkpoint_dir` was fully written (marker present and trainer state readable)."""
    path = Path(checkpoint_dir)
    marker = path / COMPLETE_MARKER
    state = path / "trainer_state.json"
    if not (marker.is_file() and state.is_file()):
        return False
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return True


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest complete checkpoint in `output_dir`, or None. Half-written (staging) folders are ignored."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file below `path` and the folders themselves to stable storage (best effort on odd filesystems)."""
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def _fsync_path(path: str | os.PathLike) -> None:
    """fsync one file or folder; a path that cannot be opened or synced is passed over."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_checkpoint(staged: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Mark `staged` complete and move it to `<output_dir>/<its name>` atomically; returns the final path.

    An existing folder of the same name (e.g. a re-run of the same step after resume) is replaced.
    """
    staged = Path(staged)
    final = Path(output_dir) / staged.name
    (staged / COMPLETE_MARKER).write_text("ok\n", encoding="utf-8")
    fsync_tree(staged)
    if final.exists():
        trash = staging_root(output_dir) / f"{staged.name}.old"
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final, trash)
        os.replace(staged, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync_path(output_dir)
    return final


def clean_staging(output_dir: str | os.PathLike) -> list[Path]:
    """Remove leftovers of interrupted saves; returns what was removed."""
    root = staging_root(output_dir)
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    return removed


def rotate_checkpoints(output_dir: str | os.PathLike, save_total_limit: int | None) -> list[Path]:
    """Keep the newest `save_total_limit` complete checkpoints (by step); delete older ones. Returns deleted paths."""
    if not save_total_limit or save_total_limit <= 0:
        return []
    checkpoints = list_checkpoints(output_dir)
    doomed = [path for _step, path in checkpoints[:-save_total_limit]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
