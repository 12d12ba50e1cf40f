"""The original MedRegA report scorers (`--compat medrega`): their text cleaning, BLEU/ROUGE/METEOR recipe per
language, and the spread of the EN ROUGE bootstrap (docs/evaluation.md lists each difference from the default mode).

`result` is the caller's `medrega_eval.score.ScoreResult` (its `details` and `unavailable` dicts are filled here).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from medrega_eval.io import ScoreInputError
from medrega_eval.metrics import text as text_m

__all__ = ["medrega_clean_report_en", "medrega_clean_report_zh", "mean_or_none", "rouge_bootstrap_spread",
           "report_metrics_medrega", "ROUGE_BOOTSTRAP_SEEDS"]


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean, or None for no values (a metric over nothing is not 0)."""
    return float(np.mean(values)) if len(values) else None


def medrega_clean_report_en(text: str) -> str:
    """The original report `cleanStr`: lower-case, split on [,:.\\n], drop empty parts and parts with '_',
    join with '.', collapse whitespace."""
    parts = [p.strip() for p in re.split(r"[,:.\n]", text.lower())]
    return " ".join(".".join(p for p in parts if p and "_" not in p).split())


def medrega_clean_report_zh(text: str) -> str:
    """The original `cleanStr_zh`, step for step: drop [..], remaining '[' -> ' ', ']' -> '', drop '-', lower-case,
    split on newlines, in each line remove every 'digits.' (also inside decimals: '2.5' -> '5'), strip, drop empty
    lines, join with '，', then '：，' -> '：' and '。，' -> '，'. (The original applies it to predictions only.)"""
    text = re.sub(r"\[.*?\]", "", text).replace("[", " ").replace("]", "")
    text = text.replace("-", "")
    parts = [re.sub(r"\d+\.", "", part).strip() for part in text.lower().split("\n")]
    text = "，".join(p for p in parts if p)
    return text.replace("：，", "：").replace("。，", "，")


ROUGE_BOOTSTRAP_SEEDS = 20


def rouge_bootstrap_spread(preds: list[str], refs: list[str], seeds: int = ROUGE_BOOTSTRAP_SEEDS) -> dict[str, Any]:
    """What HF `evaluate`'s rouge reports for the original EN scorer, over `seeds` seeds: rouge-score's
    BootstrapAggregator (1000 resamples, unseeded in the original) mid F-measure; min and max per key. The global
    numpy random state is restored afterwards."""
    from rouge_score import rouge_scorer, scoring

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    scores = [scorer.score(r, p) for p, r in zip(preds, refs)]
    mids: dict[str, list[float]] = {"rouge1": [], "rougeL": []}
    state = np.random.get_state()
    try:
        for seed in range(seeds):
            np.random.seed(seed)
            agg = scoring.BootstrapAggregator()
            for s in scores:
                agg.add_scores(s)
            result = agg.aggregate()
            for k in mids:
                mids[k].append(float(result[k].mid.fmeasure))
    finally:
        np.random.set_state(state)
    return {k: {"min": min(v), "max": max(v), "seeds": seeds} for k, v in mids.items()}


def report_metrics_medrega(preds, refs, langs, wanted, result) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """The original scorers: EN corpus HF-BLEU on 13a tokens + rouge-score; ZH per-sample HF-BLEU on jieba tokens,
    rouge-score on jieba-spaced text (CJK dropped by its tokenizer) with rouge1/rougeL swapped; METEOR = NLTK's
    on word_tokenize (EN) / jieba (ZH) tokens with WordNet (medrega_eval.metrics.meteor)."""
    from rouge_score import rouge_scorer

    from medrega_eval.metrics import meteor as meteor_m

    per: list[dict[str, float]] = [{} for _ in preds]
    out: dict[str, Any] = {}
    if all(lang == "en" for lang in langs):
        texts = [medrega_clean_report_en(p) for p in preds], [medrega_clean_report_en(r) for r in refs]
        m_hyp, m_ref = ([meteor_m.tokenize_en(t) for t in side] for side in texts)
    elif all(lang == "zh" for lang in langs):
        # predictions: cleanStr_zh + spaces removed; references: raw. METEOR takes their raw jieba tokens; BLEU (13a
        # tokens) and ROUGE (rouge-score, which drops the CJK characters) the jieba tokens joined with spaces
        jieba = text_m._get_jieba()
        res_raw = [medrega_clean_report_zh(p).replace(" ", "") for p in preds]
        m_hyp, m_ref = [list(jieba.cut(x)) for x in res_raw], [list(jieba.cut(r)) for r in refs]
        texts = [" ".join(t) for t in m_hyp], [" ".join(t) for t in m_ref]
    else:
        raise ScoreInputError("--compat medrega scores one language at a time (the original has separate EN and ZH "
                              "scorers); split the file or pass --lang")
    cands, gts = [text_m.tokenize_13a(p) for p in texts[0]], [[text_m.tokenize_13a(r)] for r in texts[1]]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    rouge = [scorer.score(r, p) for p, r in zip(*texts)]
    if langs[0] == "en":
        out["bleu1"] = text_m.hf_bleu(cands, gts, max_order=1)  # corpus BLEU, no per-sample value
        out["bleu4"] = text_m.hf_bleu(cands, gts, max_order=4)
        for row, s in zip(per, rouge):
            row.update(rouge1=s["rouge1"].fmeasure, rougeL=s["rougeL"].fmeasure)
        # HF evaluate reports a bootstrap median (random); the plain mean above estimates it, the spread bounds it
        result.details["rouge_bootstrap"] = rouge_bootstrap_spread(*texts)
    else:
        for row, cand, ref, s in zip(per, cands, gts, rouge):
            # per-sample BLEU; the original stores rouge1 under rougeL and rougeL under rouge1
            row.update(bleu1=text_m.hf_bleu([cand], [ref], max_order=1),
                       bleu4=text_m.hf_bleu([cand], [ref], max_order=4),
                       rougeL=s["rouge1"].fmeasure, rouge1=s["rougeL"].fmeasure)
    out.update({k: mean_or_none([row[k] for row in per]) for k in per[0]})  # the per-sample ones' means
    if "meteor" in wanted:
        try:
            scores = meteor_m.meteor_scores(m_hyp, m_ref)
        except text_m.MetricUnavailable as exc:
            out["meteor"] = None
            result.unavailable["meteor"] = str(exc)
        else:
            out["meteor"] = mean_or_none(scores)
            for row, v in zip(per, scores):
                row["meteor"] = v
    return out, per
