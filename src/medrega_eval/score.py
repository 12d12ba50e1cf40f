"""Score prediction records for one task: per-sample rows + corpus metrics under the top-level summary names.

Tasks: vqa, report, classification, region2text, text2region (subtypes ss/sm/ms/mm), grounded_report. The language
is per record (`lang` field, else the config's `lang`, else detected: CJK characters in the reference -> zh).
`compat="medrega"` switches every task to the original MedRegA scorers' behaviour (docs/evaluation.md lists each
difference). Bad references (unknown class label, malformed reference boxes) are problems, counted and listed, and
the sample is left out of the metrics; bad *predictions* are always scored (as wrong / as a miss) and counted.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from internvl.data.records import RecordProblem
from internvl.regions import has_regions, strip_regions
from medrega_eval.io import PredictionRecord
from medrega_eval.metrics import classification as cls_m
from medrega_eval.metrics import regions as reg_m
from medrega_eval.metrics import text as text_m
from medrega_eval.metrics import vqa as vqa_m

__all__ = ["TASKS", "SUBTYPES", "REPORT_METRICS", "ScoreConfig", "ScoreResult", "score_records", "record_lang"]

TASKS = ("vqa", "report", "classification", "region2text", "text2region", "grounded_report")
SUBTYPES = ("ss", "sm", "ms", "mm")
REPORT_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougeL", "cider")


@dataclass
class ScoreConfig:
    """What to score and how. `options` may be a list or {lang: list} (classification); `metrics` limits report
    metrics (e.g. leave out METEOR on a machine without Java)."""

    task: str
    lang: str | None = None
    subtype: str | None = None
    compat: str | None = None
    options: list[str] | dict[str, list[str]] | None = None
    multilabel: bool = False
    metrics: list[str] | None = None
    bertscore_model: str | None = None  # local model dir; BERTScore is computed only when given

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.lang not in (None, "auto", "en", "zh"):
            raise ValueError(f"unknown language {self.lang!r}; choose en, zh or auto")
        if self.subtype is not None and self.subtype not in SUBTYPES:
            raise ValueError(f"unknown subtype {self.subtype!r}; choose one of {', '.join(SUBTYPES)}")
        if self.compat not in (None, "medrega"):
            raise ValueError(f"unknown compat mode {self.compat!r}; the only one is 'medrega'")
        if self.compat == "medrega" and self.task == "text2region" and self.subtype is None:
            raise ValueError("--compat medrega for text2region needs --subtype (ss, sm, ms or mm): "
                             "the original has one scorer per subtype")
        if self.metrics:
            unknown = sorted(set(self.metrics) - set(REPORT_METRICS) - {"rouge1"})
            if unknown:
                raise ValueError(f"unknown report metric(s) {unknown}; choose from {', '.join(REPORT_METRICS)}")


@dataclass
class ScoreResult:
    """metrics: top-level summary names; details: everything else; rows: one per scored sample."""

    metrics: dict[str, Any]
    details: dict[str, Any]
    rows: list[dict]
    problems: list[RecordProblem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def record_lang(rec: PredictionRecord, cfg: ScoreConfig) -> str:
    """The record's language: its own field, the configured one, else 'zh' when the reference has CJK."""
    if rec.lang:
        return rec.lang
    if cfg.lang in ("en", "zh"):
        return cfg.lang
    return "zh" if text_m.has_cjk(rec.reference) else "en"


def _row(rec: PredictionRecord, lang: str, scores: dict[str, Any], **extra: Any) -> dict:
    row = {"id": rec.id, "source": rec.source, "lang": lang, "prediction": rec.prediction,
           "reference": rec.reference, "scores": scores}
    if rec.question is not None:
        row["question"] = rec.question
    if rec.image is not None:
        row["image"] = rec.image
        if rec.image_root:
            row["image_root"] = rec.image_root
    if rec.hw is not None:
        row["hw"] = rec.hw
    row.update(extra)
    return row


def _loc(rec: PredictionRecord) -> tuple[str, int]:
    """(file, line) of a record's source "FILE:LINE"."""
    file, _, line = rec.source.rpartition(":")
    return (file, int(line)) if line.isdigit() else (rec.source, 0)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


# ---------------------------------------------------------------------------------------------------- reports
_DEID = re.compile(r"_{2,}")


def _report_tokens(text: str, lang: str) -> list[str]:
    """Default report tokens: pycocoevalcap-style PTB tokens (EN) or jieba segments (ZH); MIMIC '___' removed."""
    return text_m.tokenize(_DEID.sub(" ", text), lang)


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


