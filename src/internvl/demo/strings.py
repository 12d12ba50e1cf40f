"""The demo page's words in English and Chinese: one table, used by every label, help text and status message.

``text(key, lang, **fields)`` looks a key up and fills ``{fields}``; an unknown key or language is a programming
error (``KeyError``), so a missing translation fails the unit test rather than showing a raw key in the page. Task
names live with the tasks (``internvl.demo.tasks.TASKS``: ``label_en`` / ``label_zh``, read through
``internvl.demo.tasks.task_label``). Messages of the file and box checks (``internvl.demo.uploads``) stay English:
they name files, types and values.
"""
from __future__ import annotations

__all__ = ["LANGS", "STRINGS", "text"]

LANGS: tuple[str, ...] = ("en", "zh")

STRINGS: dict[str, tuple[str, str]] = {
    "intro": (("Model: `{model}`. Upload a medical image, choose a task and ask. Boxes are `[x1, y1, x2, y2]` on "
               "a 0-999 grid (MedRegA's convention). Research demo, not for clinical use."),
              ("模型：`{model}`。上传一张医学图像，选择任务后提问。框的格式为 0-999 网格上的 `[x1, y1, x2, y2]`"
               "（MedRegA 的约定）。仅供研究演示，不可用于临床。")),
    "upload": ("Image file (PNG, JPEG, TIFF, DICOM, NIfTI)", "图像文件（PNG、JPEG、TIFF、DICOM、NIfTI）"),
    "axis": ("NIfTI plane", "NIfTI 切面"),
    "axial": ("axial", "轴位"),
    "coronal": ("coronal", "冠状位"),
    "sagittal": ("sagittal", "矢状位"),
    "slice": ("NIfTI slice (empty = middle)", "NIfTI 层号（留空 = 中间层）"),
    "editor": ("Image (draw over a region for Region-to-Text)", "图像（区域识别：在图上画出区域）"),
    "gallery": ("Bundled examples", "内置示例"),
    "task": ("Task", "任务"),
    "lang": ("Language", "语言"),
    "modality": ("Modality (e.g. MRI, CT; used by the task prompt)", "模态（如 MRI、CT；用于任务提示）"),
    "question": ("Question (VQA, and follow-up turns)", "问题（视觉问答及后续追问）"),
    "objects": ("Objects to find (Text-to-Region; comma separated)", "要定位的目标（目标定位；用逗号分隔）"),
    "box": ("Box x1, y1, x2, y2 (Region-to-Text; or draw it)", "框 x1, y1, x2, y2（区域识别；或在图上画出）"),
    "box_units": ("Box units", "框的单位"),
    "units_grid": ("0-999 grid", "0-999 网格"),
    "units_pixels": ("pixels", "像素"),
    "options": ("Candidate diagnoses (Diagnosis; comma separated)", "候选诊断（诊断；用逗号分隔）"),
    "ask": ("Ask", "提问"),
    "regional_cot": ("Regional CoT: find the relevant regions first, then answer with them",
                     "区域思维链：先定位相关区域，再结合这些区域回答"),
    "cot_region": ("step 1: {name}", "第一步：{name}"),
    "clear": ("Clear chat", "清空对话"),
    "annotated": ("Answer with predicted boxes", "回答及预测框"),
    "chat": ("Chat", "对话"),
    "boxes": ("Parsed boxes", "解析出的框"),
    "raw": ("raw answer", "原始回答"),
    "empty_answer": ("(empty answer)", "（空回答）"),
    "kind_error": ("Error:", "错误："),
    "kind_ok": ("Done:", "完成："),
    "kind_info": ("Note:", "提示："),
    "no_file": ("No file received.", "未收到文件。"),
    "loaded": ("Loaded {what}. Chat history cleared.", "已加载 {what}。对话记录已清空。"),
    "example_loaded": ("Example loaded: {title}.", "已加载示例：{title}。"),
    "answered": ("Answered in {seconds:.1f} s; {n} box(es) drawn.", "用时 {seconds:.1f} 秒回答；绘制了 {n} 个框。"),
    "cleared": ("Chat cleared; the image stays.", "对话已清空；图像保留。"),
    "need_image": ("Upload an image (PNG, JPEG, DICOM or NIfTI) or pick a bundled example first.",
                   "请先上传图像（PNG、JPEG、DICOM 或 NIfTI）或选择一个内置示例。"),
    "internal": ("Internal error ({what}); see the server log.", "内部错误（{what}）；详见服务器日志。"),
    "bad_slice": ("Slice {value!r} is not a whole number.", "层号 {value!r} 不是整数。"),
    "need_options": ("Diagnosis needs at least two different candidate classes, separated by commas.",
                     "诊断需要至少两个不同的候选类别，用逗号分隔。"),
    "need_box": ("Region-to-Text needs a box: draw one on the image or type x1, y1, x2, y2.",
                 "区域识别需要一个框：在图上画出，或输入 x1, y1, x2, y2。"),
    "need_objects": ("Text-to-Region needs the name(s) of what to find, e.g. 'left frontal lobe'.",
                     "目标定位需要要查找的目标名称，例如“左侧额叶”。"),
}


def text(key: str, lang: str, **fields: object) -> str:
    """The page string ``key`` in ``lang`` ("en" or "zh"), with ``{fields}`` filled in."""
    en, zh = STRINGS[key]
    template = {"en": en, "zh": zh}[lang]
    return template.format(**fields) if fields else template

