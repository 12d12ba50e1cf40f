"""Segmentation label maps -> Text-to-Region / Region-to-Text records (how SA-Med2D masks became MedRegInstruct boxes).

Label maps: 2D PNG/TIFF with integer label values (mode L, I;16, or palette indices), NIfTI volumes, or a
single-plane DICOM SEG (segment labels from its SegmentSequence). Each label value becomes one named box
(``--regions label``: the bounding box of all its pixels) or one box per connected component (``--regions
component``, 8-connected, via ``scipy.ndimage``) for multi-region objects; components smaller than
``--min-pixels`` are skipped and counted.

Pixel boxes are outer edges: a label covering columns 10..19 gives x1 = 10, x2 = 20, then
``internvl.regions.pixels_to_box`` maps them to 0-999. For volumes the chosen slices of the image are written as
PNG (windowed by :func:`internvl.data.images.load_image`) and their boxes come from the same slice of the label
volume (:func:`internvl.data.images.volume_slice`), so boxes and pixels agree whatever the storage orientation.
"""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image

from internvl.data.convert import Conversion, ConverterCLI, ConvertError, ConvertReport, check_task
from internvl.data.images import (AXES, RAS_AXIS, ImageLoadError, detect_format, load_image, probe_image, slice_shape,
                                  volume_slice)
from internvl.regions import pixels_to_box

TASKS = ("text_to_region", "region_to_text")
MODES = ("label", "component")
_NIFTI = (".nii", ".nii.gz")


class LabelMapError(ValueError):
    """A label map that cannot be used (colour image, non-integer values, unsupported SEG)."""