def _report_metrics(preds: list[str], refs: list[str], langs: list[str], cfg: ScoreConfig,
                    result: ScoreResult) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Corpus and per-sample report metrics for parallel lists of texts."""
    wanted = set(cfg.metrics or REPORT_METRICS)
    n = len(preds)
    per = [dict() for _ in range(n)]
    out: dict[str, Any] = {}
    if n == 0:
        return out, per
    if cfg.compat == "medrega":
        return _report_metrics_medrega(preds, refs, langs, wanted, result)
    cands = [_report_tokens(p, lang) for p, lang in zip(preds, langs)]
    gts = [[_report_tokens(r, lang)] for r, lang in zip(refs, langs)]
    bleu, bleu_per = text_m.coco_bleu(cands, gts, n=4)
    for k in range(4):
        if f"bleu{k + 1}" in wanted:
            out[f"bleu{k + 1}"] = bleu[k]
            for i in range(n):
                per[i][f"bleu{k + 1}"] = bleu_per[k][i]
    if "rougeL" in wanted:
        out["rougeL"], scores = text_m.corpus_rouge_l(cands, gts)
        for i, s in enumerate(scores):
            per[i]["rougeL"] = s
    if "cider" in wanted:
        out["cider"], scores = text_m.coco_cider(cands, gts)
        for i, s in enumerate(scores):
            per[i]["cider"] = s
    if "meteor" in wanted:
        _meteor(cands, gts, out, per, result)
    return out, per


def _meteor(cands, gts, out, per, result: ScoreResult) -> None:
    try:
        out["meteor"], scores = text_m.coco_meteor(cands, gts)
    except text_m.MetricUnavailable as exc:
        out["meteor"] = None
        result.unavailable["meteor"] = str(exc)
        return
    for i, s in enumerate(scores):
        per[i]["meteor"] = s


def _report_metrics_medrega(preds, refs, langs, wanted, result) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """The original scorers: EN corpus HF-BLEU on 13a tokens + rouge-score; ZH per-sample HF-BLEU on jieba tokens,
    rouge-score on jieba-spaced text (CJK dropped by its tokenizer) with rouge1/rougeL swapped."""
    from rouge_score import rouge_scorer

    n = len(preds)
    per = [dict() for _ in range(n)]
    out: dict[str, Any] = {}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    if all(lang == "en" for lang in langs):
        p_clean = [medrega_clean_report_en(p) for p in preds]
        r_clean = [medrega_clean_report_en(r) for r in refs]
        cands = [text_m.tokenize_13a(p) for p in p_clean]
        gts = [[text_m.tokenize_13a(r)] for r in r_clean]
        out["bleu1"] = text_m.hf_bleu(cands, gts, max_order=1)
        out["bleu4"] = text_m.hf_bleu(cands, gts, max_order=4)
        rouge = [scorer.score(r, p) for p, r in zip(p_clean, r_clean)]
        for i, s in enumerate(rouge):
            per[i].update(rouge1=s["rouge1"].fmeasure, rougeL=s["rougeL"].fmeasure)
        out["rouge1"] = _mean([s["rouge1"].fmeasure for s in rouge])
        out["rougeL"] = _mean([s["rougeL"].fmeasure for s in rouge])
    elif all(lang == "zh" for lang in langs):
        jieba = text_m._get_jieba()
        # predictions: cleanStr_zh + spaces removed; references: raw. Both jieba-joined with spaces, then HF BLEU's
        # 13a tokenizer; HF ROUGE on the jieba-joined strings (rouge-score drops the CJK characters)
        res = [" ".join(jieba.cut(medrega_clean_report_zh(p).replace(" ", ""))) for p in preds]
        gt = [" ".join(jieba.cut(r)) for r in refs]
        cands = [text_m.tokenize_13a(x) for x in res]
        gts = [[text_m.tokenize_13a(x)] for x in gt]
        for i in range(n):
            per[i]["bleu1"] = text_m.hf_bleu([cands[i]], [gts[i]], max_order=1)
            per[i]["bleu4"] = text_m.hf_bleu([cands[i]], [gts[i]], max_order=4)
            s = scorer.score(gt[i], res[i])
            # the original stores rouge1 under rougeL and rougeL under rouge1
            per[i].update(rougeL=s["rouge1"].fmeasure, rouge1=s["rougeL"].fmeasure)
        for k in ("bleu1", "bleu4", "rougeL", "rouge1"):
            out[k] = _mean([p[k] for p in per])
        cands = [x.split() for x in res]  # METEOR on jieba tokens (the original: NLTK; here the METEOR 1.5 jar)
        gts = [[x.split()] for x in gt]
    else:
        raise ValueError("--compat medrega scores one language at a time (the original has separate EN and ZH "
                         "scorers); split the file or pass --lang")
    if "meteor" in wanted:
        _meteor(cands, gts, out, per, result)
    return out, per


# ------------------------------------------------------------------------------------------------- per task
def _score_vqa(records, cfg, result) -> None:
    samples = []
    for rec in records:
        lang = record_lang(rec, cfg)
        s = vqa_m.score_vqa_sample(rec.prediction, rec.reference, lang, rec.answer_type, cfg.compat)
        samples.append(s)
        result.rows.append(_row(rec, lang, {"closed": s.closed, "correct": s.correct, "recall": s.recall,
                                            "token_f1": s.f1, "bleu1": s.bleu1, "exact_match": s.exact_match}))
    agg = vqa_m.aggregate_vqa(samples)
    for k in ("closed_accuracy", "open_recall", "open_accuracy", "token_f1", "recall", "bleu1", "exact_match"):
        result.metrics[k] = agg[k]
    result.details.update(num_closed=agg["num_closed"], num_open=agg["num_open"])
    # "locate X" for an absent X: the reference says "not visible"; right when the prediction says so and draws no box
    absent = [vqa_m.says_not_visible(r.prediction) and not has_regions(r.prediction)
              for r in records if vqa_m.says_not_visible(r.reference)]
    if absent:
        result.metrics["absent_accuracy"] = _mean(absent)
        result.counts["absent_questions"] = len(absent)


def _language_match(records: Sequence[PredictionRecord], result: ScoreResult) -> None:
    """lang_match: share of answers written in the question's language (text_m.text_language, the CJK-share rule),
    over records with a question whose reference is in the question's language (a Chinese question whose reference
    is "CT" says nothing about the answer's language and is left out)."""
    hits: dict[str, list[bool]] = {"en": [], "zh": []}
    for rec in records:
        q = text_m.text_language(rec.question) if rec.question else None
        if q is None or text_m.text_language(rec.reference) != q:
            continue
        hits[q].append(text_m.text_language(rec.prediction) == q)
    both = hits["en"] + hits["zh"]
    if both:
        result.metrics["lang_match"] = _mean(both)
        result.details.update(lang_match_en=_mean(hits["en"]), lang_match_zh=_mean(hits["zh"]))
        result.counts["lang_match_records"] = len(both)


