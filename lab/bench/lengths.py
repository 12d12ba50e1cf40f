"""A realistic MedRegA sequence-length mix for the packing benchmark, drawn from the real IU X-ray report texts.

The report lengths come from `NLMCXR_reports.tgz` (3,955 Open-i reports shipped in the torchxrayvision wheel; install
it with `pip install --no-deps torchxrayvision==1.5.7`, or copy the .tgz next to the benchmark). Nothing of the
text is stored or written: only token counts are computed, in memory. Token counts are estimated as
`ceil(1.25 * pieces)` where pieces are words and punctuation marks (a 64k-vocabulary BPE splits medical words into
about 1.2-1.3 pieces per word); the real Yi tokenizer is not available offline.

A sample is: system + user prompt, `<img>` + 256 image tokens + `</img>`, and an answer whose length depends on the
task, in MedRegA-like proportions (the paper's MedRegInstruct mixes VQA, report generation and region tasks):

| task              | share | answer tokens                                  | question tokens |
|-------------------|-------|------------------------------------------------|-----------------|
| VQA               | 0.40  | 1-12 (short answers)                           | 10-40           |
| report generation | 0.30  | an IU report (FINDINGS + IMPRESSION)           | 15-40           |
| region tasks      | 0.15  | 10-60 (a name and 1-3 boxes)                   | 20-60           |
| grounded report   | 0.15  | an IU report + 18 tokens per box for 1-4 boxes | 20-50           |
"""
from __future__ import annotations

import importlib.util
import math
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEMPLATE_TOKENS = 24  # system prompt + ChatML markers of the Hermes-2 template ("Answer the questions.")
IMAGE_TOKENS = 256 + 2  # <img> + 256 x <IMG_CONTEXT> + </img>
_PIECE = re.compile(r"\w+|[^\w\s]")


class ReportsNotFoundError(FileNotFoundError):
    """The IU report archive is missing."""


def find_reports_archive(explicit: str | Path | None = None) -> Path:
    """Locate NLMCXR_reports.tgz: `explicit`, then $PWD/.benchdata/, then the installed torchxrayvision package."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    candidates.append(Path.cwd() / ".benchdata" / "NLMCXR_reports.tgz")
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / "data" / "NLMCXR_reports.tgz")
    for path in candidates:
        if path.is_file():
            return path
    raise ReportsNotFoundError(
        "NLMCXR_reports.tgz not found (looked at: "
        + ", ".join(str(p) for p in candidates)
        + "); install it with `pip install --no-deps torchxrayvision==1.5.7` or pass --reports PATH"
    )


def estimate_tokens(text: str) -> int:
    """Estimated BPE token count of English text: ceil(1.25 x words-and-punctuation pieces)."""
    return math.ceil(1.25 * len(_PIECE.findall(text)))


def iu_report_token_lengths(archive: str | Path | None = None) -> list[int]:
    """Estimated token lengths of FINDINGS + IMPRESSION of every IU report that has either section."""
    path = find_reports_archive(archive)
    lengths: list[int] = []
    with tarfile.open(path) as tf:
        for member in tf.getmembers():
            if not member.name.endswith(".xml"):
                continue
            handle = tf.extractfile(member)
            if handle is None:
                continue
            try:
                root = ET.parse(handle).getroot()
            except ET.ParseError as exc:
                raise ValueError(f"{path}:{member.name}: bad XML: {exc}") from None
            sections = {a.get("Label"): (a.text or "").strip() for a in root.iter("AbstractText")}
            text = " ".join(s for s in (sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")) if s)
            if text:
                lengths.append(estimate_tokens(text))
    if not lengths:
        raise ValueError(f"{path}: no report with FINDINGS or IMPRESSION found")
    return lengths


@dataclass(frozen=True)
class SampleLength:
    """One synthetic sample: prompt tokens (template + question + image block) and supervised answer tokens."""

    task: str
    prompt: int
    answer: int

    @property
    def total(self) -> int:
        # the answer is followed by <|im_end|>, which is supervised too
        return self.prompt + self.answer + 1


TASK_SHARES = {"vqa": 0.40, "report": 0.30, "region": 0.15, "grounded": 0.15}


def sample_mix(n: int, report_lengths: list[int], *, seed: int = 0, max_len: int = 2048) -> list[SampleLength]:
    """Draw `n` samples from the MedRegA-like task mix (see the module docstring); totals are capped at max_len."""
    if not report_lengths:
        raise ValueError("report_lengths is empty")
    rng = np.random.default_rng(seed)
    tasks = list(TASK_SHARES)
    picks = rng.choice(len(tasks), size=n, p=[TASK_SHARES[t] for t in tasks])
    out: list[SampleLength] = []
    for k in picks:
        task = tasks[int(k)]
        if task == "vqa":
            question, answer = rng.integers(10, 41), rng.integers(1, 13)
        elif task == "report":
            question, answer = rng.integers(15, 41), report_lengths[rng.integers(len(report_lengths))]
        elif task == "region":
            question, answer = rng.integers(20, 61), rng.integers(10, 61)
        else:
            question = rng.integers(20, 51)
            answer = report_lengths[rng.integers(len(report_lengths))] + 18 * int(rng.integers(1, 5))
        prompt = TEMPLATE_TOKENS + IMAGE_TOKENS + int(question)
        answer = int(min(answer, max_len - prompt - 1))
        out.append(SampleLength(task=task, prompt=prompt, answer=answer))
    return out


def describe(lengths: list[int]) -> dict[str, float]:
    """Summary statistics of a list of lengths (count, mean, p10, p50, p90, max)."""
    arr = np.asarray(lengths, dtype=np.float64)
    return {
        "count": int(arr.size),
        "mean": float(arr.mean()),
        "p10": float(np.percentile(arr, 10)),
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "max": float(arr.max()),
    }
