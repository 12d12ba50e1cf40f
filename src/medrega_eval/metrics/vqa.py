"""VQA metrics in English and Chinese: closed-question accuracy, open-question recall/accuracy (the paper's rules),
token F1, BLEU-1, exact match. The default rules and the `compat="medrega"` ones (the original `src/eval/vqa`
scorer) are tabled in docs/evaluation.md.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medrega_eval.metrics.text import _get_jieba, sentence_bleu1, token_set_scores, tokenize_zh

__all__ = ["VQASample", "normalize_en", "medrega_clean_en", "vqa_tokens", "score_vqa_sample", "aggregate_vqa",
           "says_not_visible"]

# "X is not visible" answers (a "locate X" question for an X absent from the image), English and Chinese.
_NOT_VISIBLE_RE = re.compile(
    r"\bnot\s+(?:visible|seen|shown|present|depicted|found)\b|\bcannot\s+be\s+(?:seen|found|located)\b|\binvisible\b"
    r"|未见(?!明显)(?!异常)|不可见|看不到|未显示|没有显示|无法看到|不在(?:这张|本|该)?(?:图|影像)", re.IGNORECASE)

CLOSED_RECALL = 0.8
OPEN_ACCURACY_RECALL = 0.75
ZH_CLOSED_ANSWERS = frozenset({"是", "否", "不是", "有", "没有", "yes", "no"})

# MedRegA's cleanStr whole-word contractions (src/eval/vqa/postprocess_utils.py).
_MEDREGA_CONTRACTIONS = {"pa": "posterior anterior", "ivc": "inferior vena cava", "head": "brain", "both": "bilateral",
                         "tumour": "tumor", "tumours": "tumors"}


@dataclass(frozen=True)
class VQASample:
    """Per-sample VQA scores (the samples.jsonl row, in order); `closed` says which rule applied."""

    closed: bool
    correct: bool | None  # closed questions: rule outcome; open: recall >= 0.75
    recall: float
    token_f1: float
    bleu1: float
    exact_match: bool


def normalize_en(text: str) -> str:
    """Default English answer normalization: NFKC, lower-case, MedRegA's medical contractions, punctuation -> space
    (unlike the original cleanStr, "yes." and "yes" are the same answer)."""
    text = unicodedata.normalize("NFKC", text).lower().replace("-", " ")
    text = re.sub(r"[^\w\s%]", " ", text)
    return " ".join(_MEDREGA_CONTRACTIONS.get(w, w) for w in text.split())


def medrega_clean_en(text: str) -> str:
    """The original VQA `cleanStr`, step for step: split on [,:.], drop parts containing "_", rejoin with ",",
    lower-case; split again, apply the whole-word contractions inside each part, rejoin with ","; "-" -> space.
    Nothing is stripped, so punctuation other than the split characters stays attached to words ("yes." -> "yes,")."""
    parts = [p for p in re.split(r"[,:.]", text) if "_" not in p]
    text = ",".join(parts).lower()
    parts = [" ".join(_MEDREGA_CONTRACTIONS.get(w, w) for w in part.split(" "))
             for part in re.split(r"[,:.]", text) if "_" not in part]
    return ",".join(parts).replace("-", " ")


def vqa_tokens(text: str, lang: str, compat: str | None = None) -> list[str]:
    """Tokens used by the VQA metrics for `text` in `lang` under the default or `compat="medrega"` rules."""
    if lang == "en":
        return (medrega_clean_en(text) if compat == "medrega" else normalize_en(text)).split()
    if compat == "medrega":
        return list(_get_jieba().cut(text))  # zh: raw jieba segments, spaces included, as the original
    return tokenize_zh(text)


def _is_closed(ref_tokens: Sequence[str], lang: str, answer_type: str | None) -> bool:
    if answer_type:
        kind = answer_type.strip().upper()
        if kind in ("CLOSED", "OPEN"):
            return kind == "CLOSED"
        raise ValueError(f"answer_type must be CLOSED or OPEN, got {answer_type!r}")
    joined = "".join(ref_tokens) if lang == "zh" else " ".join(ref_tokens)
    return joined in (ZH_CLOSED_ANSWERS if lang == "zh" else {"yes", "no"})


def score_vqa_sample(prediction: str, reference: str, lang: str, answer_type: str | None = None,
                     compat: str | None = None) -> VQASample:
    """Score one answer. `answer_type` (CLOSED/OPEN) overrides the yes/no rule in default mode; compat ignores it."""
    pred = vqa_tokens(prediction, lang, compat)
    ref = vqa_tokens(reference, lang, compat)
    overlap = token_set_scores(pred, ref)
    recall = overlap["recall"]
    exact = " ".join(pred) == " ".join(ref)
    if compat == "medrega":
        f1 = _medrega_f1(set(pred) - {""}, set(ref) - {""})
        if lang == "zh":
            # BLEU-1 on the jieba-joined strings split on whitespace (torchmetrics' tokenizer)
            bleu1 = sentence_bleu1(" ".join(pred).split(), [" ".join(ref).split()])
            # Original quirk: "closed" is decided by the raw prediction; a {"no"} reference also accepts "not"
            if prediction in ("yes", "no"):
                ref_set = (set(ref) - {""}) | ({"not"} if set(ref) - {""} == {"no"} else set())
                recall_c = len(set(pred) & ref_set) / len(ref_set) if ref_set else 0.0
                return VQASample(True, recall_c >= 0.4, recall, f1, bleu1, exact)
            return VQASample(False, recall >= OPEN_ACCURACY_RECALL, recall, f1, bleu1, exact)
        # the original decides "closed" on the cleaned reference *string*: "No " stays "no " and is open
        closed = medrega_clean_en(reference) in ("yes", "no")
    else:
        f1, closed = overlap["f1"], _is_closed(ref, lang, answer_type)
    correct = recall >= (CLOSED_RECALL if closed else OPEN_ACCURACY_RECALL)
    return VQASample(closed, correct, recall, f1, sentence_bleu1(pred, [ref]), exact)


def _medrega_f1(pred: set[str], ref: set[str]) -> float:
    """The original's F1 = 2PR / (P + R + 1e-8) on token sets."""
    common = len(pred & ref)
    p = common / len(pred) if pred else 0.0
    r = common / len(ref) if ref else 0.0
    return 2 * p * r / (p + r + 1e-8)


