"""Box drawing of the demo: boxes land where the 0..999 grid says, every box is labelled, CJK names survive."""
from __future__ import annotations

import numpy as np
from PIL import Image

from internvl.demo.drawing import PALETTE, draw_regions
from internvl.regions import Box, Region, parse_regions


def _grey(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.full((h, w, 3), 40, dtype=np.uint8))


def test_box_outline_is_drawn_at_grid_position() -> None:
    img = _grey(400, 200)
    regions = parse_regions("<ref>left frontal lobe</ref><box>[[0, 0, 499, 999]]</box>")
    out, drawn = draw_regions(img, regions, min_side=100, min_long_side=100)
    assert out.size == (400, 200)  # large enough: not upscaled
    assert len(drawn) == 1 and drawn[0].label == "left frontal lobe"
    x1, y1, x2, y2 = drawn[0].xyxy
    assert (x1, y1) == (0.0, 0.0) and abs(x2 - 499 / 999 * 400) < 1e-6 and y2 == 200.0
    arr = np.asarray(out).astype(int)
    color = np.array(PALETTE[0])
    # the right edge of the box (x ~ 200) is drawn in the region colour at mid height, away from the label
    col = arr[150, 195:205]
    assert (np.abs(col - color).sum(axis=1) == 0).any()
    # far outside the box the image is untouched
    assert (arr[100, 350] == 40).all()


def test_multiple_regions_get_distinct_colours_and_all_boxes() -> None:
    regions = [Region("a", [Box(10, 10, 100, 100), Box(500, 500, 600, 600)]), Region("b", [Box(700, 100, 900, 300)])]
    _, drawn = draw_regions(_grey(300, 300), regions, min_side=300)
    assert [d.label for d in drawn] == ["a", "a", "b"]
    assert drawn[0].color == drawn[1].color != drawn[2].color


def test_small_images_are_upscaled_and_chinese_labels_render() -> None:
    regions = [Region("左侧额叶", [Box(100, 100, 400, 600)]), Region(None, [Box(600, 600, 900, 900)])]
    out, drawn = draw_regions(_grey(181, 217), regions, min_side=384)
    assert min(out.size) >= 384
    assert drawn[0].label == "左侧额叶" and drawn[1].label == "2"
    # pixel coordinates refer to the original image
    assert drawn[0].xyxy[2] <= 181
