#!/usr/bin/env python3
"""Data-loading throughput: samples/s of the training data path for 1,000 records of 448-px JPEGs.

What is timed is everything a training step waits for on the data side: jsonl line read, JPEG decode
(``internvl.data.images.load_image``), box-aware random resized crop with box rewriting (``data_augment: true``),
448 bicubic resize + normalisation, template + tokenisation + label masking, and collation (padding or packing) in
``--workers`` DataLoader worker processes. A mix of VQA, Region-to-Text, Text-to-Region and grounded-report records is
generated in a temporary directory (random-texture JPEGs, so decoding is not artificially cheap).

Usage::

    python3 -m lab.benchmarks.bench_dataloading                       # 1,000 records, 2 workers, padding
    python3 -m lab.benchmarks.bench_dataloading --pack --workers 4    # packing collator
    python3 -m lab.benchmarks.bench_dataloading --tokenizer /ckpt/medrega   # the real Yi tokenizer

This is a script, not a test: it prints numbers and checks nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from internvl.data.collate import PackedCollator, pad_collate
from internvl.data.dataset import build_training_dataset
from internvl.regions import format_region, pixels_to_box
from internvl.tokenization import load_tokenizer, train_sentencepiece_tokenizer

BASE = ("You are a helpful medical assistant. Your task is object detection. The region is represented in the form of "
        "bounding box, [x1, y1, x2, y2], with integers ranging from 0 to 999.")
ORGANS = ["liver", "spleen", "right kidney", "left kidney", "pancreas", "heart", "right lung", "left lung"]


def make_records(root: Path, n: int, size: int, rng: np.random.Generator) -> list[dict]:
    """Write ``n`` random-texture JPEGs and return mixed-task records referring to them."""
    records = []
    for i in range(n):
        noise = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC)
        name = f"img_{i:05d}.jpg"
        image.save(root / name, quality=90)
        organ = ORGANS[i % len(ORGANS)]
        x1, y1 = rng.integers(0, size // 2, 2)
        box = pixels_to_box((x1, y1, x1 + size // 4, y1 + size // 5), size, size)
        kind = i % 4
        if kind == 0:
            turns = ["<image>\nWhat organ is shown in this CT scan? Answer with a single word.", organ]
        elif kind == 1:
            turns = [f"<image>\nWhat is {format_region('this', [box])} in this CT scan?", organ]
        elif kind == 2:
            turns = [f"<image>\nPlease locate <ref>{organ}</ref> in this CT scan.", format_region(organ, [box])]
        else:
            turns = [f"<image>\nPlease locate the region and describe the condition of <ref>{organ}</ref>",
                     format_region(organ, [box]) + ": No focal lesion. Normal size and density. " * 3]
        records.append({"id": i, "image": name, "width": size, "height": size,
                        "conversations": [{"from": "human", "value": turns[0]}, {"from": "gpt", "value": turns[1]}]})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pack", action="store_true", help="use PackedCollator (8192 tokens per row)")
    parser.add_argument("--tokenizer", help="local tokenizer directory (default: a small SentencePiece one)")
    parser.add_argument("--epochs", type=int, default=2, help="passes; the first includes worker start-up")
    args = parser.parse_args()

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        t0 = time.perf_counter()
        records = make_records(work / "images", args.records, args.image_size, rng)
        with (work / "data.jsonl").open("w") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
        meta = {"bench": {"root": str(work / "images"), "annotation": str(work / "data.jsonl"),
                          "data_augment": True, "repeat_time": 1, "base_prompt": BASE}}
        (work / "meta.json").write_text(json.dumps(meta))
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
        else:
            corpus = [BASE] + [json.dumps(r["conversations"]) for r in records[:200]]
            tokenizer = load_tokenizer(train_sentencepiece_tokenizer(corpus, work / "tok", vocab_size=2000))
        print(f"setup: {len(records)} records + JPEGs {args.image_size}px in {time.perf_counter() - t0:.1f}s")

        t0 = time.perf_counter()
        dataset = build_training_dataset(work / "meta.json", tokenizer, None, max_seq_length=4096)
        print(f"dataset scan (offsets + record checks): {time.perf_counter() - t0:.2f}s for {len(dataset)} records")
        collate = PackedCollator(max_packed_tokens=8192) if args.pack else pad_collate
        # CPU time per sample in this process (insensitive to other load on the machine): the per-core capacity
        n_probe = min(100, len(dataset))
        dataset[0]
        c0 = time.process_time()
        collate([dataset[i] for i in range(n_probe)])
        cpu_ms = (time.process_time() - c0) / n_probe * 1000
        print(f"CPU time per sample (one process, build + collate): {cpu_ms:.1f} ms -> "
              f"{1000 / cpu_ms:.0f} samples/s per fully available core")
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                            collate_fn=collate, persistent_workers=args.workers > 0,
                            generator=torch.Generator().manual_seed(0))
        for epoch in range(args.epochs):
            t0 = time.perf_counter()
            samples = tokens = 0
            for batch in loader:
                samples += int(batch["pixel_values"].shape[0])  # one tile per sample here
                tokens += int(batch["input_ids"].numel())
            dt = time.perf_counter() - t0
            print(f"epoch {epoch}: {samples} samples in {dt:.2f}s -> {samples / dt:.1f} samples/s, "
                  f"{tokens / dt:,.0f} tokens/s (workers={args.workers}, batch={args.batch_size}, "
                  f"{'packed' if args.pack else 'padded'}, cpu_count={os.cpu_count()})")


if __name__ == "__main__":
    main()
