"""The MedRegA web demo (gradio): upload an image, pick a task and language, chat; predicted boxes are drawn
(docs/demo.md). Handlers never raise: bad input and unexpected errors become the page's status line, so one bad
upload cannot take the server down."""
from __future__ import annotations

import functools
import json
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import torch
from PIL import Image

from internvl.data.images import AXES
from internvl.demo.drawing import answer_html, draw_regions, escape, region_name_label
from internvl.demo.strings import LANGS, text
from internvl.demo.tasks import TASKS, build_prompt, task_label
from internvl.demo.uploads import (UserInputError, box_from_drawing, check_fields, check_prompt_budget, check_question,
                                   load_upload, parse_typed_box, public_message, scrub_paths)
from internvl.image_processing import first_turn_with_images
from internvl.inference import GenerationRequest, GenerationSettings, Generator
from internvl.regional_cot import RegionalCotGenerator
from internvl.regions import Box, Region, parse_regions

__all__ = ["DemoEngine", "Example", "ask", "build_app", "load_examples", "page_labels"]

log = logging.getLogger("medrega.demo")


class DemoEngine:
    """Answers one chat turn about one image, one request at a time, through `internvl.inference.Generator` (the
    generation path of `--batch` and `medrega-eval run`)."""

    def __init__(self, model: Any, tokenizer: Any, settings: GenerationSettings | None = None) -> None:
        self.generator = Generator(model, tokenizer, settings or GenerationSettings(), batch_size=1)
        self._lock = threading.Lock()

    def answer(self, image: Image.Image, prompt: str, history: list[tuple[str, str]], *, cot: bool = False,
               lang: str | None = None) -> tuple[str, list, list[Region]]:
        """(answer text, new history, step-one regions) for ``prompt`` after ``history`` ((question, answer) pairs).
        ``cot``: Regional CoT, as `medrega-eval run --regional-cot`, with its prompts in ``lang`` (the page language;
        None: guessed from the prompt); the history keeps the user's own prompt."""
        prompt = first_turn_with_images(prompt, 1, history)  # kept in the history: later turns find the image there
        request = GenerationRequest(prompt, images=[image], history=list(history), lang=lang)
        with self._lock, torch.inference_mode():
            if cot:
                result = RegionalCotGenerator(self.generator).generate_batch([request])[0]
                text, step_one = result.answer, list(result.regions)
            else:
                text, step_one = self.generator.generate_batch([request])[0], []
        return text, [*history, (prompt, text)], step_one


@dataclass(frozen=True)
class Example:
    """A bundled example (``asset/examples/examples.json``): its image, decoded once, and its task inputs."""

    path: Path
    image: Image.Image
    title: str
    task: str
    lang: str
    modality: str = ""
    question: str = ""
    objects: str = ""
    box: str = ""
    options: str = ""


