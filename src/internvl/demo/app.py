"""The MedRegA web demo (gradio): upload an image, pick a task and language, chat; predicted boxes are drawn.

Layout: left, the image (upload PNG/JPEG/DICOM/NIfTI, NIfTI slice controls, an editor to draw a query box) and a
gallery of bundled examples; right, task / language / inputs, the annotated answer image, the chat and the parsed
boxes. Every handler turns bad input into a message in the page (``UserInputError``) and never raises, so one bad
upload cannot take the server down; unexpected errors are logged with their traceback and reported in the page too.

Generation goes through ``internvl.inference.Generator``, the path of ``--batch`` and ``medrega-eval run`` (the
conversation's earlier turns ride along as the request's history); requests are serialised by a lock.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import tempfile
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

from internvl.constants import IMAGE_PLACEHOLDER
from internvl.demo.drawing import draw_regions
from internvl.demo.limits import check_fields, check_prompt_budget, public_message, scrub_paths
from internvl.demo.render import answer_html, escape, region_name_label
from internvl.demo.strings import LANGS, text
from internvl.demo.tasks import TASKS, build_prompt, follow_up_prompt, task_label
from internvl.demo.uploads import UserInputError, box_from_drawing, load_upload, parse_typed_box
from internvl.inference import GenerationRequest, GenerationSettings, Generator
from internvl.regional_cot import regional_cot
from internvl.regions import Box, Region, parse_regions

__all__ = ["DemoEngine", "Example", "ask", "build_app", "load_examples", "page_labels"]

log = logging.getLogger("medrega.demo")


class DemoEngine:
    """Answers one chat turn about one image (thread-safe, one request at a time) through the shared generation path,
    `internvl.inference.Generator`: the same template rendering, stop tokens and answer decoding as `--batch` and
    `medrega-eval run`."""

    def __init__(self, model: Any, tokenizer: Any, settings: GenerationSettings | None = None) -> None:
        self.generator = Generator(model, tokenizer, settings or GenerationSettings(), batch_size=1)
        self._lock = threading.Lock()

    def answer(self, image: Image.Image, prompt: str, history: list[tuple[str, str]], *, cot: bool = False,
               lang: str | None = None) -> tuple[str, list, list[Region]]:
        """(answer text, new history, step-one regions) for ``prompt`` after ``history`` (list of (question, answer)
        pairs). ``cot``: Regional CoT (`internvl.regional_cot`, as `medrega-eval run --regional-cot`): the model first
        finds the relevant regions, then answers with them in the prompt; the history keeps the user's own prompt."""
        if not history and IMAGE_PLACEHOLDER not in prompt:
            prompt = IMAGE_PLACEHOLDER + "\n" + prompt  # kept in the history: later turns find the image there
        request = GenerationRequest(prompt, images=[image], history=list(history))
        with self._lock, torch.inference_mode():
            if cot:
                result = regional_cot(self.generator, [request], langs=[lang])[0]
                text, step_one = result.answer, list(result.regions)
            else:
                text, step_one = self.generator.generate_batch([request])[0], []
        return text, [*history, (prompt, text)], step_one


@dataclass(frozen=True)
class Example:
    """A bundled example: image file and the task inputs that go with it (``asset/examples/examples.json``)."""

    path: Path
    title: str
    task: str
    lang: str
    modality: str = ""
    question: str = ""
    objects: str = ""
    box: str = ""
    options: str = ""


def load_examples(directory: str | Path) -> list[Example]:
    """Read ``examples.json`` in ``directory`` (list of objects with ``file``, ``title``, ``task``, ``lang`` and the
    task inputs). A missing directory gives no examples; a bad entry raises ``ValueError`` naming it."""
    directory = Path(directory)
    index = directory / "examples.json"
    if not index.is_file():
        return []
    out = []
    for i, entry in enumerate(json.loads(index.read_text(encoding="utf-8"))):
        where = f"{index}: entry {i}"
        try:
            ex = Example(path=directory / entry.pop("file"), **entry)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
        if ex.task not in TASKS or ex.lang not in ("en", "zh") or not ex.path.is_file():
            raise ValueError(f"{where}: bad task/lang or missing image {ex.path}")
        out.append(ex)
    return out


_BROWSER_IMAGES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


