"""Output paths that never overwrite their inputs or lose finished work: one mechanism for every writer.

Every command that writes results checks its output *before any work* (:func:`check_output_dir`,
:func:`check_output_file`): an output equal to, inside or containing an input (real paths), a file where a directory
is needed or the reverse, and a non-empty output without ``--overwrite`` are refused with :class:`OutputPathError`.
Results are written under a temporary name and renamed into place (:func:`atomic_write_text`,
:func:`staged_output_dir`), so a crash leaves the old result or the new one, never half of each.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["OutputPathError", "append_jsonl", "atomic_write_text", "check_output_dir", "check_output_file",
           "fsync_path", "staged_output_dir", "unique_file"]


class OutputPathError(ValueError):
    """An output path that would overwrite an input, a file where a directory is needed, a non-empty directory."""


def _check_inputs(out: Path, inputs: Iterable[str | os.PathLike | None], what: str,
                  inputs_inside_ok: bool = False) -> None:
    out_real = Path(os.path.realpath(out))  # a link to an input is the input (Path.resolve fails on link loops)
    for item in inputs:
        if item is None:
            continue
        in_real = Path(os.path.realpath(item))
        if out_real == in_real:
            raise OutputPathError(f"{what} {out} is the input {item}; choose another output path")
        if out_real.is_relative_to(in_real):
            raise OutputPathError(f"{what} {out} lies inside the input {item}; choose a path outside it")
        if not inputs_inside_ok and in_real.is_relative_to(out_real):
            raise OutputPathError(f"{what} {out} contains the input {item}; writing there could replace it")


def _stat_kind(path: Path, what: str) -> str:
    """"missing", "dir" or "file" (anything else); an OSError (name too long, ...) is a refusal."""
    try:
        os.lstat(path)
        return "dir" if path.is_dir() else "file"
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:
        raise OutputPathError(f"{what} {str(path)[:200]}: {exc.strerror or exc}") from None
    except ValueError as exc:  # an embedded NUL
        raise OutputPathError(f"{what} {str(path)[:200]!r}: {exc}") from None


def check_output_dir(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                     overwrite: bool = False, must_be_empty: bool = True, inputs_inside_ok: bool = False,
                     what: str = "output directory") -> Path:
    """Refuse ``out`` as an output directory (:class:`OutputPathError`) before any work is done.

    ``must_be_empty=False``: for writers that only add uniquely named files or manage their own contents (training
    checkpoints); ``inputs_inside_ok``: for writers that never replace the whole directory (a run's own base model).
    """
    path = Path(out)
    _check_inputs(path, inputs, what, inputs_inside_ok)
    kind = _stat_kind(path, what)
    if kind == "file":
        raise OutputPathError(f"{what} {path} is a file; a directory is needed")
    parent = next((p for p in path.parents if p.exists()), None)  # the nearest existing one
    if parent is not None and not parent.is_dir():
        raise OutputPathError(f"{what} {path}: {parent} is a file; a directory is needed")
    if kind == "dir" and must_be_empty and not overwrite and any(path.iterdir()):
        raise OutputPathError(f"{what} {path} is not empty; pass --overwrite to replace its contents")
    return path


def check_output_file(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                      overwrite: bool = False, what: str = "output file") -> Path:
    """Refuse ``out`` as an output file: equal to an input, a directory, or an existing file without ``overwrite``."""
    path = Path(out)
    _check_inputs(path, inputs, what)
    kind = _stat_kind(path, what)
    if kind == "dir":
        raise OutputPathError(f"{what} {path} is a directory; a file is needed")
    if kind == "file" and not overwrite:
        raise OutputPathError(f"{what} {path} exists; pass --overwrite to replace it")
    return path


def fsync_path(path: str | os.PathLike) -> None:
    """fsync one file or folder (so a rename inside it is durable), passing over what cannot be synced."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary sibling, fsync it, rename it over ``path``: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append rows to a JSON-lines file and flush + fsync, so a crash never loses a finished line."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        fh.flush()
        os.fsync(fh.fileno())


def unique_file(directory: str | os.PathLike, stem: str, suffix: str) -> Path:
    """Create and return a new empty file ``directory/stem{suffix}`` (or ``stem-1{suffix}`` ...), reserved with
    ``O_CREAT | O_EXCL`` so two processes asking at once get different files."""
    directory = Path(directory)
    for n in range(10_000):
        path = directory / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            continue
        return path
    raise OutputPathError(f"{directory}: no free file name {stem}-N{suffix} left")


@contextlib.contextmanager
def staged_output_dir(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new temporary directory next to ``final`` that becomes ``final`` when the block succeeds (an existing,
    empty or ``overwrite``-able ``final`` is replaced only then); on an error ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            if not final.is_dir() or (any(final.iterdir()) and not overwrite):
                raise OutputPathError(f"{final} appeared or filled up while writing; the new result is not moved "
                                      "there (pass --overwrite to replace it)")
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
