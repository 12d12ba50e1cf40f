"""Fixtures for the data-core tests: the 11 MedRegA demo records with synthetic images, and a small meta file.

The records are ``tests/data/fixtures/medrega_demo.jsonl`` (a verbatim copy of the demo ``data_file.jsonl`` from the
spec). Their images are drawn with PIL at test time: a grey "body" with a bright structure inside every box of the
record, at the record's ``width``/``height`` (256 x 256 when absent), so box-aware transforms can be checked on pixels.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from internvl.regions import box_to_pixels, parse_regions
from medrega_demo_records import demo_records

IMAGE_PREFIX = "./demo_data/images/"


def draw_record_image(record: dict) -> Image.Image:
    """A synthetic image for ``record``: grey ellipse body, one white rectangle per box of the record."""
    width, height = record.get("width", 256), record.get("height", 256)
    image = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.05, height * 0.05, width * 0.95, height * 0.95), fill=(90, 90, 90))
    for turn in record["conversations"]:
        # strict=False: task prompts contain the notation "[[x1, y1, x2, y2]]", which is not a box
        for region in parse_regions(turn["value"], strict=False):
            for box in region.boxes:
                x1, y1, x2, y2 = box_to_pixels(box, width, height)
                draw.rectangle((round(x1), round(y1), round(x2) - 1, round(y2) - 1), fill=(255, 255, 255))
    return image


def write_demo_dataset(directory: Path) -> tuple[Path, Path]:
    """Write ``images/`` and ``demo.jsonl`` (image paths relative to ``images/``); returns (root, annotation)."""
    root = directory / "images"
    root.mkdir(parents=True, exist_ok=True)
    records = demo_records()
    for record in records:
        name = record["image"].removeprefix(IMAGE_PREFIX)
        path = root / name
        if not path.exists():
            draw_record_image(record).save(path, quality=95)
    annotation = directory / "demo.jsonl"
    with annotation.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps({**record, "image": record["image"].removeprefix(IMAGE_PREFIX)}, ensure_ascii=False) + "\n")
    return root, annotation


@pytest.fixture(scope="session")
def demo_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with ``images/``, ``demo.jsonl`` (11 records), ``text.jsonl`` (3 text-only records, one multi-turn)
    and ``meta.json`` registering both (demo with data_augment, text with repeat_time 2)."""
    directory = tmp_path_factory.mktemp("demo_data")
    root, annotation = write_demo_dataset(directory)
    text = directory / "text.jsonl"
    rows = [
        {"id": "t0", "conversations": [{"from": "human", "value": "What is pleural effusion?"},
                                       {"from": "gpt", "value": "Fluid between the pleural layers."}]},
        {"id": "t1", "conversations": [{"from": "human", "value": "胸腔积液是什么？"}, {"from": "gpt", "value": "胸膜腔内液体增多。"},
                                       {"from": "human", "value": "常见吗？"}, {"from": "gpt", "value": "常见。"}]},
        {"id": "t2", "conversations": [{"from": "human", "value": "Name an organ."}, {"from": "gpt", "value": "liver"}]},
    ]
    text.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    meta = {
        "demo": {"root": str(root), "annotation": str(annotation), "data_augment": True, "repeat_time": 1,
                 "length": 11, "base_prompt": ""},
        "text_only": {"root": str(directory), "annotation": str(text), "data_augment": False, "repeat_time": 2,
                      "base_prompt": "You are a helpful medical assistant."},
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return directory
