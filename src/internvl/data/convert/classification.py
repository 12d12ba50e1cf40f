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

import os
from pathlib import Path
from typing import Any

from internvl.data.convert import (Conversion, ConverterCLI, ConvertError, ConvertReport, check_task, comma_list,
                                   read_csv)

TASKS = ("classify_single", "classify_multi")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".nii", ".gz"}
_POSITIVE, _NEGATIVE = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no", "", "-1", "-1.0"}


def convert_folders(root: str | Path, *, modality: str, options: list[str] | None = None, target: str = "disease",
                    notes: list[str] | None = None, **common: Any) -> tuple[list[dict], ConvertReport]:
    """``root/<class>/<image>`` -> single-label records with paths relative to ``root`` (which is their image root).
    ``common``: :class:`Conversion` keywords other than ``image_root``."""
    root = Path(root)
    if "image_root" in common:
        raise ConvertError("convert_folders: the image root is the folder itself; image_root is not an option here")
    if not root.is_dir():
        raise ConvertError(f"{root}: not a directory")
    conv = Conversion(f"classification folders {root}", image_root=root, **common)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if options is None:
        options = classes
    extra = sorted(set(classes) - set(options))
    if extra:
        raise ConvertError(f"{root}: class folder(s) {extra} are not in the option list {options}")
    if len(options) < 2:
        raise ConvertError(f"{root}: need at least 2 classes, found {classes}")
    for label in classes:
        for number, path in enumerate(sorted((root / label).rglob("*")), start=1):
            if path.is_dir() or path.name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                conv.report.skip(path, 0, "not-an-image", f"unsupported file type {path.suffix!r}")
                continue
            rel = os.path.relpath(path, root)
            conv.add(root / label, number, [{"task": "classify_single", "id": rel, "label": label}], image=rel,
                     modality=modality, options=options, target=target, notes=notes)
    return conv.finish()


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
    """A label CSV -> records; see the module docstring for the column layouts. ``common``: :class:`Conversion`
    keywords."""
    check_task(task, TASKS)
    if task == "classify_single" and (label_columns or separator):
        raise ConvertError("one-hot label columns and separators are for classify_multi")
    file = str(path)
    conv = Conversion(f"classification {file}", **common)
    skip = conv.report.skip
    with read_csv(Path(path), [image_column] + (label_columns or [label_column or ""])) as reader:
        rows = []
        for row in reader:
            line = reader.line_num
            image = (row[image_column] or "").strip()
            if not image:
                skip(file, line, "missing-field", f"empty {image_column!r}")
                continue
            if label_columns:
                flags = {c: _flag(row[c]) for c in label_columns}
                bad = [c for c, f in flags.items() if f is None]
                if bad:
                    skip(file, line, "bad-label", f"columns {bad} are not 0/1 (got {[row[c] for c in bad]})")
                    continue
                labels = [c for c in label_columns if flags[c]]
            else:
                raw = (row[label_column] or "").strip()  # type: ignore[index]
                labels = [x.strip() for x in raw.split(separator)] if separator else [raw]
                labels = [x for x in labels if x]
            if not labels:
                if empty_label is None:
                    skip(file, line, "no-label", "no positive label (pass --empty-label to name normal images)")
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
    for line, image, labels in rows:
        unknown = [x for x in labels if x not in options]
        if unknown:
            skip(file, line, "unknown-label", f"label(s) {unknown} not in the options")
            continue
        if task == "classify_single" and len(labels) != 1:
            skip(file, line, "bad-label", f"single-label task but got {labels}")
            continue
        fields = dict(label=labels[0]) if task == "classify_single" else dict(labels=labels)
        conv.add(file, line, [{"task": task, "id": line, **fields}], image=image, modality=modality,
                 options=options, target=target, notes=notes)
    return conv.finish()


def convert_classification(source: str | Path, *, task: str = "classify_single", image_root: str | Path | None = None,
                           **kwargs: Any) -> tuple[list[dict], ConvertReport]:
    """The command line's converter: class folders (single-label, their own image root; the CSV options do not
    apply) or a label CSV."""
    if not Path(source).is_dir():
        return convert_csv(source, task=task, image_root=image_root, **kwargs)
    if task != "classify_single":
        raise ConvertError("class folders give single-label data; use a CSV for classify_multi")
    csv_only = ("image_column", "label_column", "label_columns", "separator", "empty_label")
    return convert_folders(source, **{k: v for k, v in kwargs.items() if k not in csv_only})


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
