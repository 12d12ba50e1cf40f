#!/usr/bin/env python3
"""Trivial baselines on the MedReg-mini test split, written as prediction files that ``medrega-eval score`` reads.

    python3 scripts/medreg_mini_baselines.py --data data/built/medreg_mini --out runs/baselines
    medrega-eval score runs/baselines/text2region_mean_box.jsonl --benchmark medreg_mini_text2region --out ...

Baselines (none looks at the image):

* ``text2region_mean_box``: every queried object gets the mean of all training answer boxes (one box per object).
* ``text2region_name_mean_box``: every object gets the mean training box of that object name (a text-only prior;
  falls back to the global mean box for a name unseen in training).
* ``region2text_majority``: the most frequent training answer of the record's language.
* ``modality_majority``, ``classification_majority``, ``vqa_majority``: the most frequent *test* answer of the
  record's language (per question type for VQA) - the best any constant answer can do on this split.
* the user-style and held-out paraphrase splits (issue #17), when the build has them: ``<split>_mean_box`` and
  ``<split>_name_mean_box`` for the free-form Text-to-Region files (the same training priors),
  ``<split>_majority`` (most frequent test answer per language and question type) for the VQA-style files, and
  ``<split>_not_visible`` (always "not visible" in the question's language, no box) for the absent-name files - the
  absent-name accuracy is only meaningful beside the free-form Text-to-Region box rate, which that answer zeroes.

Each file holds one JSON object per test record: ``id``, ``prediction``, ``reference``, ``question``, ``width``,
``height``.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from internvl.regions import Box, Region, format_regions, parse_regions


def read(path: Path) -> list[dict]:
    """Records of a jsonl file; a bad line stops with FILE:LINE."""
    out = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
    return out


def lang_of(rec: dict) -> str:
    """"zh" when the question has CJK characters, else "en"."""
    q = rec["conversations"][0]["value"]
    return "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in q) else "en"


def answer(rec: dict) -> str:
    return rec["conversations"][1]["value"]


def mean_box(boxes: list[Box]) -> Box:
    n = len(boxes)
    vals = [round(sum(getattr(b, k) for b in boxes) / n) for k in ("x1", "y1", "x2", "y2")]
    return Box(*vals)


def write(path: Path, test: list[dict], predict) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in test:
            row = {"id": rec["id"], "prediction": predict(rec), "reference": answer(rec),
                   "question": rec["conversations"][0]["value"], "width": rec.get("width"),
                   "height": rec.get("height")}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(test)


# user-style / paraphrase test files -> their benchmark names (src/medrega_eval/benchmarks/medreg_mini.yaml)
USER_T2R = {"user_text_to_region": "text2region_free", "paraphrase_text2region": "para_text2region"}
USER_VQA = {"user_vqa": "vqa_free", "diagnosis": "diagnosis", "paraphrase_vqa": "para_vqa",
            "paraphrase_diagnosis": "para_diagnosis"}
USER_ABSENT = {"absent": "absent", "paraphrase_absent": "para_absent"}
NOT_VISIBLE = {"en": "Not visible in this image.", "zh": "这张图像中未见。"}


def user_split_baselines(d: Path, out: Path, global_mean: Box, name_mean: dict[str, Box]) -> dict[str, int]:
    """Baseline prediction files for the user-style and paraphrase splits present in the build (named after the
    benchmark: ``para_text2region_name_mean_box.jsonl`` ...)."""
    counts: dict[str, int] = {}
    for file, bench in USER_T2R.items():
        if (d / "test" / f"{file}.jsonl").is_file():
            test = read(d / "test" / f"{file}.jsonl")
            names = lambda r: [x.name or "" for x in parse_regions(answer(r))]  # noqa: E731
            counts[f"{bench}_mean_box"] = write(out / f"{bench}_mean_box.jsonl", test, lambda r: format_regions(
                [Region(n, [global_mean]) for n in names(r)]))
            counts[f"{bench}_name_mean_box"] = write(out / f"{bench}_name_mean_box.jsonl", test, lambda r: format_regions(
                [Region(n, [name_mean.get(n, global_mean)]) for n in names(r)]))
    for file, bench in USER_VQA.items():
        if (d / "test" / f"{file}.jsonl").is_file():
            test = read(d / "test" / f"{file}.jsonl")
            groups: dict[tuple, Counter] = defaultdict(Counter)
            for r in test:
                groups[(lang_of(r), r.get("question_type"))][answer(r)] += 1
            best = {g: c.most_common(1)[0][0] for g, c in groups.items()}
            counts[f"{bench}_majority"] = write(out / f"{bench}_majority.jsonl", test,
                                                lambda r, b=best: b[(lang_of(r), r.get("question_type"))])
    for file, bench in USER_ABSENT.items():
        if (d / "test" / f"{file}.jsonl").is_file():
            counts[f"{bench}_not_visible"] = write(out / f"{bench}_not_visible.jsonl", read(d / "test" / f"{file}.jsonl"),
                                                   lambda r: NOT_VISIBLE[lang_of(r)])
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/built/medreg_mini"))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    d = args.data

    # Text-to-Region: global mean box and per-name mean box from the training answers
    train_t2r = read(d / "train" / "text_to_region.jsonl")
    all_boxes: list[Box] = []
    by_name: dict[str, list[Box]] = defaultdict(list)
    for rec in train_t2r:
        for region in parse_regions(answer(rec)):
            all_boxes.extend(region.boxes)
            by_name[region.name or ""].extend(region.boxes)
    global_mean = mean_box(all_boxes)
    name_mean = {name: mean_box(boxes) for name, boxes in by_name.items()}
    test_t2r = read(d / "test" / "text_to_region.jsonl")

    def names(rec: dict) -> list[str]:
        return [r.name or "" for r in parse_regions(answer(rec))]

    counts = {
        "text2region_mean_box": write(args.out / "text2region_mean_box.jsonl", test_t2r, lambda r: format_regions(
            [Region(n, [global_mean]) for n in names(r)])),
        "text2region_name_mean_box": write(args.out / "text2region_name_mean_box.jsonl", test_t2r,
                                           lambda r: format_regions([Region(n, [name_mean.get(n, global_mean)])
                                                                     for n in names(r)])),
    }

    # Region-to-Text: majority training answer per language
    r2t_major = {ln: Counter(answer(r) for r in read(d / "train" / "region_to_text.jsonl") if lang_of(r) == ln)
                 .most_common(1)[0][0] for ln in ("en", "zh")}
    counts["region2text_majority"] = write(args.out / "region2text_majority.jsonl",
                                           read(d / "test" / "region_to_text.jsonl"), lambda r: r2t_major[lang_of(r)])

    # constant answers that are best on the test split itself (per language, and per question type for VQA)
    for name, file, key in (("modality_majority", "modality", None), ("classification_majority", "classification",
                                                                       None), ("vqa_majority", "vqa", "question_type")):
        test = read(d / "test" / f"{file}.jsonl")
        groups: dict[tuple, Counter] = defaultdict(Counter)
        for r in test:
            groups[(lang_of(r), r.get(key) if key else None)][answer(r)] += 1
        best = {g: c.most_common(1)[0][0] for g, c in groups.items()}
        counts[name] = write(args.out / f"{name}.jsonl", test,
                             lambda r, k=key, b=best: b[(lang_of(r), r.get(k) if k else None)])
    counts.update(user_split_baselines(d, args.out, global_mean, name_mean))
    (args.out / "baselines.json").write_text(json.dumps({
        "global_mean_box": [global_mean.x1, global_mean.y1, global_mean.x2, global_mean.y2],
        "region2text_majority": r2t_major, "records": counts}, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
