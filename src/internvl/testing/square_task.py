"""A trivially learnable Text-to-Region task for CPU training tests: one bright square on a dark, noisy image.

Images are `size` x `size` PNGs; the square (side `size // 3`) sits at one of 3 x 3 coarse positions with a few pixels
of jitter, so a tiny model can learn it in a few hundred steps while held-out images (other seeds) still differ from
the training ones. Records follow the MedRegInstruct format; answers use the shared box grammar (0-999).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from ..regions import format_region, pixels_to_box

QUESTION = "<image>\nPlease locate <ref>square</ref> in this image."
BASE_PROMPT = "Find the square."


def square_image(rng: random.Random, size: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A dark noisy image with one bright square; returns the image and the square's pixel box (x1, y1, x2, y2)."""
    side = size // 3
    starts = [0, (size - side) // 2, size - side]
    jitter = max(size // 20, 1)
    x = min(max(rng.choice(starts) + rng.randint(-jitter, jitter), 0), size - side)
    y = min(max(rng.choice(starts) + rng.randint(-jitter, jitter), 0), size - side)
    noise = np.random.default_rng(rng.randrange(2**31)).integers(0, 40, (size, size, 3), dtype=np.uint8)
    pixels = noise.copy()
    pixels[y:y + side, x:x + side] = rng.randint(200, 255)
    return Image.fromarray(pixels, "RGB"), (x, y, x + side, y + side)


def write_square_dataset(root: Path, n: int, seed: int, size: int = 56, name: str = "squares") -> Path:
    """Write `n` images + `<name>.jsonl` + `meta.json` under `root`; returns the meta file path."""
    root.mkdir(parents=True, exist_ok=True)
    images = root / "images"
    images.mkdir(exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        image, box = square_image(rng, size)
        rel = f"images/{name}_{seed}_{i:04d}.png"
        image.save(root / rel)
        answer = format_region("square", [pixels_to_box(box, size, size)])
        lines.append(json.dumps({"id": f"{name}-{i}", "image": rel, "width": size, "height": size,
                                 "conversations": [{"from": "human", "value": QUESTION},
                                                   {"from": "gpt", "value": answer}]}))
    annotation = root / f"{name}.jsonl"
    annotation.write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = root / "meta.json"
    meta.write_text(json.dumps({name: {"root": str(root), "annotation": str(annotation), "data_augment": False,
                                       "repeat_time": 1, "length": n, "base_prompt": BASE_PROMPT}}, indent=2),
                    encoding="utf-8")
    return meta
