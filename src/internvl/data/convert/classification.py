"""Image classification data (class folders or a CSV) -> classify_single / classify_multi records.

* Folders: ``ROOT/<class name>/<image>`` -> single-label records; the options are the class folder names
  (sorted, or in the order of ``--options``).
* CSV, single label: ``--image-column path --label-column label``.
* CSV, multi-label: ``--label-columns A,B,C`` (0/1 per class; VinDr/CheXpert style) or ``--label-column labels
  --separator '|'``. Records with no positive label get ``--empty-label`` (e.g. "No finding") if given,
  else they are skipped and counted.

The option list goes into the prompt (see ``prompts/classification.yaml``); ``--notes`` adds lines after it,
such as '"No finding" means no diseases are detected.'.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from internvl.data.convert import (ConvertError, ConvertOptions, ConvertReport, add_common_arguments, build_or_skip,
                                   check_task, common_options, finish_report, read_csv, write_output)

NAME = "classification"
HELP = "class folders or a label CSV -> classify_single / classify_multi records"
TASKS = ["classify_single", "classify_multi"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".nii", ".gz"}
_POSITIVE, _NEGATIVE = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no", "", "-1", "-1.0"}


def convert_folders(root: str | Path, *, modality: str, options: list[str] | None = None, target: str = "disease",
                    notes: list[str] | None = None, **common: Any) -> tuple[list[dict], ConvertReport]:
    """``root/<class>/<image>`` -> single-label records with paths relative to ``root`` (which is their image root).
    ``common``: :class:`ConvertOptions` keywords other than ``image_root``."""
    if "image_root" in common:
        raise ConvertError("class folders are their own image root; convert_folders takes no image_root")
    opts = ConvertOptions(**common)
    root = Path(root)
    if not root.is_dir():
        raise ConvertError(f"{root}: not a directory")
    report = ConvertReport(source=f"classification folders {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if options is None:
        options = classes
    extra = sorted(set(classes) - set(options))
    if extra:
        raise ConvertError(f"{root}: class folder(s) {extra} are not in the option list {options}")
    if len(options) < 2:
        raise ConvertError(f"{root}: need at least 2 classes, found {classes}")
    items = []
    for label in classes:
        for number, path in enumerate(sorted((root / label).rglob("*")), start=1):
            if path.is_dir() or path.name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                report.skip(path, 0, "not-an-image", f"unsupported file type {path.suffix!r}")
                continue
            rel = os.path.relpath(path, root)
            record = build_or_skip(report, path, 0, "classify_single", opts.lang, id=f"{opts.id_prefix}{rel}",
                                   image=rel, modality=modality, options=options, label=label, target=target,
                                   notes=notes, include_base_prompt=opts.include_base_prompt)
            if record is not None:
                items.append((str(root / label), number, record))
    return finish_report(items, report, image_root=root, image_check=opts.image_check)


def _flag(value: str | None) -> bool | None:
    v = (value or "").strip().lower()
    if v in _POSITIVE:
        return True
    if v in _NEGATIVE:
        return False
    return None


def convert_csv(path: str | Path, *, modality: str, task: str = "classify_single", image_column: str = "image",
                label_column: str | None = "label", label_columns: list[str] | None = None,
                separator: str | None = None, options: list[str] | None = None, empty_label: str | None = None,
                target: str = "disease", notes: list[str] | None = None, **common: Any
                ) -> tuple[list[dict], ConvertReport]:
    """A label CSV -> records; see the module docstring for the column layouts. ``common``: :class:`ConvertOptions`
    keywords."""
    opts = ConvertOptions(**common)
    check_task(task, TASKS)
    if task == "classify_single" and (label_columns or separator):
        raise ConvertError("one-hot label columns and separators are for classify_multi")
    path = Path(path)
    file = str(path)
    report = ConvertReport(source=f"classification {file}")
    with read_csv(path, [image_column] + (label_columns or [label_column or ""])) as reader:
        rows = []
        for row in reader:
            line = reader.line_num
            image = (row[image_column] or "").strip()
            if not image:
                report.skip(file, line, "missing-field", f"empty {image_column!r}")
                continue
            if label_columns:
                flags = {c: _flag(row[c]) for c in label_columns}
                bad = [c for c, f in flags.items() if f is None]
                if bad:
                    report.skip(file, line, "bad-label", f"columns {bad} are not 0/1 (got {[row[c] for c in bad]})")
                    continue
                labels = [c for c in label_columns if flags[c]]
            else:
                raw = (row[label_column] or "").strip()  # type: ignore[index]
                labels = [x.strip() for x in raw.split(separator)] if separator else [raw]
                labels = [x for x in labels if x]
            if not labels:
                if empty_label is None:
                    report.skip(file, line, "no-label", "no positive label (pass --empty-label to name normal images)")
                    continue
                labels = [empty_label]
            rows.append((line, image, labels))
    if options is None:
        seen: list[str] = list(label_columns or [])
        for _, _, labels in rows:
            seen += [x for x in labels if x not in seen]
        options = seen if label_columns else sorted(set(seen))
        if empty_label and empty_label not in options:
            options.append(empty_label)
    items = []
    for line, image, labels in rows:
        unknown = [x for x in labels if x not in options]
        if unknown:
            report.skip(file, line, "unknown-label", f"label(s) {unknown} not in the options")
            continue
        if task == "classify_single" and len(labels) != 1:
            report.skip(file, line, "bad-label", f"single-label task but got {labels}")
            continue
        fields = dict(label=labels[0]) if task == "classify_single" else dict(labels=labels)
        record = build_or_skip(report, file, line, task, opts.lang, id=f"{opts.id_prefix}{line}", image=image,
                               modality=modality, options=options, target=target, notes=notes,
                               include_base_prompt=opts.include_base_prompt, **fields)
        if record is not None:
            items.append((file, line, record))
    return opts.finish(items, report)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a folder of class folders, or a label CSV")
    parser.add_argument("--modality", required=True, help="modality for the prompt: OCT, chest x-ray, dermoscopic ...")
    parser.add_argument("--target", choices=["disease", "organ", "tissue"], default="disease")
    parser.add_argument("--options", help="comma-separated option list in prompt order (default: from the data)")
    parser.add_argument("--notes", action="append", help="a line after the options (repeatable)")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--label-columns", help="comma-separated one-hot class columns (multi-label)")
    parser.add_argument("--separator", help="separator inside --label-column for multi-label values")
    parser.add_argument("--empty-label", help="label for rows without a positive class (e.g. 'No finding')")
    add_common_arguments(parser, tasks=TASKS, default_task="classify_single")


def run(args: argparse.Namespace) -> ConvertReport:
    options = [o.strip() for o in args.options.split(",")] if args.options else None
    common = dict(modality=args.modality, options=options, target=args.target, notes=args.notes, **common_options(args))
    if Path(args.source).is_dir():
        if args.task != "classify_single":
            raise ConvertError("class folders give single-label data; use a CSV for classify_multi")
        del common["image_root"]  # class folders are their own image root
        records, report = convert_folders(args.source, **common)
    else:
        label_columns = [c.strip() for c in args.label_columns.split(",")] if args.label_columns else None
        records, report = convert_csv(args.source, task=args.task, image_column=args.image_column,
                                      label_column=args.label_column, label_columns=label_columns,
                                      separator=args.separator, empty_label=args.empty_label, **common)
    return write_output(records, report, args.out)
