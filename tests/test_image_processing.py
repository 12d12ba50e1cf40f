"""Tests for internvl.image_processing: V1.2 transform, dynamic tiling grid rule, placeholder expansion."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from internvl.constants import IMAGENET_MEAN, IMAGENET_STD
from internvl.image_processing import (
    ImageSettings,
    build_transform,
    dummy_pixel_values,
    dynamic_preprocess,
    expand2square,
    expand_image_placeholders,
    find_closest_aspect_ratio,
    image_block,
    images_to_pixel_values,
    num_image_tokens,
)


def _gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def test_transform_matches_reference_formula() -> None:
    image = _gradient(300, 200)
    out = build_transform(448)(image)
    assert out.shape == (3, 448, 448) and out.dtype == torch.float32
    ref = np.asarray(image.resize((448, 448), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    ref = (ref - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    torch.testing.assert_close(out, torch.from_numpy(ref).permute(2, 0, 1))


def test_white_dummy_tile_values() -> None:
    dummy = dummy_pixel_values(28)
    assert dummy.shape == (1, 3, 28, 28)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(dummy[0, :, 5, 5], expected)


def test_grayscale_and_pad2square() -> None:
    gray = Image.new("L", (40, 20), 255)
    padded = expand2square(gray.convert("RGB"), (1, 2, 3))
    assert padded.size == (40, 40)
    assert padded.getpixel((0, 0)) == (1, 2, 3) and padded.getpixel((20, 20)) == (255, 255, 255)
    assert padded.getpixel((20, 9)) == (1, 2, 3) and padded.getpixel((20, 10)) == (255, 255, 255)
    out = build_transform(40, pad2square=True)(gray)
    fill = torch.tensor([int(m * 255) / 255 for m in IMAGENET_MEAN])
    torch.testing.assert_close(out[:, 0, 0], (fill - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))


@pytest.mark.parametrize(
    "size, max_num, expected_grid",
    [
        ((448, 448), 6, (1, 1)),
        ((896, 448), 6, (2, 1)),
        ((448, 896), 6, (1, 2)),
        ((1000, 100), 6, (6, 1)),
        ((1000, 1000), 4, (2, 2)),  # tie (1,1)/(2,2): area 1e6 > 0.5*448^2*4 -> larger grid
        ((500, 500), 4, (1, 1)),    # tie, area 250000 < 401408 -> keep (1,1)
        ((1300, 1000), 12, (4, 3)),  # aspect 1.3: 4/3 beats 1/1 and 3/2
    ],
)
def test_grid_choice_rule(size, max_num, expected_grid) -> None:
    ratios = sorted({(i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1) if i * j <= max_num},
                    key=lambda r: (r[0] * r[1], r))
    assert find_closest_aspect_ratio(size[0] / size[1], ratios, size[0], size[1], 448) == expected_grid
    tiles = dynamic_preprocess(Image.new("RGB", size), 1, max_num, 448, use_thumbnail=False)
    assert len(tiles) == expected_grid[0] * expected_grid[1]
    assert all(t.size == (448, 448) for t in tiles)


def test_tiles_are_row_major_with_thumbnail_last() -> None:
    image = Image.new("RGB", (2 * 32, 2 * 32))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR
    for k, colour in enumerate(colours):
        image.paste(colour, ((k % 2) * 32, (k // 2) * 32, (k % 2 + 1) * 32, (k // 2 + 1) * 32))
    tiles = dynamic_preprocess(image, 1, 4, image_size=32, use_thumbnail=True)
    assert len(tiles) == 5
    assert [t.getpixel((16, 16)) for t in tiles[:4]] == colours
    assert tiles[4].size == (32, 32) and tiles[4].getpixel((4, 4)) == colours[0]


def test_images_to_pixel_values_v12_and_dynamic() -> None:
    images = [_gradient(64, 32), _gradient(30, 30)]
    pv, counts = images_to_pixel_values(images, ImageSettings(image_size=32))
    assert pv.shape == (2, 3, 32, 32) and counts == [1, 1]
    cfg = ImageSettings(image_size=32, dynamic_image_size=True, use_thumbnail=True, max_dynamic_patch=6)
    pv, counts = images_to_pixel_values(images, cfg)
    assert counts == [3, 1] and pv.shape == (4, 3, 32, 32)
    pv, counts = images_to_pixel_values(images, cfg, max_num=1)
    assert counts == [1, 1]
    with pytest.raises(ValueError):
        images_to_pixel_values([], cfg)


def test_settings_from_config_object() -> None:
    class Cfg:
        force_image_size = None
        vision_config = SimpleNamespace(image_size=224)
        dynamic_image_size = True
        use_thumbnail = True
        min_dynamic_patch = 1
        max_dynamic_patch = 12
        pad2square = False

    s = ImageSettings.from_config(Cfg())
    assert s.image_size == 224 and s.max_dynamic_patch == 12 and s.dynamic_image_size
    assert ImageSettings.from_config(SimpleNamespace()) == ImageSettings()


def test_placeholder_expansion() -> None:
    assert num_image_tokens(448, 14, 0.5) == 256
    assert num_image_tokens(224, 14, 0.5) == 64
    text = expand_image_placeholders("A <image>\nB <image>\nC", [1, 3], 2)
    assert text == "A " + image_block(1, 2) + "\nB " + image_block(3, 2) + "\nC"
    assert image_block(3, 2) == "<img>" + "<IMG_CONTEXT>" * 6 + "</img>"
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        expand_image_placeholders("<image> q", [1, 1], 256)
    with pytest.raises(ValueError, match="0 <image>"):
        expand_image_placeholders("q", [1], 256)


def test_settings_from_a_dict_config_are_honoured():
    """A config.json read as a dict gives the same settings as the config object (docs/foundations.md)."""
    from internvl.image_processing import ImageSettings

    settings = ImageSettings.from_config({"force_image_size": 32, "dynamic_image_size": True, "max_dynamic_patch": 4})
    assert (settings.image_size, settings.dynamic_image_size, settings.max_dynamic_patch) == (32, True, 4)
    assert ImageSettings.from_config({"vision_config": {"image_size": 64}}).image_size == 64
