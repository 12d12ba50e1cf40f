"""Checks of what a demo user sends (the uploaded file, every text field, a typed or drawn box, the prompt's size in
tokens), each raising :class:`UserInputError` with a message for the page, and error messages without server paths.

Images are decoded by :func:`internvl.data.images.load_image`; this module adds the limits for untrusted uploads
(size, type, pixel count). Generation serves one request at a time, so fields are capped in characters and the prompt
in tokens before generation: one oversized request cannot stall the others.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from internvl.constants import IMAGE_PLACEHOLDER
from internvl.data.images import ImageLoadError, detect_format, load_image
from internvl.image_processing import ImageSettings
from internvl.regions import Box, pixels_to_box

__all__ = ["ACCEPTED_SUFFIXES", "FIELD_LIMITS", "MAX_UPLOAD_BYTES", "MAX_UPLOAD_PIXELS", "LoadedUpload",
           "UserInputError", "box_from_drawing", "check_fields", "check_prompt_budget", "check_question", "load_upload",
           "parse_typed_box", "public_message", "scrub_paths"]

ACCEPTED_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".dcm", ".dicom",
                                      ".nii", ".nii.gz")
MAX_UPLOAD_BYTES: int = 256 * 1024 * 1024  # a 512^3 float32 NIfTI volume fits; larger uploads are refused
MAX_UPLOAD_PIXELS: int = 40_000_000  # per 2-D image (~6300 x 6300): bigger is refused as a possible bomb


class UserInputError(ValueError):
    """Bad user input; ``str()`` is the message shown in the page."""


@dataclass(frozen=True)
class LoadedUpload:
    """A decoded upload: the RGB image shown to the model and a one-line description for the page."""

    image: Image.Image
    kind: str  # "dicom" | "nifti" | "pil"
    description: str


def load_upload(path: str | Path, *, axis: str = "axial", slice_index: int | None = None,
                max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS) -> LoadedUpload:
    """Decode an uploaded file (PNG/JPEG/TIFF/DICOM/NIfTI: one slice along ``axis``, default the middle one) into an
    RGB image after size and type checks; :class:`UserInputError` naming the file for anything it cannot take."""
    p = Path(path)
    name = p.name
    if not p.is_file():
        raise UserInputError(f"{name}: no such file was uploaded")
    size = p.stat().st_size
    if size == 0:
        raise UserInputError(f"{name}: the file is empty")
    if size > max_bytes:
        raise UserInputError(f"{name}: {size / 2**20:.1f} MiB is over the upload limit of {max_bytes / 2**20:.0f} MiB")
    kind = detect_format(p)
    if kind == "pil" and not name.lower().endswith(ACCEPTED_SUFFIXES):
        raise UserInputError(f"{name}: unsupported file type; upload one of {', '.join(ACCEPTED_SUFFIXES)}")
    try:
        image = load_image(p, axis=axis, slice_index=slice_index, max_pixels=max_pixels)
    except ImageLoadError as exc:
        raise UserInputError(f"{name}: {exc.reason}") from exc
    except (ValueError, MemoryError) as exc:
        raise UserInputError(f"{name}: cannot be read as an image ({exc})") from exc
    w, h = image.size
    if w < 8 or h < 8:
        raise UserInputError(f"{name}: image is only {w}x{h} pixels; need at least 8x8")
    where = f", {axis} slice {'middle' if slice_index is None else slice_index}" if kind == "nifti" else ""
    shown = kind.upper() if kind != "pil" else "image"
    return LoadedUpload(image.convert("RGB"), kind, f"{name}: {shown} {w}x{h}{where}")


def check_question(text: str | None) -> str:
    """Strip a free-text question; refuse an empty one (its length is capped by :func:`check_fields`)."""
    q = (text or "").strip()
    if not q:
        raise UserInputError("The question is empty: type a question (or pick a task that needs none).")
    return q


_NUM = r"-?\d+(?:\.\d+)?"
_BOX_TEXT = re.compile(rf"^\[?\s*\[?\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]?\s*\]?$")


def parse_typed_box(text: str | None, width: int, height: int, *, units: str = "grid") -> Box:
    """A box typed as ``x1, y1, x2, y2`` (brackets optional) on the 0..999 grid or in pixels (``units="pixels"``) of
    the ``width`` x ``height`` image; :class:`UserInputError` for bad syntax, inverted corners or a box outside."""
    raw = (text or "").strip()
    m = _BOX_TEXT.match(raw)
    if not m:
        raise UserInputError(f"Box {raw!r}: type four numbers 'x1, y1, x2, y2' (top-left and bottom-right corner).")
    vals = [float(v) for v in m.groups()]
    x1, y1, x2, y2 = vals
    if x1 >= x2 or y1 >= y2:
        raise UserInputError(f"Box {raw!r}: need x1 < x2 and y1 < y2 (top-left corner first).")
    if units == "pixels":
        if min(vals) < 0 or x2 > width or y2 > height:
            raise UserInputError(f"Box {raw!r} lies outside the {width}x{height} image (pixel coordinates).")
        return pixels_to_box((x1, y1, x2, y2), width, height)
    if min(vals) < 0 or max(vals) > 999:
        raise UserInputError(f"Box {raw!r} lies outside the image: grid coordinates run from 0 to 999.")
    if any(v != int(v) for v in vals):
        raise UserInputError(f"Box {raw!r}: grid coordinates are whole numbers 0..999.")
    return Box(*(int(v) for v in vals))


def box_from_drawing(layer: np.ndarray | Image.Image | None) -> Box:
    """Bounding box of everything painted on an editor layer (RGBA, alpha > 0; it covers the whole image) on the
    0..999 grid; :class:`UserInputError` if nothing was drawn."""
    if layer is None:
        raise UserInputError("No box: draw over the region in the image editor, or type a box.")
    arr = np.asarray(layer)
    if arr.ndim != 3 or arr.shape[2] < 4:
        raise UserInputError("The drawing layer has no transparency channel; draw with the editor's brush.")
    ys, xs = np.nonzero(arr[..., 3] > 0)
    if xs.size == 0:
        raise UserInputError("No box: draw over the region in the image editor, or type a box.")
    lh, lw = arr.shape[:2]
    return pixels_to_box((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), lw, lh)


#: Longest accepted value of each demo text field, in characters.
FIELD_LIMITS: dict[str, int] = {"question": 2000, "objects": 500, "options": 1000, "modality": 64, "box": 100}
_LABELS = {"options": "candidate diagnoses"}  # the other fields are named as they are


def check_fields(**fields: Any) -> None:
    """Refuse a field that is not text, is longer than :data:`FIELD_LIMITS` or holds ``<image>`` (the demo puts it
    in)."""
    for name, value in fields.items():
        if value is None:
            continue
        label = _LABELS.get(name, name)
        if not isinstance(value, str):
            raise UserInputError(f"The {label} field must be text.")
        limit = FIELD_LIMITS[name]
        if len(value) > limit:
            raise UserInputError(f"The {label} field has {len(value)} characters; the limit is {limit}.")
        if IMAGE_PLACEHOLDER in value:
            raise UserInputError(f"The {label} field cannot contain {IMAGE_PLACEHOLDER}; the image is added for you.")


def check_prompt_budget(model: Any, tokenizer: Any, prompt: str, history: list[tuple[str, str]],
                        max_new_tokens: int) -> int:
    """Tokens the turn needs (rendered prompt + image tokens + ``max_new_tokens``); refuse it when that exceeds the
    language model's context (``llm_config.max_position_embeddings``). Returns the count."""
    llm_config = getattr(model.config, "llm_config", None)
    context = getattr(llm_config, "max_position_embeddings", None)
    rendered = model._render(model._chat_template(), list(history), prompt)
    n_images = rendered.count(IMAGE_PLACEHOLDER) or 1
    text_tokens = len(tokenizer(rendered.replace(IMAGE_PLACEHOLDER, ""), add_special_tokens=False)["input_ids"])
    image_tokens = n_images * (int(model.num_image_token) * ImageSettings.from_config(model.config).max_tiles + 2)
    total = text_tokens + image_tokens + int(max_new_tokens)
    if context is not None and total > int(context):
        raise UserInputError(f"The conversation is too long for the model: about {total} tokens including the answer "
                             f"budget, but its context holds {context}. Clear the chat or shorten the text.")
    return total


_PATH_RE = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^\s/\\'\"():,;]+){2,}[/\\]?")


def scrub_paths(text: str) -> str:
    """``text`` with every file-system path cut to its last component (``/srv/models/x/a.png`` -> ``…/a.png``)."""
    return _PATH_RE.sub(lambda m: "…/" + re.split(r"[/\\]", m.group().rstrip("/\\"))[-1], text)


def public_message(exc: BaseException) -> str:
    """An internal error as shown in the page: its type and message without server paths."""
    return f"{type(exc).__name__}: {scrub_paths(str(exc))[:300]}"
