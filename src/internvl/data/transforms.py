"""Box-aware geometric augmentation: the boxes written in the record text move with the pixels (docs/data.md).

The original trainer's ``RandomResizedCrop`` left the ``[[x1, y1, x2, y2]]`` in the text untouched. Here a random
resized crop (torchvision's parameter sampling) only accepts crops containing every box and rewrites each box on the
crop's 0..999 grid; the optional horizontal flip mirrors boxes exactly but never touches a sample whose text mentions
laterality; ``region_policy="off"`` leaves every sample with boxes alone, and multi-image samples with boxes are
never transformed (a box does not say which image it belongs to).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from internvl.constants import BOX_SCALE
from internvl.regions import Box, box_to_pixels, has_regions, map_boxes, pixels_to_box

__all__ = ["AugmentConfig", "BoxAwareAugment", "CropBox", "sample_crop", "crop_box", "flip_box", "LATERALITY_RE"]

LATERALITY_RE = re.compile(r"\b(left|right|bilateral|ipsilateral|contralateral)\b|左|右", re.IGNORECASE)


@dataclass(frozen=True)
class CropBox:
    """A crop in pixels: ``left``/``top`` corner and ``width``/``height`` (integers)."""

    left: int
    top: int
    width: int
    height: int


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters; defaults are the original RandomResizedCrop (always on) and no flip."""

    crop_prob: float = 1.0
    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.0
    region_policy: str = "move"  # "move": transform boxes with the pixels; "off": no geometric transform with boxes
    attempts: int = 10

    def __post_init__(self) -> None:
        if self.region_policy not in ("move", "off"):
            raise ValueError(f"region_policy must be 'move' or 'off', got {self.region_policy!r}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1) or not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"invalid crop scale {self.scale} or ratio {self.ratio}")
        if not (0 <= self.crop_prob <= 1 and 0 <= self.hflip_prob <= 1):
            raise ValueError("crop_prob and hflip_prob must be in [0, 1]")


def _contains(crop: CropBox, pixel_boxes: Sequence[tuple[float, float, float, float]]) -> bool:
    return all(crop.left <= x1 and crop.top <= y1 and x2 <= crop.left + crop.width and y2 <= crop.top + crop.height
               for x1, y1, x2, y2 in pixel_boxes)


def sample_crop(width: int, height: int, rng: np.random.Generator, config: AugmentConfig = AugmentConfig(),
                keep: Sequence[tuple[float, float, float, float]] = ()) -> CropBox | None:
    """Random resized crop parameters as torchvision samples them (area fraction in ``scale``, log-uniform aspect in
    ``ratio``, uniform position), restricted to crops containing every pixel box in ``keep``. After
    ``config.attempts`` misses, torchvision's centre-crop fallback; ``None`` when even that would cut a box (then the
    image is left as is)."""
    area = width * height
    log_lo, log_hi = math.log(config.ratio[0]), math.log(config.ratio[1])
    for _ in range(config.attempts):
        target = area * rng.uniform(config.scale[0], config.scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            crop = CropBox(int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h)
            if _contains(crop, keep):
                return crop
    # torchvision's fallback: a centre crop of the whole image with its aspect clamped into ``ratio``
    in_ratio = width / height
    if in_ratio < config.ratio[0]:
        w, h = width, int(round(width / config.ratio[0]))
    elif in_ratio > config.ratio[1]:
        w, h = int(round(height * config.ratio[1])), height
    else:
        w, h = width, height
    crop = CropBox((width - w) // 2, (height - h) // 2, w, h)
    return crop if _contains(crop, keep) else None


def crop_box(box: Box, crop: CropBox, width: int, height: int) -> Box:
    """``box`` (0..999 on a ``width`` x ``height`` image) expressed on the grid of ``crop``."""
    x1, y1, x2, y2 = box_to_pixels(box, width, height)
    return pixels_to_box((x1 - crop.left, y1 - crop.top, x2 - crop.left, y2 - crop.top), crop.width, crop.height)


def flip_box(box: Box) -> Box:
    """Horizontal mirror on the 0..999 grid (exact: pixel ``W - v/999 W = (999 - v)/999 W``)."""
    return Box(BOX_SCALE - box.x2, box.y1, BOX_SCALE - box.x1, box.y2)


def _boxes_in(turns: Sequence[Mapping[str, Any]]) -> list[Box]:
    """Every numeric box of the turns: the ones :func:`~internvl.regions.map_boxes` moves."""
    boxes: list[Box] = []
    for turn in turns:
        map_boxes(str(turn["value"]), lambda b: boxes.append(b) or b)
    return boxes


class BoxAwareAugment:
    """Callable ``(images, turns, rng) -> (images, turns, applied)`` applying the rules of the module docstring.

    ``turns`` are record conversation turns (``{"from", "value"}``); new dicts are returned, the input is not
    modified. ``applied`` says what was done: ``{"crop": CropBox | None, "flip": bool, "skipped": reason | None}``.
    """

    def __init__(self, config: AugmentConfig = AugmentConfig()) -> None:
        self.config = config

    def __call__(self, images: Sequence[Image.Image], turns: Sequence[Mapping[str, Any]], rng: np.random.Generator
                 ) -> tuple[list[Image.Image], list[dict[str, Any]], dict[str, Any]]:
        cfg = self.config
        out_turns = [dict(t) for t in turns]
        applied: dict[str, Any] = {"crop": None, "flip": False, "skipped": None}
        with_boxes = any(has_regions(str(t["value"])) for t in turns) and bool(_boxes_in(turns))
        if not images:
            applied["skipped"] = "no image"
        elif with_boxes and cfg.region_policy == "off":
            applied["skipped"] = "region sample (region_policy='off')"
        elif with_boxes and len(images) > 1:  # a box does not say which image it belongs to
            applied["skipped"] = "multi-image sample with boxes"
        if applied["skipped"]:
            return list(images), out_turns, applied

        new_images = []
        for image in images:
            width, height = image.size
            if cfg.crop_prob > 0 and rng.uniform() < cfg.crop_prob:
                keep = [box_to_pixels(b, width, height) for b in _boxes_in(turns)] if with_boxes else []
                crop = sample_crop(width, height, rng, cfg, keep)
                if crop is not None:
                    image = image.crop((crop.left, crop.top, crop.left + crop.width, crop.top + crop.height))
                    if with_boxes:
                        for t in out_turns:
                            t["value"] = map_boxes(str(t["value"]), lambda b, c=crop: crop_box(b, c, width, height))
                    applied["crop"] = crop
            new_images.append(image)

        text = " ".join(str(t["value"]) for t in turns)
        if cfg.hflip_prob > 0 and rng.uniform() < cfg.hflip_prob:
            if LATERALITY_RE.search(text):
                applied["skipped"] = "flip: text mentions laterality"
            else:
                new_images = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in new_images]
                if with_boxes:
                    for t in out_turns:
                        t["value"] = map_boxes(str(t["value"]), flip_box)
                applied["flip"] = True
        return new_images, out_turns, applied