def read_label_names(path: str | Path) -> dict[int, str]:
    """Label value -> name from JSON (``{"1": "liver"}``), CSV (``value,name``) or a text table.

    Text tables: one label a line, ``value name ...`` (mricron ``aal.nii.txt``) or ITK-SNAP
    (``value r g b a vis mesh "name"``); ``#`` starts a comment. Value 0 (background) is ignored.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    names: dict[int, str] = {}
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise LabelMapError(f"{path}: expected a JSON object {{value: name}}, got {type(data).__name__}")
        names = {int(key): str(value).strip() for key, value in data.items()}
    else:
        is_csv = path.suffix.lower() == ".csv"
        for number, line in enumerate(text.splitlines(), start=1):
            row = next(csv.reader([line]), []) if is_csv else line.split()
            if not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            try:
                value = int(row[0])
            except ValueError:
                if number == 1:
                    continue  # a header
                expected, got = ("value,name", row) if is_csv else ("value name", line.strip())
                raise LabelMapError(f"{path}:{number}: expected {expected!r}, got {got!r}") from None
            quoted = None if is_csv else re.search(r'"([^"]+)"', line)  # ITK-SNAP: the quoted last column
            name = quoted.group(1) if quoted else (row[1] if len(row) > 1 else "")
            if not name.strip():
                raise LabelMapError(f"{path}:{number}: label {value} has no name")
            names[value] = name.strip()
    names.pop(0, None)
    return names


def _integer_labels(values: np.ndarray, path: Path) -> np.ndarray:
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
            raise LabelMapError(f"{path}: label map has non-integer values (is it an image, not a mask?)")
    out = values.astype(np.int64)
    if (out < 0).any():
        raise LabelMapError(f"{path}: label map has negative values")
    return out


def _dicom_seg(path: Path) -> tuple[np.ndarray, dict[int, str]]:
    ds = pydicom.dcmread(path)
    if str(ds.get("Modality", "")) != "SEG" or "SegmentSequence" not in ds:
        raise LabelMapError(f"{path}: DICOM file is not a segmentation (Modality SEG with a SegmentSequence)")
    names = {int(s.SegmentNumber): str(s.get("SegmentLabel", f"segment {s.SegmentNumber}")) for s in ds.SegmentSequence}
    frames = ds.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) < len(frames):
        raise LabelMapError(f"{path}: SEG lacks per-frame segment identification for its {len(frames)} frame(s)")
    positions, segments = set(), []
    for item in list(per_frame)[: len(frames)]:  # extra items describe frames that are not stored
        segments.append(int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber))
        plane = item.get("PlanePositionSequence")
        positions.add(tuple(float(v) for v in plane[0].ImagePositionPatient) if plane else None)
    if len(positions) > 1:
        raise LabelMapError(f"{path}: multi-slice SEG is not supported; convert it to NIfTI first")
    labels = np.zeros(frames.shape[1:], dtype=np.int64)
    for frame, segment in zip(frames, segments):
        labels[frame > 0] = segment  # later segments win where they overlap
    return labels, names


def load_label_map(path: str | Path, *, axis: str = "axial", slice_index: int | None = None
                   ) -> tuple[np.ndarray, dict[int, str]]:
    """A 2D integer label map in display orientation, plus names stored in the file (DICOM SEG only)."""
    path = Path(path)
    kind = detect_format(path)
    if kind == "nifti":
        values, _ = volume_slice(path, axis=axis, slice_index=slice_index)
        return _integer_labels(values, path), {}
    if kind == "dicom":
        return _dicom_seg(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "F"):
                raise LabelMapError(f"{path}: label maps must be single-channel (got mode {im.mode}); "
                                    "save colour-coded masks as index (palette) images")
            return _integer_labels(np.asarray(im), path), {}
    except (OSError, SyntaxError) as exc:
        raise LabelMapError(f"{path}: not a readable label map ({exc})") from exc


def label_boxes(labels: np.ndarray, *, mode: str = "label", min_pixels: int = 1) -> tuple[dict[int, list[tuple[int, int, int, int]]], int]:
    """Pixel boxes ``(x1, y1, x2, y2)`` (outer edges) per label value; returns ``(boxes, small components dropped)``.

    ``mode="label"``: one box around all pixels of a label; ``"component"``: one box per 8-connected component,
    ordered top-to-bottom then left-to-right. Components (or labels) under ``min_pixels`` pixels are dropped.
    """
    from scipy import ndimage  # imported here: scipy takes about 1.5 s to import and only this function needs it

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out: dict[int, list[tuple[int, int, int, int]]] = {}
    dropped = 0
    values = [int(v) for v in np.unique(labels) if v != 0]
    structure = ndimage.generate_binary_structure(2, 2)
    for value in values:
        mask = labels == value
        if mode == "label":
            parts, n = mask.astype(np.int32), 1
        else:
            parts, n = ndimage.label(mask, structure=structure)
        sizes = ndimage.sum_labels(mask, parts, index=np.arange(1, n + 1))
        boxes = []
        for k, sl in enumerate(ndimage.find_objects(parts), start=1):
            if sl is None:
                continue
            if sizes[k - 1] < min_pixels:
                dropped += 1
                continue
            ys, xs = sl
            boxes.append((xs.start, ys.start, xs.stop, ys.stop))
        if boxes:
            out[value] = sorted(boxes, key=lambda b: (b[1], b[0]))
    return out, dropped


def _stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem


def pair_by_stem(images_dir: str | Path, masks_dir: str | Path, mask_suffix: str = "") -> tuple[list[tuple[Path, Path]], list[Path]]:
    """Match each mask ``<stem><mask_suffix>.*`` to the image ``<stem>.*``; returns (pairs, masks without image)."""
    images = {}
    for p in sorted(Path(images_dir).iterdir()):
        if p.is_file():
            images.setdefault(_stem(p), p)
    pairs, orphans = [], []
    for m in sorted(Path(masks_dir).iterdir()):
        if not m.is_file():
            continue
        stem = _stem(m)
        if mask_suffix and stem.endswith(mask_suffix):
            stem = stem[: -len(mask_suffix)]
        if stem in images:
            pairs.append((images[stem], m))
        else:
            orphans.append(m)
    return pairs, orphans


def convert_masks(masks: str | Path, images_dir: str | Path, *, mask_suffix: str = "", names: str | Path | None = None,
                  task: str = "text_to_region", mode: str = "label", min_pixels: int = 1, modality: str = "medical",
                  axis: str = "axial", slices: str = "middle", slice_step: int = 1, window: str | None = None,
                  out_images: str | Path | None = None, **options: Any) -> tuple[list[dict], ConvertReport]:
    """Convert one (label map, image) file pair, or two folders paired by stem (:func:`pair_by_stem`; masks without
    an image are skipped and counted); returns ``(records, report)``. ``names``: a label-name file
    (:func:`read_label_names`; unnamed values are skipped and counted, DICOM SEG files bring their own names).
    ``slices``: ``"middle"`` or ``"labelled"`` (every ``slice_step``-th slice holding a label); ``window``: a preset
    or ``"centre,width"`` for volume slices. ``options``: :class:`Conversion` keywords; record image paths are
    relative to ``image_root`` (default: the images' folder, or ``out_images`` for volume slices)."""
    check_task(task, TASKS)
    if slices not in ("middle", "labelled"):
        raise ConvertError(f"slices must be 'middle' or 'labelled', got {slices!r}")
    masks, images = Path(masks), Path(images_dir)
    if masks.is_file() and images.is_file():
        pairs, orphans = [(images, masks)], []
    elif masks.is_dir() and images.is_dir():
        pairs, orphans = pair_by_stem(images, masks, mask_suffix)
    else:
        raise ConvertError("--masks and --images-dir must both be files or both be directories")
    try:
        label_names = read_label_names(names) if names else {}
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{names}: cannot read label names: {exc}") from exc
    try:
        centre_width = tuple(float(v) for v in window.split(",")) if window and "," in window else window
    except ValueError:
        raise ConvertError(f"--window {window!r}: expected a preset name or 'centre,width' numbers") from None
    conv = Conversion("masks", **options)
    for image_path, mask_path in pairs:
        file = str(mask_path)
        is_volume = mask_path.name.lower().endswith(_NIFTI) and image_path.name.lower().endswith(_NIFTI)
        for index in _slice_indices(mask_path, is_volume, slices, slice_step, axis, out_images, file, conv.report):
            line = 0 if index is None else index
            try:
                labels, file_names = load_label_map(mask_path, axis=axis, slice_index=index)
            except (ImageLoadError, LabelMapError) as exc:
                conv.report.skip(file, line, "bad-label-map", str(exc))
                break
            try:
                picture = _record_image(image_path, labels.shape, index, is_volume, axis, centre_width, out_images,
                                        conv.image_root)
            except ImageLoadError as exc:
                conv.report.skip(file, line, "bad-image", str(exc))
                continue
            if isinstance(picture, str):
                conv.report.skip(file, line, "size-mismatch", picture)
                continue
            regions = _named_regions(labels, {**label_names, **file_names}, mode, min_pixels, file, line, conv.report)
            if not regions:
                conv.report.skip(file, line, "no-labels", "no named label in this slice")
                continue
            rel, width, height = picture
            base_id = _stem(mask_path) + ("" if index is None else f"-{axis}{index}")
            conv.add(file, line, _mask_builds(task, base_id, regions, mode), image=rel, width=width, height=height,
                     modality=modality)
    for orphan in orphans:
        conv.report.skip(orphan, 0, "no-matching-image", f"no image with stem {_stem(orphan)!r} in {images}")
    return conv.finish()


def _slice_indices(mask_path: Path, is_volume: bool, slices: str, slice_step: int, axis: str,
                   out_images: str | Path | None, file: str, report: ConvertReport) -> list[int | None]:
    """The slices of one pair to convert (None: the 2D map, or a volume's middle slice); [] (skipped and counted)
    when the label volume cannot be read or is empty."""
    if not is_volume:
        return [None]
    if out_images is None:
        raise ConvertError("volumes need out_images: a directory for the PNG slices")
    if slices == "middle":
        return [None]
    try:
        data = np.asanyarray(nib.as_closest_canonical(nib.load(mask_path)).dataobj)
        data = data[..., 0] if data.ndim == 4 else data
        other = tuple(i for i in range(3) if i != RAS_AXIS[axis])  # RAS world axes
        indices = [int(k) for k in np.flatnonzero((data != 0).any(axis=other))][::slice_step]
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        report.skip(file, 0, "bad-label-map", f"{mask_path}: {exc}")
        return []
    if not indices:
        report.skip(file, 0, "no-labels", "the label volume is empty")
    return indices


def _record_image(image_path: Path, label_shape: tuple[int, ...], index: int | None, is_volume: bool, axis: str,
                  window: str | tuple[float, float] | None, out_images: str | Path | None,
                  image_root: str | Path | None) -> tuple[str, int, int] | str:
    """(image path relative to the record root, width, height) of one label slice: a 2D image as it is, a volume
    slice written as PNG into ``out_images``. A string when the image and the label map differ in size (the reason)."""
    h, w = label_shape
    if not is_volume:
        info = probe_image(image_path)
        if (info.width, info.height) != (w, h):
            return f"image {info.width}x{info.height} vs label map {w}x{h}"
        return os.path.relpath(image_path, Path(image_root or image_path.parent)), w, h
    shape = slice_shape(image_path, axis)  # header only: a mismatch is found before any voxel is read
    if shape != label_shape:
        return f"image slice {shape} vs label slice {label_shape}"
    picture = load_image(image_path, window=window, axis=axis, slice_index=index)
    suffix = "mid" if index is None else f"{index:04d}"
    target = Path(out_images) / f"{_stem(image_path)}_{axis}{suffix}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    picture.save(target)
    width, height = picture.size
    return os.path.relpath(target, Path(image_root or out_images)), width, height


def _named_regions(labels: np.ndarray, names: dict[int, str], mode: str, min_pixels: int, file: str, line: int,
                   report: ConvertReport) -> list[tuple[str, list]]:
    """(name, boxes 0-999) per named label value of one label map; small components and unnamed values are
    skipped and counted."""
    h, w = labels.shape
    boxes, dropped = label_boxes(labels, mode=mode, min_pixels=min_pixels)
    for _ in range(dropped):
        report.skip(file, line, "component-too-small", f"a region under {min_pixels} pixels")
    regions = []
    for value, pixel_boxes in boxes.items():
        if value not in names:
            report.skip(file, line, "unnamed-label", f"label value {value} has no name")
            continue
        regions.append((names[value], [pixels_to_box(b, w, h) for b in pixel_boxes]))
    return regions


def _mask_builds(task: str, base_id: str, regions: list[tuple[str, list]], mode: str) -> list[dict[str, Any]]:
    """The `Conversion.add` builds of one label map (region_to_text: one per label, or per component)."""
    if task == "text_to_region":
        return [{"task": "text_to_region", "id": base_id, "regions": regions}]
    return [{"task": "region_to_text", "id": f"{base_id}-{name}-{k}",
             "regions": [(name, [box] if box is not None else region_boxes)]}
            for name, region_boxes in regions
            for k, box in enumerate(region_boxes if mode == "component" else [None])]


CLI = ConverterCLI(
    help="segmentation label maps (PNG, NIfTI, DICOM SEG) -> text_to_region / region_to_text records", tasks=TASKS,
    convert=convert_masks,
    arguments=((("--masks",), dict(required=True, help="directory of label maps (or one label map file)")),
               (("--images-dir",), dict(required=True, help="directory of images (or one image file)")),
               (("--mask-suffix",), dict(default="", help="suffix of mask stems, e.g. '_seg' for case1_seg.nii.gz")),
               (("--names",), dict(help="label names: JSON {value: name}, CSV value,name, or a text table")),
               (("--regions",), dict(dest="mode", choices=MODES, default="label",
                                     help="one box per label, or one per connected component (multi-region)")),
               (("--min-pixels",), dict(type=int, default=1, help="skip components smaller than this (default 1)")),
               (("--modality",), dict(default="medical", help="modality word for the prompt (CT, MRI, ...)")),
               (("--axis",), dict(choices=AXES, default="axial")),
               (("--slices",), dict(choices=["middle", "labelled"], default="middle", help="volume slices to use")),
               (("--slice-step",), dict(type=int, default=1, help="with --slices labelled, every N-th slice")),
               (("--window",), dict(help="window preset or 'centre,width' for volume slices")),
               (("--out-images",), dict(help="directory for PNG slices of volumes"))))
