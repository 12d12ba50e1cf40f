"""Classification / diagnosis metrics: free-text answer -> option mapping, accuracy, macro-F1, multi-label F1.

Default mapping of one answer (part): exact normalized match, else the longest option named in the answer, else the
best token-F1 option; no shared token -> *unmapped* (wrong, reported, never guessed). `compat="medrega"` reproduces
`src/eval/cls`: argmax of BLEU-1 against the lower-cased options (the first wins ties, even all-zero ones), exact
reference lookup, sklearn's macro-F1. docs/evaluation.md has both in full.
"""
from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Iterable, Sequence

from medrega_eval.metrics.text import sentence_bleu1, token_set_scores

__all__ = ["UnknownLabel", "normalize_label", "map_to_option", "map_answer", "reference_labels",
           "classification_metrics"]

_SPLIT = re.compile(r"[,;，；、\n]")


class UnknownLabel(ValueError):
    """A reference label that is not in the option list (a data error: names the label and the options)."""


def normalize_label(text: str) -> str:
    """NFKC, lower-case, punctuation to spaces, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def map_to_option(answer: str, options: Sequence[str], compat: str | None = None) -> str | None:
    """Map one answer (part) to an option name, or None when nothing matches (default rules only)."""
    if compat == "medrega":
        part = answer.lower()
        scores = [sentence_bleu1(part.split(), [o.lower().split()]) for o in options]
        return options[max(range(len(options)), key=lambda i: (scores[i], -i))]
    norm = normalize_label(answer)
    if not norm:
        return None
    norm_options = [normalize_label(o) for o in options]
    for opt, n in zip(options, norm_options):
        if n == norm:
            return opt
    padded = f" {norm} "
    contained = [(len(n), -i) for i, n in enumerate(norm_options) if n and f" {n} " in padded]
    if contained:
        return options[-max(contained)[1]]
    tokens = norm.split()
    f1s = [token_set_scores(tokens, n.split())["f1"] for n in norm_options]
    best = max(range(len(options)), key=lambda i: (f1s[i], -i))
    return options[best] if f1s[best] > 0 else None


def map_answer(answer: str, options: Sequence[str], multilabel: bool, compat: str | None = None
               ) -> tuple[list[str], list[str]]:
    """(mapped labels without duplicates, unmapped answer parts) for one prediction."""
    labels: list[str] = []
    unmapped: list[str] = []
    if compat == "medrega":
        # the original: strip trailing ASCII punctuation, ", " -> ",", lower, split on ","; single-label keeps part 1
        parts = answer.rstrip(string.punctuation).replace(", ", ",").lower().split(",")
        parts = parts if multilabel else parts[:1]
    else:  # multi-label: the comma/semicolon parts (full-width too)
        parts = [p.strip() for p in _SPLIT.split(answer) if p.strip()] if multilabel else [answer]
    for part in parts:
        label = map_to_option(part, options, compat)
        if label is None:
            unmapped.append(part)
        elif label not in labels:
            labels.append(label)
    return labels, unmapped


def reference_labels(reference: str, options: Sequence[str], multilabel: bool, compat: str | None = None) -> list[str]:
    """Reference labels; every one must be an option (exact in compat mode, normalized otherwise)."""
    if compat == "medrega":  # looked up exactly, case-sensitive, as the original
        gt = reference.rstrip(string.punctuation).replace(", ", ",")
        parts, key = (gt.split(",") if multilabel else [gt]), str
    else:
        parts, key = [p.strip() for p in (reference.split(",") if multilabel else [reference])], normalize_label
    lookup = {key(o): o for o in options}
    out: list[str] = []
    for part in parts:
        if not part:
            continue
        label = lookup.get(key(part))
        if label is None:
            raise UnknownLabel(f"reference label {part!r} is not one of the options {list(options)!r}")
        if label not in out:
            out.append(label)
    if not out:
        raise UnknownLabel("empty reference label")
    return out


def _f1(tp: int, fp: int, fn: int) -> float:
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def classification_metrics(y_true: Sequence[Iterable[str]], y_pred: Sequence[Iterable[str]], options: Sequence[str],
                           multilabel: bool, compat: str | None = None) -> dict[str, float | None]:
    """accuracy (subset accuracy for multi-label), macro_f1 and, for multi-label, micro `f1`.

    Macro-F1 averages per-label F1 (= 2TP / (2TP + FP + FN)). Default: over the labels that occur in the references or
    the predictions. compat="medrega": multi-label over every option column (absent labels count 0, as sklearn's
    zero_division=0 on one-hot arrays), single-label over labels seen in references or predictions (sklearn).
    """
    true_sets = [set(t) for t in y_true]
    pred_sets = [set(p) for p in y_pred]
    if not true_sets:
        return {"accuracy": None, "macro_f1": None, **({"f1": None} if multilabel else {})}
    accuracy = sum(t == p for t, p in zip(true_sets, pred_sets)) / len(true_sets)
    seen = set().union(*true_sets, *pred_sets)
    labels = list(options) if (multilabel and compat == "medrega") else [o for o in options if o in seen]
    per_label = []
    tp_all = fp_all = fn_all = 0
    for label in labels:
        tp = sum(label in t and label in p for t, p in zip(true_sets, pred_sets))
        fp = sum(label not in t and label in p for t, p in zip(true_sets, pred_sets))
        fn = sum(label in t and label not in p for t, p in zip(true_sets, pred_sets))
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
        per_label.append(_f1(tp, fp, fn))
    out: dict[str, float | None] = {"accuracy": accuracy,
                                    "macro_f1": sum(per_label) / len(per_label) if per_label else 0.0}
    if multilabel:
        out["f1"] = _f1(tp_all, fp_all, fn_all)
    return out
