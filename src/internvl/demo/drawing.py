"""How the demo shows predicted regions: drawn on a copy of the image, and as numbered markers in the chat bubble.

Boxes map to pixels with :func:`internvl.regions.box_to_pixels`, the evaluators' convention, so what is drawn is what
is scored. All user and model text is HTML-escaped (markdown's active characters too): an answer cannot inject markup.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from internvl.demo.strings import text
from internvl.regions import Box, Region, box_to_pixels, remove_region_tags, scan_box_lists

__all__ = ["PALETTE", "DrawnBox", "answer_html", "draw_regions", "escape", "label_font", "marker_html",
           "region_name_label"]

# Distinct, colour-blind-friendly outline colours (Okabe-Ito), cycled per region.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167),
)

# Fonts that cover Chinese (Debian fonts-wqy-microhei / fonts-noto-cjk), then Latin-only ones.
_FONT_CANDIDATES: tuple[str, ...] = ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
                                     "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
                                     "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


@dataclass(frozen=True)
class DrawnBox:
    """One drawn box: its label, colour and pixel corners (what the page lists under the image)."""

    label: str
    color: tuple[int, int, int]
    xyxy: tuple[float, float, float, float]


@lru_cache(maxsize=8)
def label_font(size: int) -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, bool]:
    """(font of ``size`` px, whether it renders CJK); Pillow's built-in font when no TrueType font is installed."""
    for i, path in enumerate(_FONT_CANDIDATES):
        if Path(path).is_file():
            return ImageFont.truetype(path, size), i < 2
    return ImageFont.load_default(size=size), False


def _printable(text: str, cjk_ok: bool) -> bool:
    return cjk_ok or all(ord(ch) < 0x2E80 for ch in text)


def draw_regions(image: Image.Image, regions: Sequence[Region], *, min_side: int = 384, min_long_side: int = 512
                 ) -> tuple[Image.Image, list[DrawnBox]]:
    """An RGB copy of ``image`` with each region's boxes outlined in its own colour and labelled ``"<n>. <name>"``
    (a name the font cannot render: ``"<n>"``), plus the drawn boxes (``xyxy`` in original pixels). Small images are
    drawn on a copy upscaled to at least ``min_side`` x ``min_long_side`` px, so labels stay readable."""
    base = image.convert("RGB")
    w0, h0 = base.size
    scale = max(1.0, min_side / max(1, min(w0, h0)), min_long_side / max(1, w0, h0))
    canvas = base.resize((round(w0 * scale), round(h0 * scale)), Image.Resampling.BICUBIC) if scale > 1 else base.copy()
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(canvas.size) / 200))
    font, cjk_ok = label_font(max(12, round(min(canvas.size) / 28)))
    drawn: list[DrawnBox] = []
    for n, region in enumerate(regions, 1):
        color = PALETTE[(n - 1) % len(PALETTE)]
        name = region.name or ""
        label = f"{n}. {name}" if name and _printable(name, cjk_ok) else str(n)
        for box in region.boxes:
            xyxy = box_to_pixels(box if isinstance(box, Box) else Box(*box), w0, h0)
            drawn.append(DrawnBox(name or str(n), color, xyxy))
            x1, y1, x2, y2 = (v * scale for v in xyxy)
            draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=color, width=line)
            tx, ty = x1 + line, y1 + line
            bbox = draw.textbbox((tx, ty), label, font=font)
            if bbox[3] > canvas.height:  # keep the label inside the image
                ty -= bbox[3] - canvas.height
                bbox = draw.textbbox((tx, ty), label, font=font)
            draw.rectangle(bbox, fill=(0, 0, 0))
            draw.text((tx, ty), label, fill=color, font=font)
    return canvas, drawn


# characters HTML or markdown would act on; as numeric entities they show as themselves
_ENTITIES = {ord(c): f"&#{ord(c)};" for c in "&<>\"'*_`[](){}#|~\\$!+-=:"}


def escape(value: str) -> str:
    """``value`` as inert text in the chatbot's markdown: characters as entities, newlines as ``<br>`` (a blank line
    would end the HTML block)."""
    return value.translate(_ENTITIES).replace("\r\n", "\n").replace("\n", "<br>")


def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def marker_html(number: int, name: str | None) -> str:
    """A region as it reads in a bubble: a coloured numbered marker (the drawn box's colour) and the name."""
    color = _hex(PALETTE[(number - 1) % len(PALETTE)])
    label = escape(name) if name else ""
    return (f'<span class="region-ref" data-region="{number}">'
            f'<span class="region-marker" style="background:{color};color:#000;border-radius:3px;'
            f'padding:0 4px;font-size:0.8em;font-weight:bold">{number}</span>'
            f'{"&nbsp;" + label if label else ""}</span>')


def answer_html(answer: str, regions: list[Region], lang: str, *, first_number: int = 1) -> str:
    """The assistant bubble: ``answer`` as text with one marker per box list of ``regions`` (as drawn), numbered from
    ``first_number`` (Region-to-Text's query box is region 1), and the raw answer in a collapsed element."""
    if not answer.strip():
        return escape(text("empty_answer", lang))
    stripped = remove_region_tags(answer)
    spans = [s for s in scan_box_lists(stripped) if s.values is not None]
    pieces, pos = [], 0
    for k, span in enumerate(spans):
        before = stripped[pos:span.start].rstrip()
        # the tagged name when the two parses agree, else the grammar's name for the tag-stripped list
        name = regions[k].name if len(spans) == len(regions) and regions[k].name else span.name
        head = before[:len(before) - len(name)] if name and before.endswith(name) else before
        pieces += [escape(head), (" " if head and not head.endswith(" ") else ""),
                   marker_html(first_number + k, name or None)]
        pos = span.end
    pieces.append(escape(stripped[pos:]))
    raw = f'<details class="raw-answer"><summary>{escape(text("raw", lang))}</summary><code>{escape(answer)}</code></details>'
    return f'<div class="answer">{"".join(pieces)}</div>{raw}'


def region_name_label(answer: str, regions: list[Region], limit: int = 60) -> str:
    """The label of a Region-to-Text query box: the answer's first region name, else its first line without region
    markup (at most ``limit`` characters), else ``"?"``."""
    name = next((r.name for r in regions if r.name), None)
    if name is None:
        lines = [ln.strip() for ln in remove_region_tags(answer).splitlines() if ln.strip()]
        name = lines[0] if lines else ""
    name = name.strip(" :：,，.。")
    if len(name) > limit:
        name = name[:limit - 1] + "…"
    return name or "?"
