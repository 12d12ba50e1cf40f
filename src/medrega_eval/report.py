"""Write a scoring run's outputs: summary.json, samples.jsonl, summary.md and a self-contained report.html
(contents: docs/evaluation.md, "Outputs")."""
from __future__ import annotations

import base64
import html
import io
import json
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from internvl.data.images import ImageLoadError, load_image
from internvl.data.records import resolve_image
from internvl.io_safety import atomic_write_text
from internvl.regions import RegionError, box_to_pixels, format_region
from medrega_eval import __version__
from medrega_eval.score import TOP_METRICS

__all__ = ["OUTPUT_FILES", "protocol_info", "write_outputs", "iou_histogram_svg", "draw_boxes"]

#: The files :func:`write_outputs` writes into a result folder.
OUTPUT_FILES = ("summary.json", "samples.jsonl", "summary.md", "report.html")

METRIC_PACKAGES = ("pycocoevalcap", "rouge-score", "sacrebleu", "jieba", "scipy", "numpy", "pycocotools", "torch",
                   "transformers")
REF_COLOR = (0, 200, 0)
PRED_COLOR = (230, 30, 30)
COT_COLOR = (30, 90, 230)  # Regional CoT step-one regions


def _output(*cmd: str, cwd: Path | None = None, stream: str = "stdout") -> str | None:
    """The stripped `stream` ("stdout" or "stderr") of a command, None when it is missing, fails or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return getattr(out, stream).strip() if out.returncode == 0 else None


def _git_commit() -> str | None:
    """HEAD of the checkout this package runs from, "+dirty" when the package tree has edits."""
    here = Path(__file__).resolve().parent
    head = _output("git", "rev-parse", "HEAD", cwd=here)
    if head is None:
        return None
    return head + ("+dirty" if _output("git", "status", "--porcelain", "--", str(here), cwd=here) else "")


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def protocol_info(**fields: Any) -> dict[str, Any]:
    """The protocol block: caller fields (model, template, generation, task, compat, ...) + environment facts."""
    java = _output("java", "-version", stream="stderr")  # java prints its version on stderr
    return {**fields, "medrega_eval": __version__, "git_commit": _git_commit(),
            "packages": {name: _package_version(name) for name in METRIC_PACKAGES},
            "java": java.splitlines()[0] if java else None, "python": platform.python_version(),
            "command": " ".join(sys.argv), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------------------------ rendering
def iou_histogram_svg(values: Sequence[float], bins: int = 10, width: int = 420, height: int = 180) -> str:
    """A self-contained SVG bar chart of values in [0, 1]: the report's IoU histogram (no plotting package needed)."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int(v * bins)))] += 1
    top = max(counts) or 1
    pad, bw = 30, (width - 40) / bins
    bars = []
    for i, c in enumerate(counts):
        h = (height - 2 * pad) * c / top
        x = pad + i * bw
        bars.append(f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{bw - 2:.1f}" height="{h:.1f}" '
                    f'fill="#4a7ebb"><title>{i / bins:.1f}-{(i + 1) / bins:.1f}: {c}</title></rect>'
                    f'<text x="{x + bw / 2:.1f}" y="{height - pad - h - 3:.1f}" font-size="10" '
                    f'text-anchor="middle">{c}</text>')
    ticks = "".join(f'<text x="{pad + i * bw:.1f}" y="{height - pad + 14}" font-size="10" text-anchor="middle">'
                    f"{i / bins:.1f}</text>" for i in range(bins + 1))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="IoU histogram">{"".join(bars)}{ticks}'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" stroke="black"/>'
            f'<text x="{width / 2}" y="{height - 2}" font-size="11" text-anchor="middle">IoU per sample</text></svg>')


def draw_boxes(image: Image.Image, ref: Sequence[Sequence[int]], pred: Sequence[Sequence[int]],
               max_side: int = 384, cot: Sequence[Sequence[int]] = ()) -> Image.Image:
    """RGB thumbnail (longest side `max_side`) with reference boxes in green, predicted boxes in red and Regional
    CoT step-one boxes (`cot`) in blue; the 0..999 boxes are mapped with `internvl.regions.box_to_pixels`."""
    img = image.convert("RGB")
    w, h = img.size
    scale = max_side / max(w, h)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    line = max(2, round(max(img.size) / 150))
    # reference drawn thicker underneath, so a perfect prediction still shows both colours
    for boxes, color, width in ((ref, REF_COLOR, 2 * line), (pred, PRED_COLOR, line), (cot, COT_COLOR, line)):
        for box in boxes:
            x1, y1, x2, y2 = (v * scale for v in box_to_pixels(list(box), w, h))
            draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
    return img


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)