def gallery_preview(path: Path) -> Path:
    """A browser-displayable PNG for an example in another format (DICOM, NIfTI, TIFF), cached in the temp dir."""
    if path.suffix.lower() in _BROWSER_IMAGES:
        return path
    key = hashlib.sha1(f"{path.resolve()}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / "medrega-demo-previews" / f"{key}.png"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        load_upload(path).image.save(out)
    return out


@dataclass
class Session:
    """Per-browser-tab state: the current image, its name and the chat history."""

    image: Image.Image | None = None
    name: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)
    chat: list[dict[str, str]] = field(default_factory=list)


def _message(message: str, kind: str = "error", lang: str = "en") -> str:
    """A status line: a plain-text kind ("Error:", "Done:", "Note:" in ``lang``) and the message. No emoji: a browser
    without an emoji font would show an empty box."""
    return f"**{text('kind_' + kind, lang)}** {escape(message)}"


def _regions_table(regions: list[Region], drawn: list) -> list[dict[str, Any]]:
    boxes = [(n, r.name, box) for n, r in enumerate(regions, 1) for box in r.boxes]  # `drawn` has one per box
    return [{"n": n, "name": name, "box": box.as_list(), "pixels": [round(v, 1) for v in shown.xyxy]}
            for (n, name, box), shown in zip(boxes, drawn)]


def ask(engine: DemoEngine, session: Session, *, task: str, lang: str, question: str = "", objects: str = "",
        box_text: str = "", box_units: str = "grid", drawing: Any = None, options: str = "", modality: str = "",
        cot: bool = False) -> tuple[Image.Image | None, list[dict[str, Any]], str]:
    """One turn: validate inputs, build the prompt, generate (``cot``: Regional CoT), parse and draw boxes; the
    step-one regions of Regional CoT are drawn after the answer's own, labelled "step 1".

    Returns (annotated image, box rows, status message). Raises :class:`UserInputError` for bad input; the caller
    shows it. The session's history and chat grow by this turn.
    """
    check_fields(question=question, objects=objects, options=options, modality=modality, box=box_text)
    if session.image is None:
        raise UserInputError(text("need_image", lang))
    w, h = session.image.size
    query_box: Box | None = None
    if TASKS.get(task) is not None and "box" in TASKS[task].needs:
        if (box_text or "").strip():
            query_box = parse_typed_box(box_text, w, h, units=box_units)
        else:
            query_box = box_from_drawing(drawing)
    if session.history and task == "vqa":
        prompt = follow_up_prompt(question)
    else:
        prompt = build_prompt(task, lang, question=question, box=query_box, objects=objects, options=options,
                              modality=modality)
        if session.history:  # the image is already in the first turn
            prompt = prompt.replace("<image>\n", "")
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


def _editor_value(image: Image.Image | None) -> dict[str, Any] | None:
    """What the image editor shows for ``image`` (no drawn layer yet)."""
    if image is None:
        return None
    return {"background": image, "layers": [], "composite": image}


def _with_errors(fn: Callable, on_error: Callable) -> Callable:
    """``fn`` as a gradio handler that never raises: bad input (``UserInputError``) and unexpected errors become
    ``on_error(message, *args)`` (unexpected ones are logged with their traceback). Every handler's last input is the
    page language, used for the internal-error message."""

    @functools.wraps(fn)  # keeps the signature, so gradio still injects gr.SelectData
    def wrapper(*args):
        try:
            return fn(*args)
        except UserInputError as exc:
            return on_error(scrub_paths(str(exc)), *args)
        except Exception as exc:  # noqa: BLE001 - keep serving; report in the page
            log.error("demo handler %s failed:\n%s", fn.__name__, traceback.format_exc())
            lang = args[-1] if args and args[-1] in LANGS else "en"
            return on_error(text("internal", lang, what=public_message(exc)), *args)

    return wrapper


