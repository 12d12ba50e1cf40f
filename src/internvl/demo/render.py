"""Chat bubbles for the demo: a model answer with its regions shown as readable text, the raw answer one click away.

``<ref>left frontal lobe</ref><box>[[120, 80, 480, 400]]</box>`` becomes a small marker in the region's drawn colour
with its number (the same colour and number as the box on the annotated image, see ``internvl.demo.drawing``) and the
region's name; the answer as the model wrote it stays in a collapsed ``<details>`` element. Regions are found by the
one box grammar (``internvl.regions``): the answer's tags are removed and its box lists scanned, and the k-th readable
box list is the k-th region with boxes of ``parse_regions``. Every piece of user or model text is HTML-escaped (and
markdown's active characters turned into entities), so an answer cannot inject markup into the page.
"""
from __future__ import annotations

from internvl.demo.drawing import PALETTE
from internvl.demo.strings import text
from internvl.regions import Region, remove_region_tags, scan_box_lists

__all__ = ["answer_html", "escape", "marker_html", "region_name_label"]

# characters HTML or markdown would act on; as numeric entities they show as themselves
_ENTITIES = {ord(c): f"&#{ord(c)};" for c in "&<>\"'*_`[](){}#|~\\$!+-=:"}


def escape(value: str) -> str:
    """``value`` as inert HTML text inside the chatbot's markdown: HTML-escaped, markdown characters as entities,
    newlines as ``<br>`` (a blank line would end the HTML block)."""
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
    """The assistant bubble for ``answer``: readable text with one marker per region box list, numbered from
    ``first_number`` (Region-to-Text draws the query box as region 1), and the raw answer in a collapsed element.

    ``regions`` are the answer's regions with boxes, as drawn (``parse_regions``); their names label the markers.
    """
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
    """The label of a Region-to-Text query box: the first region name in the answer, else the answer without its
    region markup (first line, at most ``limit`` characters), else ``"?"``."""
    name = next((r.name for r in regions if r.name), None)
    if name is None:
        lines = [ln.strip() for ln in remove_region_tags(answer).splitlines() if ln.strip()]
        name = lines[0] if lines else ""
    name = name.strip(" :：,，.。")
    if len(name) > limit:
        name = name[:limit - 1] + "…"
    return name or "?"
