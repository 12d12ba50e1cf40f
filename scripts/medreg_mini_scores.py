#!/usr/bin/env python3
"""One table of the bundled model's MedReg-mini scores beside the trivial baselines, with issue #17's targets.

    python3 scripts/medreg_mini_scores.py --eval RUN/eval --baselines RUN/baselines_scored --out RUN/scores.md

``--eval``: the ``--out`` folder of ``medrega-eval run`` (one ``<benchmark>/summary.json`` each); ``--baselines``: a
folder of ``<baseline>/summary.json`` written by ``medrega-eval score`` on the files of
``scripts/medreg_mini_baselines.py`` (the baseline's file stem names its benchmark). Writes the markdown table to
``--out`` and the same numbers as JSON beside it (``.json``). Missing summaries are shown as "-", never invented.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# benchmark -> metrics shown (first = headline); lang_match is added to every row
ROWS: dict[str, tuple[str, ...]] = {
    "medreg_mini_text2region": ("acc50", "iou", "box_rate"),
    "medreg_mini_modality": ("exact_match",),
    "medreg_mini_vqa": ("exact_match",),
    "medreg_mini_classification": ("accuracy", "macro_f1"),
    "medreg_mini_region2text": ("accuracy", "bleu1"),
    "medreg_mini_grounded": ("acc50", "iou", "bleu1", "rougeL"),
    "medreg_mini_report": ("bleu1", "bleu4", "rougeL"),
    "medreg_mini_text2region_free": ("box_rate", "acc50", "iou"),
    "medreg_mini_absent": ("absent_accuracy",),
    "medreg_mini_vqa_free": ("exact_match",),
    "medreg_mini_diagnosis": ("exact_match",),
    "medreg_mini_para_text2region": ("box_rate", "acc50", "iou"),
    "medreg_mini_para_absent": ("absent_accuracy",),
    "medreg_mini_para_vqa": ("exact_match",),
    "medreg_mini_para_diagnosis": ("exact_match",),
}
BASELINE_SUFFIXES = ("_name_mean_box", "_mean_box", "_majority", "_not_visible")


def load(path: Path) -> dict | None:
    """A summary.json, or None when it is not there."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def baselines_by_benchmark(folder: Path | None) -> dict[str, dict[str, dict]]:
    """{benchmark: {baseline name: summary}} from ``folder/<stem>/summary.json``."""
    out: dict[str, dict[str, dict]] = {}
    for summary_path in sorted(folder.glob("*/summary.json")) if folder else []:
        stem = summary_path.parent.name
        suffix = next((s for s in BASELINE_SUFFIXES if stem.endswith(s)), None)
        if suffix is None:
            continue
        out.setdefault("medreg_mini_" + stem[: -len(suffix)], {})[suffix.lstrip("_")] = load(summary_path) or {}
    return out


def fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def table(eval_dir: Path, base: dict[str, dict[str, dict]]) -> tuple[str, dict]:
    """(markdown, numbers) for every benchmark of ROWS that has a summary."""
    lines = ["| benchmark (records) | metrics | model | language match | trivial baselines |", "|---|---|---:|---:|---|"]
    numbers: dict[str, dict] = {}
    for bench, metrics in ROWS.items():
        s = load(eval_dir / bench / "summary.json")
        if s is None:
            continue
        numbers[bench] = {m: s.get(m) for m in (*metrics, "lang_match")} | {"records": s.get("num_samples")}
        b = "; ".join(f"{name} " + " / ".join(fmt(bs.get(m)) for m in metrics)
                      for name, bs in base.get(bench, {}).items())
        numbers[bench]["baselines"] = {name: {m: bs.get(m) for m in metrics} for name, bs in base.get(bench, {}).items()}
        lines.append(f"| `{bench}` ({s.get('num_samples')}) | {' / '.join(metrics)} | "
                     f"{' / '.join(fmt(s.get(m)) for m in metrics)} | {fmt(s.get('lang_match'))} | {b or '-'} |")
    return "\n".join(lines) + "\n", numbers


def targets(numbers: dict) -> tuple[str, dict]:
    """Issue #17's targets, each with its value and whether it is met."""
    def get(bench: str, metric: str) -> float | None:
        v = numbers.get(bench, {}).get(metric)
        return float(v) if isinstance(v, (int, float)) else None

    def weighted(benches: list[str], metric: str) -> float | None:
        pairs = [(get(b, metric), numbers[b].get("records") or 0) for b in benches if get(b, metric) is not None]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else None

    langs = [b for b in numbers if get(b, "lang_match") is not None]
    acc = get("medreg_mini_text2region", "acc50")
    prior = numbers.get("medreg_mini_text2region", {}).get("baselines", {}).get("name_mean_box", {}).get("acc50")
    rows = {
        "answers in the question's language (all splits, record-weighted) >= 0.95": (weighted(langs, "lang_match"), 0.95),
        "free-form Text-to-Region box rate (test + held-out) >= 0.90":
            (weighted(["medreg_mini_text2region_free", "medreg_mini_para_text2region"], "box_rate"), 0.90),
        "Text-to-Region Acc@0.5 (test) >= 0.60": (acc, 0.60),
        "absent names answered 'not visible' (test + held-out)":
            (weighted(["medreg_mini_absent", "medreg_mini_para_absent"], "absent_accuracy"), None),
    }
    lines = ["| target | value | met |", "|---|---:|---|"]
    out = {}
    for name, (value, goal) in rows.items():
        met = "-" if value is None or goal is None else ("yes" if value >= goal else "no")
        lines.append(f"| {name} | {fmt(value)} | {met} |")
        out[name] = {"value": value, "target": goal}
    margin = None if acc is None or not isinstance(prior, (int, float)) else acc - prior
    lines.append(f"| Acc@0.5 margin over the image-blind per-name prior ({fmt(prior)}) | {fmt(margin)} | - |")
    out["acc50_margin_over_name_prior"] = {"value": margin, "prior": prior}
    return "\n".join(lines) + "\n", out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eval", required=True, type=Path, help="medrega-eval run --out folder")
    p.add_argument("--baselines", type=Path, default=None, help="folder of scored baselines (<name>/summary.json)")
    p.add_argument("--out", required=True, type=Path, help="markdown file to write (.json beside it)")
    args = p.parse_args(argv)
    if not args.eval.is_dir():
        raise SystemExit(f"{args.eval}: not a folder (the --out of medrega-eval run)")
    body, numbers = table(args.eval, baselines_by_benchmark(args.baselines))
    if not numbers:
        raise SystemExit(f"{args.eval}: no medreg_mini_*/summary.json inside")
    goals, goal_numbers = targets(numbers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("## MedReg-mini scores\n\n" + body + "\n## Issue #17 targets\n\n" + goals, encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps({"benchmarks": numbers, "targets": goal_numbers}, indent=2,
                                                        ensure_ascii=False) + "\n", encoding="utf-8")
    print(body + "\n" + goals)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