def load_examples(directory: str | Path) -> list[Example]:
    """The examples of ``directory/examples.json`` (none without it); a bad entry raises ``ValueError`` naming it."""
    directory = Path(directory)
    index = directory / "examples.json"
    if not index.is_file():
        return []
    out = []
    for i, entry in enumerate(json.loads(index.read_text(encoding="utf-8"))):
        where = f"{index}: entry {i}"
        try:
            path = directory / entry.pop("file")
            ex = Example(path=path, image=load_upload(path).image, **entry)
        except (KeyError, TypeError, UserInputError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
        if ex.task not in TASKS or ex.lang not in LANGS:
            raise ValueError(f"{where}: bad task {ex.task!r} or language {ex.lang!r}")
        out.append(ex)
    return out


@dataclass
class Session:
    """Per-browser-tab state: the current image, the model's turns and the page's chat bubbles."""

    image: Image.Image | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    chat: list[dict[str, str]] = field(default_factory=list)


def _message(message: str, kind: str = "error", lang: str = "en") -> str:
    """A status line: a plain-text kind ("Error:", "Done:", "Note:" in ``lang``; no emoji, which needs an emoji font)
    and the message."""
    return f"**{text('kind_' + kind, lang)}** {escape(message)}"


def _regions_table(regions: list[Region], drawn: list) -> list[dict[str, Any]]:
    boxes = [(n, r.name, box) for n, r in enumerate(regions, 1) for box in r.boxes]  # `drawn` has one per box
    return [{"n": n, "name": name, "box": box.as_list(), "pixels": [round(v, 1) for v in shown.xyxy]}
            for (n, name, box), shown in zip(boxes, drawn)]


def ask(engine: DemoEngine, session: Session, *, task: str, lang: str, question: str = "", objects: str = "",
        box_text: str = "", box_units: str = "grid", drawing: Any = None, options: str = "", modality: str = "",
        cot: bool = False) -> tuple[Image.Image | None, list[dict[str, Any]], str]:
    """One turn: validate inputs, build the prompt, generate, parse and draw boxes (Regional CoT's step-one regions
    after the answer's own); the session grows by this turn. Returns (annotated image, box rows, status message);
    raises :class:`UserInputError` for bad input."""
    check_fields(question=question, objects=objects, options=options, modality=modality, box=box_text)
    if session.image is None:
        raise UserInputError(text("need_image", lang))
    w, h = session.image.size
    query_box: Box | None = None
    if task == "region_to_text":
        if (box_text or "").strip():
            query_box = parse_typed_box(box_text, w, h, units=box_units)
        else:
            query_box = box_from_drawing(drawing)
    if session.history and task == "vqa":
        prompt = check_question(question)  # a later turn: the user's text as is (no task prompt)
    else:
        prompt = build_prompt(task, lang, question=question, box=query_box, objects=objects, options=options,
                              modality=modality, n_images=0 if session.history else 1)  # later: image in history
    generator = engine.generator
    check_prompt_budget(generator.model, generator.tokenizer, prompt, session.history,
                        generator.settings.max_new_tokens)
    t0 = time.perf_counter()
    answer, session.history, step_one = engine.answer(session.image, prompt, session.history, cot=cot, lang=lang)
    seconds = time.perf_counter() - t0
    found = [r for r in parse_regions(answer, strict=False) if r.boxes]  # a name without a box draws nothing
    query = [Region(region_name_label(answer, found), [query_box])] if task == "region_to_text" and query_box else []
    regions = query + found + [Region(text("cot_region", lang, name=r.name or "?"), r.boxes) for r in step_one]
    annotated, drawn = draw_regions(session.image, regions)
    shown_q = {"vqa": question, "text_to_region": objects, "diagnosis": options}.get(task, "") or ""
    user_text = f"[{task_label(task, lang)}] {shown_q}".strip()
    if query:
        user_text += " " + str(query_box)
    session.chat += [{"role": "user", "content": escape(user_text)},
                     {"role": "assistant", "content": answer_html(answer, found, lang, first_number=len(query) + 1)}]
    n_boxes = sum(len(r.boxes) for r in regions)
    log.info("request: task=%s lang=%s cot=%s latency=%.2fs boxes=%d", task, lang, cot, seconds, n_boxes)
    status = _message(text("answered", lang, seconds=seconds, n=n_boxes), "ok", lang)
    return annotated, _regions_table(regions, drawn), status


def _editor_value(image: Image.Image) -> dict[str, Any]:
    """What the image editor shows for ``image`` (no drawn layer yet)."""
    return {"background": image, "layers": [], "composite": image}


#: the page elements each guarded handler updates, in order (one table for the handler and its wiring)
_UPLOAD_OUT = ("editor", "session", "status")
_EXAMPLE_OUT = ("editor", "session", "task", "lang", "question", "objects", "box", "options", "modality", "status")
_ASK_OUT = ("annotated", "chat", "boxes", "status", "session")


def _guarded(fn: Callable, outputs: tuple[str, ...]) -> Callable:
    """``fn`` as a gradio handler that never raises: bad input and unexpected errors (logged with their traceback)
    become an error in the ``status`` output, the other ``outputs`` unchanged. The last input is the page language."""

    @functools.wraps(fn)  # keeps the signature, so gradio still injects gr.SelectData
    def wrapper(*args):
        lang = args[-1] if args and args[-1] in LANGS else "en"
        try:
            return fn(*args)
        except UserInputError as exc:
            message = scrub_paths(str(exc))
        except Exception as exc:  # noqa: BLE001 - keep serving; report in the page
            log.error("demo handler %s failed:\n%s", fn.__name__, traceback.format_exc())
            message = text("internal", lang, what=public_message(exc))
        updates = [gr.update()] * len(outputs)
        updates[outputs.index("status")] = _message(message, "error", lang)
        return updates

    return wrapper


def _handlers(engine: DemoEngine, examples: list[Example]) -> SimpleNamespace:
    """The page's event handlers (upload, example pick, ask, clear), guarded where the page can send bad input."""

    def on_upload(path: str | None, axis: str, slice_index: int | None, session: Session, lang: str):
        if not path:
            return gr.update(), session, _message(text("no_file", lang), "info", lang)
        up = load_upload(path, axis=axis, slice_index=slice_index)
        return _editor_value(up.image), Session(image=up.image), _message(text("loaded", lang, what=up.description),
                                                                          "ok", lang)

    def on_example(evt: gr.SelectData, lang: str):
        ex = examples[evt.index]
        return (_editor_value(ex.image), Session(image=ex.image), ex.task, ex.lang, ex.question, ex.objects, ex.box,
                ex.options, ex.modality, _message(text("example_loaded", lang, title=ex.title), "ok", lang))

    def on_ask(session: Session, drawing, task, question, objects, box_text, box_units, options, modality, cot,
               lang):
        layer = drawing["layers"][0] if isinstance(drawing, dict) and drawing.get("layers") else None
        annotated, rows, status = ask(engine, session, task=task, lang=lang, question=question, objects=objects,
                                      box_text=box_text, box_units=box_units, drawing=layer, options=options,
                                      modality=modality, cot=bool(cot))
        return annotated, list(session.chat), rows, status, session

    def on_clear(session: Session, lang: str):
        return [], None, [], _message(text("cleared", lang), "info", lang), Session(image=session.image)

    return SimpleNamespace(upload=_guarded(on_upload, _UPLOAD_OUT), example=_guarded(on_example, _EXAMPLE_OUT),
                           ask=_guarded(on_ask, _ASK_OUT), clear=on_clear)


def _empty_file_box() -> None:
    """The file box after an upload: emptied, so the next upload works at once (the image lives on in the editor)."""
    return None


#: elements the language switch relabels; each name is the element's id and its key in ``strings.json``
_LABELLED = ("upload", "axis", "slice", "editor", "gallery", "task", "lang", "modality", "question", "objects", "box",
             "box_units", "options", "regional_cot", "annotated", "chat", "boxes")


def _choices(key: str, lang: str) -> dict[str, list[tuple[str, str]]]:
    """``{"choices": [(shown name, value), ...]}`` in ``lang`` for the menus whose names are translated, else ``{}``."""
    if key == "task":
        return {"choices": [(task_label(k, lang), k) for k in TASKS]}
    if key == "axis":
        return {"choices": [(text(a, lang), a) for a in AXES]}
    if key == "box_units":
        return {"choices": [(text("units_grid", lang), "grid"), (text("units_pixels", lang), "pixels")]}
    return {}


def _intro(title: str, model_name: str, lang: str) -> str:
    return f"# {title}\n" + text("intro", lang, model=model_name)


def _layout(title: str, model_name: str, examples: list[Example]) -> dict[str, Any]:
    """Build the page inside the current ``gr.Blocks``, labelled in English; returns its elements by id (the browser
    test's handles)."""
    c: dict[str, Any] = {"intro": gr.Markdown(_intro(title, model_name, "en"), elem_id="intro"),
                         "session": gr.State(Session())}

    def add(kind: Callable, key: str, **kwargs: Any) -> None:
        c[key] = kind(label=text(key, "en"), elem_id=key, **_choices(key, "en"), **kwargs)

    with gr.Row():
        with gr.Column(scale=1):
            # no client/gradio type filter: DICOM files often have no extension; load_upload checks the type
            # (magic bytes, then ACCEPTED_SUFFIXES) and reports anything else in the page
            add(gr.File, "upload", file_count="single", type="filepath")
            with gr.Row():
                add(gr.Dropdown, "axis", value="axial")
                add(gr.Number, "slice", precision=0, minimum=0)  # gradio checks it is a whole number >= 0
            add(gr.ImageEditor, "editor", type="numpy", image_mode="RGBA", sources=(), transforms=(), layers=False)
            # decoded images: gradio shows PIL images whatever the file format (DICOM, NIfTI, TIFF)
            add(gr.Gallery, "gallery", value=[(e.image, e.title) for e in examples], columns=4, height=220,
                allow_preview=False)
        with gr.Column(scale=1):
            add(gr.Radio, "task", value="text_to_region")
            add(gr.Radio, "lang", choices=[("English", "en"), ("中文", "zh")], value="en")
            add(gr.Textbox, "modality", value="MRI")
            add(gr.Textbox, "question")
            add(gr.Textbox, "objects")
            with gr.Row():
                add(gr.Textbox, "box")
                add(gr.Radio, "box_units", value="grid")
            add(gr.Textbox, "options")
            add(gr.Checkbox, "regional_cot", value=False)
            with gr.Row():
                c["ask"] = gr.Button(text("ask", "en"), variant="primary", elem_id="ask")
                c["clear"] = gr.Button(text("clear", "en"), elem_id="clear")
            c["status"] = gr.Markdown(elem_id="status")
            add(gr.Image, "annotated", type="pil", interactive=False, format="png")
            add(gr.Chatbot, "chat", height=260)
            add(gr.JSON, "boxes")
    return c


def page_labels(lang: str, title: str, model_name: str) -> list[Any]:
    """gradio updates that put the page in ``lang``, in the order intro, ``_LABELLED``, ask, clear."""
    labels = [gr.update(label=text(key, lang), **_choices(key, lang)) for key in _LABELLED]
    return [gr.update(value=_intro(title, model_name, lang)), *labels, gr.update(value=text("ask", lang)),
            gr.update(value=text("clear", lang))]


def build_app(engine: DemoEngine, examples: list[Example], *, title: str = "MedRegA demo",
              model_name: str = "") -> gr.Blocks:
    """The gradio Blocks app: the layout of ``_layout`` wired to the handlers of ``_handlers``."""
    h = _handlers(engine, examples)
    with gr.Blocks(title=title) as app:
        c = _layout(title, model_name, examples)

        def els(*keys: str) -> list[Any]:
            return [c[k] for k in keys]

        c["upload"].upload(h.upload, els("upload", "axis", "slice", "session", "lang"),
                           els(*_UPLOAD_OUT)).then(_empty_file_box, None, c["upload"])
        c["gallery"].select(h.example, els("lang"), els(*_EXAMPLE_OUT))
        ask_inputs = els("session", "editor", "task", "question", "objects", "box", "box_units", "options", "modality",
                         "regional_cot", "lang")
        ask_outputs = els(*_ASK_OUT)
        c["ask"].click(h.ask, ask_inputs, ask_outputs)
        c["question"].submit(h.ask, ask_inputs, ask_outputs)
        c["clear"].click(h.clear, els("session", "lang"), els("chat", "annotated", "boxes", "status", "session"))

        def on_lang(lang: str) -> list[Any]:
            return page_labels(lang, title, model_name)

        c["lang"].change(on_lang, c["lang"], els("intro", *_LABELLED, "ask", "clear"))
    return app