def _handlers(engine: DemoEngine, examples: list[Example]) -> SimpleNamespace:
    """The page's event handlers (upload, example pick, ask, clear) and their error replies, already wrapped by
    ``_with_errors`` where the page can send bad input."""

    def on_upload(path: str | None, axis: str, slice_text: str, session: Session, lang: str):
        if not path:
            return None, gr.update(), session, _message(text("no_file", lang), "info", lang)
        check_fields(slice=slice_text)
        slice_index = None
        if (slice_text or "").strip():
            try:
                slice_index = int(slice_text)
            except ValueError:
                raise UserInputError(text("bad_slice", lang, value=slice_text)) from None
        up = load_upload(path, axis=axis, slice_index=slice_index)
        new = Session(image=up.image, name=Path(path).name)
        # the file box is emptied so the next upload works at once; the image lives on in the editor
        return None, _editor_value(up.image), new, _message(text("loaded", lang, what=up.description), "ok", lang)

    def on_upload_error(message: str, path, axis, slice_text, session, lang):
        return None, gr.update(), session, _message(message, "error", lang)

    def on_example(evt: gr.SelectData, session: Session, lang: str):
        ex = examples[evt.index]
        up = load_upload(ex.path)
        new = Session(image=up.image, name=ex.path.name)
        return (_editor_value(up.image), new, ex.task, ex.lang, ex.question, ex.objects, ex.box, ex.options,
                ex.modality, _message(text("example_loaded", lang, title=ex.title), "ok", lang))

    def example_error(message: str, evt, session, lang):
        return (gr.update(), session, *([gr.update()] * 7), _message(message, "error", lang))

    def on_ask(session: Session, drawing, task, question, objects, box_text, box_units, options, modality, cot,
               lang):
        layer = None
        if isinstance(drawing, dict) and drawing.get("layers"):
            layer = drawing["layers"][0]
        annotated, rows, status = ask(engine, session, task=task, lang=lang, question=question, objects=objects,
                                      box_text=box_text, box_units=box_units, drawing=layer, options=options,
                                      modality=modality, cot=bool(cot))
        return annotated, list(session.chat), rows, status, session

    def on_ask_error(message: str, session, *rest):
        lang = rest[-1] if rest and rest[-1] in LANGS else "en"
        return gr.update(), list(session.chat) if session else [], gr.update(), _message(message, "error", lang), session

    def on_clear(session: Session, lang: str):
        new = Session(image=session.image, name=session.name)
        return [], None, [], _message(text("cleared", lang), "info", lang), new

    return SimpleNamespace(upload=_with_errors(on_upload, on_upload_error),
                           example=_with_errors(on_example, example_error),
                           ask=_with_errors(on_ask, on_ask_error), clear=on_clear)


_PLANES = ("axial", "coronal", "sagittal")  # NIfTI planes (values of load_upload's axis)


def _layout(title: str, model_name: str, examples: list[Example]) -> SimpleNamespace:
    """Build the page's components inside the current ``gr.Blocks``; returns them by name. Element ids (``upload``,
    ``task``, ``objects``, ``ask``, ``annotated``, ``status``...) are stable for the browser test. Labels are the
    English ones of ``internvl.demo.strings``; :func:`page_labels` gives the updates for another language."""
    en = functools.partial(text, lang="en")
    previews = [(str(gallery_preview(e.path)), e.title) for e in examples]
    c = SimpleNamespace()
    c.intro = gr.Markdown(f"# {title}\n" + en("intro", model=model_name), elem_id="intro")
    c.session = gr.State(Session())
    with gr.Row():
        with gr.Column(scale=1):
            # no client/gradio type filter: DICOM files often have no extension; load_upload checks the type
            # (magic bytes, then ACCEPTED_SUFFIXES) and reports anything else in the page
            c.upload = gr.File(label=en("upload"), file_count="single", type="filepath", elem_id="upload")
            with gr.Row():
                c.axis = gr.Dropdown([(en(a), a) for a in _PLANES], value="axial", label=en("axis"), elem_id="axis")
                c.slice_box = gr.Textbox(label=en("slice"), elem_id="slice")
            c.editor = gr.ImageEditor(label=en("editor"), type="numpy", image_mode="RGBA", sources=(), transforms=(),
                                      layers=False, elem_id="editor")
            c.gallery = gr.Gallery(previews, label=en("gallery"), columns=4, height=220, allow_preview=False,
                                   elem_id="gallery")
        with gr.Column(scale=1):
            c.task = gr.Radio([(task_label(k, "en"), k) for k in TASKS], value="text_to_region", label=en("task"),
                              elem_id="task")
            c.lang = gr.Radio([("English", "en"), ("中文", "zh")], value="en", label=en("lang"), elem_id="lang")
            c.modality = gr.Textbox(label=en("modality"), value="MRI", elem_id="modality")
            c.question = gr.Textbox(label=en("question"), elem_id="question")
            c.objects = gr.Textbox(label=en("objects"), elem_id="objects")
            with gr.Row():
                c.box_text = gr.Textbox(label=en("box"), elem_id="box")
                c.box_units = gr.Radio([(en("units_grid"), "grid"), (en("units_pixels"), "pixels")], value="grid",
                                       label=en("box_units"), elem_id="box_units")
            c.options = gr.Textbox(label=en("options"), elem_id="options")
            c.cot = gr.Checkbox(label=en("regional_cot"), value=False, elem_id="regional_cot")
            with gr.Row():
                c.ask_btn = gr.Button(en("ask"), variant="primary", elem_id="ask")
                c.clear_btn = gr.Button(en("clear"), elem_id="clear")
            c.status = gr.Markdown(elem_id="status")
            c.annotated = gr.Image(label=en("annotated"), type="pil", interactive=False, format="png",
                                   elem_id="annotated")
            c.chatbot = gr.Chatbot(label=en("chat"), height=260, elem_id="chat")
            c.boxes = gr.JSON(label=en("boxes"), elem_id="boxes")
    return c


