"""Tests for internvl.data.transforms: boxes move with the pixels (checked on the pixels themselves)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from internvl.data.transforms import CropBox, box_aware_augment, crop_box, sample_crop
from internvl.regions import Box, box_to_pixels, format_region, parse_regions, pixels_to_box


def _scene(width: int, height: int, rect: tuple[int, int, int, int]) -> Image.Image:
    """Black image with one white rectangle covering pixel columns x1..x2-1 and rows y1..y2-1."""
    image = Image.new("RGB", (width, height))
    ImageDraw.Draw(image).rectangle((rect[0], rect[1], rect[2] - 1, rect[3] - 1), fill=(255, 255, 255))
    return image


def _white_extent(image: Image.Image) -> tuple[int, int, int, int]:
    a = np.asarray(image.convert("L")) > 127
    ys, xs = np.nonzero(a)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _turns(box: Box, name: str = "lesion") -> list[dict]:
    prompt = 'Use "<ref>object</ref><box>[[x1, y1, x2, y2]]</box>". Please locate <ref>' + name + "</ref>."
    return [{"from": "human", "value": "<image>\n" + prompt}, {"from": "gpt", "value": format_region(name, [box])}]


@pytest.mark.parametrize("seed", range(12))
def test_box_still_covers_the_same_pixels_after_a_crop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(300, 700)), int(rng.integers(300, 700))
    x1, y1 = int(rng.integers(40, width // 2)), int(rng.integers(40, height // 2))
    rect = (x1, y1, x1 + int(rng.integers(20, width // 3)), y1 + int(rng.integers(20, height // 3)))
    image = _scene(width, height, rect)
    box = pixels_to_box(rect, width, height)
    (out,), turns = box_aware_augment([image], _turns(box), rng)
    new_box = parse_regions(turns[1]["value"])[0].boxes[0]
    got = box_to_pixels(new_box, *out.size)
    extent = _white_extent(out)
    tolerance = max(out.size) / 999 / 2 + 1.0  # half a grid step + one pixel of rasterisation
    for g, e in zip(got, extent):
        assert abs(g - e) <= tolerance, (out.size, got, extent)
    assert 'Use "<ref>object</ref><box>[[x1, y1, x2, y2]]</box>"' in turns[0]["value"]  # notation untouched


def test_crops_happen_and_keep_every_box_inside() -> None:
    image = _scene(400, 300, (150, 100, 250, 200))
    box = pixels_to_box((150, 100, 250, 200), 400, 300)
    crops = 0
    for seed in range(30):
        (out,), _ = box_aware_augment([image], _turns(box), np.random.default_rng(seed))
        if out.size != image.size:
            crops += 1
        x1, y1, x2, y2 = _white_extent(out)
        assert (x2 - x1, y2 - y1) == (100, 100)  # the whole rectangle is still in the picture
    assert crops >= 25


def test_crop_parameters_follow_scale_and_ratio() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        crop = sample_crop(448, 448, rng)
        assert crop is not None
        area = crop.width * crop.height / (448 * 448)
        assert 0.8 - 0.01 <= area <= 1.0 + 1e-9
        assert 3 / 4 - 0.02 <= crop.width / crop.height <= 4 / 3 + 0.02
        assert 0 <= crop.left <= 448 - crop.width and 0 <= crop.top <= 448 - crop.height
    # a box covering the whole image only fits the identity crop (torchvision's fallback for a square image)
    assert sample_crop(448, 448, rng, keep=[(0, 0, 448, 448)]) == CropBox(0, 0, 448, 448)
    # a wide image's fallback is centred with the aspect clamped to 4/3, which cuts a box at the left edge
    assert sample_crop(800, 100, rng, keep=[(0, 0, 10, 10)]) is None


def test_samples_without_boxes_are_cropped_and_their_text_kept() -> None:
    image = _scene(300, 300, (10, 10, 50, 50))
    plain = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "chest"}]
    (out,), turns = box_aware_augment([image], plain, np.random.default_rng(0))
    assert out.size != (300, 300) and turns == plain and turns[0] is not plain[0]


def test_multi_image_with_boxes_is_left_alone() -> None:
    image = _scene(100, 100, (10, 10, 20, 20))
    turns = [{"from": "human", "value": "<image>\n<image>\nWhere?"},
             {"from": "gpt", "value": "<ref>x</ref><box>[[100, 100, 200, 200]]</box>"}]
    images, out_turns = box_aware_augment([image, image], turns, np.random.default_rng(0))
    assert images == [image, image] and out_turns == turns


def test_crop_box_conversion() -> None:
    crop = CropBox(left=100, top=50, width=200, height=100)
    box = pixels_to_box((150, 75, 250, 125), 400, 200)
    moved = crop_box(box, crop, 400, 200)
    x1, y1, x2, y2 = box_to_pixels(moved, 200, 100)
    assert math.isclose(x1, 50, abs_tol=0.6) and math.isclose(y1, 25, abs_tol=0.6)
    assert math.isclose(x2, 150, abs_tol=0.6) and math.isclose(y2, 75, abs_tol=0.6)
