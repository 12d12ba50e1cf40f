"""Atomic checkpoint directories and the rule for finding the newest usable one.

A checkpoint is written to `<output_dir>/.staging/checkpoint-N/`, hashed into `manifest.json`
(`internvl.train.manifest`), marked `COMPLETE` and only then renamed to `<output_dir>/checkpoint-N` (atomic within one
filesystem): a run killed at any moment leaves a finished checkpoint or a staging folder, never taken as the latest and
removed by the next save. Resume (`select_resume_checkpoint`) takes the newest checkpoint that verifies against its
manifest and moves newer ones that do not aside (`checkpoint-N.rejected`), so nothing we did not write is unpickled.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from internvl.io_safety import fsync_path
from internvl.train.manifest import verify_manifest

STAGING_DIRNAME = ".staging"
COMPLETE_MARKER = "COMPLETE"
REJECTED_SUFFIX = ".rejected"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
logger = logging.getLogger("internvl.train")


def staging_root(output_dir: str | os.PathLike) -> Path:
    """Folder that holds checkpoints while they are being written."""
    return Path(output_dir) / STAGING_DIRNAME


def is_complete(checkpoint_dir: str | os.PathLike) -> bool:
    """True if `checkpoint_dir` was fully written (marker present and trainer state readable)."""
    path = Path(checkpoint_dir)
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
        return False
    return (path / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first."""
    return [(step, path) for step, path in _numbered(output_dir) if is_complete(path)]


def _numbered(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every `checkpoint-N` folder in `output_dir`, complete or not, as (N, path), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(CHECKPOINT_RE.match(child.name), child) for child in root.iterdir() if child.is_dir()]
    return sorted((int(match.group(1)), child) for match, child in found if match)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest complete checkpoint in `output_dir`, or None. Half-written (staging) folders are ignored."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file below `path` and the folders themselves to stable storage (best effort on odd filesystems)."""
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def publish_checkpoint(staged: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Mark `staged` complete and move it to `<output_dir>/<its name>` atomically; returns the final path. An
    existing folder of the same name (a re-run of the same step after resume) is replaced."""
    staged = Path(staged)
    final = Path(output_dir) / staged.name
    (staged / COMPLETE_MARKER).write_text("ok\n", encoding="utf-8")
    fsync_tree(staged)
    trash = staging_root(output_dir) / f"{staged.name}.old"
    if final.exists():
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(staged, final)
    shutil.rmtree(trash, ignore_errors=True)
    fsync_path(output_dir)
    return final


def clean_staging(output_dir: str | os.PathLike) -> bool:
    """Remove leftovers of interrupted saves (the staging folder); returns whether there were any."""
    root = staging_root(output_dir)
    found = root.is_dir() and any(root.iterdir())
    shutil.rmtree(root, ignore_errors=True)
    return found


def rotate_checkpoints(output_dir: str | os.PathLike, save_total_limit: int | None,
                       keep: str | os.PathLike | None = None) -> list[Path]:
    """Keep the newest `save_total_limit` complete checkpoints (by step) and always `keep` (the checkpoint just
    written: the newest known good one); delete the others and return them. Rejected checkpoints are not counted."""
    if not save_total_limit or save_total_limit <= 0:
        return []
    checkpoints = list_checkpoints(output_dir)
    kept = Path(keep).resolve() if keep is not None else None
    doomed = [path for _step, path in checkpoints[:-save_total_limit] if path.resolve() != kept]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def reject_checkpoint(checkpoint_dir: str | os.PathLike, problems: list[str]) -> Path:
    """Move a checkpoint that failed verification aside to `checkpoint-N.rejected` (kept for inspection, never resumed
    from, never counted by rotation), with the reasons in `REJECTED.txt`. Returns the new path."""
    path = Path(checkpoint_dir)
    target = path.with_name(path.name + REJECTED_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{REJECTED_SUFFIX}{n}")
    os.replace(path, target)
    (target / "REJECTED.txt").write_text("\n".join(problems) + "\n", encoding="utf-8")
    return target


def checkpoint_problems(path: str | os.PathLike, verify: Callable[[Path], list[str]] = verify_manifest) -> list[str]:
    """Why the checkpoint at `path` cannot be resumed from ([] when it verifies and is complete)."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path}: not a directory"]
    found = verify(path)
    if not found and not is_complete(path):
        found = [f"{path}: incomplete (no COMPLETE marker or unreadable trainer_state.json)"]
    return found


def select_resume_checkpoint(output_dir: str | os.PathLike,
                             verify: Callable[[Path], list[str]] = verify_manifest,
                             move_aside: bool = True) -> tuple[Path | None, list[str]]:
    """(newest checkpoint of `output_dir` that verifies and is complete, or None; the problems of the newer ones).
    Each newer one is named in the log and, with `move_aside` (main process), moved aside with `reject_checkpoint`,
    so a later rotation cannot keep it in place of a good one."""
    problems: list[str] = []
    for _step, path in reversed(_numbered(output_dir)):
        found = checkpoint_problems(path, verify)
        if not found:
            return path, problems
        problems.extend(found)
        for line in found:
            logger.warning("checkpoint rejected: %s", line)
        if move_aside:
            moved = reject_checkpoint(path, found)
            logger.warning("moved %s aside to %s; trying the previous checkpoint", path.name, moved.name)
    return None, problems


def verify_checkpoint(checkpoint_dir: str | os.PathLike) -> list[str]:
    """Problems of `checkpoint_dir` against its manifest (empty = verified). Under torch.distributed every rank checks
    the files it writes (`internvl.train.manifest.rank_of`) and all ranks get every rank's problems."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return verify_manifest(checkpoint_dir)
    mine = verify_manifest(checkpoint_dir, rank=dist.get_rank(), world_size=dist.get_world_size())
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return [line for part in gathered for line in (part or [])]