def _tables(summary: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    """The metric and count tables that summary.md and report.html both show: (name, [(key, text)])."""
    return [("metric", [(k, _fmt(summary[k])) for k in TOP_METRICS if k in summary]),
            ("count", [(k, str(v)) for k, v in summary.get("counts", {}).items()])]


def _markdown(summary: dict) -> str:
    lines = [f"# {summary.get('benchmark') or summary.get('task')} ({summary.get('task')})"]
    for name, items in _tables(summary):
        lines += ["", f"| {name} | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in items)]
    if summary.get("unavailable"):
        lines += ["", "Unavailable metrics:"] + [f"- {k}: {v}" for k, v in summary["unavailable"].items()]
    proto = summary.get("protocol", {})
    lines += ["", "Protocol: " + ", ".join(f"{k}={proto[k]}" for k in ("model", "template", "compat", "git_commit")
                                          if proto.get(k) is not None)]
    return "\n".join(lines) + "\n"


def _resolve_image(row: dict, image_root: str | Path | None) -> Path:
    """The row's image inside the declared ``image_root`` (the benchmark's image folder). A prediction file cannot
    widen it: the row's own ``image_root`` is only used when it lies inside the declared one, and absolute paths,
    ``..`` and symbolic links out of the root are refused (``ValueError``), so the report embeds no other file."""
    image = row.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError("no image path in the record")
    if image_root is None:
        raise ValueError("no image root declared (give --image-root or --benchmark)")
    base = Path(image_root)
    own = row.get("image_root")
    if isinstance(own, str) and own:
        try:
            base = resolve_image(own, image_root)
        except ValueError:
            raise ValueError("the record's image_root lies outside the declared image root") from None
    return resolve_image(image, base)


def _gallery(rows: Sequence[dict], image_root: str | Path | None, max_images: int) -> str:
    """Figures of up to `max_images` boxed rows, evenly spread over the IoU range (worst, typical and best)."""
    boxed = sorted((r for r in rows if r.get("ref_boxes") is not None), key=lambda r: r["scores"].get("iou", 0.0))
    if len(boxed) > max_images:
        step = (len(boxed) - 1) / (max_images - 1) if max_images > 1 else 0
        boxed = [boxed[round(i * step)] for i in range(max_images)]
    items = []
    for row in boxed:
        caption = (f"<b>{html.escape(str(row['id']))}</b> IoU {_fmt(row['scores'].get('iou'))}<br>"
                   f"ref: {html.escape(row['reference'][:200])}<br>pred: {html.escape(row['prediction'][:200])}")
        items.append(_figure(row, image_root, caption, [b["box"] for b in row["ref_boxes"]],
                             [b["box"] for b in row["pred_boxes"]], _cot_boxes(row)))
    return "".join(items)


def _figure(row: dict, image_root: str | Path | None, caption: str, ref: Sequence, pred: Sequence,
            cot: Sequence) -> str:
    """One gallery figure: the row's image with its boxes drawn, or the caption and why the image is missing."""
    try:
        img = load_image(_resolve_image(row, image_root))
    except (ImageLoadError, OSError, ValueError) as exc:
        return (f"<figure><figcaption>{caption}<br><i>image not shown: {html.escape(str(exc))}</i>"
                "</figcaption></figure>")
    png = io.BytesIO()
    draw_boxes(img, ref, pred, cot=cot).save(png, format="PNG")
    return (f'<figure><img src="data:image/png;base64,{base64.b64encode(png.getvalue()).decode()}" '
            f'alt="{html.escape(str(row["id"]))}"><figcaption>{caption}</figcaption></figure>')


def _cot_boxes(row: dict) -> list[list[int]]:
    """The Regional CoT step-one boxes of a row (``cot_regions``: [{"name", "boxes"}]), malformed entries skipped."""
    regions = [r for r in row.get("cot_regions") or [] if isinstance(r, dict)]
    return [box for region in regions for box in region.get("boxes") or []
            if isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in box)]


def _cot_text(row: dict) -> str:
    """The step-one regions as the one box grammar writes them (``<ref>name</ref><box>[[..]]</box>, ...``)."""
    parts = []
    for region in row.get("cot_regions") or []:
        try:
            parts.append(format_region(region.get("name"), region.get("boxes") or []))
        except (RegionError, AttributeError, TypeError, ValueError):
            parts.append(repr(region))
    return ", ".join(parts) or "(none)"


def _cot_gallery(rows: Sequence[dict], image_root: str | Path | None, max_images: int) -> str:
    """Regional CoT: images with the step-one regions (blue), the step-one regions as text and the answer beside."""
    items = []
    for row in [r for r in rows if _cot_boxes(r)][:max_images]:
        caption = (f"<b>{html.escape(str(row['id']))}</b><br>step one: {html.escape(_cot_text(row)[:300])}<br>"
                   f"answer: {html.escape(row['prediction'][:200])}<br>ref: {html.escape(row['reference'][:200])}")
        items.append(_figure(row, image_root, caption, [], [], _cot_boxes(row)))
    return "".join(items)


def _sample_table(rows: Sequence[dict], n: int = 20) -> str:
    cot = any("cot_regions" in r for r in rows)  # Regional CoT run: the step-one regions beside each answer
    head = ("<tr><th>id</th>" + ("<th>step-one regions</th>" if cot else "")
            + "<th>prediction</th><th>reference</th><th>scores</th></tr>")
    body = "".join(
        f"<tr><td>{html.escape(str(r['id']))}</td>"
        + (f"<td>{html.escape(_cot_text(r)[:300])}</td>" if cot else "")
        + f"<td>{html.escape(r['prediction'][:300])}</td>"
        f"<td>{html.escape(r['reference'][:300])}</td>"
        f"<td>{html.escape(', '.join(f'{k}={_fmt(v)}' for k, v in r['scores'].items() if not isinstance(v, list)))}"
        "</td></tr>" for r in rows[:n])
    return f"<table>{head}{body}</table>"


def _legend(colours: Sequence[tuple[str, str]]) -> str:
    spans = "".join(f"<span style='background:{colour}'></span>{name}" for colour, name in colours)
    return f"<p class='legend'>boxes:{spans}</p>" if colours else ""


def _html(summary: dict, rows: Sequence[dict], image_root, max_images: int) -> str:
    title = html.escape(f"{summary.get('benchmark') or summary.get('task')} - MedRegA evaluation")
    tables = "".join(f"<h2>{name.title()}s</h2><table>{''.join(f'<tr><td>{k}</td><td>{v}</td></tr>' for k, v in items)}"
                     "</table>" for name, items in _tables(summary))
    problems = "".join(f"<li>{html.escape(p)}</li>" for p in summary.get("problems", [])[:50])
    unavailable = "".join(f"<li><b>{k}</b>: {html.escape(v)}</li>" for k, v in summary.get("unavailable", {}).items())
    ious = [r["scores"]["iou"] for r in rows if isinstance(r.get("scores", {}).get("iou"), (int, float))]
    sections = [  # (heading, legend: box colours, content); a section without content is left out
        ("Unavailable metrics", (), unavailable and f"<ul>{unavailable}</ul>"),
        ("Problems (first 50)", (), problems and f"<ul>{problems}</ul>"),
        (f"IoU distribution ({len(ious)} samples)", (), ious and iou_histogram_svg(ious)),
        ("Samples", (("#00c800", "reference"), ("#e61e1e", "prediction")), _gallery(rows, image_root, max_images)),
        ("Regional CoT step-one regions", (("#1e5ae6", "step-one region"),),
         _cot_gallery(rows, image_root, max_images)),
    ]
    proto = html.escape(json.dumps(summary.get("protocol", {}), indent=2, ensure_ascii=False))
    return "".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;vertical-align:top;font-size:13px}"
        "figure{display:inline-block;width:400px;margin:6px;vertical-align:top;font-size:12px}"
        ".legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px}</style></head><body>",
        f"<h1>{title}</h1>{tables}",
        *(f"<h2>{head}</h2>{_legend(colours)}{body}" for head, colours, body in sections if body),
        f"<h2>First predictions</h2>{_sample_table(rows)}<h2>Protocol</h2><pre>{proto}</pre></body></html>"])


def write_outputs(out_dir: str | Path, summary: dict, rows: Sequence[dict], image_root: str | Path | None = None,
                  max_images: int = 12) -> dict[str, Path]:
    """Write summary.json, samples.jsonl, summary.md and report.html into out_dir (each atomically); return their
    paths. ``image_root`` is the benchmark's declared image folder: report.html embeds only images inside it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in OUTPUT_FILES}
    atomic_write_text(paths["summary.json"], json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(paths["samples.jsonl"], "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    atomic_write_text(paths["summary.md"], _markdown(summary))
    atomic_write_text(paths["report.html"], _html(summary, rows, image_root, max_images))
    return paths
