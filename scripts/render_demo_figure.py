"""Render the README's figure of the bundled model's answers (``asset/figures/demo_examples.png``).

Each panel is one demo turn (``internvl.demo.app.ask``, the code path of the web page) on a bundled example of a
region task (``asset/examples/examples.json``), plus one question typed without a task prompt: the annotated image,
the example's title or the question, and the answer with its region tags removed. Run it after retraining the bundled model so the figure shows the model that ships:

    python3 -m scripts.render_demo_figure --out asset/figures/demo_examples.png

CPU, float32, greedy: the figure is reproducible from the committed model and examples.
"""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from internvl.demo.app import DemoEngine, Example, Session, ask, load_examples
from internvl.demo.drawing import draw_regions, label_font
from internvl.demo.uploads import load_upload
from internvl.inference import GenerationSettings, load_model_and_tokenizer
from internvl.offline import enforce_offline
from internvl.regions import parse_regions, remove_region_tags

ROOT = Path(__file__).resolve().parents[1]
PANEL = 384  # px, the side every annotated image is fitted into


#: the figure's one free-form turn: typed without a task prompt, the way the README snippet and ``--batch`` send it
FREE_FORM = ("brain_mri_axial_096.jpg", "Could you show me where the right frontal lobe is?")


def figure_examples(examples: Path) -> list[Example]:
    """The bundled examples (``examples.json``) of the region tasks, whose answers draw boxes."""
    return [ex for ex in load_examples(examples) if ex.task in ("text_to_region", "region_to_text")]


def render_example(engine: DemoEngine, ex: Example) -> tuple[Image.Image, str]:
    """(annotated image, caption) of one bundled example asked through the page's own `ask`."""
    session = Session(image=ex.image)
    annotated, _, _ = ask(engine, session, task=ex.task, lang=ex.lang, question=ex.question, objects=ex.objects,
                          box_text=ex.box, options=ex.options, modality=ex.modality)
    return annotated, f"{ex.title}\nA: {remove_region_tags(session.history[-1][1])}"


def render_free_form(engine: DemoEngine, examples: Path) -> tuple[Image.Image, str]:
    """(annotated image, caption) of the free-form turn (`FREE_FORM`), its boxes drawn as the page draws them."""
    file, question = FREE_FORM
    image = load_upload(examples / file).image
    answer, _, _ = engine.answer(image, question, [])
    annotated, _ = draw_regions(image, [r for r in parse_regions(answer, strict=False) if r.boxes])
    return annotated, f"Typed without a task prompt (EN)\nQ: {question}\nA: {remove_region_tags(answer)}"


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
    examples = Path(args.examples)
    panels = [render_example(engine, ex) for ex in figure_examples(examples)] + [render_free_form(engine, examples)]
    for image, _ in panels:
        image.thumbnail((PANEL, PANEL))
    for _, caption in panels:
        print(caption.replace("\n", " | "))
    compose(panels).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