NO_OPEN_REASON = ("no open question: the original scorer raises NameError (its open-question list is only created "
                  "when it meets an open question)")


def aggregate_vqa(samples: Sequence[VQASample], compat: str | None = None) -> dict[str, float | int | None]:
    """Corpus metrics; a group with no question (e.g. no closed question) gets None, never a fake 0.

    compat="medrega": the original's guards instead: an empty file or no closed question gives 0, and no open
    question gives None for open_recall / open_accuracy (the original crashes there; see NO_OPEN_REASON)."""
    closed = [s for s in samples if s.closed]
    open_ = [s for s in samples if not s.closed]

    def mean(values: list[float]) -> float | None:
        if compat == "medrega" and not values:
            return 0
        return float(np.mean(values)) if values else None

    if compat == "medrega" and not open_:
        open_recall = open_accuracy = None
    else:
        open_recall = mean([s.recall for s in open_])
        open_accuracy = mean([float(s.correct) for s in open_])

    return {"closed_accuracy": mean([float(s.correct) for s in closed]), "open_recall": open_recall,
            "open_accuracy": open_accuracy, "token_f1": mean([s.token_f1 for s in samples]),
            "recall": mean([s.recall for s in samples]), "bleu1": mean([s.bleu1 for s in samples]),
            "exact_match": mean([float(s.exact_match) for s in samples]), "num_closed": len(closed),
            "num_open": len(open_)}


def says_not_visible(text: str) -> bool:
    """True when an answer says the asked-for object is not in the image ("is not visible", "未见X", ...; "未见异常",
    "no abnormality seen", does not count)."""
    return _NOT_VISIBLE_RE.search(text) is not None
