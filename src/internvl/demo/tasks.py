"""Demo task -> model prompt, through the prompt registry (``internvl/data/prompts``), so that the web UI asks the
model exactly what it was trained on.

Each demo task maps to a registry task; :func:`build_prompt` fills it with what the user gave (question, box, object
names, class options) and returns the first user turn in the trainer's order (``<image>\\n`` + base prompt +
question; the order MedRegA was fine-tuned with, see ``internvl.data.encode``). It uses
:func:`internvl.data.prompts.build_question`, the registry's question-only builder (no answer fields needed).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from internvl.constants import IMAGE_PLACEHOLDER
from internvl.data.encode import apply_prompt_order
from internvl.data.prompts import PromptError, build_question
from internvl.demo.strings import text
from internvl.demo.uploads import UserInputError, check_question
from internvl.regions import Box

__all__ = ["TASKS", "DemoTask", "build_prompt", "follow_up_prompt", "split_names", "task_label"]


@dataclass(frozen=True)
class DemoTask:
    """A task of the demo's task menu: its label, the registry task it uses and which inputs it needs."""

    key: str
    label_en: str
    label_zh: str
    registry_task: str
    needs: tuple[str, ...]  # subset of ("question", "box", "objects", "options", "modality")


TASKS: dict[str, DemoTask] = {t.key: t for t in (
    DemoTask("vqa", "VQA", "视觉问答", "vqa_open", ("question",)),
    DemoTask("report", "Report", "报告生成", "report_general", ()),
    DemoTask("diagnosis", "Diagnosis", "诊断", "classify_single", ("options", "modality")),
    DemoTask("region_to_text", "Region-to-Text", "区域识别", "region_to_text", ("box", "modality")),
    DemoTask("text_to_region", "Text-to-Region", "目标定位", "text_to_region", ("objects", "modality")),
    DemoTask("grounded_report", "Grounded report", "定位报告", "grounded_whole", ("modality",)),
)}


def task_label(task: str, lang: str) -> str:
    """The task menu's name of demo task ``task`` in ``lang`` ("en"/"zh")."""
    spec = TASKS[task]
    return {"en": spec.label_en, "zh": spec.label_zh}[lang]


def split_names(text: str | None) -> list[str]:
    """Object names / class options typed as a comma, semicolon, Chinese comma or newline separated list."""
    return [s.strip() for s in re.split(r"[,，、；;\n]", text or "") if s.strip()]


def build_prompt(task: str, lang: str, *, question: str | None = None, box: Box | None = None,
                 objects: str | Sequence[str] | None = None, options: str | Sequence[str] | None = None,
                 modality: str | None = None) -> str:
    """The first user turn for demo task ``task`` (a :data:`TASKS` key) in ``lang`` ("en"/"zh").

    Raises :class:`~internvl.demo.uploads.UserInputError` with a page message when an input the task needs is missing
    (empty question, no box, no object names, fewer than two options).
    """
    if task not in TASKS:
        raise UserInputError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if lang not in ("en", "zh"):
        raise UserInputError(f"Unknown language {lang!r}; choose en or zh.")
    spec = TASKS[task]
    mod = (modality or "").strip() or ("medical" if lang == "en" else "医学")
    fields: dict[str, object] = {}
    if spec.registry_task == "vqa_open":
        fields = {"question": check_question(question)}
    elif spec.registry_task == "classify_single":
        opts = split_names(options) if isinstance(options, str) or options is None else [str(o) for o in options]
        if len(opts) < 2 or len(set(opts)) != len(opts):
            raise UserInputError(text("need_options", lang))
        fields = {"modality": mod, "options": opts, "target": "disease"}
    elif spec.registry_task == "region_to_text":
        if box is None:
            raise UserInputError(text("need_box", lang))
        fields = {"modality": mod, "regions": [("this", [box])]}
    elif spec.registry_task == "text_to_region":
        names = split_names(objects) if isinstance(objects, str) or objects is None else [str(o) for o in objects]
        if not names:
            raise UserInputError(text("need_objects", lang))
        fields = {"modality": mod, "objects": names}
    elif spec.registry_task == "grounded_whole":
        fields = {"modality": mod, "target": "organ"}
    try:
        human = build_question(spec.registry_task, lang, **fields)  # type: ignore[arg-type]
    except PromptError as exc:
        raise UserInputError(f"Cannot build the {spec.label_en} prompt: {exc}") from exc
    # the trainer's prompt order ("<image>\n" + task prompt + question): what MedRegA and the bundled model saw
    return apply_prompt_order([{"from": "human", "value": human}], 1, "", "train")[0]["value"]


def follow_up_prompt(question: str | None) -> str:
    """A later turn of a multi-turn chat: the user's text as is (no task prompt, no image placeholder)."""
    q = check_question(question)
    if IMAGE_PLACEHOLDER in q:
        raise UserInputError(f"Follow-up questions cannot contain {IMAGE_PLACEHOLDER}; the image is already shown.")
    return q