def _options_for(rec: PredictionRecord, lang: str, cfg: ScoreConfig) -> list[str] | None:
    if rec.options:
        return rec.options
    if isinstance(cfg.options, dict):
        return cfg.options.get(lang)
    return cfg.options


def _score_classification(records, cfg, result) -> None:
    y_true, y_pred, unmapped_total = [], [], 0
    all_options: list[str] = []
    for rec in records:
        lang = record_lang(rec, cfg)
        options = _options_for(rec, lang, cfg)
        if not options:
            result.problems.append(RecordProblem(*_loc(rec), "no-options", "no option list for this record: give the "
                                                 "record an 'options' field, --options, or a benchmark with options"))
            continue
        try:
            truth = cls_m.reference_labels(rec.reference, options, cfg.multilabel, cfg.compat)
        except cls_m.UnknownLabel as exc:
            result.problems.append(RecordProblem(*_loc(rec), "unknown-label", str(exc)))
            continue
        labels, unmapped = cls_m.map_answer(rec.prediction, options, cfg.multilabel, cfg.compat)
        unmapped_total += bool(unmapped)
        for o in options:
            if o not in all_options:
                all_options.append(o)
        y_true.append(truth)
        y_pred.append(labels)
        correct = set(truth) == set(labels)
        result.rows.append(_row(rec, lang, {"correct": correct}, reference_labels=truth, predicted_labels=labels,
                                unmapped=unmapped))
    m = cls_m.classification_metrics(y_true, y_pred, all_options, cfg.multilabel, cfg.compat)
    result.metrics.update(m)
    result.counts["unmapped_answers"] = int(unmapped_total)


_BOX_TEXT = re.compile(r"<box>.*?</box>|\[\[[^\[\]]*(?:\][^\[\]]*)*?\]\]", re.DOTALL)


