#!/usr/bin/env python3
"""Build MedReg-mini: a small MedRegInstruct-format dataset from real medical images that install from registries.

    apt-get install -y mricron-data invesalius-examples      # brain MRI + atlas, head CT
    pip install scikit-image pydicom                          # fundus, IHC pathology, DICOM test images
    python3 -m scripts.build_medreg_mini --out data/built/medreg_mini

What comes out (see ``data/medreg_mini/README.md`` for the dataset card):

* ``images/{train,test}/<source>/*.jpg``: slices, frames and tiles (crops are baked in, boxes recomputed from the
  label maps, so every box is exact for its image).
* ``{train,test}/<task>.jsonl``: MedRegInstruct records (``id``, ``image``, ``width``, ``height``, ``conversations``,
  ``source``) made by :func:`internvl.data.prompts.build_record` and put in the trainer's prompt order
  (``<image>\n`` first), English and Chinese: Text-to-Region and Region-to-Text on brain
  MRI (AAL structures) and head CT (head / bone / brain), modality / body-part / plane VQA, body-part classification,
  grounded structure listings and short factual reports. ``test/modality.jsonl`` repeats the modality questions of
  ``test/vqa.jsonl`` on their own (the modality-accuracy benchmark).
* ``meta_file.json`` (training datasets, the trainer's registry) and ``meta_test.json`` (the test files).
* ``manifest.json``: counts per split, task, source and language, the seed and the versions of the sources.

The split is by source image (slice block, DICOM file, slide region; see ``scripts/medreg_mini_sources.py``): no test
image is a crop, window or frame of a training image. Everything is deterministic for a given ``--seed``.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from internvl.offline import enforce_offline

enforce_offline()  # the builder reads data installed from package registries only

from internvl.data.encode import apply_prompt_order
from internvl.data.images import load_image
from internvl.data.prompts import build_record, render_base_prompt
from internvl.regions import pixels_to_box
from scripts import medreg_mini_sources as src
from scripts import medreg_mini_userturns as user

TASK_FILES = ("text_to_region", "region_to_text", "vqa", "classification", "grounded", "report",
              # user-style kinds (scripts/medreg_mini_userturns.py); multi_turn is written for training only
              "user_text_to_region", "absent", "user_vqa", "diagnosis", "multi_turn")
# test-only files from the frozen held-out phrasings (data/medreg_mini/paraphrase_heldout.yaml)
HELDOUT_FILES = ("paraphrase_text2region", "paraphrase_absent", "paraphrase_vqa", "paraphrase_diagnosis")
# registry tasks whose training records are also written without their preamble (--plain-fraction): the question
# alone is a complete request for these (classification needs the option list of its preamble; reports have no
# question)
PLAIN_TASKS = ("text_to_region", "region_to_text", "vqa_open")

# VQA questions (EN, ZH) per fact; answers come from Item fields. The modality question is the original demo's.
VQA_QUESTIONS = {
    "modality": (["What modality is used to take this image?", "Which imaging modality is this?"],
                 ["这张图片的成像方式是什么?", "这是什么成像方式?"]),
    "body_part": (["Which part of the body does this image belong to?", "What body part is shown?"],
                  ["图像里包含的区域属于身体哪个部分?", "这张图像显示的是身体哪个部位?"]),
    "plane": (["In which plane is this image?", "What is the scanning plane of this image?"],
              ["这张图像是哪个扫描平面?", "这张图像的成像平面是什么?"]),
}
BODY_PARTS = ("brain", "head", "spine", "abdomen", "neck", "whole body", "eye", "colon", "skin")
BODY_PARTS_ZH = {"brain": "脑", "head": "头部", "spine": "脊柱", "abdomen": "腹部", "neck": "颈部", "whole body": "全身",
                 "eye": "眼", "colon": "结肠", "skin": "皮肤"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("data/built/medreg_mini"), help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crops", type=int, default=4, help="random crops per training slice (test: 1)")
    p.add_argument("--max-side", type=int, default=224, help="images are downscaled to this longer side")
    p.add_argument("--zh-fraction", type=float, default=0.4, help="share of records written in Chinese")
    p.add_argument("--quality", type=int, default=92, help="JPEG quality of the written images")
    p.add_argument("--quick", action="store_true", help="every 8th slice only (tests, smoke runs)")
    p.add_argument("--plain-fraction", type=float, default=0.4,
                   help="share of training Text-to-Region / Region-to-Text / VQA registry records written without the "
                        "task preamble (the question alone, as users type it); test files keep the preamble")
    p.add_argument("--max-items", type=int, default=None, help="only the first N images (tests)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------------- items
def all_items(args: argparse.Namespace, rng: np.random.Generator) -> Iterator[src.Item]:
    """Every image of the dataset: uncropped slices plus their crops (train: ``--crops``, test: 1), DICOM images
    and crops, fundus/pathology tiles."""
    step = 8 if args.quick else 2
    for item in (*src.brain_items(step=step), *src.ct_items(step=step * 2 if args.quick else step)):
        yield item
        n = args.crops if item.split == "train" else 1
        if item.source == "head_ct":  # three windows per slice already: fewer crops each
            n = max(1, n // 2) if item.split == "train" else (1 if item.name.endswith("softtissue") else 0)
        for k in range(n):
            yield src.crop_item(item, rng, 0.7, 40, f"c{k}")
    yield from src.dicom_items(load_image, n_crops=4 if args.quick else 24, rng=rng)
    yield from src.photo_items(n_tiles=8 if args.quick else 48, rng=rng)


def save_image(item: src.Item, out: Path, max_side: int, quality: int) -> tuple[str, int, int, float]:
    """Write the item's image (downscaled to ``max_side``) as JPEG; return (relative path, width, height, scale)."""
    img = Image.fromarray(item.pixels)
    scale = min(1.0, max_side / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
    grey = item.pixels.ndim == 2 or bool(np.all(item.pixels[..., 0] == item.pixels[..., 1]))
    rel = Path("images") / item.split / item.source / f"{item.name}.jpg"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (img.convert("L") if grey else img.convert("RGB")).save(out / rel, quality=quality)
    return rel.as_posix(), img.width, img.height, scale


# ------------------------------------------------------------------------------------------------------- records
def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def distinct_regions(regions: list[src.RegionAnn], width: int, height: int) -> list[src.RegionAnn]:
    """Regions whose (single) box is not nearly identical (IoU > 0.85 on the 0..999 grid) to another region's box:
    only those make unambiguous Region-to-Text questions (head CT "head" and "bone" often share a box)."""
    def grid(r: src.RegionAnn) -> tuple[int, ...]:
        b = pixels_to_box(r.boxes[0], width, height)
        return (b.x1, b.y1, b.x2, b.y2)

    single = [r for r in regions if len(r.boxes) == 1]
    return [r for r in single if all(r is o or _iou(grid(r), grid(o)) <= 0.85 for o in single)]


def paired_structures(regions: list[src.RegionAnn]) -> list[src.RegionAnn]:
    """"frontal lobe" with both sides' boxes when the left and right structure are both visible (multi-box answers)."""
    by_name = {r.name_en: r for r in regions}
    out = []
    for r in regions:
        if r.name_en.startswith("left "):
            other = by_name.get("right " + r.name_en[5:])
            if other is not None and len(r.boxes) == 1 and len(other.boxes) == 1:
                boxes = tuple(sorted(r.boxes + other.boxes))
                out.append(src.RegionAnn(r.name_en[5:], r.name_zh[2:], boxes))
    return out


def scaled_regions(item: src.Item, scale: float) -> list[src.RegionAnn]:
    """The item's regions in the saved (downscaled) image's pixels."""
    return [src.RegionAnn(r.name_en, r.name_zh, tuple(tuple(v * scale for v in b) for b in r.boxes))
            for r in item.regions]


def records_for(item: src.Item, rel: str, w: int, h: int, scale: float, rng: random.Random,
                zh_fraction: float, balance: dict[str, float], plain: tuple[random.Random, float] | None = None
                ) -> Iterator[tuple[str, str, dict]]:
    """(task file, language, record) for one saved image. Pixel boxes are scaled with the image. ``plain`` =
    (its own rng, share): registry records of PLAIN_TASKS lose their preamble with that probability, and Text-to-Region
    English ones take the demo's shorter preamble variant in a third of the rest (training); the plain rng is separate, so the
    records themselves come out as they would without it."""
    regions = scaled_regions(item, scale)

    def lang() -> str:
        return "zh" if rng.random() < zh_fraction else "en"

    def pairs(rs: list[src.RegionAnn], zh: bool) -> list[tuple[str, list]]:
        return [((r.name_zh if zh else r.name_en), [list(b) for b in r.boxes]) for r in rs]

    def rec(task: str, ln: str, **fields: object) -> dict:
        with_base, variant = True, "default"
        if plain is not None and task in PLAIN_TASKS:
            with_base = plain[0].random() >= plain[1]
            if task == "text_to_region" and ln == "en" and with_base and plain[0].random() < 1 / 3:
                variant = "demo"
        return build_record(task, ln, image=rel, width=w, height=h, rng=rng, include_base_prompt=with_base,
                            prompt_variant=variant, **fields)

    modality_en, modality_zh = src.MODALITIES[item.modality]
    mod = {"en": "MRI" if item.modality == "MRI" else modality_en, "zh": modality_zh}
    if regions:
        singles = rng.sample(regions, min(len(regions), 3))
        for r in singles:
            ln = lang()
            yield "text_to_region", ln, rec("text_to_region", ln, modality=mod[ln], regions=pairs([r], ln == "zh"),
                                            box_units="pixel")
        both = paired_structures(regions)
        if both:
            ln = lang()
            yield "text_to_region", ln, rec("text_to_region", ln, modality=mod[ln],
                                            regions=pairs([rng.choice(both)], ln == "zh"), box_units="pixel")
        if len(regions) >= 2 and rng.random() < 0.5:
            ln = lang()
            two = rng.sample(regions, 2)
            yield "text_to_region", ln, rec("text_to_region", ln, modality=mod[ln], regions=pairs(two, ln == "zh"),
                                            box_units="pixel")
        distinct = distinct_regions(regions, w, h)
        for r in rng.sample(distinct, min(len(distinct), 2)):
            ln = lang()
            yield "region_to_text", ln, rec("region_to_text", ln, modality=mod[ln], regions=pairs([r], ln == "zh"),
                                            box_units="pixel")
        if item.plane == "axial" and rng.random() < 0.3:
            ln = lang()
            text = "normal appearance" if ln == "en" else "未见异常"
            if item.source != "brain_mri":
                text = "visible in this slice" if ln == "en" else "在本层面可见"
            findings = [(pairs([r], ln == "zh"), text) for r in regions]
            yield "grounded", ln, build_record("grounded_whole", ln, image=rel, width=w, height=h, rng=rng,
                                               modality=mod[ln], findings=findings, box_units="pixel")
    # image-level facts; the modality question is sub-sampled per class so the classes are roughly balanced
    if rng.random() < balance.get(item.modality, 1.0):
        ln = lang()
        answer = modality_zh if ln == "zh" else modality_en
        r = rec("vqa_open", ln, question=rng.choice(VQA_QUESTIONS["modality"][ln == "zh"]), answer=answer)
        yield "vqa", ln, {**r, "question_type": "modality"}
    if rng.random() < 0.5 * balance.get(item.modality, 1.0):
        ln = lang()
        answer = item.body_part[1] if ln == "zh" else item.body_part[0]
        r = rec("vqa_open", ln, question=rng.choice(VQA_QUESTIONS["body_part"][ln == "zh"]), answer=answer)
        yield "vqa", ln, {**r, "question_type": "body_part"}
        ln = lang()
        options = list(BODY_PARTS) if ln == "en" else [BODY_PARTS_ZH[b] for b in BODY_PARTS]
        label = item.body_part[1] if ln == "zh" else item.body_part[0]
        yield "classification", ln, rec("classify_single", ln, modality=mod[ln], options=options, label=label,
                                        target="organ")
    if item.plane is not None and rng.random() < 0.3:
        ln = lang()
        en, zh = src.PLANES[item.plane]
        r = rec("vqa_open", ln, question=rng.choice(VQA_QUESTIONS["plane"][ln == "zh"]), answer=zh if ln == "zh" else en)
        yield "vqa", ln, {**r, "question_type": "plane"}
    if item.plane is not None and regions and rng.random() < 0.15:
        ln = lang()
        names = sorted({r.name_zh if ln == "zh" else r.name_en for r in regions})
        if ln == "en":
            findings = (f"{item.plane.capitalize()} {mod['en']} slice of the {item.body_part[0]}. "
                        f"Visible structures: {', '.join(names)}.")
            impression = "Normal brain (healthy volunteer)." if item.source == "brain_mri" else \
                f"{item.plane.capitalize()} head CT slice."
        else:
            findings = f"{mod['zh']}{src.PLANES[item.plane][1]}{item.body_part[1]}图像。可见结构：{'、'.join(names)}。"
            impression = "脑部未见异常（健康志愿者）。" if item.source == "brain_mri" else "头部CT图像。"
        yield "report", ln, rec("report_general", ln, findings=findings, impression=impression)


def modality_balance(items_per_modality: Counter) -> dict[str, float]:
    """Keep-probability per modality so that each contributes about as many modality questions as the rarest."""
    least = min(items_per_modality.values())
    return {m: min(1.0, 3 * least / n) for m, n in items_per_modality.items()}


# -------------------------------------------------------------------------------------------------------- main
def build(args: argparse.Namespace) -> dict:
    """Build the dataset into ``args.out``; return the manifest."""
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise SystemExit(f"{out}: exists, is not empty and is not a MedReg-mini build; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    np_rng = np.random.default_rng(args.seed)
    py_rng = random.Random(args.seed)
    items = list(all_items(args, np_rng))
    if args.max_items is not None:  # tests: a few images of each split
        items = [it for it in items if it.split == "train"][:args.max_items] + \
                [it for it in items if it.split == "test"][:args.max_items]
    names = Counter((it.split, it.source, it.name) for it in items)
    dupes = [k for k, n in names.items() if n > 1]
    if dupes:
        raise RuntimeError(f"duplicate image names: {dupes[:5]}")
    leaks = {it.split_key for it in items if it.split == "train"} & {it.split_key for it in items if it.split == "test"}
    if leaks:
        raise RuntimeError(f"split keys in both train and test: {sorted(leaks)[:5]}")
    balance = {split: modality_balance(Counter(it.modality for it in items if it.split == split))
               for split in ("train", "test")}
    files = {(split, task): [] for split in ("train", "test") for task in (*TASK_FILES, *HELDOUT_FILES)}
    counts: Counter = Counter()
    _, train_raw = user.load_phrasings(user.TRAIN_PHRASINGS)
    # separate streams: the registry records (py_rng) come out as before; user-style and held-out records have their own
    plain = (random.Random(args.seed * 7919 + 1), args.plain_fraction)
    makers = {"user": user.make_maker(user.TRAIN_PHRASINGS, random.Random(args.seed * 7919 + 2), train_raw),
              "heldout": user.make_maker(user.HELDOUT_PHRASINGS, random.Random(args.seed * 7919 + 3), train_raw)}
    for n, item in enumerate(items):
        rel, w, h, scale = save_image(item, out, args.max_side, args.quality)
        keep = balance[item.split].get(item.modality, 1.0)
        regions = scaled_regions(item, scale)
        produced = [*records_for(item, rel, w, h, scale, py_rng, args.zh_fraction, balance[item.split],
                                 plain if item.split == "train" else None),
                    *user.user_records(item, regions, rel, w, h, makers["user"], args.zh_fraction, keep,
                                       train=item.split == "train")]
        if item.split == "test":
            produced += user.heldout_records(item, regions, rel, w, h, makers["heldout"], args.zh_fraction, keep)
        for task, ln, record in produced:
            if task in TASK_FILES[:6]:
                # stored in the trainer's prompt order ("<image>\n" + task prompt + question), so that evaluation and
                # the demo, which send the human turn verbatim, ask exactly what the model was trained on
                record["conversations"] = apply_prompt_order(record["conversations"], 1)
            record = {"id": f"{item.split}-{task}-{len(files[(item.split, task)]):06d}", **record}
            record["source"] = item.source
            files[(item.split, task)].append(record)
            counts[(item.split, task, item.source, ln)] += 1
        if n % 500 == 0:
            print(f"{n}/{len(items)} images", file=sys.stderr)
    # the modality questions of the test split again, alone: the "modality accuracy vs majority class" benchmark
    files[("test", "modality")] = [r for r in files[("test", "vqa")] if r.get("question_type") == "modality"]
    meta_train, meta_test = {}, {}
    for (split, task), records in files.items():
        if not records:
            continue
        path = out / split / f"{task}.jsonl"
        if task == "modality":  # a subset of test/vqa.jsonl, not a training dataset
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        # meta paths are read relative to the working directory (as the original trainer does): written as --out was
        # given, so a relative --out means "run the trainer from the same directory"
        entry = {"root": str(out), "annotation": str(out / split / f"{task}.jsonl"), "length": len(records),
                 "repeat_time": 1,
                 "data_augment": False, "base_prompt": "", "max_dynamic_patch": 1}
        (meta_train if split == "train" else meta_test)[f"medreg_mini_{split}_{task}"] = entry
    (out / "meta_file.json").write_text(json.dumps(meta_train, indent=2) + "\n", encoding="utf-8")
    (out / "meta_test.json").write_text(json.dumps(meta_test, indent=2) + "\n", encoding="utf-8")
    manifest = {
        "seed": args.seed, "crops": args.crops, "max_side": args.max_side, "quick": args.quick,
        "plain_fraction": args.plain_fraction, "max_items": args.max_items,
        "images": dict(Counter(f"{it.split}/{it.source}" for it in items)),
        "records": {"/".join(k): v for k, v in sorted(counts.items())},
        "totals": {split: sum(len(v) for (s, _), v in files.items() if s == split) for split in ("train", "test")},
        "base_prompt_check": render_base_prompt("region_to_text", "en")[:40],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = build(args)
    except (src.SourceError, user.PhrasingError) as exc:
        print(f"build_medreg_mini: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), **manifest["totals"], "images": sum(manifest["images"].values())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
