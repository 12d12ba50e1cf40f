"""Box-aware random resized crop: the boxes written in the record text move with the pixels (docs/data.md).

The original trainer's ``RandomResizedCrop(448, scale=(0.8, 1), ratio=(3/4, 4/3))`` left the ``[[x1, y1, x2, y2]]``
in the text untouched. Here the crop (torchvision's parameter sampling) only accepts crops containing every box and
rewrites each box on the crop's 0..999 grid; multi-image samples with boxes are never transformed (a box does not
say which image it belongs to).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from internvl.regions import Box, box_to_pixels, map_boxes, pixels_to_box

__all__ = ["CropBox", "box_aware_augment", "crop_box", "sample_crop"]

#: The original RandomResizedCrop's area fraction and aspect range, and torchvision's number of tries.
SCALE = (0.8, 1.0)
RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10


@dataclass(frozen=True)
class CropBox:
    """A crop in pixels: ``left``/``top`` corner and ``width``/``height`` (integers)."""

    left: int
    top: int
    width: int
    height: int


def _contains(crop: CropBox, pixel_boxes: Sequence[tuple[float, float, float, float]]) -> bool:
    return all(crop.left <= x1 and crop.top <= y1 and x2 <= crop.left + crop.width and y2 <= crop.top + crop.height
               for x1, y1, x2, y2 in pixel_boxes)


def sample_crop(width: int, height: int, rng: np.random.Generator,
                keep: Sequence[tuple[float, float, float, float]] = ()) -> CropBox | None:
    """Random resized crop parameters as torchvision samples them (area fraction in :data:`SCALE`, log-uniform
    aspect in :data:`RATIO`, uniform position), restricted to crops containing every pixel box in ``keep``. After
    :data:`ATTEMPTS` misses, torchvision's centre-crop fallback; ``None`` when even that would cut a box (then the
    image is left as is)."""
    area = width * height
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(ATTEMPTS):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            crop = CropBox(int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h)
            if _contains(crop, keep):
                return crop
    # torchvision's fallback: a centre crop of the whole image with its aspect clamped into RATIO
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    crop = CropBox((width - w) // 2, (height - h) // 2, w, h)
    return crop if _contains(crop, keep) else None


def crop_box(box: Box, crop: CropBox, width: int, height: int) -> Box:
    """``box`` (0..999 on a ``width`` x ``height`` image) expressed on the grid of ``crop``."""
    x1, y1, x2, y2 = box_to_pixels(box, width, height)
    return pixels_to_box((x1 - crop.left, y1 - crop.top, x2 - crop.left, y2 - crop.top), crop.width, crop.height)


def box_aware_augment(images: Sequence[Image.Image], turns: Sequence[Mapping[str, Any]], rng: np.random.Generator
                      ) -> tuple[list[Image.Image], list[dict[str, Any]]]:
    """Crop each image as the module docstring says; returns new images and new turns (``{"from", "value"}``
    dicts; the input is not modified). Only numeric boxes move; prompt notation such as ``[[x1, y1, x2, y2]]``
    stays."""
    boxes: list[Box] = []
    for turn in turns:
        map_boxes(str(turn["value"]), lambda b: boxes.append(b) or b)
    out_turns = [dict(t) for t in turns]
    if boxes and len(images) > 1:
        return list(images), out_turns
    new_images = []
    for image in images:
        width, height = image.size
        crop = sample_crop(width, height, rng, [box_to_pixels(b, width, height) for b in boxes])
        if crop is not None:
            image = image.crop((crop.left, crop.top, crop.left + crop.width, crop.top + crop.height))
            for t in out_turns:
                t["value"] = map_boxes(str(t["value"]), lambda b, c=crop: crop_box(b, c, width, height))
        new_images.append(image)
    return new_images, out_turns
