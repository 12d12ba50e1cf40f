"""Image classification data (class folders or a CSV) -> classify_single / classify_multi records.

* Folders: ``ROOT/<class name>/<image>`` -> single-label records; the options are the class folder names
  (sorted, or in the order of ``--options``); the folder is the image root.
* CSV, single label: ``--image-column path --label-column label``.
* CSV, multi-label: ``--label-columns A,B,C`` (0/1 per class; VinDr/CheXpert style) or ``--label-column labels
  --separator '|'``. Records with no positive label get ``--empty-label`` (e.g. "No finding") if given,
  else they are skipped and counted.

The option list goes into the prompt (see ``prompts/classification.yaml``); ``--notes`` adds lines after it,
such as '"No finding" means no diseases are detected.'.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from internvl.data.convert import (Conversion, ConverterCLI, ConvertError, ConvertReport, check_task, comma_list,
                                   read_csv)

TASKS = ("classify_single", "classify_multi")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".nii", ".gz"}
_POSITIVE, _NEGATIVE = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no", "", "-1", "-1.0"}

#: one input item: (file, line, record id, image path, labels)
Row = tuple[str | Path, int, Any, str, list[str]]


def convert_classification(source: str | Path, *, modality: str, task: str = "classify_single",
                           options: list[str] | None = None, target: str = "disease", notes: list[str] | None = None,
                           image_column: str = "image", label_column: str | None = "label",
                           label_columns: list[str] | None = None, separator: str | None = None,
                           empty_label: str | None = None, image_root: str | Path | None = None, **common: Any
                           ) -> tuple[list[dict], ConvertReport]:
    """Class folders or a label CSV (see the module docstring) -> ``(records, report)``; the CSV options do not apply
    to folders. ``common``: the other :class:`Conversion` keywords. Raises :class:`ConvertError` if unusable."""
    check_task(task, TASKS)
    source = Path(source)
    if source.is_dir():
        if task != "classify_single":
            raise ConvertError("class folders give single-label data; use a CSV for classify_multi")
        if image_root is not None:
            raise ConvertError(f"{source}: the class folders are the image root; image_root is not an option here")
        conv = Conversion(f"classification folders {source}", image_root=source, **common)
        rows, options = _folder_rows(source, options, conv.report)
    else:
        if task == "classify_single" and (label_columns or separator):
            raise ConvertError("one-hot label columns and separators are for classify_multi")
        conv = Conversion(f"classification {source}", image_root=image_root, **common)
        rows = _csv_rows(source, image_column, label_column, label_columns, separator, empty_label, conv.report)
        options = options if options is not None else _seen_options(rows, label_columns, empty_label)
    for file, line, record_id, image, labels in rows:
        unknown = [x for x in labels if x not in options]
        if unknown:
            conv.report.skip(file, line, "unknown-label", f"label(s) {unknown} not in the options")
            continue
        if task == "classify_single" and len(labels) != 1:
            conv.report.skip(file, line, "bad-label", f"single-label task but got {labels}")
            continue
        fields = dict(label=labels[0]) if task == "classify_single" else dict(labels=labels)
        conv.add(file, line, [{"task": task, "id": record_id, **fields}], image=image, modality=modality,
                 options=options, target=target, notes=notes)
    return conv.finish()


def _folder_rows(root: Path, options: list[str] | None, report: ConvertReport) -> tuple[list[Row], list[str]]:
    """The images of ``root/<class>/`` (paths relative to ``root``; other files skipped and counted) and the option
    list, the class names unless ``options`` are given (which must then include every class)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    options = classes if options is None else options
    extra = sorted(set(classes) - set(options))
    if extra:
        raise ConvertError(f"{root}: class folder(s) {extra} are not in the option list {options}")
    if len(options) < 2:
        raise ConvertError(f"{root}: need at least 2 classes, found {classes}")
    rows: list[Row] = []
    for label in classes:
        for number, path in enumerate(sorted((root / label).rglob("*")), start=1):
            if path.is_dir() or path.name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                report.skip(path, 0, "not-an-image", f"unsupported file type {path.suffix!r}")
                continue
            rel = os.path.relpath(path, root)
            rows.append((root / label, number, rel, rel, [label]))
    return rows, options


def _flag(value: str | None) -> bool | None:
    v = (value or "").strip().lower()
    if v in _POSITIVE:
        return True
    if v in _NEGATIVE:
        return False
    return None


def _csv_rows(path: Path, image_column: str, label_column: str | None, label_columns: list[str] | None,
              separator: str | None, empty_label: str | None, report: ConvertReport) -> list[Row]:
    """The CSV's rows with an image and at least one label (``empty_label`` when none is positive); others are
    skipped and counted."""
    file, rows = str(path), []
    with read_csv(path, [image_column] + (label_columns or [label_column or ""])) as reader:
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
            if not labels and empty_label is None:
                report.skip(file, line, "no-label", "no positive label (pass --empty-label to name normal images)")
                continue
            rows.append((file, line, line, image, labels or [empty_label]))
    return rows


def _seen_options(rows: list[Row], label_columns: list[str] | None, empty_label: str | None) -> list[str]:
    """The option list found in the data: the one-hot columns in order, else the labels sorted; ``empty_label``
    last."""
    seen: list[str] = list(label_columns or [])
    for *_, labels in rows:
        seen += [x for x in labels if x not in seen]
    options = seen if label_columns else sorted(set(seen))
    return options + [empty_label] if empty_label and empty_label not in options else options


CLI = ConverterCLI(
    help="class folders or a label CSV -> classify_single / classify_multi records", tasks=TASKS,
    convert=convert_classification,
    arguments=((("source",), dict(help="a folder of class folders, or a label CSV")),
               (("--modality",), dict(required=True,
                                      help="modality for the prompt: OCT, chest x-ray, dermoscopic ...")),
               (("--target",), dict(choices=["disease", "organ", "tissue"], default="disease")),
               (("--options",), dict(type=comma_list, help="comma-separated option list in prompt order "
                                     "(default: from the data)")),
               (("--notes",), dict(action="append", help="a line after the options (repeatable)")),
               (("--image-column",), dict(default="image")),
               (("--label-column",), dict(default="label")),
               (("--label-columns",), dict(type=comma_list,
                                           help="comma-separated one-hot class columns (multi-label)")),
               (("--separator",), dict(help="separator inside --label-column for multi-label values")),
               (("--empty-label",), dict(help="label for rows without a positive class (e.g. 'No finding')"))))
