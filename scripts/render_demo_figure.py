"""Render the README's figure of the bundled model's answers (``asset/figures/demo_examples.png``).

Each panel is one demo turn (``internvl.demo.app.ask``, the code path of the web page) on a bundled example: the
annotated image the page shows, the question, and the answer as the page renders it (region names with their box
numbers). Run it after retraining the bundled model so the figure shows the model that ships:

    python3 -m scripts.render_demo_figure --out asset/figures/demo_examples.png

CPU, float32, greedy: the figure is reproducible from the committed model and examples.
"""
from __future__ import annotations

import argparse
import textwrap
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from internvl.demo.app import DemoEngine, Session, ask
from internvl.demo.drawing import draw_regions, label_font
from internvl.demo.uploads import load_upload
from internvl.inference import GenerationSettings, load_model_and_tokenizer
from internvl.offline import enforce_offline
from internvl.regions import parse_regions, remove_region_tags

ROOT = Path(__file__).resolve().parents[1]
PANEL = 384  # px, the side every annotated image is fitted into


@dataclass(frozen=True)
class Panel:
    """One demo turn of the figure: an example image and the task inputs typed in the page."""

    file: str
    task: str
    lang: str
    caption: str
    objects: str = ""
    question: str = ""  # task "free": the text typed, sent without a task prompt
    box_text: str = ""
    modality: str = ""


PANELS = (
    Panel("brain_mri_axial_096.jpg", "text_to_region", "en", "Text-to-Region (EN): left frontal lobe",
          objects="left frontal lobe", modality="MRI"),
    Panel("head_ct_axial_060.jpg", "text_to_region", "en", "Text-to-Region (EN): bone, brain",
          objects="bone, brain", modality="CT"),
    Panel("brain_mri_axial_096.jpg", "free", "en", "Typed without a task prompt (EN)",
          question="Could you show me where the right frontal lobe is?"),
    Panel("brain_mri_coronal_100.jpg", "region_to_text", "zh", "Region-to-Text (ZH): box 618, 502, 905, 773",
          box_text="618, 502, 905, 773", modality="磁共振"),
)


def answer_text(answer: str) -> str:
    """The answer as a reader sees it on the page: tags removed, boxes kept in brackets."""
    return remove_region_tags(answer)


def render_panel(engine: DemoEngine, panel: Panel, examples: Path) -> tuple[Image.Image, str]:
    """(annotated image fitted into PANEL px, caption text) of one turn: a demo task through the page's `ask`, or
    (task "free") the user's text sent as is, the way the README's Python snippet and ``--batch`` send it."""
    image = load_upload(examples / panel.file).image
    if panel.task == "free":
        answer, _, _ = engine.answer(image, panel.question, [])
        annotated, _ = draw_regions(image, [r for r in parse_regions(answer, strict=False) if r.boxes])
        caption = f"{panel.caption}\nQ: {panel.question}"
    else:
        session = Session(image=image, name=panel.file)
        annotated, _, _ = ask(engine, session, task=panel.task, lang=panel.lang, objects=panel.objects,
                              box_text=panel.box_text, modality=panel.modality)
        answer = session.history[-1][1]
        caption = panel.caption
    annotated.thumbnail((PANEL, PANEL))
    return annotated, f"{caption}\nA: {answer_text(answer)}"


def compose(panels: list[tuple[Image.Image, str]], width_chars: int = 52) -> Image.Image:
    """Panels side by side, each with its wrapped caption below."""
    font, _ = label_font(13)
    pad, line_h = 10, 17
    captions = [[w for line in cap.splitlines() for w in textwrap.wrap(line, width_chars) or [""]]
                for _, cap in panels]
    height = PANEL + 2 * pad + line_h * max(len(c) for c in captions) + pad
    sheet = Image.new("RGB", (len(panels) * (PANEL + pad) + pad, height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, ((image, _), lines) in enumerate(zip(panels, captions, strict=True)):
        x = pad + i * (PANEL + pad)
        sheet.paste(image, (x, pad))
        for k, line in enumerate(lines):
            color = (20, 20, 20) if k == 0 else (30, 30, 120)
            draw.text((x, PANEL + 2 * pad + k * line_h), line, fill=color, font=font)
    return sheet


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, load the model on CPU and write the figure."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "asset" / "medreg-mini-model"))
    p.add_argument("--examples", default=str(ROOT / "asset" / "examples"))
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    enforce_offline()
    model, tokenizer = load_model_and_tokenizer(args.model, dtype="float32")
    engine = DemoEngine(model.eval(), tokenizer, GenerationSettings(max_new_tokens=96))
    panels = [render_panel(engine, panel, Path(args.examples)) for panel in PANELS]
    for _, caption in panels:
        print(caption.replace("\n", " | "))
    compose(panels).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