def _score_region2text(records, cfg, result) -> None:
    bleu, f1, rec_, acc = [], [], [], []
    for rec in records:
        lang = record_lang(rec, cfg)
        if cfg.compat == "medrega":
            pred = re.sub(r"\[\[.*?\]\]", "", rec.prediction.lower()).split()
            ref = rec.reference.lower().split()
        else:
            clean = _BOX_TEXT.sub(" ", rec.prediction).replace("<ref>", "").replace("</ref>", "")
            pred = text_m.tokenize(clean, lang)
            ref = text_m.tokenize(rec.reference.replace("<ref>", "").replace("</ref>", ""), lang)
        overlap = text_m.token_set_scores(pred, ref)
        if cfg.compat == "medrega":
            overlap["f1"] = vqa_m._medrega_f1(set(pred), set(ref))
        b1 = text_m.sentence_bleu1(pred, [ref])
        ok = overlap["recall"] >= vqa_m.OPEN_ACCURACY_RECALL
        bleu.append(b1), f1.append(overlap["f1"]), rec_.append(overlap["recall"]), acc.append(float(ok))
        result.rows.append(_row(rec, lang, {"bleu1": b1, "token_f1": overlap["f1"], "recall": overlap["recall"],
                                            "correct": ok}))
    result.metrics.update(bleu1=_mean(bleu), token_f1=_mean(f1), recall=_mean(rec_), accuracy=_mean(acc))


def _region_part(records, cfg, result, texts_pred=None) -> None:
    """Box metrics of text2region / grounded_report; appends rows (or extends rows already made)."""
    preds, refs, samples, compat_vals = [], [], [], []
    parse_errors = 0
    error_examples: list[str] = []
    kept_rows = []
    for k, rec in enumerate(records):
        lang = record_lang(rec, cfg)
        ref = reg_m.parse_for_scoring(rec.reference, rec.hw)
        if ref.errors or not ref.boxes:
            reason = "; ".join(ref.errors) if ref.errors else "the reference has no box"
            result.problems.append(RecordProblem(*_loc(rec), "bad-reference-boxes", reason))
            continue
        pred = reg_m.parse_for_scoring(rec.prediction, rec.hw)
        parse_errors += len(pred.errors)
        for err in pred.errors:
            if len(error_examples) < 20:
                error_examples.append(f"{rec.source}: id {rec.id}: prediction box ignored: {err}")
        unparsable = not pred.boxes
        sample = reg_m.score_region_sample(pred.boxes, ref.boxes, unparsable)
        samples.append(sample)
        preds.append(pred.boxes)
        refs.append(ref.boxes)
        scores: dict[str, Any] = sample.metrics()
        extra: dict[str, Any] = {}
        if cfg.compat == "medrega" and cfg.task == "text2region":
            cv = reg_m.medrega_sample(pred.boxes, ref.boxes, cfg.subtype)
            compat_vals.append(cv)
            extra["medrega"] = cv
        row = _row(rec, lang, scores, **extra,
                   pred_boxes=[{"name": b.name, "box": list(b.grid)} for b in pred.boxes],
                   ref_boxes=[{"name": b.name, "box": list(b.grid)} for b in ref.boxes],
                   matches=[{"pred": i, "ref": j, "iou": iou} for i, j, iou in sample.pairs],
                   parse_errors=pred.errors, unparsable=unparsable)
        kept_rows.append((k, row))
    agg = reg_m.aggregate_regions(samples)
    top = ("iou", "acc25", "acc50", "acc75", "precision", "recall", "f1")
    if cfg.compat == "medrega" and cfg.task == "text2region":
        # the original's numbers: its own names in details.medrega, mapped onto the summary names at the top level
        original = reg_m.aggregate_medrega(compat_vals, cfg.subtype)
        result.details["medrega"] = original
        result.metrics.update({k: original[v] for k, v in reg_m.MEDREGA_TOP[cfg.subtype].items() if v in original})
        result.details["default_metrics"] = {k: agg.get(k) for k in top}
    else:
        result.metrics.update({k: agg.get(k) for k in top})
    result.metrics["map50"] = reg_m.coco_map50(preds, refs) if refs else None
    # share of predictions with at least one parseable box (free-form Text-to-Region prompts must give a box)
    result.metrics["box_rate"] = _mean([not s.unparsable for s in samples]) if samples else None
    result.details.update({k: v for k, v in agg.items() if k not in top})
    result.counts["unparsable_predictions"] = int(agg.get("unparsable", 0)) if agg else 0
    result.counts["malformed_pred_boxes"] = parse_errors
    if error_examples:
        result.details["malformed_pred_box_examples"] = error_examples
    return kept_rows


def _score_text2region(records, cfg, result) -> None:
    result.rows.extend(row for _, row in _region_part(records, cfg, result))