# components relabelled by page_labels, in its order: (attribute of _layout's namespace, string key)
_LABELLED = (("upload", "upload"), ("axis", "axis"), ("slice_box", "slice"), ("editor", "editor"),
             ("gallery", "gallery"), ("task", "task"), ("lang", "lang"), ("modality", "modality"),
             ("question", "question"), ("objects", "objects"), ("box_text", "box"), ("box_units", "box_units"),
             ("options", "options"), ("cot", "regional_cot"), ("annotated", "annotated"), ("chatbot", "chat"),
             ("boxes", "boxes"))


def page_labels(lang: str, title: str, model_name: str) -> list[Any]:
    """gradio updates that put the whole page in ``lang``: intro, every label, the task names, box units and the two
    buttons, in the order intro, ``_LABELLED``, ask, clear."""
    updates: list[Any] = [gr.update(value=f"# {title}\n" + text("intro", lang, model=model_name))]
    for attr, key in _LABELLED:
        extra: dict[str, Any] = {}
        if attr == "task":
            extra["choices"] = [(task_label(k, lang), k) for k in TASKS]
        elif attr == "axis":
            extra["choices"] = [(text(a, lang), a) for a in _PLANES]
        elif attr == "box_units":
            extra["choices"] = [(text("units_grid", lang), "grid"), (text("units_pixels", lang), "pixels")]
        updates.append(gr.update(label=text(key, lang), **extra))
    return updates + [gr.update(value=text("ask", lang)), gr.update(value=text("clear", lang))]


def build_app(engine: DemoEngine, examples: list[Example], *, title: str = "MedRegA demo",
              model_name: str = "") -> Any:
    """The gradio Blocks app: the layout of ``_layout`` wired to the handlers of ``_handlers``."""
    h = _handlers(engine, examples)
    with gr.Blocks(title=title) as app:
        c = _layout(title, model_name, examples)
        c.upload.upload(h.upload, [c.upload, c.axis, c.slice_box, c.session, c.lang],
                        [c.upload, c.editor, c.session, c.status])
        c.gallery.select(h.example, [c.session, c.lang], [c.editor, c.session, c.task, c.lang, c.question, c.objects,
                                                          c.box_text, c.options, c.modality, c.status])
        ask_inputs = [c.session, c.editor, c.task, c.question, c.objects, c.box_text, c.box_units, c.options,
                      c.modality, c.cot, c.lang]
        ask_outputs = [c.annotated, c.chatbot, c.boxes, c.status, c.session]
        c.ask_btn.click(h.ask, ask_inputs, ask_outputs)
        c.question.submit(h.ask, ask_inputs, ask_outputs)
        c.clear_btn.click(h.clear, [c.session, c.lang], [c.chatbot, c.annotated, c.boxes, c.status, c.session])
        relabelled = [c.intro, *(getattr(c, attr) for attr, _ in _LABELLED), c.ask_btn, c.clear_btn]

        def on_lang(lang: str) -> list[Any]:
            return page_labels(lang, title, model_name)

        c.lang.change(on_lang, [c.lang], relabelled)
    return app
