"""Demo task -> model prompt through the prompt registry (``internvl/data/prompts``), so the web UI asks the model
exactly what it was trained on, in the trainer's prompt order (``<image>\\n`` + base prompt + question)."""
from __future__ import annotations

import re

from internvl.data.encode import apply_prompt_order
from internvl.data.prompts import PromptError, build_question
from internvl.demo.strings import text
from internvl.demo.uploads import UserInputError, check_question
from internvl.regions import Box

__all__ = ["TASKS", "build_prompt", "split_names", "task_label"]

#: the task menu: demo task -> the registry task it asks (names: ``task_<key>`` in ``strings.json``)
TASKS: dict[str, str] = {"vqa": "vqa_open", "report": "report_general", "diagnosis": "classify_single",
                         "region_to_text": "region_to_text", "text_to_region": "text_to_region",
                         "grounded_report": "grounded_whole"}


def task_label(task: str, lang: str) -> str:
    """The task menu's name of demo task ``task`` in ``lang`` ("en"/"zh")."""
    return text(f"task_{task}", lang)


def split_names(text: str | None) -> list[str]:
    """Object names / class options typed as a comma, semicolon, Chinese comma or newline separated list."""
    return [s.strip() for s in re.split(r"[,，、；;\n]", text or "") if s.strip()]


def build_prompt(task: str, lang: str, *, question: str | None = None, box: Box | None = None,
                 objects: str | None = None, options: str | None = None, modality: str | None = None,
                 n_images: int = 1) -> str:
    """The user turn for demo task ``task`` (a :data:`TASKS` key) in ``lang``, with ``<image>`` first for the
    conversation's first turn (``n_images=0`` for a later one: the image is in the history); :class:`UserInputError`
    with a page message when an input the task needs is missing."""
    if task not in TASKS:
        raise UserInputError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if lang not in ("en", "zh"):
        raise UserInputError(f"Unknown language {lang!r}; choose en or zh.")
    mod = (modality or "").strip() or ("medical" if lang == "en" else "医学")
    fields: dict[str, object] = {}
    if task == "vqa":
        fields = {"question": check_question(question)}
    elif task == "diagnosis":
        opts = split_names(options)
        if len(opts) < 2 or len(set(opts)) != len(opts):
            raise UserInputError(text("need_options", lang))
        fields = {"modality": mod, "options": opts, "target": "disease"}
    elif task == "region_to_text":
        if box is None:
            raise UserInputError(text("need_box", lang))
        fields = {"modality": mod, "regions": [("this", [box])]}
    elif task == "text_to_region":
        names = split_names(objects)
        if not names:
            raise UserInputError(text("need_objects", lang))
        fields = {"modality": mod, "objects": names}
    elif task == "grounded_report":
        fields = {"modality": mod, "target": "organ"}
    try:
        human = build_question(TASKS[task], lang, **fields)  # type: ignore[arg-type]
    except PromptError as exc:
        raise UserInputError(f"Cannot build the {task_label(task, 'en')} prompt: {exc}") from exc
    # the trainer's prompt order ("<image>\n" + task prompt + question): what MedRegA and the bundled model saw
    return apply_prompt_order([{"from": "human", "value": human}], n_images)[0]["value"]