def _score_report(records, cfg, result, grounded: bool = False) -> None:
    langs = [record_lang(r, cfg) for r in records]
    preds = [strip_regions(r.prediction) if grounded else r.prediction for r in records]
    refs = [strip_regions(r.reference) if grounded else r.reference for r in records]
    out, per = _report_metrics(preds, refs, langs, cfg, result)
    result.metrics.update(out)
    if grounded:
        # every record gets text scores; region scores only where the reference boxes parse
        region_rows = dict(_region_part(records, cfg, result))
        for k, rec in enumerate(records):
            row = region_rows.get(k) or _row(rec, langs[k], {})
            row["scores"] = {**per[k], **row["scores"]}
            row["text_prediction"], row["text_reference"] = preds[k], refs[k]
            result.rows.append(row)
    else:
        for rec, lang, scores in zip(records, langs, per):
            result.rows.append(_row(rec, lang, scores))


def _bertscore(records, cfg, result) -> None:
    """BERTScore F1 from the local model; rows are matched by id (grounded: on the box-free text)."""
    from medrega_eval.metrics.model_based import bertscore

    grounded = cfg.task == "grounded_report"
    by_id = {r.id: r for r in records}
    rows = [row for row in result.rows if row["id"] in by_id]
    cands = [strip_regions(by_id[row["id"]].prediction) if grounded else by_id[row["id"]].prediction for row in rows]
    refs = [strip_regions(by_id[row["id"]].reference) if grounded else by_id[row["id"]].reference for row in rows]
    try:
        mean, per = bertscore(cands, refs, cfg.bertscore_model)
    except text_m.MetricUnavailable as exc:
        result.metrics["bertscore"] = None
        result.unavailable["bertscore"] = str(exc)
        return
    result.metrics["bertscore"] = mean
    for row, value in zip(rows, per):
        row["scores"]["bertscore"] = value


def score_records(records: Sequence[PredictionRecord], cfg: ScoreConfig,
                  problems: Sequence[RecordProblem] = ()) -> ScoreResult:
    """Score `records` for `cfg.task`; `problems` from reading the file are carried into the result."""
    cfg.validate()
    result = ScoreResult(metrics={}, details={}, rows=[], problems=list(problems))
    records = list(records)
    result.counts["empty_predictions"] = sum(not r.prediction.strip() for r in records)
    if cfg.task == "vqa":
        _score_vqa(records, cfg, result)
    elif cfg.task == "report":
        _score_report(records, cfg, result)
    elif cfg.task == "grounded_report":
        _score_report(records, cfg, result, grounded=True)
    elif cfg.task == "classification":
        _score_classification(records, cfg, result)
    elif cfg.task == "region2text":
        _score_region2text(records, cfg, result)
    elif cfg.task == "text2region":
        _score_text2region(records, cfg, result)
    if cfg.bertscore_model and cfg.task in ("vqa", "report", "region2text", "grounded_report"):
        _bertscore(records, cfg, result)
    _language_match(records, result)
    result.counts["records"] = len(records)
    result.counts["scored"] = len(result.rows)
    langs = sorted({row["lang"] for row in result.rows})
    result.details["languages"] = langs
    return result


# Summary key order: the top-level names first, then compat-only names.
TOP_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougeL", "cider", "closed_accuracy", "open_recall",
               "open_accuracy", "token_f1", "exact_match", "accuracy", "macro_f1", "recall", "iou", "acc25", "acc50",
               "acc75", "precision", "f1", "map50", "rouge1", "bertscore", "box_rate", "absent_accuracy", "lang_match")


def summarize(result: ScoreResult, cfg: ScoreConfig, protocol: dict[str, Any], benchmark: str | None = None,
              max_problems: int = 500) -> dict[str, Any]:
    """The summary.json object: top-level metrics (fractions; CIDEr as pycocoevalcap reports it), counts, problems."""
    counts = dict(result.counts)
    from medrega_eval.io import problem_counts

    for reason, n in problem_counts(result.problems).items():
        counts[f"problem:{reason}"] = n
    summary: dict[str, Any] = {"task": cfg.task, "benchmark": benchmark, "lang": cfg.lang, "subtype": cfg.subtype,
                               "compat": cfg.compat}
    for k in TOP_METRICS:
        if k in result.metrics:
            summary[k] = result.metrics[k]
    summary["num_samples"] = counts.get("scored", 0)
    summary["counts"] = counts
    summary["problems"] = [str(p) for p in result.problems[:max_problems]]
    if len(result.problems) > max_problems:
        summary["problems"].append(f"... and {len(result.problems) - max_problems} more")
    summary["unavailable"] = dict(result.unavailable)
    summary["details"] = result.details
    summary["protocol"] = protocol
    return summary
