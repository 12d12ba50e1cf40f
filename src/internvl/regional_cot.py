"""Regional CoT (MedRegA paper §5, Table 14): answer a question in two batched generation steps.

Step one asks for the regions relevant to the question (registry prompt ``regional_cot_locate``). Step two asks the
original question with those regions written before it (``regional_cot_answer``), keeping the task preamble and
``<image>`` placement; without a named region with a box it is the original question unchanged.
``medrega-eval run --regional-cot`` and the demo's check box both use :class:`RegionalCotGenerator`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from internvl.constants import IMAGE_PLACEHOLDER
from internvl.data.prompts import build_question, join_prompt, load_prompts
from internvl.inference import GenerationRequest
from internvl.regions import Region, parse_regions

__all__ = ["MAX_REGIONS", "CotAnswer", "RegionalCotGenerator", "guess_lang", "split_question", "step_one_request",
           "step_two_request", "usable_regions"]

MAX_REGIONS = 8  # regions written into the step-two prompt (keeps the prompt bounded whatever step one emits)


@dataclass
class CotAnswer:
    """One Regional CoT answer: the final answer, the step-one regions used in step two and the step-one answer."""

    answer: str
    regions: list[Region]
    step_one_answer: str

    def record_fields(self) -> dict[str, Any]:
        """The per-sample fields `medrega-eval run` keeps (JSON-ready)."""
        return {"cot_regions": [r.as_dict() for r in self.regions],
                "cot_step_one": self.step_one_answer}


def guess_lang(text: str) -> str:
    """``"zh"`` when the text has CJK ideographs, else ``"en"`` (the language of the registry prompts to use)."""
    return "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en"


@lru_cache(maxsize=1)
def _preambles() -> tuple[str, ...]:
    """Every literal registry base prompt (longest first): the task preamble a benchmark question may start with."""
    found = set()
    for tp in load_prompts().values():
        values = list(tp.base_prompt.values()) if isinstance(tp.base_prompt, dict) else [tp.base_prompt]
        found.update(text for text in [*values, *tp.base_prompt_variants.values()] if text and "{" not in text)
    return tuple(sorted(found, key=len, reverse=True))


def split_question(prompt: str) -> tuple[str, str]:
    """Split a prompt into (head, question): head is the leading ``<image>`` placeholders and registry task preamble
    (in either order, as MedRegA prompts have them), question is the rest."""
    pos = 0
    while True:
        rest = prompt[pos:]
        stripped = rest.lstrip()
        skip = len(rest) - len(stripped)
        if stripped.startswith(IMAGE_PLACEHOLDER):
            pos += skip + len(IMAGE_PLACEHOLDER)
            continue
        pre = next((p for p in _preambles() if stripped.startswith(p)), None)
        if pre is None:
            return prompt[:pos + skip], stripped
        pos += skip + len(pre)


def step_one_request(request: GenerationRequest, lang: str) -> GenerationRequest:
    """The step-one request: the registry's locate prompt around the question, same images and history."""
    _, question = split_question(request.prompt)
    n_images = request.prompt.count(IMAGE_PLACEHOLDER)
    prompt = build_question("regional_cot_locate", lang, n_images=n_images, question=question or request.prompt)
    return replace(request, prompt=prompt)


def step_two_request(request: GenerationRequest, regions: Sequence[Region], lang: str) -> GenerationRequest:
    """The original request with `regions` written before its question (unchanged when there are none)."""
    if not regions:
        return request
    head, question = split_question(request.prompt)
    body = build_question("regional_cot_answer", lang, n_images=0, question=question or request.prompt,
                          regions=list(regions), include_base_prompt=False)
    return replace(request, prompt=join_prompt(head, body))


def usable_regions(answer: str, limit: int = MAX_REGIONS) -> list[Region]:
    """Named regions with at least one box from a step-one answer (tolerant grammar), at most `limit`."""
    regions = [r for r in parse_regions(answer, strict=False) if r.name and r.name.strip() and r.boxes]
    return regions[:limit]


class RegionalCotGenerator:
    """A `Generator` look-alike for batch loops (`generate_batch`, `batch_size`) that returns :class:`CotAnswer`s."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator
        self.batch_size = generator.batch_size

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[CotAnswer]:
        """Both steps for one batch (each step one `generate_batch` call of the wrapped generator), worded in each
        request's `lang` (the demo's page language, the benchmark sample's), else guessed from its text."""
        langs = [r.lang or guess_lang(r.prompt) for r in requests]
        step_one = self.generator.generate_batch([step_one_request(r, lang) for r, lang in zip(requests, langs)])
        regions = [usable_regions(a) for a in step_one]
        second = [step_two_request(r, regs, lang) for r, regs, lang in zip(requests, regions, langs)]
        answers = self.generator.generate_batch(second)
        return [CotAnswer(a, regs, s1) for a, regs, s1 in zip(answers, regions, step_one)]
