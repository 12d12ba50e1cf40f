"""Tests for internvl.data.transforms: boxes move with the pixels (checked on the pixels themselves)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from internvl.data.transforms import AugmentConfig, BoxAwareAugment, CropBox, crop_box, flip_box, sample_crop
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
def test_box_still_covers_the_same_pixels_after_crop_and_flip(seed: int) -> None:
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(300, 700)), int(rng.integers(300, 700))
    x1, y1 = int(rng.integers(40, width // 2)), int(rng.integers(40, height // 2))
    rect = (x1, y1, x1 + int(rng.integers(20, width // 3)), y1 + int(rng.integers(20, height // 3)))
    image = _scene(width, height, rect)
    box = pixels_to_box(rect, width, height)
    augment = BoxAwareAugment(AugmentConfig(hflip_prob=0.5))
    (out,), turns, applied = augment([image], _turns(box), rng)
    new_box = parse_regions(turns[1]["value"])[0].boxes[0]
    got = box_to_pixels(new_box, *out.size)
    extent = _white_extent(out)
    if applied["crop"] is not None:
        assert out.size == (applied["crop"].width, applied["crop"].height)
    tolerance = max(out.size) / 999 / 2 + 1.0  # half a grid step + one pixel of rasterisation
    for g, e in zip(got, extent):
        assert abs(g - e) <= tolerance, (applied, got, extent)
    assert 'Use "<ref>object</ref><box>[[x1, y1, x2, y2]]</box>"' in turns[0]["value"]  # notation untouched


def test_crops_happen_and_keep_every_box_inside() -> None:
    image = _scene(400, 300, (150, 100, 250, 200))
    box = pixels_to_box((150, 100, 250, 200), 400, 300)
    augment = BoxAwareAugment(AugmentConfig())
    crops = 0
    for seed in range(30):
        _, turns, applied = augment([image], _turns(box), np.random.default_rng(seed))
        crop = applied["crop"]
        if crop is not None:
            crops += 1
            assert crop.left <= 150 and crop.top <= 100 and crop.left + crop.width >= 250 and crop.top + crop.height >= 200
    assert crops >= 25


def test_crop_parameters_follow_scale_and_ratio() -> None:
    rng = np.random.default_rng(0)
    cfg = AugmentConfig()
    for _ in range(200):
        crop = sample_crop(448, 448, rng, cfg)
        assert crop is not None
        area = crop.width * crop.height / (448 * 448)
        assert 0.8 - 0.01 <= area <= 1.0 + 1e-9
        assert 3 / 4 - 0.02 <= crop.width / crop.height <= 4 / 3 + 0.02
        assert 0 <= crop.left <= 448 - crop.width and 0 <= crop.top <= 448 - crop.height
    # a box covering the whole image only fits the identity crop (torchvision's fallback for a square image)
    assert sample_crop(448, 448, rng, AugmentConfig(scale=(0.8, 0.95)), keep=[(0, 0, 448, 448)]) == CropBox(0, 0, 448, 448)
    # a wide image's fallback is centred with the aspect clamped to 4/3, which cuts a box at the left edge
    assert sample_crop(800, 100, rng, AugmentConfig(scale=(0.8, 0.81)), keep=[(0, 0, 10, 10)]) is None


def test_region_policy_off_and_non_region_samples() -> None:
    image = _scene(300, 300, (10, 10, 50, 50))
    box = pixels_to_box((10, 10, 50, 50), 300, 300)
    off = BoxAwareAugment(AugmentConfig(region_policy="off", hflip_prob=1.0))
    (out,), turns, applied = off([image], _turns(box), np.random.default_rng(0))
    assert out is image and turns == _turns(box) and applied["skipped"].startswith("region sample")
    plain = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "chest"}]
    (out,), turns, applied = off([image], plain, np.random.default_rng(0))
    assert applied["crop"] is not None and out.size != (300, 300) and turns == plain


def test_flip_is_exact_and_blocked_by_laterality() -> None:
    assert flip_box(Box(0, 10, 100, 20)) == Box(899, 10, 999, 20)
    assert flip_box(flip_box(Box(3, 4, 5, 6))) == Box(3, 4, 5, 6)
    image = _scene(200, 100, (10, 10, 60, 40))
    box = pixels_to_box((10, 10, 60, 40), 200, 100)
    flip_only = BoxAwareAugment(AugmentConfig(crop_prob=0.0, hflip_prob=1.0))
    (out,), turns, applied = flip_only([image], _turns(box, "right lung"), np.random.default_rng(0))
    assert not applied["flip"] and "laterality" in applied["skipped"] and turns == _turns(box, "right lung")
    (out,), turns, applied = flip_only([image], _turns(box, "liver"), np.random.default_rng(0))
    assert applied["flip"] and _white_extent(out) == (140, 10, 190, 40)
    assert parse_regions(turns[1]["value"])[0].boxes == [flip_box(box)]


def test_multi_image_with_boxes_is_left_alone() -> None:
    image = _scene(100, 100, (10, 10, 20, 20))
    turns = [{"from": "human", "value": "<image>\n<image>\nWhere?"},
             {"from": "gpt", "value": "<ref>x</ref><box>[[100, 100, 200, 200]]</box>"}]
    images, out_turns, applied = BoxAwareAugment()([image, image], turns, np.random.default_rng(0))
    assert applied["skipped"] == "multi-image sample with boxes" and out_turns == turns


def test_crop_box_conversion() -> None:
    crop = CropBox(left=100, top=50, width=200, height=100)
    box = pixels_to_box((150, 75, 250, 125), 400, 200)
    moved = crop_box(box, crop, 400, 200)
    x1, y1, x2, y2 = box_to_pixels(moved, 200, 100)
    assert math.isclose(x1, 50, abs_tol=0.6) and math.isclose(y1, 25, abs_tol=0.6)
    assert math.isclose(x2, 150, abs_tol=0.6) and math.isclose(y2, 75, abs_tol=0.6)
    with pytest.raises(ValueError):
        AugmentConfig(region_policy="sometimes")
